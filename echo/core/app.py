"""One ASGI app: the transport for the realtime traffic, Starlette for everything else.

``EchoServer`` is the composition root: settings, a runner, an associations store, a
transport (the wire) and a broker (what crosses nodes). It knows nothing about which runner
or store it got: ``echoctl dev`` passes the local worker runner and a file store, a cloud
deployment passes others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from echo.broker.base import Broker
from echo.broker.memory import MemoryBroker
from echo.config import Settings, redis_urls
from echo.core import http, metrics, shutdown
from echo.core.associations import Associations, AssociationsError
from echo.core.functions import FunctionCatalog, missing_functions
from echo.core.pipeline import Pipeline
from echo.core.realtime import Realtime
from echo.core.runners import Runner, RunnerSet, load_runner_class
from echo.core.server_api import ServerApi
from echo.core.store import AssociationsStore, FileStore, RedisStore, S3Store
from echo.core.webhooks import Webhooks
from echo.transport.base import Transport, TransportOptions, load_transport

log = logging.getLogger("echo.server")

Hook = Callable[[], Awaitable[None]]


def make_broker(settings: Settings) -> Broker:
    """Redis when ``redis_url`` is set (one URL, several, or a Cluster's), else one node."""
    if not settings.redis_url:
        return MemoryBroker()
    from echo.broker.redis import RedisBroker

    return RedisBroker.from_settings(settings)


def transport_options(settings: Settings) -> TransportOptions:
    # headroom over the message limit for the envelope; a bigger frame is refused by the
    # transport before it reaches a handler
    payload = max(settings.max_message_bytes * 2 + 16 * 1024, 1024 * 1024)
    return TransportOptions(
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        max_payload=payload,
        connect_timeout=settings.connect_timeout,
        max_backlog=settings.max_queued_packets,
        cors_origins=settings.cors_origins,
        max_namespaces=settings.max_namespaces_per_connection,
    )


class EchoServer:
    def __init__(
        self,
        settings: Settings,
        runner: Runner,
        store: AssociationsStore,
        *,
        routes: Sequence[BaseRoute] = (),
        broker: Broker | None = None,
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
        self.functions = FunctionCatalog(
            settings.path(settings.functions_dir), settings.function_timeout
        )
        self.broker = broker if broker is not None else make_broker(settings)
        self.realtime = Realtime(
            settings,
            self.broker,
            lambda realtime: Pipeline(
                runner,
                self.functions,
                lambda: self.associations,
                realtime.deliver,
                realtime.report_function_error,
                max_pending_per_channel=settings.max_pending_per_channel,
                max_result_bytes=settings.max_message_bytes,
            ),
        )
        self.webhooks = Webhooks(settings.webhooks, self.broker, on_failure=lambda app, url, why:
                                 self.realtime.status(app, "webhook_failed", url=url, error=why))
        self.realtime.webhooks = self.webhooks
        self.options = transport_options(settings)
        self.transport: Transport = load_transport(settings.transport)(self.realtime, self.options)
        self.realtime.attach(self.transport)
        metrics.watch(self.transport, self.broker)
        starlette = Starlette(
            routes=[*http.routes(self), *ServerApi(self).routes(), *routes],
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
        self.asgi = self.transport.asgi(starlette)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.runner.start()
        await self.broker.start(self.realtime.write_local)
        await self.webhooks.start()
        await self.transport.start()
        await self.load_associations()
        watcher = asyncio.create_task(self.store.watch(self.load_associations))
        for hook in self._on_startup:
            await hook()
        try:
            yield
        finally:
            for hook in self._on_shutdown:
                await hook()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await self.transport.close()  # runs every disconnect: presence "left", status
            await shutdown.flush_within(self.broker.flush, 2.0)  # ... which others must hear
            await self.webhooks.close()
            await self.broker.close()
            await self.store.close()
            await self.runner.close()

    async def drain(self, grace: float = 10) -> None:
        """Before the transports close on shutdown: finish in-flight messages, tell clients."""
        await shutdown.drain(self.realtime, grace)

    async def readiness_problems(self) -> list[str]:
        problems = []
        if self.associations_problem:
            problems.append(f"associations: {self.associations_problem}")
        try:
            problems.extend(await asyncio.wait_for(self.broker.problems(), 2))
        except TimeoutError:
            problems.append(f"{self.broker.name}: no answer within 2 s")
        return problems

    async def load_associations(self) -> bool:
        """(Re)load from the store; a broken or unreachable one keeps the previous in force."""
        try:
            associations = await self.store.load()
        except Exception as exc:
            kind = "broken" if isinstance(exc, AssociationsError) else "unreachable"
            message = f"{self.store.describe()}: {exc}"
            if self.associations_problem == "not loaded yet":
                self.associations_problem = f"{kind} at start-up, serving without: {message}"
                fallback = self.store.fallback() if kind == "unreachable" else None
                if fallback is not None:
                    await self._serve_last_known_good(fallback, message)
            await self.report_associations_error(message)
            return False
        current = self.associations
        if associations.version < current.version:
            # never go back to an older shared document; the store lost ours (Redis restarted
            # empty, then re-seeded from an older copy): give it back
            try:
                if await self.store.offer(current):
                    log.warning("the associations store held v%d, older than this node's v%d "
                                "(emptied and re-seeded?): restored v%d", associations.version,
                                current.version, current.version)
            except Exception as exc:
                log.warning("associations v%d could not be restored to %s: %s",
                            current.version, self.store.describe(), exc)
            return False
        if (
            associations.document != current.document
            or associations.version != current.version  # same text, newer version: record it
            or self.associations_problem
        ):
            await self.apply_associations(associations, source=self.store.describe())
        return True

    async def _serve_last_known_good(self, fallback: AssociationsStore, problem: str) -> None:
        try:
            associations = await fallback.load()
        except Exception as exc:
            log.error("no last known good associations in %s either: %s", fallback.describe(), exc)
            return
        await self.apply_associations(associations, source=f"{fallback.describe()} (fallback)")
        self.associations_problem = (
            f"store unreachable at start-up, serving the last known good copy from "
            f"{fallback.describe()}: {problem}"
        )

    async def replace_associations(self, associations: Associations, *, source: str) -> Associations:
        """Store a new document (shared with every node, where the store is) and apply it."""
        stored = await self.store.save(associations)
        await self.apply_associations(stored, source=source)
        return stored

    def function_problems(self, associations: Associations) -> list[str]:
        """Functions the document names that this node could not run: with the local runner,
        those without a folder (a remote runner may know functions this disk does not)."""
        if self.settings.runner != "local":
            return []
        return missing_functions(associations, self.settings.path(self.settings.functions_dir))

    async def report_associations_error(self, message: str) -> None:
        log.error("associations not applied, keeping the previous ones: %s", message)
        await self._status_all("associations_error", error=message)

    async def apply_associations(self, associations: Associations, *, source: str) -> None:
        if associations.version and associations.version < self.associations.version:
            return
        self.associations = associations
        self.associations_problem = None
        metrics.ASSOCIATIONS_VERSION.set(associations.version)
        log.info("associations v%d applied from %s: %s", associations.version, source,
                 ", ".join(sorted(associations.apps)))
        for problem in self.function_problems(associations)[:20]:
            log.error("associations: %s (publishes there will fail with not_found)", problem)
        await self._status_all("associations_updated", source=source,
                               version=associations.version)

    def reload_functions(self, names: set[str] | None = None) -> None:
        """Changed code or function.toml: fresh specs and fresh workers on the next message."""
        self.functions.invalidate(names)
        self.runner.reload(names)

    def connected_apps(self) -> list[str]:
        """Apps with a connection on this node (the ones whose admins can hear a status)."""
        return sorted({conn.app for conn in self.transport.connections()})

    async def _status_all(self, event: str, **details: object) -> None:
        """A node-local event (every node applies a sync itself): tell this node's admins."""
        for app in self.connected_apps():
            self.realtime.status(app, event, local=True, **details)


def make_store(settings: Settings) -> AssociationsStore:
    """The project's file (or the S3 object ``associations_s3`` names); shared through
    Redis, with that as the durable copy, when Redis is set."""
    durable: AssociationsStore = FileStore(settings.path(settings.associations))
    if settings.associations_s3:
        durable = S3Store(settings.associations_s3, settings.aws_region,
                          settings.lambda_endpoint_url)
    if not settings.redis_url:
        return durable
    return RedisStore(redis_urls(settings.redis_url)[0], durable, cluster=settings.redis_cluster)


def build_server(settings: Settings, runner: Runner | None = None, **options: Any) -> EchoServer:
    """An EchoServer from settings: ``runner`` (or the one ``settings.runner`` names) plus any
    other runner a function's function.toml asks for."""
    if runner is None:  # a misspelt runner name fails here, at start-up, not on first publish
        runner = load_runner_class(settings.runner).from_settings(settings)
    return EchoServer(settings, RunnerSet(settings, runner), make_store(settings), **options)
