"""``echoctl dev``: the whole system on one laptop, with hot reload and the demo apps.

Same server as production (:class:`echo.core.app.EchoServer`), plus the local worker runner,
the project's ``associations.json`` as the store, file watchers, ``/apps/`` and a dev-only
``/dev/token`` endpoint so demo pages connect without copy-pasting a token.
"""

from __future__ import annotations

import asyncio
import html
import logging
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from echo.config import Settings
from echo.core.app import EchoServer, build_server
from echo.core.auth import issue_token
from echo.core.protocol import CHANNEL_NAME, ErrorCode, error
from echo.core.runners import Runner
from echo.emulator.inspector import Inspector
from echo.emulator.local_runner import LocalRunner
from echo.emulator.localstack import LocalStackFunctions, localstack_settings
from echo.emulator.origin import own_pages_only
from echo.emulator.watch import watch_associations, watch_functions
from echo.runners.lambda_runner import LambdaRunner

DEV_TOKEN_TTL = 24 * 3600
log = logging.getLogger("echo.dev")


def _dev_routes(settings: Settings, apps_dir: Path, inspector: Inspector) -> list[BaseRoute]:
    async def dev_token(request: Request) -> JSONResponse:
        app = request.query_params.get("app", "")
        if not CHANNEL_NAME.match(app):
            return JSONResponse(error(ErrorCode.BAD_REQUEST, "?app=NAME is required"),
                                status_code=400)
        admin = request.query_params.get("admin", "").lower() in ("1", "true", "yes")
        token = issue_token(settings.secrets_for(app)[0], app, admin=admin, ttl=DEV_TOKEN_TTL)
        return JSONResponse({"appName": app, "jwt": token, "admin": admin})

    async def index(request: Request) -> Response:
        apps = sorted(p.name for p in apps_dir.iterdir() if (p / "index.html").exists()) \
            if apps_dir.is_dir() else []
        if len(apps) == 1:
            return RedirectResponse(f"/apps/{apps[0]}/")
        links = "".join(
            f'<li><a href="/apps/{html.escape(a)}/">{html.escape(a)}</a></li>' for a in apps
        )
        return HTMLResponse(f"<!doctype html><title>Echo dev</title><h1>Echo apps</h1><ul>{links}</ul>")

    routes: list[BaseRoute] = [
        Route("/", index),
        Route("/dev/token", own_pages_only(dev_token)),
        *inspector.routes(),
    ]
    if apps_dir.is_dir():
        routes.append(Mount("/apps", app=StaticFiles(directory=apps_dir, html=True)))
    return routes


def _say_if_it_died(task: asyncio.Task[None]) -> None:
    """A watcher that stops by mistake must say so: hot reload is off from then on."""
    if not task.cancelled() and task.exception() is not None:
        log.error("hot reload stopped: the file watcher failed", exc_info=task.exception())


FUNCTION_MODES = ("local", "localstack")


def build_dev_server(settings: Settings, functions: str = "local") -> EchoServer:
    """The dev server; ``functions`` is where echo functions run: ``local`` worker processes
    or ``localstack`` (deployed to the Lambda emulator, redeployed on every edit)."""
    functions_dir = settings.path(settings.functions_dir)
    associations = settings.path(settings.associations)
    emulator: LocalStackFunctions | None = None
    runner: Runner
    if functions == "localstack":
        settings = localstack_settings(settings)
        runner = LambdaRunner.from_settings(settings)
    else:
        runner = LocalRunner.from_settings(settings)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    inspector = Inspector()

    async def start_watching() -> None:
        stop.clear()
        on_change = None
        if emulator is not None:
            await emulator.deploy_all()
            on_change = emulator.redeploy
        tasks.append(asyncio.create_task(watch_functions(server, functions_dir, stop, on_change,
                                                         inspector=inspector)))
        tasks.append(asyncio.create_task(watch_associations(server, associations, stop)))
        for task in tasks:
            task.add_done_callback(_say_if_it_died)

    async def stop_watching() -> None:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    server = build_server(
        settings,
        runner,
        routes=_dev_routes(settings, settings.path(settings.apps_dir), inspector),
        on_startup=[start_watching],
        on_shutdown=[stop_watching],
    )
    inspector.attach(server)
    if functions == "localstack":
        emulator = LocalStackFunctions(settings, server.functions)
    return server
