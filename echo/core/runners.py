"""Runners execute echo functions. One small interface, several backends.

A backend is found by name through the ``echo.runners`` entry-point group, so the server
never imports a particular one: ``echoctl dev`` plugs in the local worker-process runner, a
cloud deployment a Lambda runner, and a third party can add its own package.
"""

from __future__ import annotations

import abc
from dataclasses import KW_ONLY, dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from echo.config import Settings
    from echo.core.functions import FunctionSpec

RUNNER_GROUP = "echo.runners"


@dataclass(frozen=True)
class InvocationContext:
    """Who published what where; reaches the function as Lambda's ``client_context.custom``."""

    app: str
    channel: str
    uuid: str | None
    message_id: str
    _: KW_ONLY
    encrypted: bool = False
    """An encrypted channel's (trusted) function: its host decrypts the event and seals the
    result (:mod:`echo.runners.trusted`)."""
    notes: dict[str, Any] | None = field(default=None, compare=False)
    """Given (the dev inspector): a runner that can, writes what the invocation printed or
    logged (``logs``: lines) and, when it raised, the ``traceback`` here."""

    def as_dict(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "app": self.app,
            "channel": self.channel,
            "uuid": self.uuid,
            "messageId": self.message_id,
        }
        if self.encrypted:
            fields["encrypted"] = True
        return fields


class FunctionErrorKind(StrEnum):
    """Why a function gave no usable result (README: Failures)."""

    RAISED = "raised"
    """The handler raised."""
    TIMEOUT = "timeout"
    BAD_RESULT = "bad_result"
    """Not JSON, or not the runner's answer shape."""
    CRASHED = "crashed"
    """The worker process died (or the runner shut down)."""
    NOT_FOUND = "not_found"
    LOAD_FAILED = "load_failed"
    """The code or its configuration could not be loaded."""
    FAILED = "failed"
    """The runner itself could not reach the function."""


@dataclass(frozen=True)
class ChainStep:
    """One function of a chain run in one call: its result (or the FunctionError it ended
    with) and how long it took."""

    result: Any
    seconds: float


class FunctionError(Exception):
    """An echo function did not produce a usable result; ``kind`` says how."""

    def __init__(self, function: str, kind: FunctionErrorKind | str, detail: str) -> None:
        try:
            self.kind = FunctionErrorKind(kind)
        except ValueError:  # a worker's answer with a kind this version does not know
            self.kind = FunctionErrorKind.RAISED
        super().__init__(f"function {function!r} {self.kind}: {detail}")
        self.function = function
        self.detail = detail


class Runner(abc.ABC):
    """Runs one echo function on one event and returns its JSON-compatible result."""

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings: Settings) -> Runner:
        """Build the runner a server with ``settings`` should use."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (processes, clients) before the first invoke."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything; invoke is not called afterwards."""

    @abc.abstractmethod
    async def invoke(self, spec: FunctionSpec, event: Any, context: InvocationContext) -> Any:
        """Return the function's result (``None`` filters the message) or raise FunctionError.

        The runner enforces ``spec.timeout``; the pipeline handles retries and ``on_error``.
        """

    def reload(self, functions: set[str] | None = None) -> None:  # noqa: B027 - optional hook
        """Pick up changed code for ``functions`` (all when None) on the next invoke."""

    def can_chain(self, specs: list[FunctionSpec]) -> bool:
        """Whether :meth:`invoke_chain` can run these functions in one call (a runner whose
        every call is a round trip to a worker saves all but one)."""
        return False

    async def invoke_chain(self, specs: list[FunctionSpec], event: Any,
                           context: InvocationContext) -> list[ChainStep]:
        """Each function's step in turn, up to the first None result or FunctionError (last
        in the list); raises FunctionError when the call as a whole failed."""
        raise NotImplementedError


class RunnerSet(Runner):
    """The project's runner plus any a function asks for in its function.toml (``runner =``).

    Backends are created on first use, so a project that never names ``lambda`` never
    imports boto3.
    """

    def __init__(self, settings: Settings, default: Runner | None = None) -> None:
        self.settings = settings
        self._runners: dict[str, Runner] = {settings.runner: default} if default else {}
        self._started: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> RunnerSet:
        return cls(settings)

    async def _get(self, name: str) -> Runner:
        runner = self._runners.get(name)
        if runner is None:
            runner = load_runner_class(name).from_settings(self.settings)
            self._runners[name] = runner
        if name not in self._started:
            self._started.add(name)
            await runner.start()
        return runner

    async def start(self) -> None:
        await self._get(self.settings.runner)

    async def close(self) -> None:
        for runner in self._runners.values():
            await runner.close()

    def reload(self, functions: set[str] | None = None) -> None:
        for runner in self._runners.values():
            runner.reload(functions)

    def _chain_backend(self, specs: list[FunctionSpec]) -> Runner | None:
        names = {spec.runner or self.settings.runner for spec in specs}
        if len(names) != 1:
            return None
        runner = self._runners.get(names.pop())
        return runner if runner is not None and runner.can_chain(specs) else None

    def can_chain(self, specs: list[FunctionSpec]) -> bool:
        return self._chain_backend(specs) is not None

    async def invoke_chain(self, specs: list[FunctionSpec], event: Any,
                           context: InvocationContext) -> list[ChainStep]:
        runner = self._chain_backend(specs)
        if runner is None:
            raise FunctionError(specs[0].name, FunctionErrorKind.FAILED, "no runner chains these")
        return await runner.invoke_chain(specs, event, context)

    async def invoke(self, spec: FunctionSpec, event: Any, context: InvocationContext) -> Any:
        try:
            runner = await self._get(spec.runner or self.settings.runner)
        except LookupError as exc:
            raise FunctionError(spec.name, FunctionErrorKind.LOAD_FAILED, str(exc)) from None
        return await runner.invoke(spec, event, context)


def load_runner_class(name: str) -> type[Runner]:
    """Find a runner backend registered under ``name`` in the ``echo.runners`` group."""
    found = entry_points(group=RUNNER_GROUP, name=name)
    if not found:
        available = sorted(ep.name for ep in entry_points(group=RUNNER_GROUP))
        raise LookupError(f"no runner named {name!r} (available: {', '.join(available)})")
    runner_class = next(iter(found)).load()
    if not (isinstance(runner_class, type) and issubclass(runner_class, Runner)):
        raise LookupError(f"runner {name!r} does not point at a Runner subclass")
    return runner_class
