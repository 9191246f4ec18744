"""A function worker process: reads invocations on stdin, answers on its original stdout.

Run as ``python -m echo.emulator.worker``. Each line in is a JSON request, each line out a
JSON response. The handler's own ``print`` output goes to stderr (the dev server's console),
so it can never corrupt the protocol. Handlers are compiled straight from source (no .pyc),
so an edit is always seen by a fresh worker, even within the same second.

When the server hands over a batch, the answers go back together: an answer waits while
more requests are already in (one write and one server wake-up per batch, not per call), but
never more than ``HOLD`` seconds, so the server's per-call timeout still sees each call end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
import types
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson


class ClientContext:
    """Lambda's ``context.client_context``: Echo puts app, channel, uuid in ``custom``."""

    def __init__(self, custom: dict[str, Any]) -> None:
        self.custom = custom
        self.client = None
        self.env = None


class LambdaContext:
    """The attributes AWS Lambda's Python runtime gives a handler, emulated locally."""

    def __init__(self, function_name: str, request_id: str, timeout: float, custom: dict) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:local:000000000000:function:{function_name}"
        self.memory_limit_in_mb = 128
        self.aws_request_id = request_id
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"
        self.identity = None
        self.client_context = ClientContext(custom)
        self._deadline = time.monotonic() + timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


_handlers: dict[str, Any] = {}


def exec_module(source_file: Path, folder: Path, module_name: str) -> types.ModuleType:
    """A function's module, run fresh from its file (never cached in ``sys.modules``), with
    its folder importable while it loads, so a handler can import modules beside it."""
    module = types.ModuleType(module_name)
    module.__file__ = str(source_file)
    sys.path.insert(0, str(folder))
    try:
        exec(compile(source_file.read_bytes(), str(source_file), "exec"), module.__dict__)
    finally:
        sys.path.remove(str(folder))
    return module


def _load_handler(request: dict[str, Any]) -> Any:
    name = request["function"]
    if name in _handlers:
        return _handlers[name]
    folder = Path(request["path"])
    deps = request.get("deps")
    if deps and deps not in sys.path:  # its own packages, ahead of the server's
        sys.path.insert(0, deps)
    module_name, function_name = request["handler"].split(".", 1)
    source_file = folder / f"{module_name}.py"
    module = exec_module(source_file, folder, f"echo_function_{name.replace('-', '_')}")
    handler = getattr(module, function_name, None)
    if not callable(handler):
        raise LookupError(f"{source_file.name} defines no function {function_name!r}")
    _handlers[name] = handler
    return handler


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _missing_module(exc: ModuleNotFoundError, request: dict[str, Any]) -> str:
    """Name the file to fix: the function's own requirements.txt."""
    wanted = (exc.name or "").split(".")[0] or "it"
    return (f"{_describe(exc)}: add {wanted} to {Path(request['path']) / 'requirements.txt'} "
            "(echoctl dev installs it for this function, and it goes into the Lambda zip)")


MAX_CAPTURED_LINES = 200
MAX_LINE = 2000


