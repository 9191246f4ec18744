"""Hot reload: watch ``functions/`` and ``associations.json`` and apply changes live.

A changed function is checked first (its function.toml, its module's syntax, a top-level
handler, all without running it). If it is fine it retires the runner's workers (fresh code
on the next message) and a copy of it is kept in ``.echo/last-good/``; if not, the mistake is
printed and sent to admins, and that copy stays in force until the next good save. A
changed associations file is re-read and, if valid, applied; if broken, the previous one
stays and the admins are told why. Open connections are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from echo.core.app import EchoServer
from echo.core.associations import AssociationsError
from echo.core.functions import (
    FunctionConfigError,
    function_folders,
    is_function_name,
    load_spec,
    source_problem,
)
from echo.core.store import FileStore
from echo.emulator import dependencies
from echo.emulator.inspector import Inspector

log = logging.getLogger("echo.watch")

# react quickly: an edit is usually one write; 150 ms lets an editor's save settle
DEBOUNCE_MS = 150
NOT_COPIED = shutil.ignore_patterns("node_modules", "__pycache__", ".*")
"""Left out of a function's last good copy: installed packages and caches."""


def changed_functions(functions_dir: Path, paths: set[str]) -> set[str]:
    names = set()
    for raw in paths:
        try:
            relative = Path(raw).resolve().relative_to(functions_dir.resolve())
        except ValueError:
            continue
        parts = relative.parts
        if not parts or not is_function_name(parts[0]) or "node_modules" in parts:
            continue  # hidden, private, or installed packages (not the function's code)
        if len(parts) == 1 and not (functions_dir / parts[0]).is_dir():
            continue  # a file beside the functions (an Ekko folder's associations.json)
        names.add(parts[0])
    return names


class LastGoodCode:
    """A copy of each function as it last passed the checks, which the server runs while
    the function's own folder holds a mistake."""

    def __init__(self, server: EchoServer, functions_dir: Path, copies: Path) -> None:
        self.server = server
        self.functions_dir = functions_dir
        self.copies = copies

    def problem(self, name: str) -> str | None:
        """What is wrong with the function as saved, or None."""
        folder = self.functions_dir / name
        try:
            return source_problem(load_spec(folder, self.server.settings.function_timeout))
        except FunctionConfigError as exc:
            return str(exc)

    def keep(self, name: str) -> None:
        self.server.functions.pin(name, None)
        copy = self.copies / name
        try:
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(self.functions_dir / name, copy, ignore=NOT_COPIED)
            installed = self.functions_dir / name / "node_modules"
            if installed.is_dir():  # the copy resolves packages where the function has them
                (copy / "node_modules").symlink_to(installed.resolve(), target_is_directory=True)
        except OSError as exc:
            log.warning("%s: no copy of its working code kept (%s)", name, exc)

    def fall_back(self, name: str) -> bool:
        """Run the kept copy of ``name``; False when there is none (it never worked)."""
        copy = self.copies / name
        if not copy.is_dir():
            return False
        self.server.functions.pin(name, copy)
        return True


async def check_functions(guard: LastGoodCode, names: set[str]) -> tuple[set[str], dict[str, str]]:
    """Sort changed functions into those to reload and those whose mistake is reported
    (with what was said about it); installs their requirements; keeps or falls back to the
    last good copy."""
    reload: set[str] = set()
    mistakes: dict[str, str] = {}
    for name in sorted(names):
        folder = guard.functions_dir / name
        if not folder.is_dir():
            guard.server.functions.pin(name, None)  # deleted: gone, not pinned to a copy
            reload.add(name)
            continue
        problem = guard.problem(name)
        if problem is None:
            try:
                await dependencies.ensure(guard.server.settings.project_dir, folder)
            except dependencies.InstallError as exc:
                problem = str(exc)
        if problem is None:
            guard.keep(name)
            reload.add(name)
        elif guard.fall_back(name):
            reload.add(name)  # fresh workers, running the copy
            mistakes[name] = f"{problem}; not reloaded: the previous code stays in force"
        else:
            mistakes[name] = f"{problem}; it has no working version yet, publishes through it fail"
    return reload, mistakes


async def report_mistakes(server: EchoServer, mistakes: dict[str, str]) -> None:
    for name, mistake in mistakes.items():
        log.error("function %s: %s", name, mistake)
        for app in server.connected_apps():
            server.realtime.status(app, "function_problem", local=True, function=name,
                                   error=mistake)


async def watch_functions(
    server: EchoServer,
    functions_dir: Path,
    stop: asyncio.Event,
    on_change: Callable[[set[str]], Awaitable[object]] | None = None,
    inspector: Inspector | None = None,
) -> None:
    functions_dir.mkdir(parents=True, exist_ok=True)
    guard = LastGoodCode(server, functions_dir, server.settings.path(Path(".echo/last-good")))
    present = {p.name for p in function_folders(functions_dir)}
    installed, mistakes = await check_functions(guard, present)  # copies kept, mistakes said
    await report_mistakes(server, mistakes)
    server.reload_functions(installed)  # workers warmed before the packages were in: retired
    if inspector is not None and mistakes:
        inspector.reloaded([], mistakes)
    async for changes in watchfiles.awatch(
        functions_dir, stop_event=stop, debounce=DEBOUNCE_MS, step=30, recursive=True
    ):
        names = changed_functions(functions_dir, {path for _, path in changes})
        if not names:
            continue
        reload, mistakes = await check_functions(guard, names)
        await report_mistakes(server, mistakes)
        if inspector is not None:
            inspector.reloaded(sorted(reload - set(mistakes)), mistakes)
        if reload:
            server.reload_functions(reload)
            if on_change is not None:
                await on_change(reload)
            fine = sorted(reload - set(mistakes))
            if fine:
                log.info("reloaded %s", ", ".join(fine))
                for app in server.connected_apps():
                    server.realtime.status(app, "functions_reloaded", local=True, functions=fine)


async def watch_associations(server: EchoServer, path: Path, stop: asyncio.Event) -> None:
    # watch the folder, not the file: editors save by writing a new file and renaming it
    target = path.resolve()
    async for _ in watchfiles.awatch(
        target.parent,
        stop_event=stop,
        debounce=DEBOUNCE_MS,
        step=30,
        recursive=False,
        watch_filter=lambda _, changed: Path(changed).resolve() == target,
    ):
        await apply_file(server, target)


async def apply_file(server: EchoServer, path: Path) -> None:
    """Apply the edited file through the server's store (shared with other nodes if any)."""
    try:
        associations = await FileStore(path).load()
    except AssociationsError as exc:
        await server.report_associations_error(f"{path}: {exc}")
        return
    missing = server.function_problems(associations)
    if missing:
        await server.report_associations_error(f"{path}: {'; '.join(missing[:5])}")
        return
    if associations.document != server.associations.document:
        try:
            await server.replace_associations(associations, source=str(path))
        except Exception as exc:
            await server.report_associations_error(f"{path} not stored: {exc}")
