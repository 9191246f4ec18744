"""Runs echo functions in local worker processes, like a small Lambda on the laptop.

Each worker is a separate Python process running :mod:`echo.emulator.worker`, one invocation
at a time. A function that hangs is killed at its timeout, one that crashes its process is
reported and replaced, one that leaks takes only its worker with it: the server never shares
their fate. ``reload()`` retires every worker so the next invocation loads fresh code (a cold
start, as after a Lambda deploy); one warm worker is started straight away.

Invocations wait in one queue. A free worker takes the next one, or, when a backlog has built
up, its fair share of it (up to 32, and never more than the backlog divided by the workers, so
one slow function holds up few others) in a single write. The worker still runs them one by
one, each with its full timeout, and sends the answers back together (none held more than
5 ms). Under load that turns a pipe round trip and several event-loop wake-ups per message
into one per batch, and the deliveries of a batch leave in one pass of the event loop.

A worker killed at a timeout fails only the call it was running; the calls it had not
started go back to the front of the queue. A worker that dies by itself mid-batch (a crash
may have taken held answers with it) has its unanswered calls run again, each alone, so only
the call that crashes a worker on its own fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import sys
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from echo.config import Settings
from echo.core.functions import FunctionConfigError, FunctionSpec, discover
from echo.core.runners import (
    ChainStep,
    FunctionError,
    FunctionErrorKind,
    InvocationContext,
    Runner,
)
from echo.emulator import dependencies

log = logging.getLogger("echo.runner.local")

MAX_BATCH = 32
KILL_GRACE = 1.0
"""Seconds after a call's timeout that its answer is still read (the kill takes effect)."""
NODE_WORKER = Path(__file__).with_name("node_worker.mjs")
_READ_LIMIT = 64 * 1024 * 1024


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process, generation: int) -> None:
        self.process = process
        self.generation = generation
        self.killed = False
        self.timed_out = False

    @property
    def alive(self) -> bool:
        # returncode stays None until the process is reaped, so a kill is recorded here
        return not self.killed and self.process.returncode is None

    def kill(self) -> None:
        if self.alive:
            self.killed = True
            # the whole process group: a child the handler forked (or spawned) goes too, and
            # with it the pipe it would otherwise hold open
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            # reap it, so no zombie or unclosed transport is left behind
            reaper = asyncio.get_running_loop().create_task(self.process.wait())
            _reapers.add(reaper)
            reaper.add_done_callback(_reapers.discard)


_reapers: set[asyncio.Task[int]] = set()


@dataclass
class _Call:
    """One invocation waiting for, or running in, a worker."""

    spec: FunctionSpec
    id: int
    line: bytes
    answer: asyncio.Future[dict[str, Any]]
    alone: bool = False  # was in a batch whose worker died: runs in a batch of its own


