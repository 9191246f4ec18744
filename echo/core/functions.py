"""Echo functions on disk: ``functions/NAME/handler.py`` (or, in JavaScript, ``index.js`` /
``index.mjs`` as Ekko wrote them) plus an optional ``function.toml``.

The folder is the unit everything works with: the local runner runs it, the Lambda packager
zips it, the pipeline reads its policy. ``function.toml`` keys (all optional)::

    handler = "handler.handler"  # module.function, as in Lambda
    timeout = 3.0                 # seconds per invocation
    retries = 0                   # extra attempts after raised / timeout / crashed
    on_error = "error"            # error: not delivered, publisher gets an error ack
                                  # drop:  not delivered, publisher ack says droppedBy
                                  # pass:  the message goes on unchanged past this function
    concurrency = 0               # max invocations at once on this node (0 = no limit)
    runner = "local"              # override the project's runner for this function
                                  # ("inline": in the server process, trusted code only)
    url = "https://..."           # for runner = "http"
    description = "..."
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echo.core.associations import FUNCTION_NAME, Associations

SPEC_FILE = "function.toml"
PYTHON_RUNTIME = "python3.12"
NODE_RUNTIME = "nodejs20.x"
JS_EXTENSIONS = (".mjs", ".js", ".cjs")
ON_ERROR = ("error", "drop", "pass")
_HANDLER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
_KEYS = {"handler", "timeout", "retries", "on_error", "concurrency", "runner", "url",
         "description", "runtime", "memory"}


class FunctionConfigError(ValueError):
    """A function folder or its function.toml is invalid; the message names the file."""


@dataclass(frozen=True)
class FunctionSpec:
    """One function's code location and policy. ``path`` is None for a remote-only function."""

    name: str
    path: Path | None = None
    handler: str = "handler.handler"
    timeout: float = 3.0
    retries: int = 0
    on_error: str = "error"
    concurrency: int = 0
    runner: str | None = None
    url: str | None = None
    description: str = ""
    runtime: str = PYTHON_RUNTIME
    memory: int = 128

    @property
    def language(self) -> str:
        """``python`` or ``javascript``, from the runtime (as Lambda names it)."""
        return "javascript" if self.runtime.startswith("nodejs") else "python"

    @property
    def module_file(self) -> Path | None:
        if self.path is None:
            return None
        module = self.handler.split(".", 1)[0]
        if self.language == "javascript":
            found = [self.path / (module + ext) for ext in JS_EXTENSIONS
                     if (self.path / (module + ext)).exists()]
            return found[0] if found else self.path / (module + ".js")
        return self.path / (module + ".py")


def _number(spec_file: Path, key: str, value: Any, low: float, high: float, whole: bool) -> Any:
    kinds = int if whole else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "a whole number" if whole else "a number"
        raise FunctionConfigError(f"{spec_file}: {key} must be {kind} from {low:g} to {high:g}")
    return value


