"""Small asyncio helpers shared by the servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def wait_event_or_task(event: asyncio.Event, task: asyncio.Task[Any] | None,
                             timeout: float | None = None) -> None:
    """Return once `event` is set or `task` (when given) has finished, or `timeout` passed."""
    if task is None and timeout is None:
        await event.wait()
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter} if task is None else {waiter, task}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


class Signal:
    """Wakes every coroutine waiting for some state to change (`notify` after each change)."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds (re-checked at each notify); False after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self._event is None:
                self._event = asyncio.Event()
            try:
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that comes while the
                # event is being set (it returns the result instead), and the waiter went on waiting:
                # a resuming subscriber whose client left at that moment stayed in the hub.
                async with asyncio.timeout(remaining):
                    await self._event.wait()
            except TimeoutError:
                return predicate()
        return True
