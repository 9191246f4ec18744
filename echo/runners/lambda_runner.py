"""Runs echo functions on AWS Lambda (or anything speaking its API: LocalStack, moto).

Invokes synchronously (``RequestResponse``), as Ekko did, on a thread pool so the event loop
never blocks: boto3 is synchronous, and the default executor (6 threads here) would cap
concurrent invocations. The function name on Lambda is ``lambda_prefix`` + the Echo name.
App, channel and publisher reach the handler as ``context.client_context.custom``, exactly
as under ``echoctl dev``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from echo.aws import aws_client
from echo.config import Settings
from echo.core.functions import FunctionSpec
from echo.core.runners import FunctionError, FunctionErrorKind, InvocationContext, Runner

MAX_CONCURRENT_INVOCATIONS = 64
CLIENT_CONTEXT_LIMIT = 3583  # bytes of base64, Lambda's documented maximum


def lambda_client(endpoint_url: str | None, region: str) -> Any:
    return aws_client(
        "lambda", region=region, endpoint_url=endpoint_url,
        max_pool_connections=MAX_CONCURRENT_INVOCATIONS, read_timeout=900, connect_timeout=5,
        retries={"max_attempts": 1, "mode": "standard"},  # Echo's own retries decide
    )


class LambdaRunner(Runner):
    def __init__(self, endpoint_url: str | None, region: str, prefix: str = "") -> None:
        self.endpoint_url = endpoint_url
        self.region = region
        self.prefix = prefix
        self._client: Any = None
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_INVOCATIONS, thread_name_prefix="lambda")

    @classmethod
    def from_settings(cls, settings: Settings) -> LambdaRunner:
        return cls(settings.lambda_endpoint_url, settings.aws_region, settings.lambda_prefix)

    def lambda_name(self, function: str) -> str:
        return self.prefix + function

    async def start(self) -> None:
        self._client = lambda_client(self.endpoint_url, self.region)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def invoke(self, spec: FunctionSpec, event: Any, context: InvocationContext) -> Any:
        if self._client is None:
            await self.start()
        custom = base64.b64encode(json.dumps({"custom": context.as_dict()}).encode()).decode()
        request = {
            "FunctionName": self.lambda_name(spec.name),
            "InvocationType": "RequestResponse",
            "Payload": json.dumps(event).encode(),
        }
        if len(custom) <= CLIENT_CONTEXT_LIMIT:
            request["ClientContext"] = custom
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._pool, self._invoke_blocking, spec, request)
        try:
            # Lambda enforces the function's own timeout; this bounds a hung connection too
            return await asyncio.wait_for(call, spec.timeout + 5)
        except TimeoutError:
            raise FunctionError(spec.name, FunctionErrorKind.TIMEOUT, f"no answer from Lambda within "
                                                      f"{spec.timeout + 5:g}s") from None

    def _invoke_blocking(self, spec: FunctionSpec, request: dict[str, Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

        try:
            response = self._client.invoke(**request)
            payload = response["Payload"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ResourceNotFoundException":
                raise FunctionError(
                    spec.name, FunctionErrorKind.NOT_FOUND, f"no Lambda function {request['FunctionName']!r}"
                ) from None
            raise FunctionError(spec.name, FunctionErrorKind.FAILED, f"Lambda {code}: {exc}") from None
        except ReadTimeoutError:
            raise FunctionError(spec.name, FunctionErrorKind.TIMEOUT,
                                "Lambda did not answer in time") from None
        except BotoCoreError as exc:
            raise FunctionError(spec.name, FunctionErrorKind.FAILED, f"Lambda unreachable: {exc}") from None
        if response.get("FunctionError"):
            raise _error_from_payload(spec.name, payload)
        try:
            return json.loads(payload) if payload else None
        except ValueError:
            raise FunctionError(
                spec.name, FunctionErrorKind.BAD_RESULT, f"Lambda returned non-JSON: {payload[:80]!r}"
            ) from None


def _error_from_payload(function: str, payload: bytes) -> FunctionError:
    """Lambda's error document ``{errorMessage, errorType}`` as a FunctionError."""
    try:
        document = json.loads(payload)
    except ValueError:
        document = {"errorMessage": payload.decode(errors="replace")[:200]}
    if not isinstance(document, dict):
        document = {"errorMessage": str(document)[:200]}
    error_type = str(document.get("errorType", ""))
    message = str(document.get("errorMessage", "")).strip()
    if "Timedout" in error_type or "timed out" in message.lower():
        return FunctionError(function, FunctionErrorKind.TIMEOUT, message or error_type)
    if "MarshalError" in error_type:
        return FunctionError(function, FunctionErrorKind.BAD_RESULT, message or error_type)
    detail = f"{error_type}: {message}" if error_type else message
    return FunctionError(function, FunctionErrorKind.RAISED, detail)
