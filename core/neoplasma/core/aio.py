"""Small asyncio helpers shared by the servers."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
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


# Waiters a Signal wakes in one pass of the event loop at most (the rest a pass later, and so on): about a Turns
# slice (2 ms) of woken tasks' steps. 16 made 10,000 resumes of a reconnect storm (bench/storm.py) wait 625 passes
# of a busy loop to be woken: all live 7.7-8.6 s after the kill, 4.8-6.5 s on the build before.
WAKES_PER_PASS = 100


class Signal:
    """Wakes coroutines waiting for some state to change (`notify` after each change).

    The signal checks its waiters' predicates itself, once per pass of the loop after a notify, and wakes only
    those whose predicate holds, at most `wakes_per_pass` of them a pass, the longest waiting first (the others
    are checked again a pass later). A thousand waiters on one signal (resumes reading one replay, or waiting to
    be caught up) cost a notify a thousand predicate calls, not a thousand task steps, and the loop the next
    steps of a few woken tasks per pass, not of all of them in one: live work runs between."""

    def __init__(self, wakes_per_pass: int = WAKES_PER_PASS) -> None:
        self.wakes_per_pass = wakes_per_pass
        self._waiters: dict[asyncio.Future[None], Callable[[], bool]] = {}  # in the order they came
        self._checking = False

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def notify(self) -> None:
        if self._waiters and not self._checking:
            self._checking = True
            next(iter(self._waiters)).get_loop().call_soon(self._check)

    def _check(self) -> None:
        """Wake the waiters whose predicate holds, up to `wakes_per_pass`; past that, check again next pass."""
        self._checking = False
        woken = 0
        for waiter, predicate in list(self._waiters.items()):
            if waiter.done():  # woken or timed out, its task not yet run; or cancelled
                continue
            try:
                holds = predicate()
            except Exception:  # the waiter calls it again itself, and gets the error
                holds = True
            if holds:
                if woken == self.wakes_per_pass:
                    self.notify()
                    return
                waiter.set_result(None)
                woken += 1

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds (checked by the signal at each notify); False after `timeout` seconds
        (math.inf: none)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters[waiter] = predicate
            timer = loop.call_later(remaining, _wake, waiter) if remaining != math.inf else None
            try:
                await waiter
            finally:
                del self._waiters[waiter]
                if timer is not None:
                    timer.cancel()
        return True


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Pace:
    """Work held to `rate` units a second, in bursts of `burst` seconds' worth after a quiet while (a burst of
    resumes starts at the steady rate, not with a second's worth at full speed). No clock of its own."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._paid_until = 0.0  # when the work taken so far is paid for (the caller's clock)

    def delay(self, amount: float, now: float) -> float:
        """Take `amount` more units at `now`: the seconds to wait before going on (0: at once)."""
        self._paid_until = max(self._paid_until, now - self.burst) + amount / self.rate
        return max(0.0, self._paid_until - now)

    def refund(self, amount: float) -> None:
        """Give back `amount` units taken (`delay`) for work that was then not done: later work need not wait for it."""
        self._paid_until -= amount / self.rate


