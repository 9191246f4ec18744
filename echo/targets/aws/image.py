"""The server image on AWS: build the project's image with the ``docker`` SDK, push it to ECR.

The build itself is the Docker target's (:func:`echo.targets.docker.images.build_image`):
Echo's ``Dockerfile`` with Echo's sources and the project side by side, entries sorted, so an
unchanged project builds to the same image id. The ECR tag is that id, so an unchanged
project pushes nothing and leaves the task definition (and so the stack) unchanged.

``-o image=URI`` skips all of this; so must a machine without a reachable Docker engine.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from botocore.exceptions import ClientError

from echo.config import Settings
from echo.targets.base import Progress, TargetError

BUILD_TIMEOUT = 1800  # seconds one engine call (a build step, a layer upload) may stay silent
KEPT_IMAGES = 10
"""Images an ECR repository keeps (a lifecycle rule expires the older ones)."""
ARCHITECTURES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "arm64", "aarch64": "arm64"}


def docker_client() -> Any:
    """A client of a reachable engine, or a TargetError that says what to do instead."""
    try:
        import docker

        docker.from_env(timeout=10).ping()  # fail fast when there is no engine
        client = docker.from_env(timeout=BUILD_TIMEOUT)
    except Exception as exc:  # no socket, no permission, engine down: all mean the same here
        raise TargetError(
            f"Docker is not reachable ({type(exc).__name__}: {str(exc)[:160]}), so the server "
            "image cannot be built here: start Docker, or build the image elsewhere from Echo's "
            "Dockerfile, push it, and pass -o image=URI"
        ) from None
    return client


def ensure_repository(ecr: Any, name: str, progress: Progress) -> dict[str, Any]:
    try:
        return ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except ecr.exceptions.RepositoryNotFoundException:
        progress(f"creating ECR repository {name}")
        repository = ecr.create_repository(
            repositoryName=name, imageScanningConfiguration={"scanOnPush": True},
            tags=[{"Key": "echo:deployment", "Value": name}],
        )["repository"]
        # every deploy of changed code pushes an image: keep the last few, not all of them
        ecr.put_lifecycle_policy(repositoryName=name, lifecyclePolicyText=json.dumps(
            {"rules": [{"rulePriority": 1, "description": f"keep the last {KEPT_IMAGES} images",
                        "selection": {"tagStatus": "any", "countType": "imageCountMoreThan",
                                      "countNumber": KEPT_IMAGES},
                        "action": {"type": "expire"}}]}))
        return repository


def _pushed(ecr: Any, repository: str, tag: str) -> bool:
    try:
        ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])
        return True
    except ClientError:
        return False


def build_and_push(ecr: Any, settings: Settings, repository: str, base_image: str | None,
                   progress: Progress) -> tuple[str, str]:
    """Build the project's image and push it; return ``(image URI, architecture)``."""
    from echo.targets.docker.images import build_image

    client = docker_client()
    local_tag = f"{repository}:aws-build"
    image_id = build_image(client, settings, local_tag, {"echo.deployment": repository},
                           base_image, progress)
    image = client.images.get(image_id)
    architecture = ARCHITECTURES.get(str(image.attrs.get("Architecture", "amd64")), "x86_64")
    tag = image_id.split(":", 1)[-1][:20]
    repo = ensure_repository(ecr, repository, progress)
    uri = f"{repo['repositoryUri']}:{tag}"
    if _pushed(ecr, repository, tag):
        progress(f"image {uri} is already in ECR")
        return uri, architecture
    token = ecr.get_authorization_token()["authorizationData"][0]
    username, _, password = base64.b64decode(token["authorizationToken"]).decode().partition(":")
    image.tag(repo["repositoryUri"], tag)
    progress(f"pushing {uri}")
    _push(client, repo["repositoryUri"], tag, {"username": username, "password": password},
          uri, progress)
    return uri, architecture


def _push(client: Any, repository_uri: str, tag: str, auth: dict[str, str], uri: str,
          progress: Progress) -> None:
    """Push, streaming the engine's status lines; any failure is a TargetError."""
    import docker.errors

    hint = ("check that this identity may push to ECR (ecr:InitiateLayerUpload...) and that "
            "the engine reaches the registry, or push yourself and pass -o image=URI")
    last = ""
    try:
        for chunk in client.api.push(repository_uri, tag=tag, stream=True, decode=True,
                                     auth_config=auth):
            if "error" in chunk:
                raise TargetError(f"pushing {uri} failed: {str(chunk['error']).strip()}; {hint}")
            status = str(chunk.get("status", ""))
            if status and status != last and not status.startswith(("Pushing", "Waiting")):
                progress(f"push: {status}")
                last = status
    except (docker.errors.DockerException, OSError) as exc:
        raise TargetError(f"pushing {uri} failed: {exc}; {hint}") from None
