"""Where the running dev server listens, for the CLI commands that talk to it.

``echoctl dev --port 4000`` writes ``.echo/dev-server.json`` once it listens and removes it
when it stops, so ``echoctl jwt`` and ``echoctl associations push`` in the same project reach
that port without being told, the way the server chose it (flag, ECHO_PORT, echo.toml).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from echo.config import Settings

ADDRESS_FILE = Path(".echo") / "dev-server.json"


def record(settings: Settings) -> Path:
    path = settings.project_dir / ADDRESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"url": settings.local_url, "pid": os.getpid()}), encoding="utf-8")
    return path


def forget(path: Path) -> None:
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded.get("pid") == os.getpid():  # another dev server may have taken over
            path.unlink()
    except (OSError, ValueError):
        pass


def dev_server_url(settings: Settings) -> str:
    """The running dev server's URL for this project, else where settings say it would be."""
    try:
        recorded = json.loads((settings.project_dir / ADDRESS_FILE).read_text(encoding="utf-8"))
        os.kill(int(recorded["pid"]), 0)  # still running?
        return str(recorded["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return settings.local_url
