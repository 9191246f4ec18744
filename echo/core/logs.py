"""Logs that an attacker cannot blow up: every record's message bounded and on one line.

Client-controlled text (namespaces, channel names, payload excerpts, app names in a PUT)
reaches log messages in many places; bounding each call site is easy to forget, so the
formatter bounds every record: at most :data:`MAX_MESSAGE` characters, control characters
shown escaped (a forged newline cannot fake a second record). Three styles:

- ``plain``: one line per record (files, containers, collectors);
- ``json``: one JSON object per line (``ts``, ``level``, ``logger``, ``message``, ``exc``);
- ``rich``: for a person at a terminal, without rich's highlighter (whose regexes are
  quadratic on long unbroken text) and without markup.

``auto`` (the default) is ``rich`` on a terminal and ``plain`` otherwise.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

MAX_MESSAGE = 2000
STYLES = ("auto", "plain", "json", "rich")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line, control characters escaped, cut at ``limit`` with a note."""
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def _message(record: logging.LogRecord) -> str:
    try:
        return bounded(record.getMessage())
    except Exception as exc:  # a bad format string must not lose the record
        return bounded(f"{record.msg!r} (unformattable: {exc})")


class BoundedFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _message(record)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": _message(record)}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)[-8000:]
        return json.dumps(entry, ensure_ascii=False)


def handler_for(style: str, *, terminal: bool) -> logging.Handler:
    if style == "auto":
        style = "rich" if terminal else "plain"
    if style == "rich":
        from rich.console import Console
        from rich.highlighter import NullHighlighter
        from rich.logging import RichHandler

        rich = RichHandler(console=Console(stderr=True), show_path=False, markup=False,
                           highlighter=NullHighlighter())
        rich.setFormatter(BoundedFormatter("%(name)s: %(message)s"))
        return rich
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(JsonFormatter() if style == "json" else
                       BoundedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return plain


def configure(level: str, style: str = "auto", *, terminal: bool | None = None) -> None:
    """Send every logger's records through one bounded handler of ``style``."""
    if terminal is None:
        terminal = sys.stderr.isatty()
    logging.basicConfig(level=level.upper(), handlers=[handler_for(style, terminal=terminal)],
                        force=True)
