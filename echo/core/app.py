"""One ASGI app: Socket.IO for the realtime traffic, Starlette for everything else.

``EchoServer`` ties together settings, a runner and an associations store. It knows nothing
about which runner or store it got: ``echoctl dev`` passes the local worker runner and a file
store, a cloud deployment passes others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import socketio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from echo.config import Settings
from echo.core import http
from echo.core.associations import Associations, AssociationsError
from echo.core.pipeline import Pipeline
from echo.core.realtime import Realtime
from echo.core.runners import Runner
from echo.core.store import AssociationsStore

log = logging.getLogger("echo.server")

Hook = Callable[[], Awaitable[None]]


class EchoServer:
    def __init__(
        self,
        settings: Settings,
        runner: Runner,
        store: AssociationsStore,
        *,
        routes: Sequence[BaseRoute] = (),
        client_manager: socketio.AsyncManager | None = None,
        on_startup: Sequence[Hook] = (),
        on_shutdown: Sequence[Hook] = (),
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.store = store
        self.associations = Associations.empty()
        self.associations_problem: str | None = "not loaded yet"
        self._on_startup = list(on_startup)
        self._on_shutdown = list(on_shutdown)
        self.realtime = Realtime(
            settings,
            lambda realtime: Pipeline(
                runner,
                lambda: self.associations,
                realtime.deliver,
                realtime.report_function_error,
                max_pending_per_channel=settings.max_pending_per_channel,
            ),
            client_manager=client_manager,
        )
        starlette = Starlette(
            routes=[*http.routes(self), *routes],
            middleware=[
                Middleware(
                    CORSMiddleware,
                    allow_origins=list(settings.cors_origins),
                    allow_methods=["GET", "PUT"],
                    allow_headers=["authorization", "content-type"],
                )
            ],
            lifespan=self._lifespan,
        )
        self.asgi = socketio.ASGIApp(self.realtime.sio, other_asgi_app=starlette)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.runner.start()
        await self.load_associations()
        for hook in self._on_startup:
            await hook()
        try:
            yield
        finally:
            for hook in self._on_shutdown:
                await hook()
            await self.runner.close()

    def readiness_problems(self) -> list[str]:
        return [f"associations: {self.associations_problem}"] if self.associations_problem else []

    async def load_associations(self) -> bool:
        """(Re)load from the store; a broken document keeps the previous one in force."""
        try:
            associations = await self.store.load()
        except AssociationsError as exc:
            message = f"{self.store.describe()}: {exc}"
            if self.associations_problem == "not loaded yet":
                self.associations_problem = f"broken at start-up, serving without: {message}"
            log.error("associations not applied, keeping the previous ones: %s", message)
            await self._status_all("associations_error", error=message)
            return False
        if associations.document != self.associations.document or self.associations_problem:
            await self.apply_associations(associations, source=self.store.describe())
        return True

    async def apply_associations(self, associations: Associations, *, source: str) -> None:
        self.associations = associations
        self.associations_problem = None
        log.info("associations applied from %s: %s", source, ", ".join(sorted(associations.apps)))
        await self._status_all("associations_updated", source=source)

    def connected_apps(self) -> list[str]:
        """Apps with a namespace on this node (the ones whose admins can hear a status)."""
        return [ns.lstrip("/") for ns in self.realtime.sio.manager.get_namespaces() if ns != "/"]

    async def _status_all(self, event: str, **details: object) -> None:
        for app in self.connected_apps():
            await self.realtime.status(app, event, **details)