class _Capture(io.TextIOBase):
    """What a handler prints or logs during one invocation, for the dev inspector; it still
    reaches the console too."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.lines: list[str] = []
        self._partial = ""

    def write(self, text: str) -> int:
        self.console.write(text)
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            if len(self.lines) < MAX_CAPTURED_LINES:
                self.lines.append(line[:MAX_LINE])
        return len(text)

    def flush(self) -> None:
        self.console.flush()

    def done(self) -> list[str]:
        if self._partial and len(self.lines) < MAX_CAPTURED_LINES:
            self.lines.append(self._partial[:MAX_LINE])
        return self.lines


class _LogToCapture(logging.Handler):
    def __init__(self, capture: _Capture) -> None:
        super().__init__()
        self.capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.capture.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")


def handle(request: dict[str, Any]) -> dict[str, Any]:
    if not request.get("capture"):
        return _handle(request)
    capture = _Capture(sys.stderr)
    handler = _LogToCapture(capture)
    root = logging.getLogger()
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = capture
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        response = _handle(request, traceback_wanted=True)
    finally:
        sys.stdout, sys.stderr = saved
        root.removeHandler(handler)
    response["logs"] = capture.done()
    return response


class _HopTimeout(BaseException):
    """A chained function ran past its own timeout (not an Exception: the handler's own
    ``except Exception`` must not swallow it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _HopTimeout


def strict_json(value: Any) -> Any:
    """``value`` as the server would read it back, or ValueError: what a per-function call's
    answer is held to (:func:`_encoded`), applied between chained functions."""
    try:
        out = orjson.dumps(value)
        if b"null" in out:
            json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"returned {type(value).__name__}, which is not JSON this server "
                         f"carries ({str(exc)[:200]})") from None
    return orjson.loads(out)


def handle_chain(request: dict[str, Any]) -> dict[str, Any]:
    """Run a channel's functions one after another in this one round trip. The answer lists
    each function's result up to the first that filtered the message (None) or failed
    (``failed``: its kind and detail); the server applies each one's policy from there."""
    value = request["event"]
    results: list[Any] = []
    seconds: list[float] = []
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for hop in request["chain"]:
            started = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, hop["timeout"])
            try:
                answer = _handle({**hop, "event": value, "context": request["context"]})
            except _HopTimeout:
                answer = {"ok": False, "kind": "timeout",
                          "detail": f"no result within {hop['timeout']:g}s"}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            seconds.append(time.perf_counter() - started)
            if answer["ok"]:
                try:
                    value = strict_json(answer["result"])
                except ValueError as exc:
                    answer = {"ok": False, "kind": "bad_result", "detail": str(exc)}
            if not answer["ok"]:
                return {"ok": True, "results": results, "seconds": seconds,
                        "failed": {"kind": answer["kind"], "detail": answer["detail"]}}
            results.append(value)
            if value is None:
                break
    finally:
        signal.signal(signal.SIGALRM, previous)
    return {"ok": True, "results": results, "seconds": seconds}


def _handle(request: dict[str, Any], traceback_wanted: bool = False) -> dict[str, Any]:
    try:
        handler = _load_handler(request)
    except ModuleNotFoundError as exc:
        traceback.print_exception(exc, file=sys.__stderr__)
        return {"ok": False, "kind": "load_failed", "detail": _missing_module(exc, request),
                **({"traceback": traceback.format_exc()[-8000:]} if traceback_wanted else {})}
    except Exception as exc:
        traceback.print_exception(exc, file=sys.__stderr__)
        return {"ok": False, "kind": "load_failed", "detail": _describe(exc),
                **({"traceback": traceback.format_exc()[-8000:]} if traceback_wanted else {})}
    context = LambdaContext(
        request["function"], request["context"].get("messageId", ""), request["timeout"],
        request["context"],
    )
    event, sealer = request["event"], None
    encrypted = bool(request["context"].get("encrypted"))
    if encrypted:  # a trusted function on an encrypted channel
        from echo.runners import trusted
        from echo.sdk.e2e import DecryptFailed

        try:
            event, sealer = trusted.open_event(event, request["context"])
        except (LookupError, DecryptFailed) as exc:  # our own words: no plaintext in them
            return {"ok": False, "kind": "raised", "detail": f"could not decrypt its input: {exc}"}
        except ImportError:
            return {"ok": False, "kind": "raised", "detail": "could not decrypt its input: "
                    "install the cryptography package (pip install 'echo-realtime[sdk]')"}
        except Exception as exc:
            return {"ok": False, "kind": "raised",
                    "detail": f"could not decrypt its input: {type(exc).__name__}"}
    try:
        result = handler(event, context)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        if sealer is not None:
            result = sealer.seal(result)
    except Exception as exc:
        # the server's console, not the invocation's captured output
        print(f"[{request['function']}] raised:", file=sys.__stderr__)
        traceback.print_exception(exc, file=sys.__stderr__)
        detail = (_missing_module(exc, request) if isinstance(exc, ModuleNotFoundError)
                  else _describe(exc))
        if encrypted:  # an exception's text may quote the plaintext: it stays on this host
            detail = (f"{type(exc).__name__} (the channel is encrypted: the message is on the "
                      "function host's console)")
        answer: dict[str, Any] = {"ok": False, "kind": "raised", "detail": detail}
        if traceback_wanted and not encrypted:
            # from the handler's own frame on (the worker's call into it says nothing)
            frames = exc.__traceback__.tb_next if exc.__traceback__ else None
            answer["traceback"] = "".join(
                traceback.format_exception(type(exc), exc, frames))[-8000:]
        return answer
    return {"ok": True, "result": result}


