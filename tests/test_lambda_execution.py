"""The lambda runner against moto with a Docker engine: moto really executes the code.

Without an engine moto echoes payloads (tests/test_runners.py covers that plumbing). Here a
Lambda runtime image built locally (tests/fixtures/lambda-runtime) lets moto run each
deployed zip in a container, so the demo chain's transformations and a raising function's
error come back from "Lambda" itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from echo.core.functions import FunctionCatalog
from echo.core.runners import FunctionError, InvocationContext
from echo.runners.lambda_deploy import LambdaDeployer
from echo.runners.lambda_runner import LambdaRunner
from tests.conftest import MotoServer, make_project
from tests.test_docker import BASE_IMAGE, engine, not_run, require_image

pytestmark = [pytest.mark.anyio, pytest.mark.aws, pytest.mark.docker]

RUNTIME_IMAGE = "echo-lambda-runtime"
RUNTIME_DIR = Path(__file__).parent / "fixtures" / "lambda-runtime"


@pytest.fixture(scope="module")
def runtime_image() -> str:
    """Build the test runtime image (and name the base busybox, which moto also runs)."""
    if BASE_IMAGE is None:
        not_run("ECHO_TEST_BASE_IMAGE is not set; `source scripts/docker-ci.sh` builds one")
    require_image(BASE_IMAGE)
    client = engine()
    import docker.errors

    try:
        client.images.get("busybox:latest")
    except docker.errors.ImageNotFound:  # moto's helper container only needs `sleep`
        client.images.get(BASE_IMAGE).tag("busybox", "latest")
    client.images.build(path=str(RUNTIME_DIR), tag=f"{RUNTIME_IMAGE}:python3.12",
                        buildargs={"BASE": BASE_IMAGE}, rm=True)
    return RUNTIME_IMAGE


@pytest.fixture(scope="module")
def executing_moto(tmp_path_factory: pytest.TempPathFactory,
                   runtime_image: str) -> Iterator[MotoServer]:
    previous = os.environ.get("MOTO_DOCKER_LAMBDA_IMAGE")
    os.environ["MOTO_DOCKER_LAMBDA_IMAGE"] = runtime_image
    try:
        server = MotoServer(tmp_path_factory.mktemp("moto-docker"), use_docker=True).start()
    finally:
        if previous is None:
            os.environ.pop("MOTO_DOCKER_LAMBDA_IMAGE")
        else:
            os.environ["MOTO_DOCKER_LAMBDA_IMAGE"] = previous
    yield server
    server.stop()


@pytest.fixture(scope="module")
def deployed(executing_moto: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = make_project(tmp_path_factory.mktemp("lambda-exec"))
    catalog = FunctionCatalog(project / "functions")
    role = LambdaDeployer.ensure_role(executing_moto.client("iam"), "echo-test")
    deployer = LambdaDeployer(executing_moto.client("lambda"), "echo-test-", role)
    deployer.deploy([catalog.get(n) for n in ("demo-angry", "demo-emojify", "fail-raise")])
    return project


async def test_moto_runs_the_deployed_code_through_the_lambda_runner(
    executing_moto: MotoServer, deployed: Path
) -> None:
    runner = LambdaRunner(executing_moto.url, "us-east-1", "echo-test-")
    await runner.start()
    catalog = FunctionCatalog(deployed / "functions")
    context = InvocationContext("chat-demo", "emoji", "alice", "m-1")
    try:
        angry = await runner.invoke(catalog.get("demo-angry"), {"text": "hello"}, context)
        assert angry == {"text": "HELLO!!!"}
        emoji = await runner.invoke(catalog.get("demo-emojify"), angry, context)
        assert emoji == {"text": "\N{ANGRY FACE} HELLO!!! \N{ANGRY FACE}"}
        with pytest.raises(FunctionError) as info:
            await runner.invoke(catalog.get("fail-raise"), "x", context)
        assert info.value.kind == "raised"
        assert "ValueError: boom from fail-raise" in info.value.detail
    finally:
        await runner.close()