class LocalRunner(Runner):
    def __init__(
        self,
        functions_dir: Path,
        *,
        default_timeout: float = 3.0,
        max_workers: int = 4,
        python: str = sys.executable,
        project_dir: Path | None = None,
        language: str = "python",
    ) -> None:
        self.functions_dir = functions_dir
        self.project_dir = project_dir or functions_dir.parent
        self.language = language
        self.command = ([python, "-m", "echo.emulator.worker"] if language == "python"
                        else [shutil.which("node") or "node", str(NODE_WORKER)])
        self._other: LocalRunner | None = None
        """The pool of the other language's workers (made on first use): Node processes
        for JavaScript functions, beside the Python ones, with the same rules."""
        self._deps: dict[Path, str | None] = {}
        """Function folder -> its installed requirements target (read once per reload)."""
        self.default_timeout = default_timeout
        self.max_workers = max_workers
        self.python = python
        self._idle: list[_Worker] = []
        self._count = 0  # workers alive or being started
        self._generation = 0
        self._waiting: deque[_Call] = deque()
        self._ids = itertools.count(1)
        self._closed = False
        self._all: set[_Worker] = set()
        self._batches: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalRunner:
        return cls(
            settings.path(settings.functions_dir),
            default_timeout=settings.function_timeout,
            max_workers=settings.max_workers,
            project_dir=settings.project_dir,
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
        if self._other is not None:
            await self._other.close()
        self._closed = True
        while self._waiting:
            call = self._waiting.popleft()
            if not call.answer.done():
                call.answer.set_exception(
                    FunctionError(call.spec.name, FunctionErrorKind.CRASHED, "the runner was shut down"))
        for worker in list(self._all):
            worker.kill()
            with contextlib.suppress(Exception):
                await worker.process.wait()
        self._all.clear()
        self._idle.clear()

    def reload(self, functions: set[str] | None = None) -> None:
        """Retire every worker: the next invocation runs the code as it is now on disk."""
        if self._other is not None:
            self._other.reload(functions)
        self._generation += 1
        self._deps.clear()
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
        self._idle.append(worker)
        self._dispatch()

    def _pool_for(self, spec: FunctionSpec) -> LocalRunner:
        if spec.language == self.language or self._closed:
            return self  # (closed: invoke says so)
        if self._other is None:
            self._other = LocalRunner(self.functions_dir, default_timeout=self.default_timeout,
                                      max_workers=self.max_workers, python=self.command[0],
                                      project_dir=self.project_dir, language=spec.language)
        return self._other

    async def invoke(self, spec: FunctionSpec, event: Any, context: InvocationContext) -> Any:
        pool = self._pool_for(spec)
        if pool is not self:
            return await pool.invoke(spec, event, context)
        function = spec.name
        if spec.path is None:
            raise FunctionError(function, FunctionErrorKind.NOT_FOUND,
                                f"no folder {self.functions_dir / function}")
        if self._closed:
            raise FunctionError(function, FunctionErrorKind.CRASHED, "the runner was shut down")
        call_id = next(self._ids)
        request = {
            "id": call_id,
            "function": function,
            "path": str(spec.path),
            "deps": self._deps_of(spec.path),
            "handler": spec.handler,
            "timeout": spec.timeout,
            "event": event,
            "context": context.as_dict(),
            # an encrypted channel's function may print the plaintext: not for the inspector
            **({"capture": True} if context.notes is not None and not context.encrypted else {}),
        }
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(_Call(spec, call_id, orjson.dumps(request) + b"\n", answer))
        self._dispatch()
        response = await answer
        if context.notes is not None:
            for key in ("logs", "traceback"):
                if key in response:
                    context.notes[key] = response[key]
        if not response.get("ok"):
            raise FunctionError(function, response.get("kind", "raised"), response.get("detail", ""))
        return response.get("result")

    def can_chain(self, specs: list[FunctionSpec]) -> bool:
        """Whether ``specs`` can run in one worker round trip: Python functions of this pool
        with folders (the JavaScript worker runs one function per call)."""
        return (self.language == "python" and not self._closed
                and all(spec.language == "python" and spec.path is not None for spec in specs))

    async def invoke_chain(self, specs: list[FunctionSpec], event: Any,
                           context: InvocationContext) -> list[ChainStep]:
        """Run ``specs`` one after another in one worker call; return each one's step up to
        the first that filtered (None) or failed (a FunctionError, last in the list). Raises
        FunctionError when the call as a whole failed (the worker crashed or hung past every
        timeout): which function did it is then unknown."""
        call_id = next(self._ids)
        request = {
            "id": call_id,
            "chain": [{"function": spec.name, "path": str(spec.path),
                       "deps": self._deps_of(spec.path),  # type: ignore[arg-type]
                       "handler": spec.handler, "timeout": spec.timeout} for spec in specs],
            "event": event,
            "context": context.as_dict(),
        }
        # each function's own timeout is kept in the worker; this one is the backstop
        backstop = replace(specs[0], timeout=sum(spec.timeout for spec in specs) + KILL_GRACE)
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(_Call(backstop, call_id, orjson.dumps(request) + b"\n", answer))
        self._dispatch()
        response = await answer
        if not response.get("ok"):
            raise FunctionError(specs[0].name, response.get("kind", "raised"),
                                response.get("detail", ""))
        results: list[Any] = list(response.get("results") or [])
        seconds: list[float] = list(response.get("seconds") or [])
        failed = response.get("failed")
        if failed is not None and len(results) < len(specs):
            results.append(FunctionError(specs[len(results)].name, failed.get("kind", "raised"),
                                         failed.get("detail", "")))
        seconds += [0.0] * (len(results) - len(seconds))
        return [ChainStep(result, took) for result, took in zip(results, seconds, strict=False)]

    def _deps_of(self, folder: Path) -> str | None:
        if folder not in self._deps:
            target = dependencies.target_of(self.project_dir, folder)
            self._deps[folder] = str(target) if target is not None else None
        return self._deps[folder]

    def _dispatch(self) -> None:
        """Hand waiting invocations to free workers, starting workers up to the limit."""
        while self._waiting and not self._closed:
            worker = self._free_worker()
            if worker is None:
                if self._count >= self.max_workers:
                    return  # every worker is busy: the next to finish comes back here
                self._count += 1  # reserved; started by the batch itself
            batch = self._next_batch()
            if not batch:
                if worker is not None:
                    self._idle.append(worker)
                else:
                    self._count -= 1
                return
            task = asyncio.get_running_loop().create_task(self._run_batch(worker, batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _free_worker(self) -> _Worker | None:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive and worker.generation == self._generation:
                return worker
            self._forget(worker)
        return None

    def _next_batch(self) -> list[_Call]:
        share = min(MAX_BATCH, max(1, len(self._waiting) // self.max_workers))
        batch: list[_Call] = []
        while self._waiting and len(batch) < share:
            if self._waiting[0].alone and batch:
                break
            call = self._waiting.popleft()
            if call.answer.done():  # its publish was cancelled (e.g. at shutdown)
                continue
            batch.append(call)
            if call.alone:
                break
        return batch

    async def _run_batch(self, worker: _Worker | None, batch: list[_Call]) -> None:
        finished = 0  # calls of the batch answered (or failed) so far; the rest run elsewhere
        try:
            if worker is None:
                try:
                    worker = await self._spawn()
                except Exception as exc:
                    self._count -= 1
                    for call in batch:
                        _answer(call, FunctionError(call.spec.name, FunctionErrorKind.CRASHED,
                                                    f"could not start a worker: {exc}"))
                    finished = len(batch)
                    return
            try:
                finished = await self._run_on(worker, batch)
            except asyncio.CancelledError:
                worker.kill()
                raise
            except Exception:  # a runner bug must answer, not leave publishes waiting
                log.exception("local runner failed running a batch")
                worker.kill()
                for call in batch:
                    _answer(call, FunctionError(call.spec.name, FunctionErrorKind.CRASHED,
                                                "runner error (logged)"))
                finished = len(batch)
            if worker.alive and worker.generation == self._generation and not self._closed:
                self._idle.append(worker)
            else:
                self._forget(worker)
        finally:
            leftover = batch[finished:]
            if self._closed:
                for call in leftover:
                    _answer(call, FunctionError(call.spec.name, FunctionErrorKind.CRASHED,
                                                "the runner was shut down"))
            else:
                self._waiting.extendleft(reversed(leftover))  # never started: run elsewhere
                self._dispatch()

    async def _run_on(self, worker: _Worker, batch: list[_Call]) -> int:
        """Run ``batch`` on ``worker``; return how many of its calls were answered or failed."""
        process = worker.process
        assert process.stdin and process.stdout
        loop = asyncio.get_running_loop()
        try:
            process.stdin.write(b"".join(call.line for call in batch))
            await process.stdin.drain()
        except (ConnectionError, OSError):
            worker.kill()
            return 0
        for index, call in enumerate(batch):
            timer = loop.call_later(call.spec.timeout, _expire, worker)
            try:
                # bounded even if the pipe outlives the worker (a descendant that escaped
                # its group): the timeout, then a moment for the kill to close it
                # (asyncio.timeout: a timer, where wait_for also made a task per call)
                async with asyncio.timeout(call.spec.timeout + KILL_GRACE):
                    line = await process.stdout.readline()
            except TimeoutError:
                worker.timed_out = True
                worker.kill()
                line = b""
            except (ValueError, asyncio.LimitOverrunError) as exc:
                worker.kill()
                _answer(call, FunctionError(call.spec.name, FunctionErrorKind.CRASHED, str(exc)))
                return index + 1
            finally:
                timer.cancel()
            if not line:
                if worker.timed_out:
                    error = FunctionError(call.spec.name, FunctionErrorKind.TIMEOUT,
                                          f"no result within {call.spec.timeout:g}s")
                else:
                    code = await process.wait()
                    if len(batch) - index > 1:
                        # the worker holds answers until its batch is done (worker.py), so
                        # a sudden exit may have taken finished calls' answers with it: run
                        # each unanswered call again on its own, and blame only the one
                        # that brings a worker down by itself
                        for unanswered in batch[index:]:
                            unanswered.alone = True
                        return index
                    error = FunctionError(call.spec.name, FunctionErrorKind.CRASHED,
                                          f"worker process exited with code {code}")
                worker.kill()
                _answer(call, error)
                return index + 1
            try:
                response = orjson.loads(line)
                if response.get("id") != call.id:
                    raise ValueError(f"answer for invocation {response.get('id')}, not {call.id}")
            except (ValueError, AttributeError) as exc:
                worker.kill()
                _answer(call, FunctionError(call.spec.name, FunctionErrorKind.CRASHED,
                                            f"worker protocol: {exc}"))
                return index + 1
            _answer(call, response)
        return len(batch)

    async def _spawn(self) -> _Worker:
        """Start a worker; the caller has already counted it in ``_count``."""
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        process = await asyncio.create_subprocess_exec(
            *self.command,
            start_new_session=True,  # its own process group, killed whole (see _Worker.kill)
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=_READ_LIMIT,
        )
        worker = _Worker(process, self._generation)
        self._all.add(worker)
        return worker

    def _forget(self, worker: _Worker) -> None:
        worker.kill()
        if worker in self._all:
            self._all.discard(worker)
            self._count -= 1


def _expire(worker: _Worker) -> None:
    worker.timed_out = True
    worker.kill()


def _answer(call: _Call, outcome: dict[str, Any] | FunctionError) -> None:
    if call.answer.done():
        return
    if isinstance(outcome, FunctionError):
        call.answer.set_exception(outcome)
    else:
        call.answer.set_result(outcome)
