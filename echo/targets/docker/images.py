"""The Echo image of a project: a build context made of Echo's sources and the project.

The context holds Echo's top-level ``Dockerfile``, Echo's sources under ``echo-src/`` and
the project's functions, associations and ``echo.toml`` under ``project/``. Entries are
sorted and carry no times or owners, so an unchanged project builds to the same image id
from the engine's cache.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import echo
from echo.config import CONFIG_FILE, Settings
from echo.targets.base import Progress, TargetError

SKIPPED = {"__pycache__", "node_modules", ".DS_Store", "_template"}
ECHO_SOURCES = ("pyproject.toml", "README.md", "associations.json", "echo", "functions", "apps")


def echo_source() -> Path:
    """Echo's checkout (the Dockerfile and pyproject.toml next to the ``echo`` package)."""
    root = Path(echo.__file__).resolve().parent.parent
    if not all((root / name).exists() for name in ("Dockerfile", *ECHO_SOURCES)):
        raise TargetError(
            f"Echo's sources (Dockerfile, pyproject.toml) are not next to {root / 'echo'}: "
            "install Echo from a checkout (`pip install -e .`), or build an image with its "
            "Dockerfile and pass -o image=NAME"
        )
    return root


def _walk(path: Path) -> Iterator[Path]:
    yield path
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name not in SKIPPED and not child.name.endswith(".pyc"):
                yield from _walk(child)


def _add(archive: tarfile.TarFile, source: Path, name: str) -> None:
    for path in _walk(source):
        info = tarfile.TarInfo(name + path.as_posix()[len(source.as_posix()):])
        info.mode = 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644
        if path.is_dir():
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        else:
            data = path.read_bytes()
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


def build_context(settings: Settings, source: Path) -> bytes:
    """The tar sent to the engine: Dockerfile, ``echo-src/`` and ``project/``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _add(archive, source / "Dockerfile", "Dockerfile")
        for name in ECHO_SOURCES:
            _add(archive, source / name, f"echo-src/{name}")
        functions = settings.path(settings.functions_dir)
        if functions.is_dir():
            _add(archive, functions, "project/functions")
        else:
            info = tarfile.TarInfo("project/functions")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(info)
        associations = settings.path(settings.associations)
        if associations.exists():
            _add(archive, associations, "project/associations.json")
        else:
            _add_bytes(archive, "project/associations.json", b'{"applications": {}}\n')
        if (settings.project_dir / CONFIG_FILE).exists():
            _add(archive, settings.project_dir / CONFIG_FILE, f"project/{CONFIG_FILE}")
    return buffer.getvalue()


def pip_build_args() -> dict[str, str]:
    """A package index configured for pip here (PIP_INDEX_URL...) is used by the build too."""
    args = {}
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        urls = [u for u in os.environ.get(name, "").split() if u.startswith(("http://", "https://"))]
        if urls:
            args[name] = " ".join(urls)
    return args


def build_image(client: Any, settings: Settings, tag: str, labels: dict[str, str],
                base_image: str | None, progress: Progress) -> str:
    """Build the project's image; return its id. A failed step raises TargetError."""
    import docker.errors

    source = echo_source()
    buildargs = {"ECHO_SRC": "echo-src", "PROJECT": "project", **pip_build_args()}
    if base_image:
        buildargs["BASE_IMAGE"] = base_image
    progress(f"building image {tag} from {settings.project_dir} (base {base_image or 'default'})")
    tail: list[str] = []
    try:
        stream = client.api.build(
            fileobj=io.BytesIO(build_context(settings, source)), custom_context=True, tag=tag,
            buildargs=buildargs, labels=labels, rm=True, forcerm=True, decode=True,
        )
        for chunk in stream:
            if "error" in chunk:
                detail = "\n".join(tail[-8:])
                raise TargetError(
                    f"image build failed: {chunk['error'].strip()}\n{detail}\n"
                    "fix the failing step above (a base image without python3 -m venv? "
                    "no access to PyPI?), or pass -o base_image=IMAGE"
                )
            line = str(chunk.get("stream", "")).strip()
            if line:
                tail.append(line)
                if line.startswith("Step "):
                    step, _, instruction = line.partition(" : ")
                    progress(f"build {step.lower()}: {' '.join(instruction.split())[:70]}")
    except docker.errors.APIError as exc:
        raise TargetError(f"image build failed: {exc.explanation or exc}") from exc
    image = client.images.get(tag)
    return str(image.id)
