"""Keeping every ready proxy of one NeoplasmaCluster on the current membership snapshot.

`MembershipSync.update(members, targets, seen_at)` builds the next snapshot with
`next_snapshot` (the version grows only when the brokers changed); `push()` (the controller's
act phase) pushes it, through the same `MembershipPusher` the local runtime uses (over a stream
kept open to each proxy, or Apply: core.push), to each ready proxy that has not applied it:
one push task per proxy, so a slow or broken proxy never holds the others back. A proxy whose
push failed is retried with backoff (this is the one retry loop of a push: the pusher tries
once). Anti-entropy (`Refresh`) pushes the current snapshot again to each proxy that runs it,
once per interval at the proxy's own phase, which also repairs one that restarted unnoticed:
spread so, it never adds a burst to all proxies at once to a change's push, and a proxy
confirmed by a change's push is not pushed again for half an interval. Versions never go
backwards: a restarted operator resumes from the version in the resource's status, and a proxy
that reports a newer version than ours (pushed before a crash, never recorded) makes the next
snapshot jump past it.

The decisions are plain functions and classes (`resume_snapshot`, `catch_up`, `Convergence`,
`Refresh`, core.backoff's `Backoff`); only `MembershipSync` does I/O, and only through the pusher.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.logs import get_logger
from neoplasma.core.membership import EMPTY, MAX_VERSION, Member, Snapshot, next_snapshot
from neoplasma.core.push import MembershipPusher, PushResult
from neoplasma.operator.conditions import MembershipProgress
from neoplasma.operator.members import ProxyTarget

log = get_logger("operator.sync")

RETRY = BackoffPolicy(initial=0.1, maximum=10.0)  # a proxy whose push failed (each push is tried once)
# The controller is told a push's news at most once per this many seconds, news meanwhile at its end: the frozen
# proxies' pushes of one change fail together, each a pass over every pod if told one by one.
NEWS_GATHER = 0.05

# Stands for "whatever the proxies had before this operator started": it equals no real
# membership, so the first snapshot after a restart always takes a new version.
_UNKNOWN = Member(name="", address="")


def resume_snapshot(version: int, cluster: str = "") -> Snapshot:
    """The starting point of an operator that finds `version` in the resource's status, for the
    cluster whose identity (named by resume tokens) is `cluster`."""
    return replace(EMPTY if version <= 0 else Snapshot(version, (_UNKNOWN,)), cluster=cluster)


def catch_up(snapshot: Snapshot, applied_versions: Iterable[int]) -> Snapshot:
    """`snapshot` again under a version above every one a proxy reports having applied, at most
    MAX_VERSION (what proxies accept). Reports beyond it are no version an operator made and are
    ignored; a proxy pinned at MAX_VERSION (a push made with the credential) needs a restart."""
    highest = max((v for v in applied_versions if v <= MAX_VERSION), default=0)
    if highest <= snapshot.version:
        return snapshot
    return replace(snapshot, version=min(highest + 1, MAX_VERSION))


@dataclass
class Convergence:
    """Time from a membership change being seen to every ready proxy having applied it.

    A change superseded before it converged is measured from when the first one was seen.
    """

    pending_version: int | None = None
    pending_since: float = 0.0
    last_seconds: float | None = None

    def changed(self, version: int, seen_at: float) -> None:
        if self.pending_version is None:
            self.pending_since = seen_at
        else:
            self.pending_since = min(self.pending_since, seen_at)
        self.pending_version = version

    def check(self, version: int, all_applied: bool, now: float) -> float | None:
        """Record and return the convergence time once `version` is everywhere."""
        if self.pending_version is None or not all_applied or version < self.pending_version:
            return None
        self.last_seconds = max(0.0, now - self.pending_since)
        self.pending_version = None
        return self.last_seconds


@dataclass(frozen=True)
class Refresh:
    """Anti-entropy: when a proxy confirmed running the current snapshot is pushed it again.

    Each proxy has its own phase, one of `slots` spaced `interval / slots` apart (a hash of its
    name), and is pushed once per `interval` at that phase, the first one at least half an interval
    after its last confirmation. So the pushes of 1000 proxies spread over the interval (a tenth of
    them at each slot, whenever they were last confirmed) instead of coming all at once, a proxy
    confirmed by a change's push is not pushed again soon after, and none goes unconfirmed for more
    than 1.5 intervals (one, while nothing changes)."""

    interval: float = 5.0
    slots: int = 10

    def __post_init__(self) -> None:
        if not (self.interval > 0 and self.slots >= 1):
            raise ValueError(f"anti-entropy needs an interval > 0 and slots >= 1, got {self.interval} and {self.slots}")

    def phase(self, name: str) -> float:
        """The proxy's offset within each interval (seconds)."""
        return zlib.crc32(name.encode()) % self.slots * self.interval / self.slots

    def due_at(self, name: str, confirmed_at: float) -> float:
        """When the proxy `name`, confirmed at `confirmed_at`, is pushed again (clock time)."""
        offset = self.phase(name)
        return offset + math.ceil((confirmed_at + self.interval / 2 - offset) / self.interval) * self.interval


