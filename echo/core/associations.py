"""The associations document: which echo functions run, in order, on which channels.

Ekko's format, kept as is::

    {"applications": {"chat-demo": {"channels": [
        {"channelName": "angry", "functionNames": ["demo-angry", "demo-emojify"]},
        {"channelName": "chat:*", "functionNames": ["profanity-filter"]}]}}}

A channel name is matched exactly; a name containing ``*``, ``?`` or ``[`` is a glob pattern
(``fnmatch`` rules). An exact entry wins over patterns; among patterns the first listed wins.
An entry may add ``"presence": "count"`` (presence answers counts only, no joined/left
events), ``"ordered": false`` (Echo's extra): its messages are delivered as soon as
their chain finishes instead of in publish order, and ``"history": true`` or
``"history": {"size": 100, "ttl": 600}`` (Echo's extra): its last ``size`` messages, as
delivered, are kept for ``ttl`` seconds for recovery and history reads (settings give what is
left out). ``"encrypted": true`` (Echo's extra) makes it an end-to-end encrypted channel:
publishes must be envelopes (see :mod:`echo.sdk.e2e`), and a function may run on it only when
listed in ``"trustedFunctions"`` too (it is given the key and decrypts; see the README).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any

_GLOB_CHARS = re.compile(r"[*?\[]")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_GLOB_SYNTAX = re.compile(r"\[!?|\]|[*?]")
"""What a pattern may hold besides channel-name characters."""


class AssociationsError(ValueError):
    """The document is invalid; ``path`` points at the offending part (e.g. ``applications.x``)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


MAX_HISTORY_SIZE = 10_000
MAX_HISTORY_TTL = 30 * 24 * 3600.0


@dataclass(frozen=True)
class HistorySpec:
    """A channel's history as the document asks for it (None: the settings' default)."""

    size: int | None = None
    ttl: float | None = None


@dataclass(frozen=True)
class Rule:
    """What applies to a channel: its function chain, whether delivery keeps order, and
    whether its messages are kept (history)."""

    functions: tuple[str, ...] = ()
    ordered: bool = True
    history: HistorySpec | None = None
    presence_counts_only: bool = False
    """``"presence": "count"``: no joined/left events and no member list, only the count
    (a big channel would otherwise send every subscriber every join and leave)."""
    encrypted: bool = False
    """End to end: the server accepts only envelopes here and never sees the plaintext."""


NO_RULE = Rule()


@dataclass(frozen=True)
class AppChains:
    exact: dict[str, Rule] = field(default_factory=dict)
    patterns: tuple[tuple[str, Rule], ...] = ()

    def match(self, channel: str) -> Rule:
        rule = self.exact.get(channel)
        if rule is not None:
            return rule
        for pattern, pattern_rule in self.patterns:
            if fnmatch.fnmatchcase(channel, pattern):
                return pattern_rule
        return NO_RULE

    def rules(self) -> list[tuple[str, Rule]]:
        return [*self.exact.items(), *self.patterns]


@dataclass(frozen=True)
class Associations:
    """A validated document plus a fast ``match(app, channel)``.

    ``version`` is assigned by a store that shares the document between nodes (0 = local
    only); a node never replaces a document with one of a lower version.
    """

    document: dict[str, Any]
    apps: dict[str, AppChains]
    version: int = 0

    @classmethod
    def empty(cls) -> Associations:
        return cls(document={"applications": {}}, apps={})

    def match(self, app: str, channel: str) -> Rule:
        """The rule for a channel of an app; no functions and ordered when none applies."""
        chains = self.apps.get(app)
        return chains.match(channel) if chains else NO_RULE

    def function_names(self) -> set[str]:
        return {
            name
            for chains in self.apps.values()
            for _, rule in chains.rules()
            for name in rule.functions
        }


def _check_app_name(name: str, path: str) -> None:
    """An app is a namespace ``/<app>``: the same characters as a channel name, 1-200."""
    from echo.core.protocol import CHANNEL_NAME

    if not CHANNEL_NAME.match(name):
        raise AssociationsError(f"applications.{name[:80]}", "an app name is 1-200 characters "
                                "of letters, digits and _ - : . @ = /")


def _check_channel_name(name: str, path: str) -> None:
    """A rule for a name no client may use would never apply: refuse it here, not silently."""
    from echo.core.protocol import CHANNEL_NAME

    literal = _GLOB_SYNTAX.sub("", name) if _GLOB_CHARS.search(name) else name
    if len(name) > 200 or (literal and not CHANNEL_NAME.match(literal)):
        raise AssociationsError(path, f"{name[:80]!r} is not a channel name clients may use: "
                                      "1-200 characters of letters, digits and _ - : . @ = / "
                                      "(patterns add * ? [...])")


def _expect(value: Any, kind: type, path: str, described: str) -> Any:
    if not isinstance(value, kind):
        raise AssociationsError(path, f"expected {described}, got {type(value).__name__}")
    return value


def _history(value: Any, path: str) -> HistorySpec | None:
    if value is False or value is None:
        return None
    if value is True:
        return HistorySpec()
    _expect(value, dict, path, 'true, false or an object like {"size": 100, "ttl": 600}')
    unknown = set(value) - {"size", "ttl"}
    if unknown:
        raise AssociationsError(f"{path}.{sorted(unknown)[0]}", "unknown key (expected size, ttl)")
    size, ttl = value.get("size"), value.get("ttl")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                             or not 1 <= size <= MAX_HISTORY_SIZE):
        raise AssociationsError(f"{path}.size",
                                f"must be a whole number of messages, 1 to {MAX_HISTORY_SIZE}")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                            or not 1 <= ttl <= MAX_HISTORY_TTL):
        raise AssociationsError(f"{path}.ttl", f"must be seconds, 1 to {MAX_HISTORY_TTL:.0f}")
    return HistorySpec(size, None if ttl is None else float(ttl))