async def _await(awaitable: Any) -> Any:
    return await awaitable


HOLD = 0.005
"""Longest an answer waits for the ones after it in the same batch (seconds)."""


class _Answers:
    """Answers on their way to the server, written together when a batch is done."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.held: list[bytes] = []
        self.since = 0.0
        self.changed = threading.Condition()
        threading.Thread(target=self._release_late, daemon=True).start()

    def add(self, answer: bytes, *, more_coming: bool) -> None:
        with self.changed:
            self.held.append(answer)
            if not more_coming:
                self.write_held()
            elif len(self.held) == 1:  # the release thread wakes only when one is held
                self.since = time.monotonic()
                self.changed.notify()

    def write_held(self) -> None:
        if self.held:
            self.out.write(b"".join(self.held))
            self.out.flush()
            self.held.clear()

    def _release_late(self) -> None:
        """Write held answers after HOLD, e.g. while the next call in the batch runs long."""
        while True:
            with self.changed:
                while not self.held:
                    self.changed.wait()
                since = self.since
            time.sleep(max(0.0, since + HOLD - time.monotonic()))
            with self.changed:
                if self.held and self.since == since:
                    self.write_held()


def _requests(fd: int) -> Iterator[tuple[bytes, bool]]:
    """Each request line, and whether another one is already waiting behind it."""
    lines: deque[bytes] = deque()
    rest = b""
    while True:
        if not lines:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            *complete, rest = (rest + chunk).split(b"\n")
            lines.extend(complete)
            continue
        line = lines.popleft()
        waiting = bool(lines) or bool(select.select([fd], [], [], 0)[0])
        yield line, waiting


def main() -> None:
    answers = _Answers(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)  # anything printed by a handler lands on stderr
    sys.stdout = sys.stderr
    try:
        _serve(answers)
    finally:  # e.g. sys.exit() in a handler: what was answered still goes out
        with answers.changed:
            answers.write_held()


def _serve(answers: _Answers) -> None:
    for line, more_coming in _requests(sys.stdin.fileno()):
        request = orjson.loads(line)  # written by the server with orjson: no big integers
        response = handle_chain(request) if "chain" in request else handle(request)
        response["id"] = request["id"]
        answers.add(_encoded(response) + b"\n", more_coming=more_coming)


def _encoded(response: dict[str, Any]) -> bytes:
    """The answer as JSON the server reads exactly: no integer beyond 64 bits (it would
    come back a float), no NaN, nesting within orjson's limit; otherwise ``bad_result``."""
    try:
        out = orjson.dumps(response)
        if b"null" in out:  # orjson writes NaN and infinities as null: look closer
            json.dumps(response.get("result"), allow_nan=False)
        return out
    except (TypeError, ValueError, RecursionError) as exc:
        result = response.get("result")
        return orjson.dumps({
            "id": response["id"], "ok": False, "kind": "bad_result",
            "detail": f"returned {type(result).__name__}, which is not JSON this server "
                      f"carries ({str(exc)[:200]})"})


if __name__ == "__main__":
    main()
