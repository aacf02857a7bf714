"""One way to run a server (`neoplasma broker`, `proxy`, `ingest-redis`, `up`): start it, announce it,
serve until SIGTERM or SIGINT, drain it within a deadline, close it.

A server is a `Service`; `serve` is the only place that handles the signals and the deadline, and
logs the server's `KIND_serving`, `KIND_drain_timeout` and `KIND_stopped` events.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any, Protocol

from neoplasma.core.logs import get_logger
from neoplasma.core.net import announce

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    """The parts of a server `serve` runs, in this order."""

    kind: str  # "broker", "proxy", "ingest", "up": the announce line's kind, the log events' prefix

    async def start(self) -> dict[str, Any]:
        """Bind and start serving; the fields of the serving line (name, addresses)."""

    async def quiesce(self) -> None:
        """Stop taking new work (fail readiness, refuse publishes, stop reading)."""

    def deadline(self) -> float | None:
        """Seconds `drained` may take, asked once `quiesce` returned (None: it bounds itself)."""

    async def drained(self) -> None:
        """Return once the work in hand is done; cancelled at the deadline."""

    def pending(self) -> dict[str, Any]:
        """What was left at the deadline, for the log."""

    async def close(self) -> dict[str, Any]:
        """Release everything; the fields of the stopped event (totals)."""


def announce_serving(service: Service, fields: dict[str, Any]) -> None:
    """The default announcement: the one JSON line on stdout (neoplasma.core.net.announce)."""
    announce(kind=service.kind, **fields)


async def serve(service: Service, stop: asyncio.Event | None = None,
                announced: Callable[[Service, dict[str, Any]], None] = announce_serving) -> int:
    """Run `service` until SIGTERM/SIGINT (or `stop` is set); its exit code (0: stopped cleanly).
    A failure to start propagates (the service releases what it had started)."""
    stop = stop or asyncio.Event()
    log = get_logger(service.kind)
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        fields = await service.start()
        log.info(f"{service.kind}_serving", **fields)
        announced(service, fields)
        await stop.wait()
        await service.quiesce()
        try:
            await asyncio.wait_for(service.drained(), service.deadline())
        except TimeoutError:
            log.warning(f"{service.kind}_drain_timeout", **service.pending())
        log.info(f"{service.kind}_stopped", **await service.close())
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
    return 0
