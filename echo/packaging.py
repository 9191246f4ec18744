"""Build a function folder into a Lambda deployment zip, deterministically.

Same inputs, same bytes: entries sorted, timestamps fixed, permissions normalised, no
bytecode or caches. A ``requirements.txt`` is installed into the zip with pip (pure-Python
wheels only make sense here; Lambda runs Linux). The zip's SHA-256 is what deploys compare
to decide whether a function changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from echo.core.functions import FunctionSpec

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".git", "node_modules"}
_SKIP_SUFFIXES = {".pyc", ".pyo"}
_SKIP_NAMES = {"function.toml", ".DS_Store"}


class PackagingError(Exception):
    """The function could not be packaged; the message names the step."""


@dataclass(frozen=True)
class Package:
    name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _files(root: Path) -> list[tuple[str, Path]]:
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in relative.parts):
            continue
        if path.is_file() and path.suffix not in _SKIP_SUFFIXES and path.name not in _SKIP_NAMES:
            found.append((relative.as_posix(), path))
    return sorted(found)


def _add(archive: zipfile.ZipFile, arcname: str, path: Path) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_FIXED_TIME)
    info.external_attr = (0o755 if path.stat().st_mode & 0o111 else 0o644) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, path.read_bytes(), compresslevel=9)


def pip_install_command(target: Path, requirements: Path) -> list[str]:
    """pip installing ``requirements`` into ``target`` alone (the zip, or a dev function's
    own folder of packages)."""
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--no-compile", "--progress-bar", "off", "--target", str(target), "-r", str(requirements)]


def npm_dependencies(folder: Path) -> bool:
    """Whether ``folder``'s package.json names dependencies (ValueError: not JSON)."""
    manifest = json.loads((folder / "package.json").read_text(encoding="utf-8"))
    return isinstance(manifest, dict) and bool(manifest.get("dependencies"))


def npm_install_command(npm: str, folder: Path) -> list[str]:
    """npm installing ``folder``'s production dependencies into its node_modules: ``ci``
    when a lock file pins them, else ``install`` (writing no lock file into the folder)."""
    locked = (folder / "package-lock.json").exists()
    return [npm, "ci" if locked else "install", "--omit=dev", "--no-audit", "--no-fund",
            *([] if locked else ["--no-package-lock"])]


def _npm_packages(spec: FunctionSpec, scratch: Path) -> list[tuple[str, Path]]:
    """A JavaScript function's production dependencies, installed afresh (not whatever its
    own node_modules holds), as ``node_modules/...`` entries."""
    assert spec.path is not None
    if not npm_dependencies(spec.path):
        return []
    shutil.copytree(spec.path, scratch, ignore=shutil.ignore_patterns("node_modules"))
    npm = shutil.which("npm")
    if npm is None:
        raise PackagingError(f"{spec.name}: its package.json needs npm, which is not on PATH")
    result = subprocess.run(npm_install_command(npm, scratch), cwd=scratch, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise PackagingError(f"{spec.name}: npm could not install package.json: "
                             f"{(result.stderr or result.stdout).strip()[-400:]}")
    return [(f"node_modules/{name}", path) for name, path in _files(scratch / "node_modules")
            if name != ".package-lock.json"]


def build_zip(spec: FunctionSpec) -> Package:
    if spec.path is None or not spec.path.is_dir():
        raise PackagingError(f"{spec.name}: no function folder to package")
    entries = _files(spec.path)
    with tempfile.TemporaryDirectory(prefix=f"echo-pkg-{spec.name}-") as scratch:
        requirements = spec.path / "requirements.txt"
        if requirements.exists():
            target = Path(scratch)
            result = subprocess.run(pip_install_command(target, requirements),
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise PackagingError(
                    f"{spec.name}: pip could not install requirements.txt: "
                    f"{result.stderr.strip()[-400:]}"
                )
            # installer metadata holds install-time paths and records: not needed to run
            entries += [(name, path) for name, path in _files(target)
                        if not name.split("/", 1)[0].endswith((".dist-info", ".egg-info"))]
            entries.sort()
        if spec.language == "javascript" and (spec.path / "package.json").exists():
            entries = sorted([*entries, *_npm_packages(spec, Path(scratch) / "npm")])
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for arcname, path in entries:
                _add(archive, arcname, path)
    return Package(spec.name, buffer.getvalue())
