"""One controller per NeoplasmaCluster: a small scheduler, and each pass as observe, decide, act.

kopf's handlers (handlers.py) only hand the latest cluster object to this module and wake the
cluster's controller: one asyncio task that sleeps until woken (a pod change: at once, unless
another was answered within the debounce, then gathered with the others of that burst into one
membership version; a child or the resource changed) or until the earliest
step is `due`, then runs one level-based pass over the current state:

- observe (observe.py): one read of the API's view (kopf's indexes, the Secrets when wanted), then
  the pods' own answers (`read_pods`: Stats, Status, /stats, under one read timeout);
- decide (steps.py): `Resource` reads spec and annotations, then each step of
  `Steps.sequence()` takes the observation and the time and returns a `Decision`;
- act (here): all the I/O the decisions ask for (server-side apply, deletes, the credential
  Secret, membership pushes, status, Events, metrics), telling the steps how it went.

A pass runs in two halves so that no pod's answer ever delays a membership push: the first
observes the API's view and acts on Trust and Membership (`Steps.without_reads()`); the second,
a task of its own, reads the pods (a frozen one costs the read timeout) and acts on the other
steps. While a second half runs, a wake-up runs another first half at once (a pod change is pushed
after its debounce, whatever the reads), and a full pass follows once that second half ended. A
second half that reads every proxy's Status first lets a change's pushes under way end (at most the
read timeout), so that 1000 reads do not share the CPU with 1000 acknowledgements; and it reads them
100 at a time, each batch after the pushes under way ended, so that a change coming during the read
shares the CPU with one batch of it, not all 1000 calls.

Why not kopf's per-object timers and daemons: the due times move (debounce, each step's
backoff, the push grace, an interval only while autoscaling), pod and child events must wake
the same loop at once, and kopf keeps handler progress on the resource, which this operator
never writes. A plain task per cluster also runs without kopf, as the tests drive it.
No finalizer: deleting the resource deletes the children through their owner references.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import kopf

from neoplasma.core import drains
from neoplasma.core.control import BrokerChannels
from neoplasma.core.logs import get_logger
from neoplasma.core.push import MembershipPusher
from neoplasma.core.tiers import Tier
from neoplasma.core.trust import Access
from neoplasma.operator import children as ch
from neoplasma.operator.kube import Kube
from neoplasma.operator.members import ClusterKey
from neoplasma.operator.metrics import Metrics
from neoplasma.operator.observe import Indexes, Seen, describe, observe, read_pods
from neoplasma.operator.render import INGEST
from neoplasma.operator.settings import Options
from neoplasma.operator.status import persisted_version
from neoplasma.operator.steps import Decision, Event, Failing, Steps, earliest
from neoplasma.operator.sync import MembershipSync, Refresh
from neoplasma.wire.v1 import neoplasma_pb2 as pb

log = get_logger("operator")


class OperatorState:
    """What the operator holds in memory: one controller per NeoplasmaCluster, and the metrics."""

    def __init__(self, kube: Kube, options: Options, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.options = options
        self.clock = clock
        self.metrics = Metrics()
        self.controllers: dict[ClusterKey, ClusterController] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    def cluster_seen(self, event_type: str | None, body: Mapping[str, Any], indexes: Indexes) -> None:
        """A watch event of a NeoplasmaCluster: start, update or stop its controller."""
        metadata = body.get("metadata") or {}
        key: ClusterKey = (str(metadata.get("namespace")), str(metadata.get("name")))
        controller = self.controllers.get(key)
        if event_type == "DELETED":
            if controller is not None:
                self._stop(key)
                log.info("cluster_forgotten", cluster="/".join(key))
            return
        if controller is not None and controller.uid != metadata.get("uid"):
            # Deleted and created again under the same name while we were not looking.
            self._stop(key)
            controller = None
        if controller is None:
            controller = ClusterController(key, body, indexes, self.kube, self.options, self.clock,
                                           metrics=self.metrics)
            self.controllers[key] = controller
            self.metrics.clusters.set(len(self.controllers))
            controller.start()
        else:
            controller.set_body(body)

    def _stop(self, key: ClusterKey) -> None:
        task = asyncio.get_running_loop().create_task(self.controllers.pop(key).stop())
        self.metrics.forget(key)
        self.metrics.clusters.set(len(self.controllers))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def wake(self, key: ClusterKey, *, pods: bool = False, children: bool = False, proxies: bool = False) -> None:
        controller = self.controllers.get(key)
        if controller is not None:
            controller.wake(pods=pods, children=children, proxies=proxies)

    async def close(self) -> None:
        controllers, self.controllers = list(self.controllers.values()), {}
        await asyncio.gather(*(c.stop() for c in controllers), *self._stopping, return_exceptions=True)
        self.kube.close()


class Wakeup:
    """Why and since when the controller was woken (pod changes are debounced)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.pods_seen_at: float | None = None
        self.pods_answered_at = -math.inf  # when the last pass for a pod change began
        self.deferred = False  # a pass's first half ran while another's second half was under way

    def pods_due(self, debounce: float) -> float | None:
        """When the pass for the pod change seen may begin (None: none seen): at once, unless a pass
        answered one less than `debounce` seconds before; then at that time, with every change seen
        meanwhile gathered into it. An isolated change is pushed without waiting; a burst costs at
        most one pass (and membership version) per `debounce`."""
        return None if self.pods_seen_at is None else max(self.pods_seen_at, self.pods_answered_at + debounce)

    def set(self, pods_at: float | None = None) -> None:
        if pods_at is not None and self.pods_seen_at is None:
            self.pods_seen_at = pods_at
        self.event.set()

    def take(self, now: float) -> float:
        """When the pod change this pass answers was seen (`now` for none); the next is new."""
        self.event.clear()
        if self.pods_seen_at is not None:
            self.pods_answered_at = now
        seen_at, self.pods_seen_at = (self.pods_seen_at or now), None
        return seen_at


