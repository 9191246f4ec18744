"""The servers under test, each a real process on a free loopback port, and /proc sampling.

- ``echo``: ``echoctl serve`` (Echo's production entry point) on a copy of ``bench/project``,
  native transport (``ECHO_TRANSPORT=native``);
- ``echo-pysio``: the same Echo on its python-socketio transport (``ECHO_TRANSPORT=python-socketio``);
- ``echo@REF``: Echo as committed at a git ref (``echo/`` snapshotted with ``git archive``, first on
  ``PYTHONPATH``), e.g. the "before" of a change measured in the same run as the "after";
- ``node``: ``bench/node/baseline-server.mjs``, a minimal socket.io 4.x server (the seed's stack);
- ``pysio``: ``bench/baseline_pysio.py``, python-socketio under ``uvicorn.run`` defaults;
- ``redis``: a private ``redis-server`` for the scale-out scenarios.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
NODE_DIR = BENCH / "node"
PROJECT = BENCH / "project"
SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
APP = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

TARGETS = ("echo", "node", "pysio")  # the default set; ``echo-pysio`` and ``echo@REF`` on request
EXTRA_TARGETS = ("echo-pysio",)
LABELS = {"echo": "Echo", "echo-pysio": "Echo (python-socketio transport)", "node": "Node socket.io",
          "pysio": "python-socketio"}
SHORT = {"echo": "Echo", "echo-pysio": "Echo on py-sio", "node": "Node", "pysio": "py-sio"}


def ref_of(target: str) -> str | None:
    """The git ref of an ``echo@REF`` target, None for every other target."""
    return target.split("@", 1)[1] if target.startswith("echo@") else None


def family(target: str) -> str:
    """``echo`` for every Echo target (so Echo-only scenarios run them all), else the target."""
    return "echo" if target in ("echo", *EXTRA_TARGETS) or ref_of(target) else target


def is_product(target: str) -> bool:
    """The Echo being built (working tree, either transport): the exit status is gated on it."""
    return family(target) == "echo" and ref_of(target) is None


def known(target: str) -> bool:
    return target in TARGETS or target in EXTRA_TARGETS or bool(ref_of(target))


def label(target: str) -> str:
    ref = ref_of(target)
    return f"Echo before ({ref})" if ref else LABELS.get(target, target)


def short_label(target: str) -> str:
    return "Echo before" if ref_of(target) else SHORT.get(target, target)


class ServerFailed(RuntimeError):
    """A server did not start (or died): the bench run fails."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def token(app: str = APP) -> str:
    from echo.core.auth import issue_token

    return issue_token(SECRET, app)


# ---- /proc --------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    children = _children_map()
    tree: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_KB
        except OSError:
            continue
    return total / 1024


# ---- processes ----------------------------------------------------------------------------


@dataclass
class Server:
    """One server process; ``pids()`` is its process tree (Echo's function workers included)."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_url: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    interrupted: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_path.parent,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise ServerFailed(f"{self.name} exited with {code}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ServerFailed(f"{self.name} not ready within {timeout}s:\n{self.log()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        return process_tree(self.process.pid) if self.process is not None and self.alive() else []

    def interrupt(self) -> None:
        """Ask it to stop (Ctrl+C); ``stop`` waits for it, killing it after 8 s."""
        if self.process is not None and self.alive() and not self.interrupted:
            self.interrupted = True
            self.process.send_signal(signal.SIGINT)

    def stop(self) -> None:
        if self.process is None or not self.alive():
            return
        self.interrupt()
        try:
            self.process.wait(8)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL the whole process tree (a node that dies); ``start`` runs it again."""
        if self.process is not None and self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.interrupted = False

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-3000:]


def echoctl() -> str:
    beside = Path(sys.executable).parent / "echoctl"
    found = str(beside) if beside.exists() else shutil.which("echoctl")
    if not found:
        raise ServerFailed("echoctl not found: install Echo into the venv (./scripts/test does)")
    return found


HISTORY_RULES = (
    {"channelName": "h:*", "functionNames": [], "history": {"size": 100, "ttl": 600}},
    {"channelName": "hf1:*", "functionNames": ["bench-a"], "history": {"size": 100, "ttl": 600}},
)
"""Channels ``h:...`` keep history (Echo's default size and ttl) for the history scenarios,
``hf1:...`` also run one function (the soak with ``--history``); only in the project of the
Echo being built: an Echo before history refuses the key."""


