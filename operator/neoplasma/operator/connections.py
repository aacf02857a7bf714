"""Connections as a managed resource: which proxies shed how many subscribers, and how fast every
operation that makes subscribers reconnect may go. Pure: no I/O, no clocks (callers pass `now`).

Rebalancing. kube-proxy sends each (re)connect to a ready endpoint at random, so "move 20
subscribers from A to C" cannot be ordered; what can be ordered is where a subscriber may *not*
land. A plan gives every proxy a limit, `cap` = the most subscribers it may hold while the plan
runs (the larger of ceil(average) and floor((1 + tolerance) x average)). A proxy at or over its
limit sheds the excess at the rate it is given and, like a full one, refuses new subscribers
(SSE: `retry:` and the end of the stream, gRPC: UNAVAILABLE) and fails readiness, so the Service
stops sending them there; a proxy below it accepts until it is full. A reconnect therefore lands
on a proxy with room, at most a few bounces (each one retry interval) before kube-proxy has seen
the readiness; the proxies end at or below `cap` (or what they cannot shed, below), whatever
order the reconnects come in, as the limits add up to at least every subscriber there is. A shed
gRPC call's connection also gets GOAWAY from the proxy, so that its retry opens a new connection
(a channel's retry over the old one would come back to the same proxy).

Only subscribers that resume exactly elsewhere are moved (a proxy reports them as movable):
plasma's gRPC stream carries no position, so one moved would miss what is published while it
reconnects; nor does a stream that has not been sent a position yet. The others count as load
(in the average and the cap) but a proxy's limit is never below them, so a proxy sheds at most
its movable subscribers; one whose excess cannot move is left as it is, and status says so
(state `Unmovable`) instead of a round that could not end. Drains of pods that are going away
end every subscriber: nothing else is possible.

No subscriber is moved twice within `COOLDOWN`, and there is no ping-pong: a proxy counts a
subscriber that resumed there while it was under a limit (the moved ones land then) as unmovable
for that long, so what it received stays and only what it had otherwise may be shed. The proxies
hold this, so an operator that restarts forgets nothing of it; which proxies received moved
subscribers and when is also shown in status (`received`, wall-clock times) and read back at
start (a new round waits `AFTER_ROUND` after the last one ended, restart or not). A proxy that
received is not barred from shedding as a whole: after a scale-in it may hold every subscriber,
none of them moved.

One reconnect budget. Every operation that makes subscribers reconnect is an `Operation`: a
terminating proxy pod's drain (a rollout, a scale-in, an eviction) or the rebalance round.
`share_budget` gives them rates that add up to the budget: drains share it equally (they hold
pods that are going away), a running rebalance keeps `REBALANCE_SHARE_WITH_DRAINS` of it and
starts no new round meanwhile. A drain that would not end before its pod is killed (SIGKILL
closes every remaining subscriber at once: the storm the budget exists to avoid) gets the rate
that ends it in time, over the budget if it must be, and says so (`forced`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from neoplasma.core.scaling import REBALANCE_COOLDOWN, ConnectionPolicy
from neoplasma.operator.conditions import now_text

COOLDOWN = REBALANCE_COOLDOWN  # seconds: a moved subscriber is not moved again (the proxies hold it)
SETTLE = 10.0  # seconds a proxy must have been ready before it counts (endpoints, kube-proxy)
HOLD = 30.0  # seconds a limit given to a proxy lasts unless given again (an operator gone lifts it)
# After a round, its limits stay this long (two readiness probe periods), so that subscribers still
# on their way land elsewhere, then lapse; turned off, at once.
AFTER_ROUND = 10.0
MIN_HOLD = 0.5
ROUND_TIMEOUT = 600.0  # a round that has not finished by then ends anyway (proxies gone, clients slow)
REBALANCE_SHARE_WITH_DRAINS = 0.1  # of the budget, for a running rebalance while pods drain
DEADLINE_MARGIN = 5.0  # seconds before SIGKILL by which a drain must be done
MIN_RATE = 0.1  # reconnects/s: the slowest any running operation is paced (a proxy needs > 0)
MAX_RECEIVED = 256  # entries of status.rebalance.received written and read back (the latest first)
MAX_NAME = 253  # characters of a pod name


# -- what was observed --------------------------------------------------------------------


UNMOVABLE_WHY = ("plasma gRPC streams carry no position to resume from, other streams have none until they are "
                 f"sent an event or a heartbeat, and subscribers moved less than {REBALANCE_COOLDOWN:g} s ago are not "
                 "moved again")


@dataclass(frozen=True)
class ProxySeen:
    """A proxy pod that is not being deleted: its subscribers (SSE and gRPC), how long it has been
    ready (None: not ready, or its Status could not be read), and how many of its subscribers
    could not resume exactly elsewhere (ProxyStatus: subscribers - movable_subscribers)."""

    name: str
    subscribers: int
    ready_for: float | None
    unmovable: int = 0

    def excess(self, limit: int) -> int:
        """What it would shed down to `limit`: movable subscribers only."""
        return max(0, self.subscribers - max(limit, self.unmovable))


@dataclass(frozen=True)
class Round:
    """One rebalance round: its limits and its sources (the proxies that shed)."""

    started: float
    cap: int
    limits: Mapping[str, int]
    sources: frozenset[str]
    moves: int  # subscribers the sources were to shed at the start
    ended: float | None = None

    def receivers(self) -> frozenset[str]:
        return frozenset(self.limits) - self.sources


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a rebalance would do now: limits for every proxy, and how many each source sheds.
    Without moves, `reason` says why nothing is to be done."""

    reason: str
    cap: int = 0
    limits: Mapping[str, int] = field(default_factory=dict)
    moves: Mapping[str, int] = field(default_factory=dict)
    average: float = 0.0
    busiest: int = 0
    stuck: int = 0  # subscribers over the cap that cannot be moved (UNMOVABLE_WHY)

    @property
    def moved(self) -> int:
        return sum(self.moves.values())

    def to_status(self, rate: float | None) -> dict[str, Any]:
        """The plan as `status.rebalance.plan`: moves, the rate it would get, the ETA."""
        status: dict[str, Any] = {
            "cap": self.cap, "subscribers": self.moved,
            "moves": [{"from": name, "subscribers": n} for name, n in sorted(self.moves.items())],
        }
        if rate:
            status["reconnectsPerSecond"] = round(rate, 3)
            status["etaSeconds"] = math.ceil(self.moved / rate)
        return status


