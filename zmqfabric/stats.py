"""Counters a node keeps about itself, and rate-limited logging of refused input."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from .constants import LOG_RATE_PER_MINUTE


class Counters:
    """Named monotonic counters. Thread-safe; ``snapshot()`` returns a plain dict copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))


class RateLimitedLog:
    """Logs at most ``per_minute`` lines per key each minute; counts the rest silently.

    Uses the monotonic clock. Thread-safe.
    """

    def __init__(self, logger: logging.Logger, per_minute: int = LOG_RATE_PER_MINUTE) -> None:
        self._logger = logger
        self._per_minute = per_minute
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        self._log(logging.WARNING, key, message, args, False)

    def exception(self, key: str, message: str, *args: object) -> None:
        """Like ``logger.exception`` (with the traceback), rate-limited per key."""
        self._log(logging.ERROR, key, message, args, True)

    def _log(self, level: int, key: str, message: str, args: tuple[object, ...],
             exc_info: bool) -> None:
        now = time.monotonic()
        with self._lock:
            start, count = self._windows.get(key, (now, 0))
            if now - start >= 60.0:
                start, count = now, 0
            self._windows[key] = (start, count + 1)
        if count < self._per_minute:
            self._logger.log(level, message, *args, exc_info=exc_info)
        elif count == self._per_minute:
            self._logger.log(level, "%s: further messages suppressed for a minute", key)
