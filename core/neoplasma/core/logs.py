"""Structured logs: one JSON object per line on stderr.

    log = get_logger("broker")
    log.info("relay_opened", proxy="p-1", topics=3)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Lines caused by outside input (a client's bad request, a protocol error, another library's complaint
# about what a peer sent): at most this many per second and process, in bursts of at most OUTSIDE_BURST;
# the next line written says how many were left out (`suppressed`).
OUTSIDE_PER_SECOND = 5.0
OUTSIDE_BURST = 20


class LineBudget:
    """A token bucket of log lines, with a count of the lines it refused since the last it allowed."""

    def __init__(self, per_second: float = OUTSIDE_PER_SECOND, burst: int = OUTSIDE_BURST,
                 clock: Any = time.monotonic) -> None:
        self.per_second, self.burst, self.clock = per_second, burst, clock
        self.tokens = float(burst)
        self.at = clock()
        self.suppressed = 0

    def take(self) -> int | None:
        """None when no line may be written now; else how many were suppressed before this one."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        if self.tokens < 1:
            self.suppressed += 1
            return None
        self.tokens -= 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


OUTSIDE = LineBudget()  # one per process: whatever is sent, its lines share it


class OutsideFilter(logging.Filter):
    """Other libraries' warnings and errors (aiohttp's bad requests, asyncio's protocol failures, ...)
    are about what peers sent: they draw from `OUTSIDE` and lose their tracebacks (the exception's type
    and message stay), so that no input makes a process write more than the budget allows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("neoplasma.") or record.levelno < logging.WARNING:
            return True
        suppressed = OUTSIDE.take()
        if suppressed is None:
            return False
        fields: dict[str, Any] = {"source": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            if isinstance(error, HttpProcessingError):  # a request aiohttp could not parse: the client's doing
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            fields["error"] = f"{type(error).__name__}: {error}"[:500]
            record.exc_info = None
            record.exc_text = None
        if suppressed:
            fields["suppressed"] = suppressed
        record.fields = {**getattr(record, "fields", {}), **fields}
        return True


class EventLogger:
    """A thin wrapper that turns keyword arguments into structured fields."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(f"neoplasma.{name}")

    def _emit(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, event, exc_info=exc_info, extra={"fields": fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, False, fields)

    def outside(self, event: str, level: int = logging.WARNING, **fields: Any) -> None:
        """A line (a warning unless `level` says) caused by outside input: written within the process's
        `OUTSIDE` budget."""
        if self._log.isEnabledFor(level):
            suppressed = OUTSIDE.take()
            if suppressed:
                fields["suppressed"] = suppressed
            if suppressed is not None:
                self._emit(level, event, False, fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, event, exc_info, fields)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def setup_logging(level: str = "info") -> None:
    """Send every neoplasma log line, as JSON, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(OutsideFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