def received_to_status(history: Iterable[Round], current: Round | None, now: float,
                       wall: datetime) -> list[dict[str, str]]:
    """`status.rebalance.received`: each proxy that received moved subscribers less than COOLDOWN
    ago (a receiver of a round that ended then, or of the running one: now; it holds those as
    unmovable meanwhile) and when, RFC 3339 from the wall clock `wall` (at monotonic `now`); the
    latest first, at most MAX_RECEIVED."""
    at: dict[str, float] = {}
    for past in [*history, *([current] if current is not None else [])]:
        end = now if past.ended is None else past.ended
        if now - end < COOLDOWN:
            for name in past.receivers():
                at[name] = max(at.get(name, end), end)
    latest = sorted(at.items(), key=lambda item: (-item[1], item[0]))[:MAX_RECEIVED]
    return [{"proxy": name, "at": now_text(wall + timedelta(seconds=t - now))} for name, t in latest]


def received_from_status(entries: object, now: float, wall: datetime) -> list[Round]:
    """What `received_to_status` wrote, read back by an operator that restarted (for status, and
    the wait after a round): one ended round per time, with those proxies as its receivers.
    Entries that are unreadable or older than COOLDOWN are left out; one later than `wall`
    (clocks apart) counts as now; at most MAX_RECEIVED are read."""
    if not isinstance(entries, list):
        return []
    by_time: dict[float, set[str]] = {}
    for entry in entries[:MAX_RECEIVED]:
        if not isinstance(entry, Mapping):
            continue
        name, stamp = entry.get("proxy"), entry.get("at")
        ago = _seconds(wall, stamp) if isinstance(stamp, str) else None
        if isinstance(name, str) and 0 < len(name) <= MAX_NAME and ago is not None and ago < COOLDOWN:
            by_time.setdefault(now - max(ago, 0.0), set()).add(name)
    return [Round(t, 0, dict.fromkeys(sorted(names), 0), frozenset(), 0, ended=t) for t, names in by_time.items()]


