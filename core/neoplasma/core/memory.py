"""Giving freed memory back to the system after a large departure (many subscribers, a large interest), and
keeping a long-running process's garbage collections short (`settle_heap`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


# Allocations (less deallocations) between collections of the youngest generation: CPython's default is 700.
YOUNG_THRESHOLD = 10_000


def settle_heap(why: str) -> None:
    """Once start-up has made what lives as long as the process (modules, classes, the Kubernetes client's
    models, kopf, grpc: ~90,000 objects in the operator, ~57,000 in a broker or proxy), keep them out of every
    later garbage collection, and collect the youngest generation less often. Called by the operator and, once
    serving, by every server `run_server` runs.

    A collection of the oldest generation visits every tracked object: with those 90,000, bench/membership.py
    measured pauses of 96-373 ms of the operator's event loop every 3-5 s while it pushed to 1000 proxies
    (each push's call objects, alive across younger collections, are promoted until the oldest generation
    has grown by a quarter). `gc.freeze` moves what is alive now to a generation no collection visits
    (refcounting still frees those objects; only cycles among them would stay, and start-up makes none
    worth collecting). With the first threshold at YOUNG_THRESHOLD more of an in-flight push's objects are
    gone before a collection would promote them: in that bench no full collection ran at all, and the
    longest pause was 13-47 ms (96-373 ms before)."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    log.info("heap_settled", why=why, frozen_objects=gc.get_freeze_count(), young_threshold=YOUNG_THRESHOLD,
             ms=round(1000 * (time.perf_counter() - started), 1))
