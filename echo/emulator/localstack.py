"""``echoctl dev --functions localstack``: run the functions on LocalStack's Lambda.

The dev server deploys ``functions/`` to the Lambda API at start, redeploys a function when
its files change, and invokes it there through the same Lambda runner the cloud uses. The
endpoint comes from ``localstack-client`` (``http://localhost:4566`` unless LOCALSTACK_HOST
says otherwise), or from ``ECHO_LAMBDA_ENDPOINT_URL`` (e.g. a moto server).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from echo.aws import aws_client
from echo.config import Settings
from echo.core.functions import FunctionCatalog, discover
from echo.extras import require
from echo.runners.lambda_deploy import LambdaDeployer
from echo.runners.lambda_runner import lambda_client

log = logging.getLogger("echo.localstack")

DEV_PREFIX = "echo-dev-"
DEV_ROLE = "echo-dev-functions"


def localstack_settings(settings: Settings) -> Settings:
    get_service_endpoint = require("localstack_client.config", "localstack",
                                   "`--functions localstack`").get_service_endpoint

    return dataclasses.replace(
        settings,
        runner="lambda",
        lambda_endpoint_url=settings.lambda_endpoint_url or get_service_endpoint("lambda"),
        lambda_prefix=settings.lambda_prefix or DEV_PREFIX,
    )


class LocalStackFunctions:
    """Keeps the project's functions deployed on the emulator's Lambda while dev runs."""

    def __init__(self, settings: Settings, catalog: FunctionCatalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self._deployer: LambdaDeployer | None = None

    def _connect(self) -> LambdaDeployer:
        if self._deployer is None:
            endpoint, region = self.settings.lambda_endpoint_url, self.settings.aws_region
            iam = aws_client("iam", region=region, endpoint_url=endpoint)
            role = LambdaDeployer.ensure_role(iam, DEV_ROLE)
            self._deployer = LambdaDeployer(
                lambda_client(endpoint, region), self.settings.lambda_prefix, role
            )
        return self._deployer

    async def deploy_all(self) -> list[str]:
        specs = discover(self.settings.path(self.settings.functions_dir), self.settings.function_timeout)
        return await self._deploy(list(specs.values()))

    async def redeploy(self, names: set[str]) -> list[str]:
        specs = []
        for name in sorted(names):
            spec = self.catalog.get(name)
            if spec.path is not None:
                specs.append(spec)
        return await self._deploy(specs)

    async def _deploy(self, specs: list[Any]) -> list[str]:
        def run() -> list[str]:
            return self._connect().deploy(specs, progress=log.info)

        try:
            changed = await asyncio.to_thread(run)
        except Exception as exc:
            log.error(
                "could not deploy to the Lambda emulator at %s: %s (is LocalStack running? "
                "`docker compose up localstack`)", self.settings.lambda_endpoint_url, exc,
            )
            return []
        if changed:
            log.info("deployed to %s: %s", self.settings.lambda_endpoint_url, ", ".join(changed))
        return changed
