"""The dev inspector: what happened to each message, hop by hop, and what the dev loop saw.

``echoctl dev`` only. It is the pipeline's :class:`~echo.core.pipeline.Tracer`: for every
message it records the input, each function's input, output, duration, what the function
printed or logged in that invocation and, when it failed, the kind, message and traceback
(with the handler's own file and line picked out), then the outcome and how many
subscribers the channel had. Recent file-watcher reloads and their mistakes are kept too.

Served as JSON (``/dev/traces``, ``/dev/clients``, ``/dev/reloads``), as a live stream
(``/dev/traces/stream``, server-sent events) and as a page (``/dev/inspector/``), with two
actions: publish a test message, and replay a recorded message through the current code
(the replay is shown beside the original, and delivered to no one).

Memory is bounded: a ring of :data:`MAX_TRACES` messages, values over
:data:`MAX_VALUE_BYTES` kept as a shortened preview.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from echo.core import protocol
from echo.core.pipeline import Envelope, Hop, Outcome
from echo.core.protocol import ErrorCode, ProtocolError
from echo.core.runners import FunctionError, InvocationContext
from echo.emulator.origin import own_pages_only

if TYPE_CHECKING:
    from echo.core.app import EchoServer

MAX_TRACES = 300
MAX_VALUE_BYTES = 16 * 1024
MAX_RELOADS = 50
MAX_WATCHERS = 20
PAGE = Path(__file__).with_name("inspector_page")
INSPECTOR_UUID = "inspector"
_PY_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_JS_FRAME = re.compile(r"(?:\(|at )(?:file://)?(/[^():\s]+):(\d+):\d+")


def bounded(value: Any) -> Any:
    """``value`` itself if small, else a preview that says it was cut."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return {"unshown": type(value).__name__}
    if len(text) <= MAX_VALUE_BYTES:
        return value
    return {"truncated": True, "bytes": len(text), "preview": text[:MAX_VALUE_BYTES]}


def handler_line(traceback: str, folder: Path | None) -> dict[str, Any] | None:
    """The innermost frame of a traceback in the function's own folder: where to look."""
    if not traceback or folder is None:
        return None
    root = str(folder.resolve())
    found = None
    for pattern in (_PY_FRAME, _JS_FRAME):
        for match in pattern.finditer(traceback):
            path = match.group(1)
            with contextlib.suppress(OSError):
                if str(Path(path).resolve()).startswith(root):
                    found = {"file": path, "line": int(match.group(2))}
    return found


