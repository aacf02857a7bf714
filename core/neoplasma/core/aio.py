"""Small asyncio helpers shared by the servers."""

from __future__ import annotations

import asyncio
from typing import Any


async def wait_event_or_task(event: asyncio.Event, task: asyncio.Task[Any] | None) -> None:
    """Return once `event` is set or `task` (when given) has finished, whichever comes first."""
    if task is None:
        await event.wait()
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
