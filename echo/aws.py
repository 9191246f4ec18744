"""The one boto3 client factory, for the lambda runner and the AWS target.

Against an emulator endpoint (moto, LocalStack) with no credentials configured, it signs
with dummy ones, so ``echoctl dev --functions localstack`` and the tests need no AWS account.
"""

from __future__ import annotations

from typing import Any

from echo.extras import require


def aws_client(service: str, *, region: str, endpoint_url: str | None = None,
               session: Any = None, **config: Any) -> Any:
    """A boto3 client for ``service``; ``config`` goes to botocore's ``Config`` (timeouts,
    retries, pool size)."""
    boto3 = require("boto3", "aws", "AWS (the lambda runner, the AWS target)")
    from botocore.config import Config

    session = session if session is not None else boto3.session.Session()
    credentials: dict[str, str] = {}
    if endpoint_url and session.get_credentials() is None:
        credentials = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    return session.client(service, endpoint_url=endpoint_url,
                          config=Config(region_name=region, **config), **credentials)
