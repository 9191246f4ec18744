"""Hot reload: watch ``functions/`` and ``associations.json`` and apply changes live.

A changed function retires the runner's workers (fresh code on the next message); a changed
associations file is re-read and, if valid, applied; if broken, the previous one stays and
the admins are told why. Open connections are never touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from echo.core.app import EchoServer
from echo.core.associations import AssociationsError
from echo.core.store import FileStore

log = logging.getLogger("echo.watch")

# react quickly: an edit is usually one write; 150 ms lets an editor's save settle
DEBOUNCE_MS = 150


def changed_functions(functions_dir: Path, paths: set[str]) -> set[str]:
    names = set()
    for raw in paths:
        try:
            relative = Path(raw).resolve().relative_to(functions_dir.resolve())
        except ValueError:
            continue
        if relative.parts and not relative.parts[0].startswith((".", "_")):
            names.add(relative.parts[0])
    return names


async def watch_functions(
    server: EchoServer,
    functions_dir: Path,
    stop: asyncio.Event,
    on_change: Callable[[set[str]], Awaitable[object]] | None = None,
) -> None:
    functions_dir.mkdir(parents=True, exist_ok=True)
    async for changes in watchfiles.awatch(
        functions_dir, stop_event=stop, debounce=DEBOUNCE_MS, step=30, recursive=True
    ):
        names = changed_functions(functions_dir, {path for _, path in changes})
        if names:
            server.reload_functions(names)
            if on_change is not None:
                await on_change(names)
            log.info("reloaded %s", ", ".join(sorted(names)))
            for app in server.connected_apps():
                await server.realtime.status(
                    app, "functions_reloaded", local=True, functions=sorted(names)
                )


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
    if associations.document != server.associations.document:
        try:
            await server.replace_associations(associations, source=str(path))
        except Exception as exc:
            await server.report_associations_error(f"{path} not stored: {exc}")
