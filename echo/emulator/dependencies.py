"""A function's own packages: ``requirements.txt`` (Python) or ``package.json`` (JavaScript).

**Python**: ``functions/NAME/requirements.txt``, installed for that function alone.

Each function gets an isolated target, ``.echo/deps/NAME-<hash of the file>/`` (pip
``--target``), on the worker's ``sys.path`` ahead of the server's packages, so what one
function pins does not change another's files. The hash is the cache: an unchanged file is
never installed twice, an edited one is installed afresh beside the old (which stays in force
until the new one is ready) and the old is then removed. The Lambda zip gets the same packages
(:mod:`echo.packaging`).

Modules are still shared within a worker process: two functions pinning different versions
of one package get whichever a worker imported first.

**JavaScript**: a ``package.json`` with dependencies is installed where Node looks for it,
``functions/NAME/node_modules/`` (``npm ci`` when there is a lock file, else ``npm install``),
as Lambda's zip layout has it; a marker there records the hash of what was installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import time
from pathlib import Path

from echo.packaging import npm_dependencies, npm_install_command, pip_install_command

log = logging.getLogger("echo.deps")

REQUIREMENTS = "requirements.txt"
DEPS_DIR = Path(".echo") / "deps"
DONE = ".installed"
"""Written last: a target without it is an install that did not finish."""
SHOWN_LINES = 40


PACKAGE_JSON = "package.json"
NPM_MARKER = ".echo-installed"


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
    """Install the function's packages if this version of its file is not yet: for Python the
    target (None without a requirements.txt). Progress goes to the log as the installer
    reports it."""
    if (function_dir / PACKAGE_JSON).exists():
        await ensure_npm(function_dir)
    target = target_of(project_dir, function_dir)
    if target is None or installed(target):
        return target
    name = function_dir.name
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("%s: installing %s (pip)…", name, function_dir / REQUIREMENTS)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *pip_install_command(scratch, function_dir / REQUIREMENTS),
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


def _npm_digest(function_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in (PACKAGE_JSON, "package-lock.json"):
        with contextlib.suppress(OSError):
            digest.update((function_dir / name).read_bytes())
    return digest.hexdigest()


async def ensure_npm(function_dir: Path) -> None:
    """``npm ci`` / ``npm install`` in the function's folder, once per version of its
    package.json (and lock file)."""
    try:
        if not npm_dependencies(function_dir):
            return
    except (OSError, ValueError) as exc:
        raise InstallError(f"{function_dir.name}: {function_dir / PACKAGE_JSON} is not JSON "
                           f"({exc})") from None
    marker = function_dir / "node_modules" / NPM_MARKER
    digest = _npm_digest(function_dir)
    with contextlib.suppress(OSError):
        if marker.read_text().strip() == digest:
            return
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError(f"{function_dir.name}: its package.json needs npm, which is not on PATH")
    command = npm_install_command(npm, function_dir)
    log.info("%s: installing %s (npm %s)…", function_dir.name, function_dir / PACKAGE_JSON,
             command[1])
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command, cwd=str(function_dir), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    if process.returncode != 0:
        tail = " | ".join(line for line in output.decode(errors="replace").splitlines()
                          if line.strip())[-600:]
        raise InstallError(f"{function_dir.name}: npm could not install "
                           f"{function_dir / PACKAGE_JSON}: {tail}")
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(digest + "\n")
    log.info("%s: packages installed in %.1f s", function_dir.name, time.monotonic() - started)