def plan_rebalance(proxies: Sequence[ProxySeen], tolerance: float, *, settle: float = SETTLE) -> Plan:
    """How to spread the subscribers of `proxies` (those not being deleted) so that the busiest
    holds at most (1 + tolerance) x the average."""
    if len(proxies) < 2:
        return Plan("fewer than 2 proxies: nothing to balance")
    waiting = sorted(p.name for p in proxies if p.ready_for is None or p.ready_for < settle)
    if waiting:
        return Plan(f"waiting for {', '.join(waiting)} to be ready for {settle:g} s")
    total = sum(p.subscribers for p in proxies)
    if total == 0:
        return Plan("no subscribers")
    average = total / len(proxies)
    busiest = max(p.subscribers for p in proxies)
    if busiest <= (1 + tolerance) * average:
        return Plan(f"balanced: the busiest proxy holds {busiest}, within {1 + tolerance:g} x the average "
                    f"{average:.1f}", average=average, busiest=busiest)
    cap = max(math.ceil(average), math.floor((1 + tolerance) * average))
    limits = _proxy_limits(proxies, cap)
    moves = {p.name: p.subscribers - limits[p.name] for p in proxies if p.subscribers > limits[p.name]}
    stuck = {p.name: p.unmovable - cap for p in proxies if p.unmovable > cap}
    if not moves:
        return Plan(_stuck_reason(stuck, cap) if stuck else f"as even as whole subscribers allow (at most {cap} per "
                    "proxy)", average=average, busiest=busiest, stuck=sum(stuck.values()))
    reason = (f"the busiest proxy holds {busiest}, over {1 + tolerance:g} x the average {average:.1f}: "
              f"at most {cap} per proxy")
    if stuck:
        reason += f"; {_stuck_reason(stuck, cap)}"
    return Plan(reason, cap, limits, moves, average, busiest, sum(stuck.values()))


def _proxy_limits(proxies: Sequence[ProxySeen], cap: int) -> dict[str, int]:
    """Every proxy's limit: `cap`, never below what it cannot shed (its unmovable subscribers)."""
    return {p.name: max(cap, p.unmovable) for p in proxies}


def _stuck_reason(stuck: Mapping[str, int], cap: int) -> str:
    over = ", ".join(f"{name} {n}" for name, n in sorted(stuck.items()))
    return f"over the limit of {cap}, not moved as they cannot resume elsewhere ({over}): {UNMOVABLE_WHY}"


def replan(shown: Mapping[str, Any], proxies: Sequence[ProxySeen]) -> Plan:
    """The plan shown in status (`Plan.to_status`), for the proxies there are now: its cap, its
    sources each shedding at most what was shown (subscribers that left meanwhile are not
    replaced by others), proxies that are gone left out."""
    cap = shown.get("cap")
    rows = shown.get("moves")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1 or not isinstance(rows, list):
        return Plan("the plan in status is unreadable: compute a new one with neoplasma.io/rebalance=plan")
    approved = {str(row.get("from")): row.get("subscribers") for row in rows if isinstance(row, Mapping)}
    limits = _proxy_limits(proxies, cap)
    moves: dict[str, int] = {}
    for p in proxies:
        most = approved.get(p.name)
        if isinstance(most, int) and not isinstance(most, bool) and p.subscribers > limits[p.name]:
            moves[p.name] = min(most, p.subscribers - limits[p.name])
            limits[p.name] = p.subscribers - moves[p.name]
    if not moves:
        return Plan("nothing of the approved plan is left to move")
    total = sum(p.subscribers for p in proxies)
    return Plan(f"the approved plan: at most {cap} per proxy", cap, limits, moves, total / len(proxies),
                max(p.subscribers for p in proxies))


