"""``runner = "inline"``: a trusted Python function run inside the server process, for speed
over isolation.

No worker round trip (a pipe write, a process wake-up and a JSON encode/decode each way): the
handler is called on the server's event loop itself. That is only right for what it is
meant for: small, fast, trusted transforms. A function that blocks stalls every connection
of the node while it runs, one that never returns cannot be stopped (its ``timeout`` is not
enforced: there is nothing to kill), and one that crashes the interpreter takes the node
with it. The event is a copy (a function may change it freely) and the result is checked
as any function's is. Async handlers are awaited under the function's timeout.

Only Python; a code change is picked up on the next invoke after :meth:`reload` (the dev
server's watcher calls it).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path
from typing import Any

import orjson

from echo.config import Settings
from echo.core.functions import FunctionSpec
from echo.core.runners import FunctionError, FunctionErrorKind, InvocationContext, Runner
from echo.emulator.worker import LambdaContext, exec_module, strict_json


class InlineRunner(Runner):
    def __init__(self) -> None:
        self._handlers: dict[str, Any] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> InlineRunner:
        return cls()

    def reload(self, functions: set[str] | None = None) -> None:
        if functions is None:
            self._handlers.clear()
        else:
            for name in functions:
                self._handlers.pop(name, None)

    def handler_of(self, spec: FunctionSpec) -> Any:
        handler = self._handlers.get(spec.name)
        if handler is not None:
            return handler
        if spec.language != "python" or spec.module_file is None or spec.path is None:
            raise FunctionError(spec.name, FunctionErrorKind.LOAD_FAILED,
                                "the inline runner runs Python functions only")
        source: Path = spec.module_file
        folder = str(spec.path)
        before = set(sys.modules)
        try:
            module = exec_module(source, spec.path, f"echo_inline_{spec.name.replace('-', '_')}")
        except Exception as exc:
            raise FunctionError(spec.name, FunctionErrorKind.LOAD_FAILED,
                                f"{type(exc).__name__}: {exc}") from None
        finally:
            # modules it imported from its own folder stay its own (the handler holds them):
            # another function's ``import helper`` gets its own, a reload a fresh one
            for name in set(sys.modules) - before:
                file = getattr(sys.modules[name], "__file__", None) or ""
                if file.startswith(folder + "/"):
                    del sys.modules[name]
        handler = getattr(module, spec.handler.split(".", 1)[1], None)
        if not callable(handler):
            raise FunctionError(spec.name, FunctionErrorKind.LOAD_FAILED,
                                f"{source.name} defines no function {spec.handler.split('.', 1)[1]!r}")
        self._handlers[spec.name] = handler
        return handler

    async def invoke(self, spec: FunctionSpec, event: Any, context: InvocationContext) -> Any:
        if context.encrypted:
            raise FunctionError(spec.name, FunctionErrorKind.LOAD_FAILED, "the inline runner "
                                "holds no keys: run a trusted function on the local runner")
        handler = self.handler_of(spec)
        own = orjson.loads(orjson.dumps(event))  # its own copy: a change stays in the function
        lambda_context = LambdaContext(spec.name, context.message_id, spec.timeout,
                                       context.as_dict())
        try:
            result = handler(own, lambda_context)
            if inspect.isawaitable(result):
                try:
                    async with asyncio.timeout(spec.timeout):
                        result = await result
                except TimeoutError as exc:
                    if exc.__context__ is None or isinstance(exc.__context__, asyncio.CancelledError):
                        raise FunctionError(spec.name, FunctionErrorKind.TIMEOUT,
                                            f"no result within {spec.timeout:g}s") from None
                    raise
        except FunctionError:
            raise
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # SystemExit too: a function must not stop the server
            raise FunctionError(spec.name, FunctionErrorKind.RAISED,
                                f"{type(exc).__name__}: {exc}") from None
        try:
            return strict_json(result)
        except ValueError as exc:
            raise FunctionError(spec.name, FunctionErrorKind.BAD_RESULT, str(exc)) from None
