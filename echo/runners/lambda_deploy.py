"""Keep a project's functions deployed on a Lambda API: AWS, LocalStack or moto.

Used by ``echoctl dev --functions localstack`` (deploy at start, redeploy on each edit) and
by the AWS target (``echoctl functions deploy --target aws``). A function whose packaged zip
has the same SHA-256 as the deployed code is left alone, so a re-run with no change is a
no-op and a changed function is the only one updated.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from echo.core.functions import FunctionSpec
from echo.packaging import build_zip

_TRUST_POLICY = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                   "Action": "sts:AssumeRole"}],
})


class LambdaDeployer:
    def __init__(self, lambda_client: Any, prefix: str, role_arn: str) -> None:
        self.client = lambda_client
        self.prefix = prefix
        self.role_arn = role_arn

    @staticmethod
    def ensure_role(iam_client: Any, name: str) -> str:
        """A basic execution role for emulators (the AWS target brings its own)."""
        try:
            return iam_client.get_role(RoleName=name)["Role"]["Arn"]
        except iam_client.exceptions.NoSuchEntityException:
            return iam_client.create_role(
                RoleName=name, AssumeRolePolicyDocument=_TRUST_POLICY
            )["Role"]["Arn"]

    def deployed(self) -> dict[str, dict[str, Any]]:
        """Deployed functions of this project by Echo name, with their configuration."""
        found: dict[str, dict[str, Any]] = {}
        for page in self.client.get_paginator("list_functions").paginate():
            for config in page["Functions"]:
                if config["FunctionName"].startswith(self.prefix):
                    found[config["FunctionName"][len(self.prefix):]] = config
        return found

    def deploy(self, specs: Iterable[FunctionSpec],
               progress: Callable[[str], None] = lambda _: None) -> list[str]:
        """Create or update each function; return the names that changed."""
        current = self.deployed()
        changed = []
        for spec in specs:
            package = build_zip(spec)
            code_sha = base64.b64encode(bytes.fromhex(package.sha256)).decode()
            name = self.prefix + spec.name
            settings = {
                "Role": self.role_arn,
                "Handler": spec.handler,
                "Runtime": spec.runtime,
                "Timeout": max(1, math.ceil(spec.timeout)),
                "MemorySize": spec.memory,
                "Description": spec.description[:256],
            }
            existing = current.get(spec.name)
            if existing is None:
                progress(f"creating function {name}")
                self.client.create_function(
                    FunctionName=name, Code={"ZipFile": package.data}, Publish=False, **settings
                )
            else:
                same_code = existing.get("CodeSha256") == code_sha
                same_settings = all(existing.get(k) == v for k, v in settings.items())
                if same_code and same_settings:
                    continue
                if not same_code:
                    progress(f"updating code of {name}")
                    self.client.update_function_code(FunctionName=name, ZipFile=package.data)
                    self._wait_updated(name)
                if not same_settings:
                    progress(f"updating settings of {name}")
                    self.client.update_function_configuration(FunctionName=name, **settings)
                    self._wait_updated(name)
            changed.append(spec.name)
        return changed

    def destroy(self, names: Iterable[str],
                progress: Callable[[str], None] = lambda _: None) -> list[str]:
        removed = []
        current = self.deployed()
        for name in names:
            if name in current:
                progress(f"deleting function {self.prefix + name}")
                self.client.delete_function(FunctionName=self.prefix + name)
                removed.append(name)
        return removed

    def _wait_updated(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            config = self.client.get_function_configuration(FunctionName=name)
            if config.get("LastUpdateStatus", "Successful") != "InProgress":
                return
            time.sleep(0.5)
