"""A function's own Python packages: ``functions/NAME/requirements.txt``, installed for it.

Each function gets an isolated target, ``.echo/deps/NAME-<hash of the file>/`` (pip
``--target``), on the worker's ``sys.path`` ahead of the server's packages, so what one
function pins does not change another's files. The hash is the cache: an unchanged file is
never installed twice, an edited one is installed afresh beside the old (which stays in force
until the new one is ready) and the old is then removed. The Lambda zip gets the same packages
(:mod:`echo.packaging`).

Modules are still shared within a worker process: two functions pinning different versions
of one package get whichever a worker imported first.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("echo.deps")

REQUIREMENTS = "requirements.txt"
DEPS_DIR = Path(".echo") / "deps"
DONE = ".installed"
"""Written last: a target without it is an install that did not finish."""
SHOWN_LINES = 40


class InstallError(Exception):
    """pip failed; the message names the function and pip's last words."""


def target_of(project_dir: Path, function_dir: Path) -> Path | None:
    """Where ``function_dir``'s requirements go (installed or not), or None when it has none."""
    requirements = function_dir / REQUIREMENTS
    try:
        digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    except OSError:
        return None
    return project_dir / DEPS_DIR / f"{function_dir.name}-{digest}"


def installed(target: Path) -> bool:
    return (target / DONE).exists()


async def ensure(project_dir: Path, function_dir: Path) -> Path | None:
    """Install the function's requirements if this version of the file is not yet; the
    target, or None without a requirements.txt. Progress goes to the log as pip reports it."""
    target = target_of(project_dir, function_dir)
    if target is None or installed(target):
        return target
    name = function_dir.name
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("%s: installing %s (pip)…", name, function_dir / REQUIREMENTS)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
        "--progress-bar", "off", "--target", str(scratch), "-r", str(function_dir / REQUIREMENTS),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    tail: list[str] = []
    shown = 0
    async for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip()
        tail = [*tail[-9:], line]
        if line.startswith(("Collecting", "Downloading", "Installing", "Successfully")) \
                and shown < SHOWN_LINES:
            shown += 1
            log.info("%s: %s", name, line[:200])
    if await process.wait() != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise InstallError(f"{name}: pip could not install {function_dir / REQUIREMENTS}: "
                           + " | ".join(line for line in tail if line.strip())[-600:])
    (scratch / DONE).write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    for old in target.parent.glob(f"{name}-*"):  # earlier versions of this function's file
        if old != target and old.name.rsplit("-", 1)[0] == name and not old.name.endswith(".partial"):
            shutil.rmtree(old, ignore_errors=True)
    log.info("%s: requirements installed in %.1f s", name, time.monotonic() - started)
    return target