# -- the budget -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """Something that makes subscribers reconnect: `kind` rollout, scale-in or eviction (a
    terminating proxy pod: `name`, killed in `seconds_left`) or rebalance."""

    kind: str
    name: str
    left: int  # subscribers still to move
    seconds_left: float | None = None  # until SIGKILL (None: no deadline)


@dataclass(frozen=True)
class Share:
    operation: Operation
    rate: float  # reconnects per second
    forced: bool = False  # more than its share: the drain would not end before SIGKILL otherwise

    @property
    def eta(self) -> float | None:
        return self.operation.left / self.rate if self.rate > 0 else None

    def to_status(self) -> dict[str, Any]:
        op = self.operation
        status: dict[str, Any] = {"kind": op.kind, "name": op.name, "subscribersLeft": op.left,
                                  "reconnectsPerSecond": round(self.rate, 3)}
        if self.eta is not None:
            status["etaSeconds"] = math.ceil(self.eta)
        if self.forced:
            status["overBudget"] = True
        return status


def share_budget(budget: float, operations: Sequence[Operation]) -> list[Share]:
    """Rates for `operations` (in their order) that add up to at most `budget`, unless a drain
    needs more to end before its pod is killed (then `forced`)."""
    drains = [i for i, op in enumerate(operations) if op.kind != "rebalance" and op.left > 0]
    rebalances = [i for i, op in enumerate(operations) if op.kind == "rebalance" and op.left > 0]
    rates = [0.0] * len(operations)
    forced = [False] * len(operations)
    for_rebalance = budget * REBALANCE_SHARE_WITH_DRAINS if drains and rebalances else budget
    if drains:
        needs = [_need(operations[i]) for i in drains]
        fair = (budget - (for_rebalance if rebalances else 0.0)) / len(drains)
        for i, rate, need in zip(drains, _fill(budget - (for_rebalance if rebalances else 0.0), needs), needs,
                                 strict=True):
            rates[i], forced[i] = rate, need > fair + 1e-9
    if rebalances:
        for i, rate in zip(rebalances, _fill(for_rebalance, [0.0] * len(rebalances)), strict=True):
            rates[i] = rate
    return [Share(op, max(rates[i], MIN_RATE) if op.left > 0 else 0.0, forced[i])
            for i, op in enumerate(operations)]


def _need(op: Operation) -> float:
    """The rate that ends `op` before its deadline."""
    if op.seconds_left is None:
        return 0.0
    return op.left / max(op.seconds_left - DEADLINE_MARGIN, 1.0)


def _fill(total: float, needs: Sequence[float]) -> list[float]:
    """Equal shares of `total`, except that each gets at least its need (water-filling)."""
    rates = [0.0] * len(needs)
    remaining, count = total, len(needs)
    for i in sorted(range(len(needs)), key=lambda k: -needs[k]):
        rates[i] = max(needs[i], remaining / count)
        remaining -= rates[i]
        count -= 1
    return rates


def split_rate(rate: float, moves: Mapping[str, int]) -> dict[str, float]:
    """A round's rate over its sources, in proportion to what each sheds (they end together)."""
    total = sum(moves.values())
    return {name: max(rate * n / total, MIN_RATE) for name, n in moves.items() if n > 0} if total else {}


# -- what a drain needs from the pods ---------------------------------------------------------

SUBSCRIBERS_FLOOR = 25_000  # subscribers per proxy the grace period always covers
MAX_GRACE_SECONDS = 3600  # beyond this a drain is sped up (over the budget) rather than waited for


def covered_subscribers(observed_max: int) -> int:
    """The subscribers per proxy a drain is sized for: the floor, or the next power of two above
    what the busiest proxy holds, so that the grace period (a pod template field: changing it
    rolls the pods) only changes when the load doubles."""
    if observed_max <= SUBSCRIBERS_FLOOR:
        return SUBSCRIBERS_FLOOR
    return 1 << (observed_max - 1).bit_length()


def grace_seconds(budget: float, observed_max: int, drain_delay: float, margin: float = 10.0) -> int:
    """terminationGracePeriodSeconds of a proxy pod: its drain delay, then the subscribers it is
    sized for at the whole budget (the rollout and PodDisruptionBudget stop one at a time), and a
    margin to stop; at most MAX_GRACE_SECONDS (then the drain is sped up to end in time)."""
    seconds = drain_delay + math.ceil(covered_subscribers(observed_max) / budget) + margin
    return int(min(math.ceil(seconds), MAX_GRACE_SECONDS))


STOP_SECONDS = 5.0  # after its drain, the time a proxy takes to stop


