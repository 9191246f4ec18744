"""The Docker target: ``echoctl deploy --target docker`` runs Echo as containers on one engine."""

from echo.targets.docker.stack import DockerTarget

__all__ = ["DockerTarget"]
