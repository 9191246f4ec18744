"""The shape the project keeps: who may import whom, and no private names of other libraries.

``echo.core`` is policy: it reaches the wire only through ``echo.transport.base`` and other
nodes only through ``echo.broker.base``, and knows nothing of the dev loop or deploy
targets. The wire and the broker know nothing of the core. No module of Echo touches a
private attribute (``obj._name``) other than its own (``self``/``cls``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ECHO = Path(__file__).resolve().parent.parent / "echo"

FORBIDDEN_IMPORTS = {
    # package: prefixes it must never import
    "core": ("engineio", "socketio", "uvicorn.", "websockets", "echo.emulator", "echo.targets",
             "echo.transport.native", "echo.transport.pysocketio", "echo.broker.redis"),
    "transport": ("echo.core", "echo.broker", "echo.emulator", "echo.targets"),
    "broker": ("echo.core", "echo.emulator", "echo.targets", "engineio", "socketio"),
}
ALLOWED = {
    # the composition root picks the implementations by name, lazily
    ("core/app.py", "echo.broker.redis"),
    # the python-socketio transport is the one module that may use python-socketio
}


def _modules(package: str) -> list[Path]:
    return sorted((ECHO / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _matches(module: str, prefix: str) -> bool:
    """``prefix`` names a package and its submodules; with a trailing dot, submodules only."""
    if prefix.endswith("."):
        return module.startswith(prefix)
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_layers_import_only_what_they_may(package: str) -> None:
    problems = []
    for path in _modules(package):
        relative = path.relative_to(ECHO).as_posix()
        for line, module in _imports(path):
            for prefix in FORBIDDEN_IMPORTS[package]:
                if _matches(module, prefix) and (relative, prefix) not in ALLOWED:
                    problems.append(f"echo/{relative}:{line} imports {module}")
    assert not problems, "\n".join(problems)


def test_only_the_python_socketio_transport_imports_python_socketio() -> None:
    """On the server side; the SDK's socket client (sdk/realtime.py) is a client of Echo and
    uses python-socketio's AsyncClient, through its public API too."""
    problems = []
    for path in sorted(ECHO.rglob("*.py")):
        relative = path.relative_to(ECHO).as_posix()
        if relative in ("transport/pysocketio.py", "sdk/realtime.py"):
            continue
        for line, module in _imports(path):
            if module.split(".")[0] in ("socketio", "engineio"):
                problems.append(f"echo/{relative}:{line} imports {module}")
    assert not problems, "\n".join(problems)


def private_accesses(source: str) -> list[tuple[int, str]]:
    """``x._name`` other than on ``self``, ``cls`` or ``super()``, and ``from lib import _name``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
                continue
            found.append((node.lineno, ast.unparse(node)))
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and not node.module.startswith("echo"):
            found += [(node.lineno, f"from {node.module} import {alias.name}")
                      for alias in node.names if alias.name.startswith("_")]
    return found


def test_no_private_attribute_of_another_object_anywhere() -> None:
    problems = [f"echo/{path.relative_to(ECHO).as_posix()}:{line} {text}"
                for path in sorted(ECHO.rglob("*.py"))
                for line, text in private_accesses(path.read_text())]
    assert not problems, "\n".join(problems)


def test_the_scan_finds_what_it_looks_for() -> None:
    sample = ("from engineio.packet import _x\n"
              "def f(self, sock):\n    self._ok = super()._ok\n    return sock.queue._queue\n")
    assert private_accesses(sample) == [(1, "from engineio.packet import _x"),
                                        (4, "sock.queue._queue")]