class Gathering:
    """When news is told: at once when none was told for `every` seconds, else at the end of those seconds, once for
    all the news meanwhile. Pure: callers pass the clock."""

    def __init__(self, every: float = NEWS_GATHER) -> None:
        self.every = every
        self._told_at = -math.inf
        self._pending = False

    def news(self, now: float) -> float | None:
        """Seconds until telling this news (0: now, and it counts as told); None: a telling to come covers it."""
        if self._pending:
            return None
        wait = max(0.0, self._told_at + self.every - now)
        if wait:
            self._pending = True
        else:
            self._told_at = now
        return wait

    def told(self, now: float) -> None:
        """The telling `news` put off was made at `now`."""
        self._pending, self._told_at = False, now


@dataclass
class _Push:
    incarnation: str
    version: int
    task: asyncio.Task[None]


class MembershipSync:
    """The membership of one cluster and its push to that cluster's ready proxies."""

    def __init__(
        self,
        pusher: MembershipPusher,
        *,
        version: int = 0,
        on_progress: Callable[[], None] = lambda: None,
        retry: BackoffPolicy = RETRY,
        refresh: Refresh = Refresh(),
        clock: Callable[[], float] = time.monotonic,
        label: str = "",
        cluster: str = "",
        on_converged: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        """`cluster` is the cluster's identity, sent with every snapshot (resume tokens name it);
        `on_converged` is told each convergence time (the metrics); `on_progress` is called when a push
        brings news (a failure, a recovery, the version everywhere), not for each acknowledgement, and at most once
        per NEWS_GATHER seconds (the news meanwhile told together at the end of them)."""
        self.pusher = pusher
        self.snapshot = resume_snapshot(version, cluster)
        self.convergence = Convergence()
        self.retry = retry
        self.refresh = refresh
        self._on_progress = on_progress
        self._on_converged = on_converged
        self._clock = clock
        self._label = label
        self._targets: dict[str, ProxyTarget] = {}
        self._applied: dict[str, tuple[str, int]] = {}  # name -> (incarnation, version)
        self._errors: dict[str, str] = {}
        # The ready proxies not (known to be) running the current version: kept as pushes end, so that
        # an acknowledgement costs the same whether 2 or 1000 proxies are pushed to.
        self._lagging: set[str] = set()
        self._retries: dict[str, Backoff] = {}  # the proxies whose push failed
        self._refresh_at: dict[str, float] = {}  # name -> its next anti-entropy push (those running the version)
        self._pushes: dict[str, _Push] = {}
        self._gathering = Gathering()
        self._telling: asyncio.TimerHandle | None = None  # news put off by `_gathering`, to be told
        self._closed = False

    # -- driving ---------------------------------------------------------------------------

    def update(self, members: Iterable[Member], targets: Mapping[str, ProxyTarget], seen_at: float) -> Snapshot:
        """Take the current brokers and ready proxies; start whatever pushes are due."""
        previous = self.snapshot
        self.snapshot = next_snapshot(self.snapshot, members)
        if self.snapshot is not previous:
            self.convergence.changed(self.snapshot.version, seen_at)
            log.info("membership_changed", cluster=self._label, version=self.snapshot.version,
                     brokers=[f"{m.name}={m.address}/{m.state.value}" for m in self.snapshot.members])
        self._set_targets(targets)
        self._lagging = {name for name in self._targets if not self._is_applied(name)}
        self._check_converged()
        return self.snapshot

    def push(self) -> None:
        """Start the pushes that are due: to each ready proxy that has not applied the snapshot
        and is not backing off, and (anti-entropy) to each one that has and whose `Refresh` is due."""
        self.pusher.prune(t.address for t in self._targets.values())
        self._push_due()

    def next_due(self) -> float | None:
        """When the next push is due (clock time), if any: the earliest failed push's retry or
        anti-entropy push. A push under way is due at none: its end is news or a new due time."""
        retry = min((r.not_before for r in self._retries.values() if r.not_before is not None), default=None)
        refresh = min((at for name, at in self._refresh_at.items()
                       if self._is_applied(name) and not self._under_way(name)), default=None)
        return retry if refresh is None else refresh if retry is None else min(retry, refresh)

    async def pushed(self, timeout: float) -> None:
        """Return once a change's pushes under way (to proxies not known to fail, nor already running the
        version: anti-entropy) have ended, or after `timeout` seconds: a change's burst to every proxy is not
        made to share the CPU with other calls to them (the reads of every proxy's Status wait on it)."""
        under_way = [push.task for name, push in self._pushes.items()
                     if not push.task.done() and name not in self._errors and not self._is_applied(name)]
        if under_way:
            await asyncio.wait(under_way, timeout=timeout)

    def settling_since(self) -> float | None:
        """When the change now being pushed was seen, while every push so far went fine."""
        if self.convergence.pending_version is None or self._errors:
            return None
        return self.convergence.pending_since

    def progress(self) -> MembershipProgress:
        return MembershipProgress(
            version=self.snapshot.version,
            brokers=len(self.snapshot.members),
            proxies=len(self._targets),
            acknowledged=len(self._targets) - len(self._lagging),
            errors=dict(self._errors),
            last_convergence_seconds=self.convergence.last_seconds,
            lagging=tuple(sorted(self._lagging, key=lambda name: (name not in self._errors, name))),
        )

    async def close(self) -> None:
        self._closed = True
        if self._telling is not None:
            self._telling.cancel()
        pushes, self._pushes = list(self._pushes.values()), {}
        for push in pushes:
            push.task.cancel()
        for push in pushes:
            with contextlib.suppress(BaseException):
                await push.task
        await self.pusher.close()

    # -- internals -------------------------------------------------------------------------

    def _is_applied(self, name: str) -> bool:
        target = self._targets.get(name)
        return target is not None and self._applied.get(name) == (target.incarnation, self.snapshot.version)

    def _set_targets(self, targets: Mapping[str, ProxyTarget]) -> None:
        self._targets = dict(targets)
        for name in [n for n in self._pushes if n not in targets]:
            self._pushes.pop(name).task.cancel()
        for table in (self._applied, self._errors, self._retries, self._refresh_at):
            for name in [n for n in table if n not in targets]:
                del table[name]

    def _under_way(self, name: str) -> bool:
        push = self._pushes.get(name)
        return push is not None and not push.task.done()

    def _push_due(self) -> None:
        if self._closed:
            return
        now = self._clock()
        for name, target in self._targets.items():
            push, retry = self._pushes.get(name), self._retries.get(name)
            if push is not None and not push.task.done():
                if (push.incarnation, push.version) == (target.incarnation, self.snapshot.version):
                    continue
                push.task.cancel()  # superseded by a newer snapshot or a new incarnation
            elif self._is_applied(name):
                if self._refresh_at.get(name, math.inf) > now:
                    continue  # anti-entropy not due yet
            elif retry is not None and not retry.due(now):
                continue
            if retry is not None:
                retry.not_before = None  # under way: not due again unless it fails
            task = asyncio.get_running_loop().create_task(self._push(target, self.snapshot))
            self._pushes[name] = _Push(target.incarnation, self.snapshot.version, task)

    async def _push(self, target: ProxyTarget, snapshot: Snapshot) -> None:
        result = await self.pusher.push_one(target.name, target.address, snapshot)
        if self._targets.get(target.name) != target:
            return  # the proxy went away or restarted meanwhile; its new incarnation gets its own push
        if self._record(target, snapshot, result):
            self._news()

    def _news(self) -> None:
        """Tell the controller (`on_progress`) of news now, or with the news gathered over NEWS_GATHER seconds."""
        loop = asyncio.get_running_loop()
        wait = self._gathering.news(loop.time())
        if wait == 0:
            self._on_progress()
        elif wait is not None:
            self._telling = loop.call_later(wait, self._tell)

    def _tell(self) -> None:
        self._telling = None
        self._gathering.told(asyncio.get_running_loop().time())
        if not self._closed:
            self._on_progress()

    def _record(self, target: ProxyTarget, snapshot: Snapshot, result: PushResult) -> bool:
        """Take a push's result; whether the controller has news (a failure, a recovery, the version
        everywhere, a version to catch up with) rather than one more acknowledgement among many."""
        name = target.name
        if result.ok and result.applied_version > self.snapshot.version:
            # A version pushed before this operator (re)started: move past it, push again.
            self.snapshot = catch_up(self.snapshot, [result.applied_version])
            self._lagging = set(self._targets)
            self.convergence.changed(self.snapshot.version, self._clock())
            log.warning("membership_version_caught_up", cluster=self._label, proxy=name,
                        proxy_version=result.applied_version, version=self.snapshot.version)
            self._push_due()
            return True
        if result.ok:
            self._applied[name] = (target.incarnation, result.applied_version)
            recovered = self._errors.pop(name, None) is not None
            self._retries.pop(name, None)
            if self._is_applied(name):
                self._lagging.discard(name)
                self._refresh_at[name] = self.refresh.due_at(name, self._clock())
            return self._check_converged() or recovered
        if snapshot.version != self.snapshot.version:
            return False  # a newer push supersedes this failure
        # Not known to run the version any more (a failed anti-entropy push: it may have restarted).
        self._applied.pop(name, None)
        self._refresh_at.pop(name, None)
        self._lagging.add(name)
        self._errors[name] = result.error or "no answer"
        delay = self._retries.setdefault(name, Backoff(self.retry)).failed(self._clock())
        log.warning("membership_push_failed", cluster=self._label, proxy=name, address=target.address,
                    version=snapshot.version, error=self._errors[name], retry_in=round(delay, 2))
        return True

    def _check_converged(self) -> bool:
        """Whether the current version has just reached every ready proxy (recorded if so)."""
        seconds = self.convergence.check(self.snapshot.version, not self._lagging, self._clock())
        if seconds is None:
            return False
        self._on_converged(seconds)
        log.info("membership_converged", cluster=self._label, version=self.snapshot.version,
                 proxies=len(self._targets), seconds=round(seconds, 4))
        return True
