"""Giving freed memory back to the system after a large departure (many subscribers, a large interest)."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

from neoplasma.core.logs import get_logger

log = get_logger("memory")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_TRIM = _malloc_trim()


def give_back(why: str, **fields: object) -> None:
    """Return the C heap's free pages to the system (glibc `malloc_trim`: freed large blocks such as big
    dict and set tables; Python's own small-object arenas go back by themselves, once wholly empty). Takes
    a millisecond or so: call it after a large departure, not per subscriber."""
    started = time.perf_counter()
    trimmed = bool(_TRIM(0)) if _TRIM is not None else False
    log.info("memory_given_back", why=why, trimmed=trimmed, ms=round(1000 * (time.perf_counter() - started), 1),
             **fields)