@dataclass(frozen=True)
class DrainSizing:
    """What the proxy pods are rendered with: the pace of a drain when the operator says nothing
    (the whole budget: one pod at a time drains, as the rollout and the PodDisruptionBudget
    allow), the time it must end within, the grace period, and the PDB's maxUnavailable."""

    drain_rate: float
    drain_within: int
    grace_seconds: int
    max_unavailable: int = 1


def drain_sizing(budget: float, observed_max: int, drain_delay: float, proxies: int) -> DrainSizing:
    grace = grace_seconds(budget, observed_max, drain_delay, margin=2 * STOP_SECONDS)
    within = max(1, math.floor(grace - drain_delay - STOP_SECONDS))
    return DrainSizing(budget, within, grace, max_unavailable(budget, covered_subscribers(observed_max), within,
                                                              proxies))


def max_unavailable(budget: float, observed_max: int, window: float, replicas: int) -> int:
    """The proxy PodDisruptionBudget's maxUnavailable: as many pods as can drain at once within
    `window` seconds (the grace period's drain part) sharing the budget, at least 1, and at most a
    quarter of the proxies (the others take their subscribers)."""
    fits = int(budget * window // max(observed_max, 1))
    return max(1, min(fits, replicas // 4))


# -- the rebalance step -----------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """What to tell one proxy: hold at most `keep` subscribers, shedding the excess at `rate`
    (ProxyControl.Drain with keep_at_most, reconnects_per_second, hold_seconds)."""

    proxy: str
    keep: int
    rate: float
    hold: float = HOLD


@dataclass(frozen=True)
class Orders:
    """One pass's decision: the limits to send, `status.rebalance`, the events."""

    limits: tuple[Limit, ...] = ()
    status: Mapping[str, Any] = field(default_factory=dict)
    events: tuple[str, ...] = ()


class Rebalancer:
    """One cluster's rebalancing between passes: the running round and the past ones (for the
    wait after a round and status `received`, read back at the first step). `operation` says what the
    round has left for the budget; `step` decides.

    `approve` runs the plan shown in status once, when the annotation turns to `approve` (from
    anything else: status keeps the mode last seen, and `approval: pending` until it ran); while
    it stays `approve`, later plans are shown, not run. No write to the resource but its status
    (a GitOps tool would fight an operator that rewrote its annotations).
    """

    def __init__(self) -> None:
        self.current: Round | None = None
        self.history: list[Round] = []
        self._mode: str | None = None  # the mode at the last step (None: none yet: status says)
        self._pending = False

    def operation(self, proxies: Sequence[ProxySeen]) -> Operation | None:
        """The running round as an operation for `share_budget` (None: no round)."""
        if self.current is None:
            return None
        return Operation("rebalance", "rebalance", _left(self.current, proxies))

    def step(self, mode: str, proxies: Sequence[ProxySeen], tolerance: float, rate: float | None,
             previous: Mapping[str, Any] | None, draining: bool, now: float, wall: datetime | None = None) -> Orders:
        """`rate`: the running round's share of the budget (or what a new round would get);
        `previous`: `status.rebalance` as last written (what a restarted operator goes on from:
        the plan shown, the mode and approval last seen, the proxies that received moved
        subscribers); `draining`: pods are draining (a new round waits for them); `wall`: the
        wall clock at `now`, for `received` (None: not read nor written)."""
        previous = previous or {}
        if self._mode is None and wall is not None:
            self.history += received_from_status(previous.get("received"), now, wall)
        orders = self._step(mode, proxies, tolerance, rate, previous, draining, now)
        self._mode, self._pending = mode, orders.status.get("approval") == "pending"
        if wall is not None:
            orders = replace(orders, status={**orders.status,
                                             "received": received_to_status(self.history, self.current, now, wall)})
        return orders

    def _step(self, mode: str, proxies: Sequence[ProxySeen], tolerance: float, rate: float | None,
              previous: Mapping[str, Any], draining: bool, now: float) -> Orders:
        self.history = [r for r in self.history if r.ended is not None and now - r.ended < COOLDOWN]
        shown = previous.get("plan") if isinstance(previous.get("plan"), Mapping) else None
        if self._mode is None:
            last_mode, was_pending = previous.get("mode"), previous.get("approval") == "pending"
        else:  # (the status in hand may not show the last write yet)
            last_mode, was_pending = self._mode, self._pending
        pending = mode == "approve" and (last_mode != "approve" or was_pending)
        events: list[str] = []

        ending: tuple[Limit, ...] = ()  # the last word to the proxies of a round that ended now
        seen = _seen(proxies)

        def orders(state: str, reason: str, *, limits: tuple[Limit, ...] | None = None,
                   still_pending: bool = pending, **fields: Any) -> Orders:
            # Every key of status.rebalance that is not here is removed (status.present): no figure of
            # an earlier state stays behind.
            status = {"mode": mode, "state": state, "reason": reason,
                      "approval": "pending" if still_pending else None, **seen, **fields}
            return Orders(ending if limits is None else limits, status, tuple(events))

        if self.current is not None:
            left = _left(self.current, proxies)
            if mode == "off" or left == 0 or now - self.current.started > ROUND_TIMEOUT:
                why = ("neoplasma.io/rebalance is off" if mode == "off" else "done" if left == 0
                       else f"not done after {ROUND_TIMEOUT:g} s")
                events.append(f"rebalance ended ({why}): {self.current.moves - left} of "
                              f"{self.current.moves} subscribers moved")
                here = {p.name: p.subscribers for p in proxies}
                ending = tuple(replace(x, hold=AFTER_ROUND) if mode != "off"  # off: lifted, nothing more shed
                               else replace(x, keep=max(x.keep, here[x.proxy]), hold=MIN_HOLD)
                               for x in self._limits(self.current, proxies, rate))
                self.history.append(replace(self.current, ended=now))
                self.current = None
            else:
                return orders("Running", f"moving {left} more subscribers, at most {self.current.cap} per proxy",
                              limits=self._limits(self.current, proxies, rate), plan=shown, **self._eta(left, rate))
        if mode == "off":
            return orders("Off", "neoplasma.io/rebalance is off")
        plan = plan_rebalance(proxies, tolerance)
        if pending and shown:
            plan = replan(shown, proxies)
            if not plan.moves:
                events.append(f"approved plan not run: {plan.reason}")
                return orders(_idle(plan), plan.reason, still_pending=False)
        if not plan.moves:
            return orders(_idle(plan), plan.reason)
        if mode == "plan" or (mode == "approve" and not (pending and shown)):
            then = ("set neoplasma.io/rebalance=approve to run it" if mode == "plan" else "running it next" if pending
                    else "the approved plan ran: set neoplasma.io/rebalance=plan, then approve, to run this one")
            return orders("Planned", f"{plan.reason}; {then}", plan=plan.to_status(rate))
        if draining:
            return orders("Waiting", "proxy pods are draining: rebalancing starts when they are done",
                          plan=plan.to_status(rate))
        if any(r.ended is not None and now - r.ended < AFTER_ROUND for r in self.history):
            # The last round's moved subscribers may still be reconnecting, counted nowhere: a plan made
            # now would take them for gone and give limits that hold fewer than every subscriber.
            return orders("Waiting", f"the last round's moved subscribers are still landing (for {AFTER_ROUND:g} s "
                          "after it ended)", plan=plan.to_status(rate))
        self.current = Round(now, plan.cap, dict(plan.limits), frozenset(plan.moves), plan.moved)
        events.append(f"rebalance started: {plan.reason}; moving " + ", ".join(
            f"{n} from {name}" for name, n in sorted(plan.moves.items())))
        return orders("Running", plan.reason, limits=self._limits(self.current, proxies, rate), still_pending=False,
                      plan=plan.to_status(rate), **self._eta(plan.moved, rate))

    @staticmethod
    def _limits(current: Round, proxies: Sequence[ProxySeen], rate: float | None) -> tuple[Limit, ...]:
        here = {p.name: p for p in proxies}
        shed = {name: here[name].excess(current.limits[name]) for name in current.sources if name in here}
        rates = split_rate(rate or MIN_RATE, shed)
        return tuple(Limit(name, keep, rates.get(name, MIN_RATE)) for name, keep in sorted(current.limits.items())
                     if name in here)

    @staticmethod
    def _eta(left: int, rate: float | None) -> dict[str, Any]:
        if not rate:
            return {"subscribersLeft": left}
        return {"subscribersLeft": left, "reconnectsPerSecond": round(rate, 3), "etaSeconds": math.ceil(left / rate)}


def _seen(proxies: Sequence[ProxySeen]) -> dict[str, Any]:
    """The figures status.rebalance shows in every state: the average and busiest proxy, and the
    subscribers that cannot be moved."""
    total = sum(p.subscribers for p in proxies)
    return {"average": round(total / len(proxies), 1) if proxies else 0.0,
            "busiest": max((p.subscribers for p in proxies), default=0),
            "unmovable": sum(p.unmovable for p in proxies)}


def _idle(plan: Plan) -> str:
    """The state when nothing is to move: Unmovable when what is over the cap cannot move, else Balanced."""
    return "Unmovable" if plan.stuck else "Balanced"


def _left(current: Round, proxies: Sequence[ProxySeen]) -> int:
    """What the round's sources still hold over their limits and can move (sources that are gone
    count 0; subscribers that cannot move are not waited for)."""
    return sum(p.excess(current.limits[p.name]) for p in proxies if p.name in current.sources)


# -- one pass: every operation, one budget ------------------------------------------------------


@dataclass(frozen=True)
class PodSeen:
    """A proxy pod as one pass saw it: its subscribers (None: its Status could not be read), how
    long it has been ready (None: not ready), and, terminating, why (`drain_kind`) and the seconds
    until it is killed; of its subscribers, those that cannot be moved (ProxySeen.unmovable)."""

    name: str
    subscribers: int | None
    ready_for: float | None = None
    terminating: str | None = None
    seconds_left: float | None = None
    unmovable: int = 0


class ProxyPod(Protocol):
    """What `pods_seen` needs of a proxy pod (members.PodView)."""

    @property
    def name(self) -> str: ...
    @property
    def ready(self) -> bool: ...
    @property
    def deleting(self) -> bool: ...
    @property
    def owner(self) -> str: ...
    @property
    def ready_since(self) -> str: ...
    @property
    def deletion(self) -> str: ...


def pods_seen(pods: Iterable[ProxyPod], subscribers: Mapping[str, tuple[int, int]], current_owner: str,
              scaled_in: bool, wall: datetime) -> list[PodSeen]:
    """The proxy pods as the connections step sees them: `subscribers` by pod name (those read:
    how many, how many movable), the ReplicaSet of the proxy Deployment's current template
    (`current_owner`), whether the operator lowered the proxies' replicas lately (`scaled_in`),
    the wall clock."""
    seen = []
    for pod in pods:
        count, movable = subscribers.get(pod.name, (None, 0))
        unmovable = max(0, count - movable) if count is not None else 0
        if pod.deleting:
            left = _seconds(wall, pod.deletion)
            seen.append(PodSeen(pod.name, count, None, drain_kind(pod.owner, current_owner, scaled_in),
                                None if left is None else -left, unmovable))
        elif not pod.ready:
            seen.append(PodSeen(pod.name, count, None, unmovable=unmovable))
        else:  # ready since an unknown time: counted as settled
            since = _seconds(wall, pod.ready_since)
            seen.append(PodSeen(pod.name, count, SETTLE if since is None else since, unmovable=unmovable))
    return seen


def _seconds(wall: datetime, stamp: str) -> float | None:
    """Seconds from `stamp` (RFC 3339) to `wall` (None: no stamp, or unreadable)."""
    try:
        return (wall - datetime.fromisoformat(stamp)).total_seconds() if stamp else None
    except (ValueError, TypeError):  # (TypeError: a stamp without a time zone)
        return None


def drain_kind(pod_owner: str, current_owner: str, scaled_in: bool) -> str:
    """Why a proxy pod is terminating: its ReplicaSet is not the Deployment's current one (a
    rollout); else the operator lowered the replicas lately (a scale-in); else an eviction (a
    node drain, the eviction API, a deleted pod: the ReplicaSet replaces it)."""
    if current_owner and pod_owner != current_owner:
        return "rollout"
    return "scale-in" if scaled_in else "eviction"


@dataclass(frozen=True)
class Pace:
    """A terminating pod's share of the budget: ProxyControl.Drain(reconnects_per_second=rate)."""

    proxy: str
    rate: float


@dataclass(frozen=True)
class Notice:
    """An Event to post (reason, message)."""

    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class ConnectionOrders:
    paces: tuple[Pace, ...] = ()
    limits: tuple[Limit, ...] = ()
    status: Mapping[str, Any] = field(default_factory=dict)  # status.rebalance and status.reconnects
    notices: tuple[Notice, ...] = ()


class Connections:
    """The connections step of a cluster's pass: the drains under way and the rebalance share
    one budget; what each proxy is told, and what status shows."""

    def __init__(self) -> None:
        self.rebalancer = Rebalancer()
        self._over: frozenset[str] = frozenset()  # drains last reported over the budget
        self._replicas: int | None = None
        self._lowered_at: float | None = None
        self.busiest = 0  # subscribers on the busiest proxy at the last pass (DrainSizing)
        self._last: Orders | None = None

    def scaled_in(self, replicas: int, grace: float, now: float) -> bool:
        """Whether the proxies' replicas (as rendered, given on every pass) went down less than
        `grace` seconds ago: a pod of the current template stopping now is then a scale-in."""
        if self._replicas is not None and replicas < self._replicas:
            self._lowered_at = now
        self._replicas = replicas
        return self._lowered_at is not None and now - self._lowered_at < grace

    def step(self, policy: ConnectionPolicy, pods: Sequence[PodSeen], previous: Mapping[str, Any] | None,
             now: float, wall: datetime | None = None) -> ConnectionOrders:
        """`previous`: `status.rebalance` as last written; `wall`: the wall clock (Rebalancer.step)."""
        budget = policy.max_reconnects
        drains = [Operation(p.terminating, p.name, p.subscribers or 0, p.seconds_left)
                  for p in pods if p.terminating is not None and p.subscribers]
        live = [ProxySeen(p.name, p.subscribers or 0, p.ready_for if p.subscribers is not None else None, p.unmovable)
                for p in pods if p.terminating is None]
        running = self.rebalancer.operation(live)
        shares = share_budget(budget, [*drains, *([running] if running else [])])
        rate = shares[-1].rate if running else (budget * REBALANCE_SHARE_WITH_DRAINS if drains else budget)
        unknown = {p.name for p in pods if p.terminating is None and p.subscribers is None}
        current = self.rebalancer.current
        if current is not None and current.sources & unknown and self._last is not None:
            orders = self._last  # a source could not be read: its limits renewed, nothing decided
        else:
            orders = self.rebalancer.step(policy.rebalance, live, policy.tolerance, rate, previous, bool(drains), now,
                                          wall)
        self._last = replace(orders, events=())
        notices = [Notice("Rebalance", message) for message in orders.events]
        over = frozenset(s.operation.name for s in shares if s.forced)
        if over - self._over:
            late = [s for s in shares if s.operation.name in over - self._over]
            notices.append(Notice("ReconnectBudgetExceeded", "; ".join(
                f"{s.operation.kind} of {s.operation.name}: {s.operation.left} subscribers left and "
                f"{s.operation.seconds_left or 0:.0f} s before the pod is killed: {s.rate:.0f}/s" for s in late)
                + f", over neoplasma.io/max-reconnects-per-second {budget:g} (else they would all reconnect at "
                "once when it is killed); raise the budget or the grace period", warning=True))
        self._over = over
        entries = [s.to_status() for s in shares if s.operation.kind != "rebalance" and s.operation.left]
        if running and self.rebalancer.current is not None:
            entries.append(shares[-1].to_status())
        elif self.rebalancer.current is not None:  # started in this pass
            entries.append(Share(Operation("rebalance", "rebalance", self.rebalancer.current.moves), rate).to_status())
        status = {"rebalance": dict(orders.status),
                  "reconnects": {"budget": budget, "inProgress": entries,
                                 "reconnectsPerSecond": round(sum(e["reconnectsPerSecond"] for e in entries), 3)}}
        self.busiest = max((p.subscribers or 0 for p in pods), default=0)
        return ConnectionOrders(
            paces=tuple(Pace(s.operation.name, s.rate) for s in shares if s.operation.kind != "rebalance"
                        and s.operation.left),
            limits=orders.limits, status=status, notices=tuple(notices))
