"""Echo functions on disk: ``functions/NAME/handler.py`` plus an optional ``function.toml``.

The folder is the unit everything else works with: the local runner runs it, the Lambda
packager zips it. ``function.toml`` keys (all optional)::

    handler = "handler.handler"   # module.function, as in Lambda
    timeout = 3.0                  # seconds per invocation
    description = "..."
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from echo.core.associations import FUNCTION_NAME

SPEC_FILE = "function.toml"
_HANDLER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
_KEYS = {"handler", "timeout", "description", "runtime"}


class FunctionConfigError(ValueError):
    """A function folder or its function.toml is invalid; the message names the file."""


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    path: Path
    handler: str = "handler.handler"
    timeout: float = 3.0
    description: str = ""

    @property
    def module_file(self) -> Path:
        return self.path / (self.handler.split(".", 1)[0] + ".py")

    @property
    def function_name(self) -> str:
        return self.handler.split(".", 1)[1]


def load_spec(path: Path, default_timeout: float = 3.0) -> FunctionSpec:
    name = path.name
    if not FUNCTION_NAME.match(name):
        raise FunctionConfigError(f"{path}: {name!r} is not a function name (letters, digits, - _)")
    values: dict[str, object] = {}
    spec_file = path / SPEC_FILE
    if spec_file.exists():
        try:
            values = tomllib.loads(spec_file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise FunctionConfigError(f"{spec_file}: not valid TOML ({exc})") from None
        unknown = set(values) - _KEYS
        if unknown:
            raise FunctionConfigError(
                f"{spec_file}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_KEYS))})"
            )
    handler = values.get("handler", "handler.handler")
    if not isinstance(handler, str) or not _HANDLER.match(handler):
        raise FunctionConfigError(f"{spec_file}: handler must look like 'module.function'")
    timeout = values.get("timeout", default_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 900:
        raise FunctionConfigError(f"{spec_file}: timeout must be a number of seconds in (0, 900]")
    description = values.get("description", "")
    if not isinstance(description, str):
        raise FunctionConfigError(f"{spec_file}: description must be a string")
    spec = FunctionSpec(name, path, handler, float(timeout), description)
    if not spec.module_file.exists():
        raise FunctionConfigError(f"{path}: no {spec.module_file.name} (handler {handler!r})")
    return spec


def discover(functions_dir: Path, default_timeout: float = 3.0) -> dict[str, FunctionSpec]:
    """Every valid function folder; invalid ones raise, so a typo is never silently ignored."""
    specs: dict[str, FunctionSpec] = {}
    if not functions_dir.is_dir():
        return specs
    for path in sorted(functions_dir.iterdir()):
        if path.is_dir() and not path.name.startswith((".", "_")):
            specs[path.name] = load_spec(path, default_timeout)
    return specs