@dataclass
class Running:
    """The controller's tasks: its scheduler loop, and the second half of a pass (the pods' answers read,
    then acted on), which runs on while the loop goes on pushing membership changes."""

    loop: asyncio.Task[None] | None = None
    second_half: asyncio.Task[None] | None = None

    def reading(self) -> bool:
        return self.second_half is not None and not self.second_half.done()


class ClusterController:
    def __init__(
        self,
        key: ClusterKey,
        body: Mapping[str, Any],
        indexes: Indexes,
        kube: Kube,
        options: Options,
        clock: Callable[[], float] = time.monotonic,
        *,
        metrics: Metrics | None = None,
        post: Callable[[Event], None] | None = None,
    ) -> None:
        self.key = key
        self.body = copy.deepcopy(dict(body))
        self.indexes = indexes
        self.kube = kube
        self.options = options
        self.clock = clock
        self.metrics = metrics or Metrics()
        self._post_event = post or self._kopf_event
        sync = MembershipSync(MembershipPusher(timeout=options.read_timeout),
                              refresh=Refresh(options.anti_entropy),
                              clock=clock, label=self.label,
                              version=persisted_version(self.body.get("status")), on_progress=self.wake,
                              cluster=self.uid, on_converged=lambda seconds: self.metrics.converged(key, seconds))
        self.steps = Steps(self.body, options, sync, clock())
        self.broker_channels = BrokerChannels()  # the brokers' Stats reads (the proxies': the pushes' channels)
        self._wakeup = Wakeup()
        self._failing = Failing(options.retry)  # a pass that raised (a bug)
        self._running = Running()

    @property
    def label(self) -> str:
        return "/".join(self.key)

    @property
    def uid(self) -> str:
        return str(self.body["metadata"].get("uid"))

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        log.info("cluster_controller_started", cluster=self.label,
                 membership_version=self.steps.membership.sync.snapshot.version)
        self._running.loop = asyncio.get_running_loop().create_task(self._run(), name=f"neoplasma:{self.label}")

    async def stop(self) -> None:
        for task in (self._running.loop, self._running.second_half):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.steps.membership.sync.close()
        await self.broker_channels.close()
        log.info("cluster_controller_stopped", cluster=self.label)

    def set_body(self, body: Mapping[str, Any]) -> None:
        self.body = copy.deepcopy(dict(body))
        self.wake()

    def wake(self, *, pods: bool = False, children: bool = False, proxies: bool = False) -> None:
        """`pods`: a pod or ReplicaSet changed (debounced; pushes membership); `proxies`: one of the proxies'
        (their Status is read again: one may have begun to stop, to be paced now); `children`: a child."""
        if children:
            self.steps.children.dirty = self.steps.trust.stale = True
        if proxies:
            self.steps.connections.stale = True
        self._wakeup.set(self.clock() if pods else None)

    # -- the scheduler ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._sleep()
            pods_due = self._wakeup.pods_due(self.options.debounce)
            if pods_due is not None and pods_due > self.clock():
                await asyncio.sleep(pods_due - self.clock())
            started = time.perf_counter()
            reading = self._running.reading()
            try:
                seen = await self._first_half(self._wakeup.take(self.clock()), reads=not reading)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug: say so, and try again later (events still wake us)
                self._pass_failed(error, started)
                continue
            if reading:
                self._wakeup.deferred = True  # the other steps once the reads under way are in: a full pass then
            else:
                self._running.second_half = asyncio.get_running_loop().create_task(self._second_half(seen, started))

    async def _sleep(self) -> None:
        """Until woken, or the earliest step is due. While a pass waits for the pods' answers, only a
        wake-up (a pod change to push) ends the sleep; what else is due waits for that pass's end."""
        while self._running.second_half is not None and self._running.reading():
            woken = asyncio.ensure_future(self._wakeup.event.wait())
            try:
                await asyncio.wait([woken, self._running.second_half], return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
            if self._wakeup.event.is_set():
                return
        due = earliest(self.steps.due, self._failing.retry.not_before)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.event.wait(), None if due is None else max(0.0, due - self.clock()))

    async def _first_half(self, pods_changed_at: float, reads: bool) -> Seen:
        """Observe the API's view and act on the steps that need no more (Trust, Membership): a pass's
        first half, which never waits for a pod. `reads`: whether this pass goes on to read the pods."""
        now = self.clock()
        desired, events = self.steps.resource.step(self.body)
        self._post(events)
        seen = await observe(self.kube, self.indexes, self.key, self.body, desired,
                             self.steps.wants(desired, now, pods=reads), now, pods_changed_at)
        for step in self.steps.without_reads():
            await self._act(step.decide(seen, now), seen)
        return seen

    async def _second_half(self, seen: Seen, started: float) -> None:
        """Read the pods (a slow or frozen one costs up to the read timeout) and act on the other steps;
        meanwhile the scheduler runs first halves for pod changes, so membership pushes never wait."""
        try:
            if seen.wants.proxies or Tier.PROXY in seen.wants.loads:  # a call to every proxy: after a change's pushes
                await self.steps.membership.sync.pushed(self.options.read_timeout)
            sync = self.steps.membership.sync
            seen = await read_pods(seen, self.steps.trust.reach(seen.desired.cluster, seen.trust),
                                   self.options.read_timeout, sync.pusher.channels, self.broker_channels,
                                   gate=lambda: sync.pushed(self.options.read_timeout))
            for step in self.steps.with_reads():
                await self._act(step.decide(seen, seen.at), seen)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug: say so, and try again later (events still wake us)
            self._pass_failed(error, started)
        else:
            self.metrics.reconciled(self.key, time.perf_counter() - started, ok=True)
            self._failing.succeeded()
        finally:
            if self._wakeup.deferred:  # pod changes came meanwhile: now the full pass they ask for
                self._wakeup.deferred = False
                self._wakeup.set()

    def _pass_failed(self, error: Exception, started: float) -> None:
        self.metrics.reconciled(self.key, time.perf_counter() - started, ok=False)
        delay, events = self._failing.failed(describe(error), self.clock())
        log.error("cluster_reconcile_failed", exc_info=True, cluster=self.label, retry_in=delay)
        self._post(events)

    # -- act: all the I/O ------------------------------------------------------------------

    async def _act(self, decision: Decision, seen: Seen) -> None:
        self._post(decision.events)
        if decision.secret is not None:
            await self._create_secret(decision.secret)
        if decision.access is not None:
            await self._use(decision.access)
        if decision.push:
            self.steps.membership.sync.push()
        if decision.drains:
            await self._pace(decision.drains)
        for change in decision.scaled:
            self.metrics.scaled(self.key, change.tier.plural, change.direction)
        if decision.plan is not None:
            await self._apply(decision.plan, seen)
        if decision.observed is not None:
            self.metrics.observe(self.key, decision.observed)
        if decision.status is not None:
            await self._write_status(decision.status)

    async def _pace(self, requests: Mapping[str, pb.DrainRequest]) -> None:
        """Send the proxies their paces and limits (idempotent: a failed one goes again next time)."""
        failed = await drains.send(requests, self.steps.trust.access[Tier.PROXY],
                                   self.steps.membership.sync.pusher.channels)
        if failed:
            log.warning("drain_calls_failed", cluster=self.label, failed=failed)

    async def _create_secret(self, secret: Mapping[str, Any]) -> None:
        try:
            await asyncio.to_thread(self.kube.create_secret, secret)
        except Exception as error:  # read again on the next pass (the Trust step stays stale)
            log.error("credential_create_failed", cluster=self.label, error=describe(error))

    async def _use(self, access: Mapping[Tier, Access]) -> None:
        self.steps.trust.access = dict(access)
        self.steps.membership.sync.pusher.access = access[Tier.PROXY]  # ProxyChannels: new TLS, new channels

    async def _apply(self, plan: ch.Plan, seen: Seen) -> None:
        cluster, children = self.steps.scaling.effective, self.steps.children
        assert cluster is not None  # a plan is made from it
        try:
            # Independent objects: apply them all at once, then delete what is no longer rendered.
            await asyncio.gather(*(asyncio.to_thread(self.kube.apply, c.manifest) for c in plan.apply))
            for change in plan.apply:
                self._post([Event("Created" if change.action == "create" else "Updated", change.describe())])
            for kind, name in plan.delete:
                await asyncio.to_thread(self.kube.delete, kind, cluster.namespace, name)
                self._post([Event("Deleted", f"deleted {kind} {name}: " + (
                    "spec.networkPolicies.enabled is false" if kind == "NetworkPolicy" else
                    "spec.ingest is not set" if name == f"{cluster.name}-{INGEST}" else
                    f"not needed for {cluster.spec.brokers.replicas} brokers of at most "
                    f"{cluster.spec.brokers.max_per_deployment} per Deployment"))])
        except Exception as error:  # API errors, or the API out of reach: retried with backoff
            self._post(children.failed(describe(error), self.clock()))
            log.error("children_failed", cluster=self.label, error=describe(error))
            return
        children.applied(seen.desired, cluster)

    async def _write_status(self, status: dict[str, Any]) -> None:
        try:
            kept = await asyncio.to_thread(self.kube.patch_status, self.key[0], self.key[1], status)
        except Exception as error:  # retried with backoff; membership pushes go on meanwhile
            self._post(self.steps.status.failed(describe(error), self.clock()))
            log.error("status_failed", cluster=self.label, error=describe(error))
            return
        self.steps.status.written(kept)
        if kept:
            log.info("status_written", cluster=self.label, generation=status["observedGeneration"],
                     ready=status["conditions"][0]["status"], membership=status["membership"],
                     brokers=status["brokers"], proxies=status["proxies"])

    def _post(self, events: Iterable[Event]) -> None:
        for event in events:
            (log.warning if event.warning else log.info)("cluster_event", cluster=self.label, reason=event.reason,
                                                          message=event.message)
            self._post_event(event)

    def _kopf_event(self, event: Event) -> None:
        metadata = self.body.get("metadata") or {}
        ref = kopf.Body(cast(kopf.RawBody, {
            "apiVersion": self.body.get("apiVersion"),
            "kind": self.body.get("kind"),
            "metadata": {key: metadata.get(key) for key in ("name", "namespace", "uid")},
        }))
        with contextlib.suppress(LookupError):  # outside kopf (e.g. in a unit test): logged only
            (kopf.warn if event.warning else kopf.info)(ref, reason=event.reason, message=event.message)
