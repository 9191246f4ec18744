"""Warnings that can fire thousands of times a second (every frame during an outage), logged
at most once a second per kind, with the count of everything they stand for."""

from __future__ import annotations

import logging
import time
from typing import Any


class ThrottledLog:
    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._pending: dict[str, int] = {}

    def warning(self, kind: str, count: int, message: str, *args: Any) -> None:
        """Log ``message % (total, *args)``; ``total`` sums ``count`` over the calls of this
        ``kind`` not logged since the last line."""
        total = self._pending.get(kind, 0) + count
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._pending[kind] = total
            return
        self._last[kind] = now
        self._pending[kind] = 0
        self.logger.warning(message, total, *args)