class Turns:
    """Work that can wait (a resuming subscriber's catch-up) in small steps, behind the loop's other work.

    `await turn()` before each step (which must be short: a few milliseconds). Within a slice of `slice`
    seconds nobody waits; once it is used up, or while others wait, a caller waits for its turn: one
    waiter is let through per pass of the event loop, in arrival order, and a new slice begins. So
    whatever became ready meanwhile (the hub's dispatcher, relay reads) runs between any two steps once
    steps contend, and a burst of catch-up (1000 resumes at once) holds the loop for one step at a time,
    not for all of them.
    """

    def __init__(self, slice: float = 0.002, clock: Callable[[], float] = time.perf_counter) -> None:
        self.slice = slice
        self.clock = clock
        self.ends = 0.0  # when the current slice is used up (clock)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._scheduled = False
        self._let_through = False  # a waiter was let through and has not run yet: the slice is its
        self._began_in_pass = False  # `take` began a slice in this pass of the loop

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def free(self) -> bool:
        """Whether a step may run now without waiting: nobody waits, nobody let through is still to run, and the
        current slice is not used up."""
        return not self._waiters and not self._let_through and self.in_slice()

    def in_slice(self) -> bool:
        """Whether the current slice (the last one let through's) is not used up."""
        return self.clock() < self.ends

    def take(self) -> bool:
        """Whether a step that cannot wait (a callback's) may run now: as `free`, or, when nobody waits and
        nobody let through is still to run, a new slice begun for it, at most once per pass of the event loop.
        False: the step should wait for a turn (`InTurns`). A burst handled in one pass (a thousand requests
        read in one callback each) thus runs a slice's worth, the rest in turns behind the loop's other work."""
        if self._waiters or self._let_through:
            return False
        if self.in_slice():
            return True
        if self._began_in_pass:
            return False
        self._began_in_pass = True
        self.ends = self.clock() + self.slice
        asyncio.get_running_loop().call_soon(self._pass_ended)
        return True

    def _pass_ended(self) -> None:
        self._began_in_pass = False

    async def turn(self) -> None:
        if self.free():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if not self._scheduled:
            self._schedule()
        await waiter  # (one let through and then cancelled loses its turn: the next one's is scheduled)

    def _schedule(self) -> None:
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._next)

    def _next(self) -> None:
        """A pass of the loop later: a new slice, for the first waiter still waiting."""
        self._scheduled = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.ends = self.clock() + self.slice
                waiter.set_result(None)
                # Its task runs when the loop calls back the waiter; this callback comes right after (a step that
                # comes meanwhile waits: it would take the new slice before the one it was begun for).
                self._let_through = True
                waiter.add_done_callback(self._ran)
                break
        if self._waiters:
            self._schedule()

    def _ran(self, _: asyncio.Future[None]) -> None:
        self._let_through = False


class Cancels:
    """Tasks cancelled `per_pass` at a time, a pass of the event loop apart, in the order given: a thousand
    subscribers leaving at once (their connections closed together) have their catch-ups wound down behind the
    loop's other work, not all in one pass of it (each unwinding takes some 20-30 µs: 1000 held the loop 15-27 ms,
    bench/forged_resumes.py's `after_p99_ms`)."""

    def __init__(self, per_pass: int = 50) -> None:
        self.per_pass = per_pass
        self._tasks: deque[asyncio.Future[Any]] = deque()
        self._scheduled = False

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self, task: asyncio.Future[Any]) -> None:
        if task.done():
            return
        self._tasks.append(task)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        tasks = self._tasks
        for _ in range(min(self.per_pass, len(tasks))):
            tasks.popleft().cancel()
        if tasks:
            asyncio.get_running_loop().call_soon(self._run)
        else:
            self._scheduled = False


class InTurns:
    """Calls that can wait (setting up a resuming subscriber) made in `turns`' turns: in arrival order, as many
    per turn as its slice holds, by one task for all of them. An exception from one goes to the loop's exception
    handler (as a protocol callback's would); the next is called."""

    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        self._queue: deque[Callable[[], None]] = deque()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def busy(self) -> bool:
        """Whether a call made now would not run at once without waiting (then `push` it)."""
        return bool(self._queue) or not self.turns.free()

    def push(self, call: Callable[[], None]) -> None:
        self._queue.append(call)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        queue, turns, loop = self._queue, self.turns, asyncio.get_running_loop()
        try:
            while queue:
                await turns.turn()
                while queue:
                    try:
                        queue.popleft()()
                    except Exception as exc:  # reported, as the loop reports a callback's
                        loop.call_exception_handler({"message": "a call made in turns failed", "exception": exc})
                    if not turns.in_slice():
                        break
        finally:
            self._task = None
