"""Runs echo functions behind HTTP: POST the event, the response body is the new message.

For webhooks and other FaaS platforms (the approach Ably's integrations take). The URL is the
function's ``url`` in function.toml, or the project's ``http_url`` template with
``{function}`` replaced. Request: the event as JSON; app, channel, publisher and message id in
``X-Echo-*`` headers. Response: 200 with JSON is the result, 204 (or JSON ``null``) filters
the message, anything else is an error with the status and the start of the body.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from echo.config import Settings
from echo.core.functions import FunctionSpec
from echo.core.runners import FunctionError, FunctionErrorKind, InvocationContext, Runner


class HttpRunner(Runner):
    def __init__(self, url_template: str | None = None) -> None:
        self.url_template = url_template
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpRunner:
        return cls(settings.http_url)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=100))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def url_for(self, spec: FunctionSpec) -> str:
        if spec.url:
            return spec.url
        if self.url_template:
            return self.url_template.replace("{function}", spec.name)
        raise FunctionError(spec.name, FunctionErrorKind.LOAD_FAILED,
                            "no url: set url in its function.toml or ECHO_HTTP_URL")

    async def invoke(self, spec: FunctionSpec, event: Any, context: InvocationContext) -> Any:
        if self._client is None:
            await self.start()
        assert self._client is not None
        headers = {
            "content-type": "application/json",
            "x-echo-function": spec.name,
            "x-echo-app": context.app,
            "x-echo-channel": context.channel,
            "x-echo-uuid": context.uuid or "",
            "x-echo-message-id": context.message_id,
        }
        try:
            response = await self._client.post(
                self.url_for(spec), content=orjson.dumps(event), headers=headers,
                timeout=spec.timeout,
            )
        except httpx.TimeoutException:
            raise FunctionError(spec.name, FunctionErrorKind.TIMEOUT,
                                f"no answer within {spec.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise FunctionError(spec.name, FunctionErrorKind.FAILED, f"endpoint unreachable: {exc}") from None
        if response.status_code == 204:
            return None
        if not response.is_success:
            raise FunctionError(
                spec.name, FunctionErrorKind.RAISED, f"HTTP {response.status_code}: {response.text[:200]}"
            )
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise FunctionError(
                spec.name, FunctionErrorKind.BAD_RESULT, f"response is not JSON: {response.text[:80]!r}"
            ) from None