def make_project(root: Path, history: bool = True, name: str = "project") -> Path:
    """A throw-away copy of bench/project, so a run writes nothing into the repository."""
    project = root / name
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    if history:
        associations = project / "associations.json"
        data = json.loads(associations.read_text())
        data["applications"][APP]["channels"].extend(HISTORY_RULES)
        associations.write_text(json.dumps(data, indent=2))
    return project


# Where each Echo target's code comes from: absent = this working tree (as installed in the
# venv), or a folder holding an ``echo/`` package snapshotted from a git ref (``--echo-ref`` for
# ``echo``/``echo-pysio``, the ref itself for ``echo@REF``), put first on PYTHONPATH so that
# ``echoctl`` and its function workers import it instead.
SNAPSHOTS: dict[str, Path] = {}


def safe_name(text: str) -> str:
    """A target or ref as a file name (refs may hold ``/``)."""
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in text)


def snapshot_echo(ref: str, root: Path, targets: tuple[str, ...] = ("echo",)) -> Path:
    """Extract ``echo/`` as committed at ``ref`` (read-only for the repository: git archive)."""
    data = subprocess.run(["git", "archive", "--format=tar", ref, "echo"], cwd=REPO,
                          capture_output=True, check=True, timeout=60).stdout
    dest = root / f"echo-src-{safe_name(ref)}"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(dest, filter="data")
    for target in targets:
        SNAPSHOTS[target] = dest
    return dest


def make_server(target: str, workdir: Path, redis_url: str | None = None, index: int = 0) -> Server:
    port = free_port()
    env = {**os.environ, "ECHO_SECRET": SECRET}
    log_path = workdir / f"{safe_name(target)}-{index}-{port}.log"
    if family(target) == "echo":
        history = ref_of(target) is None  # an Echo before history knows no "history" key
        project = workdir / ("project" if history else "project-before")
        if not project.exists():
            make_project(workdir, history=history, name=project.name)
        env.update(
            ECHO_HOST="127.0.0.1",
            ECHO_LOG_LEVEL="warning",
            # abuse limits off: one bench publisher sends thousands of messages a second, and
            # seed-10k holds 10,001 connections in one app (Echo ignores ECHO_* it does not know)
            ECHO_PUBLISH_RATE="0",
            ECHO_MAX_CONNECTIONS_PER_APP="1000000",
            # every load-generator connection comes from 127.0.0.1: the per-address cap
            # (1,000 by default) would refuse the 1,001st
            ECHO_MAX_CONNECTIONS_PER_IP="0",
        )
        # the transport is chosen here, never inherited from the shell (an older Echo ignores it)
        for inherited in ("ECHO_TRANSPORT", "ECHO_REDIS_URL", "ECHO_REDIS_CLUSTER"):
            env.pop(inherited, None)
        if target == "echo-pysio":
            env["ECHO_TRANSPORT"] = "python-socketio"
        elif target == "echo":
            env["ECHO_TRANSPORT"] = "native"
        if redis_url:
            env["ECHO_REDIS_URL"] = redis_url
        snapshot = SNAPSHOTS.get(target)
        if snapshot is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(snapshot), env.get("PYTHONPATH")) if p)
        command = [echoctl(), "serve", "--project", str(project), "--port", str(port)]
        ready = f"http://127.0.0.1:{port}/ready"
    elif target == "node":
        command = ["node", str(NODE_DIR / "baseline-server.mjs"), "--port", str(port)]
        if redis_url:
            command += ["--redis", redis_url]
        ready = f"http://127.0.0.1:{port}/health"
    elif target == "pysio":
        command = [sys.executable, str(BENCH / "baseline_pysio.py"), "--port", str(port)]
        if redis_url:
            command += ["--redis", redis_url]
        # an Engine.IO handshake: the hand-written server has no health route
        ready = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling"
    else:
        raise ValueError(target)
    return Server(target, command, env, ready, port, log_path)


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self, timeout: float = 10) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerFailed("redis-server is not installed (apt-get install -y redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--maxclients", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise ServerFailed(f"redis-server did not listen on {self.port}")

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process and self.process.poll() is None else []

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="echo-bench-"))


def ensure_node_modules() -> None:
    """``npm ci`` once, as scripts/setup.sh does for the other Node folders."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise ServerFailed("node/npm not found: install Node.js 18+ (apt-get install -y nodejs npm)")
    modules = NODE_DIR / "node_modules"
    lock = NODE_DIR / "package-lock.json"
    if not modules.is_dir() or lock.stat().st_mtime > modules.stat().st_mtime:
        subprocess.run(
            ["npm", "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
            check=True, timeout=300,
        )
        modules.touch()
