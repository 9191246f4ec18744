"""An app's own backend beside Echo (Starlette): it mints its users' tokens, publishes
to a user's personal channel, reads presence, and takes Echo's webhooks. Run it with
``ECHO_SECRET=... ECHO_WEBHOOK_SECRET=... uvicorn apps.backend.app:app --port 8000``."""

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from echo.sdk import AsyncServerApi, EchoError, user_token, verify_webhook

APP, SECRET = os.environ.get("ECHO_APP", "chat-demo"), os.environ["ECHO_SECRET"]
echo = AsyncServerApi(os.environ.get("ECHO_URL", "http://localhost:3000"), APP, secret=SECRET)
events: list[dict] = []  # what the webhooks told us (a real backend acts on them)


async def token(request: Request) -> JSONResponse:  # behind your login: it knows the user
    return JSONResponse({"jwt": user_token(SECRET, APP, request.query_params["user"], ttl=600)})


async def ship(request: Request) -> JSONResponse:
    order = await request.json()
    ack = await echo.publish(f"user:{order['user']}", {"shipped": order["id"]},
                             idempotency_key=f"shipped-{order['id']}")  # a retry is no resend
    support = await echo.presence("support")
    return JSONResponse({"delivered": ack["delivered"], "support_online": support["count"]})


async def hooks(request: Request) -> JSONResponse:
    try:
        batch = verify_webhook(os.environ["ECHO_WEBHOOK_SECRET"], request.headers, await request.body())
    except EchoError as refused:
        return JSONResponse({"error": refused.message}, status_code=400)
    events.extend(batch["events"])  # at least once: de-duplicate on each event's "id"
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/token", token), Route("/ship", ship, methods=["POST"]),
                        Route("/echo-hooks", hooks, methods=["POST"])])