def _encrypted(entry: dict[str, Any], functions: list[str], path: str) -> bool:
    """``encrypted`` and ``trustedFunctions``: a function on an encrypted channel sees only
    ciphertext, so each one must be trusted with the key explicitly."""
    encrypted = entry.get("encrypted", False)
    if not isinstance(encrypted, bool):
        raise AssociationsError(f"{path}.encrypted", "must be true or false")
    trusted = _expect(entry.get("trustedFunctions", []), list, f"{path}.trustedFunctions",
                      "a list of function names")
    if trusted and not encrypted:
        raise AssociationsError(f"{path}.trustedFunctions",
                                'only an encrypted channel has trusted functions ("encrypted": true)')
    for position, name in enumerate(trusted):
        if name not in functions:
            raise AssociationsError(f"{path}.trustedFunctions[{position}]",
                                    f"{str(name)[:80]!r} is not in this channel's functionNames")
    if encrypted:
        untrusted = [name for name in functions if name not in trusted]
        if untrusted:
            raise AssociationsError(
                f"{path}.functionNames", f"{untrusted[0]!r} cannot run on an encrypted channel: "
                "it would see only ciphertext. Remove it, or trust it with the channel's key by "
                'listing it in "trustedFunctions" (its host then sees the plaintext)')
    return encrypted


def parse_associations(data: Any) -> Associations:
    """Validate a decoded JSON document; raise AssociationsError naming the bad path."""
    _expect(data, dict, "", "a JSON object with an 'applications' key")
    unknown = set(data) - {"applications", "version"}
    if unknown:
        raise AssociationsError(sorted(unknown)[0], "unknown key (expected 'applications')")
    if "applications" not in data:
        raise AssociationsError("applications", "missing")
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**63:
        raise AssociationsError("version", "must be a whole number (the store sets it)")
    applications = _expect(data["applications"], dict, "applications", "an object of apps")

    apps: dict[str, AppChains] = {}
    for app_name, app_doc in applications.items():
        app_path = f"applications.{app_name}"
        if not app_name:
            raise AssociationsError(app_path, "app name must not be empty")
        _check_app_name(app_name, app_path)
        _expect(app_doc, dict, app_path, "an object with a 'channels' list")
        channels = _expect(app_doc.get("channels", []), list, f"{app_path}.channels", "a list")
        exact: dict[str, Rule] = {}
        patterns: list[tuple[str, Rule]] = []
        for index, entry in enumerate(channels):
            entry_path = f"{app_path}.channels[{index}]"
            _expect(entry, dict, entry_path, "an object with channelName and functionNames")
            name = entry.get("channelName")
            if not isinstance(name, str) or not name:
                raise AssociationsError(f"{entry_path}.channelName", "must be a non-empty string")
            _check_channel_name(name, f"{entry_path}.channelName")
            names = _expect(
                entry.get("functionNames", []),
                list,
                f"{entry_path}.functionNames",
                "a list of function names",
            )
            for position, function in enumerate(names):
                if not isinstance(function, str) or not FUNCTION_NAME.match(function):
                    raise AssociationsError(
                        f"{entry_path}.functionNames[{position}]",
                        f"{function!r} is not a function name (letters, digits, - and _)",
                    )
            ordered = entry.get("ordered", True)
            if not isinstance(ordered, bool):
                raise AssociationsError(f"{entry_path}.ordered", "must be true or false")
            unknown = set(entry) - {"channelName", "functionNames", "ordered", "history",
                                    "presence", "encrypted", "trustedFunctions"}
            if unknown:
                raise AssociationsError(f"{entry_path}.{sorted(unknown)[0]}", "unknown key")
            history = _history(entry.get("history", False), f"{entry_path}.history")
            presence = entry.get("presence", "full")
            if presence not in ("full", "count"):
                raise AssociationsError(f"{entry_path}.presence", 'must be "full" or "count"')
            encrypted = _encrypted(entry, names, entry_path)
            rule = Rule(tuple(names), ordered, history, presence == "count", encrypted)
            if _GLOB_CHARS.search(name):
                if any(p == name for p, _ in patterns):
                    raise AssociationsError(f"{entry_path}.channelName", f"{name!r} listed twice")
                patterns.append((name, rule))
            else:
                if name in exact:
                    raise AssociationsError(f"{entry_path}.channelName", f"{name!r} listed twice")
                exact[name] = rule
        apps[app_name] = AppChains(exact=exact, patterns=tuple(patterns))
    return Associations(document=data, apps=apps)


def parse_associations_text(text: str | bytes, source: str = "associations") -> Associations:
    """Parse JSON text; a syntax error names the line and column."""
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise AssociationsError(
            "", f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except UnicodeDecodeError:
        raise AssociationsError("", f"{source} is not UTF-8 text") from None
    except RecursionError:
        raise AssociationsError("", f"{source} is nested too deeply to be an associations "
                                    "document") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise AssociationsError("", f"{source} is not valid JSON ({str(exc)[:120]})") from None
    return parse_associations(data)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
