"""The Target interface and its registry (entry points ``echo.targets``).

A target turns a project (settings, ``functions/``, ``associations.json``) into a running
deployment and back. A third party adds one by shipping a package with an ``echo.targets``
entry point; ``echoctl deploy|status|teardown --target NAME`` finds it without Echo
changing. What a deployment needs to remember (endpoint, where its secret is) lives in
``.echo/targets/NAME.json`` in the project, written through :meth:`Target.save_state`.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from echo.config import Settings
from echo.core.associations import Associations

TARGET_GROUP = "echo.targets"

Progress = Callable[[str], None]
"""Reports one line of progress ("building image", "stack CREATE_IN_PROGRESS ...")."""


class TargetError(Exception):
    """A deployment step failed; the message says what failed and what to do next."""


@dataclass
class Outputs:
    """What a user needs from a deployment: where it is and how to get tokens for it."""

    endpoint: str
    secret: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Target(abc.ABC):
    name: str = ""

    def __init__(self, settings: Settings, options: dict[str, str]) -> None:
        self.settings = settings
        self.options = options

    # -- what every target does ---------------------------------------------------------

    @abc.abstractmethod
    def deploy(self, progress: Progress) -> Outputs:
        """Create or update the deployment; a re-run with no change changes nothing."""

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """A JSON-able description of what is running (empty ``{}`` when nothing is)."""

    @abc.abstractmethod
    def teardown(self, progress: Progress) -> None:
        """Remove everything ``deploy`` created."""

    @abc.abstractmethod
    def push_associations(self, associations: Associations, progress: Progress) -> None:
        """Store the document where the deployment reads it and apply it live."""

    def synth(self, out: Path, progress: Progress) -> list[Path]:
        """Write what ``deploy`` would apply (templates, packages) to ``out``; deploy nothing."""
        raise TargetError(f"target {self.name!r} has no --dry-run")

    def outputs(self) -> Outputs:
        state = self.load_state()
        if not state.get("endpoint"):
            raise TargetError(
                f"no {self.name} deployment recorded; run `echoctl deploy --target {self.name}`"
            )
        return Outputs(state["endpoint"], state.get("secret"), state.get("details", {}))

    # -- state kept in the project -------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.settings.project_dir / ".echo" / "targets" / f"{self.name}.json"

    def load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def save_state(self, state: dict[str, Any]) -> None:
        """Write the state (it may hold a secret) readable by the owner only, from the start."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an older file may have had wider permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(state, indent=2) + "\n")

    def forget_state(self) -> None:
        self.state_path.unlink(missing_ok=True)


def available_targets() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=TARGET_GROUP))


def load_target(name: str, settings: Settings, options: dict[str, str]) -> Target:
    found = entry_points(group=TARGET_GROUP, name=name)
    if not found:
        raise LookupError(f"no target named {name!r} (available: {', '.join(available_targets())})")
    target_class = next(iter(found)).load()
    if not (isinstance(target_class, type) and issubclass(target_class, Target)):
        raise LookupError(f"target {name!r} does not point at a Target subclass")
    return target_class(settings, options)
