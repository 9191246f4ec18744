"""Runs echo functions in local worker processes, like a small Lambda on the laptop.

Each worker is a separate Python process running :mod:`echo.emulator.worker`, one invocation
at a time. A function that hangs is killed at its timeout, one that crashes its process is
reported and replaced, one that leaks takes only its worker with it: the server never shares
their fate. ``reload()`` retires every worker so the next invocation loads fresh code (a cold
start, as after a Lambda deploy); one warm worker is started straight away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from echo.config import Settings
from echo.core.functions import FunctionConfigError, FunctionSpec, discover
from echo.core.runners import FunctionError, InvocationContext, Runner

log = logging.getLogger("echo.runner.local")

_READ_LIMIT = 64 * 1024 * 1024


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process, generation: int) -> None:
        self.process = process
        self.generation = generation
        self.killed = False

    @property
    def alive(self) -> bool:
        # returncode stays None until the process is reaped, so a kill is recorded here
        return not self.killed and self.process.returncode is None

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(orjson.dumps(request) + b"\n")
        await self.process.stdin.drain()
        line = await self.process.stdout.readline()
        if not line:
            code = await self.process.wait()
            raise ConnectionError(f"worker process exited with code {code}")
        return orjson.loads(line)

    def kill(self) -> None:
        if self.alive:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            # reap it, so no zombie or unclosed transport is left behind
            reaper = asyncio.get_running_loop().create_task(self.process.wait())
            _reapers.add(reaper)
            reaper.add_done_callback(_reapers.discard)


_reapers: set[asyncio.Task[int]] = set()


class LocalRunner(Runner):
    def __init__(
        self,
        functions_dir: Path,
        *,
        default_timeout: float = 3.0,
        max_workers: int = 4,
        python: str = sys.executable,
    ) -> None:
        self.functions_dir = functions_dir
        self.default_timeout = default_timeout
        self.max_workers = max_workers
        self.python = python
        self._idle: list[_Worker] = []
        self._count = 0
        self._generation = 0
        self._available = asyncio.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._all: set[_Worker] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalRunner:
        return cls(
            settings.path(settings.functions_dir),
            default_timeout=settings.function_timeout,
            max_workers=settings.max_workers,
        )

    async def start(self) -> None:
        try:
            found = discover(self.functions_dir, self.default_timeout)
        except FunctionConfigError as exc:
            log.error("%s", exc)
        else:
            log.info("functions in %s: %s", self.functions_dir, ", ".join(found) or "none")
        self._count += 1
        self._idle.append(await self._spawn())

    async def close(self) -> None:
        self._closed = True
        for worker in list(self._all):
            worker.kill()
            with contextlib.suppress(Exception):
                await worker.process.wait()
        self._all.clear()
        self._idle.clear()

    def reload(self, functions: set[str] | None = None) -> None:
        """Retire every worker: the next invocation runs the code as it is now on disk."""
        self._generation += 1
        for worker in self._idle:
            self._forget(worker)
        self._idle.clear()
        if not self._closed and self._count < self.max_workers:
            self._count += 1
            task = asyncio.get_running_loop().create_task(self._warm())
            task.add_done_callback(lambda t: t.exception())

    async def _warm(self) -> None:
        try:
            worker = await self._spawn()
        except BaseException:
            self._count -= 1
            raise
        async with self._available:
            self._idle.append(worker)
            self._available.notify()

    async def invoke(self, spec: FunctionSpec, event: Any, context: InvocationContext) -> Any:
        function = spec.name
        if spec.path is None:
            raise FunctionError(function, "not_found", f"no folder {self.functions_dir / function}")
        request = {
            "id": next(self._ids),
            "function": function,
            "path": str(spec.path),
            "handler": spec.handler,
            "timeout": spec.timeout,
            "event": event,
            "context": context.as_dict(),
        }
        worker = await self._acquire()
        try:
            response = await asyncio.wait_for(worker.call(request), spec.timeout)
        except TimeoutError:
            worker.kill()
            raise FunctionError(function, "timeout", f"no result within {spec.timeout:g}s") from None
        except (ConnectionError, ValueError, asyncio.LimitOverrunError) as exc:
            worker.kill()
            raise FunctionError(function, "crashed", str(exc)) from None
        finally:
            await self._release(worker)
        if not response.get("ok"):
            raise FunctionError(function, response.get("kind", "raised"), response.get("detail", ""))
        return response.get("result")

    async def _spawn(self) -> _Worker:
        """Start a worker; the caller has already counted it in ``_count``."""
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        process = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "echo.emulator.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=_READ_LIMIT,
        )
        worker = _Worker(process, self._generation)
        self._all.add(worker)
        return worker

    async def _acquire(self) -> _Worker:
        async with self._available:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive and worker.generation == self._generation:
                        return worker
                    self._forget(worker)
                if self._count < self.max_workers:
                    self._count += 1  # reserve the slot before spawning outside the lock
                    break
                await self._available.wait()
        try:
            return await self._spawn()
        except BaseException:
            self._count -= 1
            raise

    async def _release(self, worker: _Worker) -> None:
        async with self._available:
            if worker.alive and worker.generation == self._generation and not self._closed:
                self._idle.append(worker)
            else:
                self._forget(worker)
            self._available.notify()

    def _forget(self, worker: _Worker) -> None:
        worker.kill()
        if worker in self._all:
            self._all.discard(worker)
            self._count -= 1