class Inspector:
    """Recent messages and reloads, for the inspector's page, its JSON and its stream."""

    def __init__(self) -> None:
        self._server: EchoServer | None = None
        self.traces: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.reloads: deque[dict[str, Any]] = deque(maxlen=MAX_RELOADS)
        self._watchers: set[asyncio.Queue[dict[str, Any]]] = set()

    @property
    def server(self) -> EchoServer:
        assert self._server is not None, "attach() the inspector to its server first"
        return self._server

    def attach(self, server: EchoServer) -> None:
        """Watch ``server``'s pipeline (its routes were made before it existed)."""
        self._server = server
        server.realtime.pipeline.tracer = self

    # -- the pipeline's tracer ------------------------------------------------------------

    def started(self, envelope: Envelope) -> None:
        self._keep({"id": envelope.id, "app": envelope.app, "channel": envelope.channel,
                    "uuid": envelope.uuid, "seq": envelope.seq, "ts": envelope.ts,
                    "input": bounded(envelope.message), "hops": [], "outcome": None})

    def hop(self, envelope: Envelope, hop: Hop) -> None:
        trace = self.traces.get(envelope.id)
        if trace is not None:
            trace["hops"].append(self._hop(hop))
            self._tell({"type": "trace", "trace": trace})

    def finished(self, envelope: Envelope, outcome: Outcome) -> None:
        trace = self.traces.get(envelope.id)
        if trace is None:
            return
        result: dict[str, Any] = {"delivered": outcome.delivered,
                                  "subscribers": self._subscribers(envelope.app, envelope.channel)}
        if outcome.delivered:
            result["output"] = bounded(outcome.envelope.message)
        for key, value in (("filteredBy", outcome.filtered_by), ("droppedBy", outcome.dropped_by)):
            if value:
                result[key] = value
        if outcome.error is not None:
            result["error"] = {"function": outcome.error.function,
                               "kind": str(outcome.error.kind), "message": outcome.error.detail}
        trace["outcome"] = result
        self._tell({"type": "trace", "trace": trace})

    def _hop(self, hop: Hop) -> dict[str, Any]:
        shown: dict[str, Any] = {"function": hop.function, "input": bounded(hop.given),
                                 "durationMs": round(hop.seconds * 1000, 2),
                                 "logs": list(hop.notes.get("logs", []))}
        if hop.error is None:
            shown["output"] = bounded(hop.result)
            if hop.result is None:
                shown["filtered"] = True
        else:
            traceback = str(hop.notes.get("traceback", ""))
            folder = None
            with contextlib.suppress(Exception):
                folder = self.server.functions.get(hop.function).path
            shown["error"] = {"kind": str(hop.error.kind), "message": hop.error.detail,
                              "traceback": traceback, "at": handler_line(traceback, folder)}
        return shown

    def _subscribers(self, app: str, channel: str) -> int:
        return sum(1 for conn in self.server.transport.connections()
                   if conn.app == app and channel in conn.rooms)

    def _keep(self, trace: dict[str, Any]) -> None:
        self.traces[trace["id"]] = trace
        while len(self.traces) > MAX_TRACES:
            self.traces.popitem(last=False)
        self._tell({"type": "trace", "trace": trace})

    # -- the file watcher's reports ---------------------------------------------------------

    def reloaded(self, functions: list[str], mistakes: dict[str, str]) -> None:
        entry = {"ts": int(time.time() * 1000), "functions": functions, "mistakes": mistakes}
        self.reloads.appendleft(entry)
        self._tell({"type": "reload", "reload": entry})

    # -- the live stream --------------------------------------------------------------------

    def _tell(self, event: dict[str, Any]) -> None:
        for queue in list(self._watchers):
            if queue.qsize() < 1000:  # a watcher that stopped reading loses updates, not memory
                queue.put_nowait(event)

    async def stream(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            yield b": connected\n\n"
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield b"data: " + json.dumps(event, default=str).encode() + b"\n\n"
        finally:
            self._watchers.discard(queue)

    # -- actions ----------------------------------------------------------------------------

    async def publish(self, app: str, channel: Any, message: Any) -> dict[str, Any]:
        request = protocol.parse_publish({"channel": channel, "message": message},
                                         self.server.settings.max_message_bytes)
        return await self.server.realtime.publish_as(app, INSPECTOR_UUID, request)

    async def replay(self, trace_id: str) -> dict[str, Any]:
        """Run a recorded message's input through the channel's chain as the code is now."""
        original = self.traces.get(trace_id)
        if original is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"no recorded message {trace_id[:80]!r} "
                                f"(the inspector keeps the last {MAX_TRACES})")
        if isinstance(original["input"], dict) and original["input"].get("truncated"):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "that message was too big to keep whole")
        app, channel = original["app"], original["channel"]
        rule = self.server.realtime.pipeline.rule(app, channel)
        value = original["input"]
        hops = []
        error = None
        for function in rule.functions:
            notes: dict[str, Any] = {}
            context = InvocationContext(app, channel, original["uuid"], f"replay-{trace_id}",
                                        encrypted=rule.encrypted, notes=notes)
            started = time.perf_counter()
            hop = Hop(function, value, notes=notes)
            try:
                result = await self.server.runner.invoke(self.server.functions.get(function),
                                                         value, context)
                self.server.realtime.pipeline.check_result(function, result, rule.encrypted)
                value = hop.result = result
            except Exception as exc:
                hop.error = exc if isinstance(exc, FunctionError) else FunctionError(
                    function, "load_failed", str(exc))
                error = hop.error
            hop.seconds = time.perf_counter() - started
            hops.append(self._hop(hop))
            if error is not None or value is None:
                break
        before = (original.get("outcome") or {}).get("output")
        output = None if error is not None else bounded(value)
        return {"ok": True, "original": trace_id, "app": app, "channel": channel,
                "input": original["input"], "hops": hops, "output": output,
                "before": before, "changed": output != before}

    def clients(self) -> dict[str, Any]:
        found = []
        for conn in self.server.transport.connections():
            client = conn.state
            if client is None:
                continue
            found.append({"app": conn.app, "connection": conn.sid, "uuid": client.uuid,
                          "admin": client.admin, "transport": conn.transport_name,
                          "channels": sorted(client.channels),
                          "withPresence": sorted(client.announced)})
        counts: dict[str, dict[str, int]] = {}
        for item in found:
            for channel in item["channels"]:
                per_app = counts.setdefault(item["app"], {})
                per_app[channel] = per_app.get(channel, 0) + 1
        return {"ok": True, "clients": found, "channels": counts}

    # -- routes -----------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        async def traces(request: Request) -> JSONResponse:
            app = request.query_params.get("app")
            channel = request.query_params.get("channel")
            chosen = [t for t in reversed(self.traces.values())
                      if (app is None or t["app"] == app)
                      and (channel is None or t["channel"] == channel)]
            return JSONResponse({"ok": True, "traces": chosen})

        async def stream(request: Request) -> Response:
            if len(self._watchers) >= MAX_WATCHERS:
                return _refusal(ProtocolError(ErrorCode.LIMIT, f"{MAX_WATCHERS} inspector "
                                              "streams are open already"), 429)
            return StreamingResponse(self.stream(), media_type="text/event-stream",
                                     headers={"cache-control": "no-store"})

        async def publish(request: Request) -> JSONResponse:
            try:
                body = await request.json()
                if not isinstance(body, dict) or "message" not in body:
                    raise ProtocolError(ErrorCode.BAD_REQUEST,
                                        "send {app, channel, message} as JSON")
                app = body.get("app")
                if not isinstance(app, str) or not protocol.CHANNEL_NAME.match(app):
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "app must be an app name")
                return JSONResponse(await self.publish(app, body.get("channel"), body["message"]))
            except ProtocolError as exc:
                return _refusal(exc)
            except ValueError:
                return _refusal(ProtocolError(ErrorCode.BAD_REQUEST, "the body is not JSON"))

        async def replay(request: Request) -> JSONResponse:
            try:
                return JSONResponse(await self.replay(request.path_params["trace"]))
            except ProtocolError as exc:
                return _refusal(exc)

        async def clients(request: Request) -> JSONResponse:
            return JSONResponse(self.clients())

        async def reloads(request: Request) -> JSONResponse:
            return JSONResponse({"ok": True, "reloads": list(self.reloads)})

        return [
            Route("/dev/traces", own_pages_only(traces)),
            Route("/dev/traces/stream", own_pages_only(stream)),
            Route("/dev/traces/{trace}/replay", own_pages_only(replay), methods=["POST"]),
            Route("/dev/inspector/publish", own_pages_only(publish), methods=["POST"]),
            Route("/dev/clients", own_pages_only(clients)),
            Route("/dev/reloads", own_pages_only(reloads)),
            Mount("/dev/inspector", app=StaticFiles(directory=PAGE, html=True)),
        ]


def _refusal(exc: ProtocolError, status: int = 400) -> JSONResponse:
    return JSONResponse(protocol.error(exc.code, exc.message, **exc.details), status_code=status)
