"""Optional parts of the package: imported where used, with the install command when absent.

``pip install echo-realtime`` is the server and the SDK; ``[aws]`` adds boto3 (the lambda
runner, the AWS target), ``[docker]`` the Docker SDK (the Docker target, building the AWS
image), ``[localstack]`` LocalStack's endpoint lookup, ``[sdk]`` aiohttp for the SDK's
socket client.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install 'echo-realtime[{extra}]'") from None