def load_spec(path: Path, default_timeout: float = 3.0) -> FunctionSpec:
    name = path.name
    if not FUNCTION_NAME.match(name):
        raise FunctionConfigError(f"{path}: {name!r} is not a function name (letters, digits, - _)")
    values: dict[str, Any] = {}
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
    javascript = "runtime" not in values and not (path / "handler.py").exists() and any(
        (path / f"index{ext}").exists() for ext in JS_EXTENSIONS)  # Ekko's layout
    handler = values.get("handler", "index.handler" if javascript else "handler.handler")
    if not isinstance(handler, str) or not _HANDLER.match(handler):
        raise FunctionConfigError(f"{spec_file}: handler must look like 'module.function'")
    timeout = values.get("timeout", default_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 900:
        raise FunctionConfigError(f"{spec_file}: timeout must be a number of seconds in (0, 900]")
    on_error = values.get("on_error", "error")
    if on_error not in ON_ERROR:
        raise FunctionConfigError(f"{spec_file}: on_error must be one of {', '.join(ON_ERROR)}")
    for key in ("runner", "url", "description", "runtime"):
        if key in values and not isinstance(values[key], str):
            raise FunctionConfigError(f"{spec_file}: {key} must be a string")
    runner = values.get("runner")
    if runner == "http" and not values.get("url"):
        raise FunctionConfigError(f"{spec_file}: runner = \"http\" needs url = \"https://...\"")
    spec = FunctionSpec(
        name=name,
        path=path,
        handler=handler,
        timeout=float(timeout),
        retries=_number(spec_file, "retries", values.get("retries", 0), 0, 10, whole=True),
        on_error=on_error,
        concurrency=_number(spec_file, "concurrency", values.get("concurrency", 0), 0, 10_000,
                            whole=True),
        runner=runner,
        url=values.get("url"),
        description=values.get("description", ""),
        runtime=values.get("runtime", NODE_RUNTIME if javascript else PYTHON_RUNTIME),
        memory=_number(spec_file, "memory", values.get("memory", 128), 128, 10_240, whole=True),
    )
    if runner in (None, "local", "lambda", "inline") and not spec.module_file.exists():  # type: ignore[union-attr]
        raise FunctionConfigError(f"{path}: no {spec.module_file.name} (handler {handler!r}; a "  # type: ignore[union-attr]
                                  "function is handler.py, or index.js / index.mjs)")
    return spec


def _top_level_names(body: list[ast.stmt]) -> set[str] | None:
    """Names a module defines when it runs (None when a ``*`` import hides them)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.If | ast.Try | ast.With | ast.For | ast.While):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [handler.body for handler in getattr(node, "handlers", [])]
            for block in blocks:
                inner = _top_level_names(block)
                if inner is None:
                    return None
                names |= inner
    return names


def source_problem(spec: FunctionSpec) -> str | None:
    """What would stop the function's Python module from loading, found without running
    it: a syntax error (file and line) or no top-level handler. None when it looks fine."""
    file = spec.module_file
    if file is None or spec.runner not in (None, "local", "lambda", "inline") or not file.exists():
        return None
    if spec.language == "javascript":
        return _javascript_problem(file, spec.handler.split(".", 1)[1])
    try:
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except SyntaxError as exc:
        return f"{file}, line {exc.lineno}: {exc.msg}"
    except (OSError, ValueError) as exc:
        return f"{file}: cannot be read ({exc})"
    function = spec.handler.split(".", 1)[1]
    names = _top_level_names(tree.body)
    if names is not None and function not in names:
        return (f"{file}: no top-level {function!r} (the handler is {spec.handler!r}: "
                f"define `def {function}(message, context):`)")
    return None


def _javascript_problem(file: Path, export: str) -> str | None:
    """``node --check`` for syntax (it parses, never runs), and a word-level look for the
    export: a module that never says ``handler`` cannot export it."""
    node = shutil.which("node")
    if node is None:
        return f"{file}: a JavaScript function needs Node.js (`node` is not on PATH)"
    try:
        checked = subprocess.run([node, "--check", str(file)], capture_output=True, text=True,
                                 timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{file}: could not be checked with node ({exc})"
    if checked.returncode != 0:
        lines = [line for line in checked.stderr.splitlines() if line.strip()]
        where = lines[0].replace(str(file), file.name) if lines else ""
        what = next((line for line in lines if "Error" in line), "a syntax error")
        return f"{file}: {what} ({where})"
    if not re.search(rf"\b{re.escape(export)}\b", file.read_text(errors="replace")):
        return (f"{file}: no {export!r} export (write `exports.{export} = async (message) => "
                "message`, or `export const {export} = ...`)")
    return None


def missing_functions(associations: Associations, functions_dir: Path) -> list[str]:
    """Each function the document names that has no folder, or that it trusts with an
    encrypted channel's keys on a runner that cannot open envelopes; by its path in the
    document."""
    problems: list[str] = []
    for app, app_doc in associations.document.get("applications", {}).items():
        for index, entry in enumerate(app_doc.get("channels", [])):
            for position, name in enumerate(entry.get("functionNames", [])):
                if not (functions_dir / name).is_dir():
                    problems.append(
                        f"applications.{app}.channels[{index}].functionNames[{position}]: no "
                        f"function {name!r} (no folder {functions_dir / name}; "
                        f"`echoctl functions new {name}` makes one)")
            for position, name in enumerate(entry.get("trustedFunctions", [])):
                runner = _runner_of(functions_dir / name)
                if runner not in (None, "local"):  # only the local workers open envelopes
                    problems.append(
                        f"applications.{app}.channels[{index}].trustedFunctions[{position}]: "
                        f"{name!r} runs on the {runner} runner, which cannot open an encrypted "
                        "channel's messages (trusted functions run on the local runner)")
    return problems


def _runner_of(folder: Path) -> str | None:
    try:
        return load_spec(folder).runner if folder.is_dir() else None
    except FunctionConfigError:
        return None  # reported as the function's own problem


def is_function_name(name: str) -> bool:
    """Whether a folder of that name in the functions folder is a function (not hidden, not
    private, not installed packages)."""
    return not name.startswith((".", "_")) and name != "node_modules"


def function_folders(functions_dir: Path) -> list[Path]:
    """The function folders in ``functions_dir``, sorted (none if it is missing)."""
    if not functions_dir.is_dir():
        return []
    return sorted(p for p in functions_dir.iterdir() if p.is_dir() and is_function_name(p.name))


def discover(functions_dir: Path, default_timeout: float = 3.0) -> dict[str, FunctionSpec]:
    """Every valid function folder; invalid ones raise, so a typo is never silently ignored."""
    return {path.name: load_spec(path, default_timeout) for path in function_folders(functions_dir)}


class FunctionCatalog:
    """Specs by name, read once from disk and cached until ``invalidate`` (hot reload).

    A name with no folder gets a default spec without a path: a remote runner (Lambda,
    HTTP) can still run it, the local runner reports it ``not_found``.
    """

    def __init__(self, functions_dir: Path, default_timeout: float = 3.0) -> None:
        self.functions_dir = functions_dir
        self.default_timeout = default_timeout
        self._specs: dict[str, FunctionSpec] = {}
        self._pinned: dict[str, Path] = {}
        """Functions run from another folder: the copy of their last working code."""

    def get(self, name: str) -> FunctionSpec:
        """The spec for ``name``; raises FunctionConfigError for a broken function.toml."""
        spec = self._specs.get(name)
        if spec is None:
            path = self._pinned.get(name, self.functions_dir / name)
            if path.is_dir():
                spec = load_spec(path, self.default_timeout)
            else:
                spec = FunctionSpec(name=name, timeout=self.default_timeout)
            self._specs[name] = spec
        return spec

    def pin(self, name: str, folder: Path | None) -> None:
        """Run ``name`` from ``folder`` (named like it) instead of its own; None: its own."""
        if folder is None:
            self._pinned.pop(name, None)
        else:
            self._pinned[name] = folder
        self._specs.pop(name, None)

    def invalidate(self, names: set[str] | None = None) -> None:
        if names is None:
            self._specs.clear()
        for name in names or ():
            self._specs.pop(name, None)
