"""Connections on the real control plane: the operator's rebalance (plan, then approve) after a
proxy scale-up, and a rollout paced by the reconnect budget, with real brokers and proxies run by
the stand-in kubelet and subscribers that reach the proxies as a Service does (a ready address of
the proxy Service's Endpoints, at random) and resume with their last id.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
import test_operator_kube
from harness import EventSource, Publisher, proxy_status, wait_for
from kubeharness.kubelet import StandInKubelet
from test_operator_kube import NEOPLASMA_PODS, Clusters, OperatorProcess, membership_everywhere, neoplasma_command
from test_proxy_shed import delivered_exactly_once

pytestmark = [pytest.mark.kube, pytest.mark.timeout(240)]

clusters = test_operator_kube.clusters  # fixtures
operator = test_operator_kube.operator


@pytest.fixture
def pods(kubelet: Callable[..., StandInKubelet]) -> StandInKubelet:
    return kubelet(NEOPLASMA_PODS, command_mapper=neoplasma_command, max_probe_period=0.2)


class Service:
    """Connections to the proxy Service as kube-proxy makes them: to a ready proxy pod, at random
    (the pods' Ready condition, as the kubelet's readiness probe sets it, is what endpoints follow)."""

    def __init__(self, clusters: Clusters, name: str) -> None:
        self.clusters, self.name = clusters, name
        self.rng = random.Random(5)
        self.ready: list[str] = []

    def refresh(self) -> None:
        self.ready = [p.status.pod_ip for p in self.clusters.ready_pods(self.name, "proxy")]

    def pick(self) -> str:
        return f"{self.rng.choice(self.ready)}:8080" if self.ready else "127.0.0.1:9"


async def counts(clusters: Clusters, name: str) -> dict[str, int]:
    """Subscribers per running proxy pod (ready or not: a full one fails readiness), from its Status."""
    access = clusters.access(name)
    pods = clusters.core.list_namespaced_pod(
        clusters.namespace, label_selector=f"app.kubernetes.io/instance={name},app.kubernetes.io/component=proxy").items
    return {p.metadata.name: (await proxy_status(f"{p.status.pod_ip}:50052", access)).subscribers
            for p in pods if p.metadata.deletion_timestamp is None and p.status.pod_ip}


async def keep_refreshing(service: Service) -> None:
    while True:
        await asyncio.to_thread(service.refresh)
        await asyncio.sleep(0.2)


async def subscribed(clusters: Clusters, proxies: int, budget: int, rebalance: str, subscribers: int
                     ) -> tuple[asyncio.Task[None], list[EventSource]]:
    """Cluster demo (1 broker, `proxies`) with `subscribers` browsers through the Service stand-in."""
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": proxies}},
                   {"neoplasma.io/rebalance": rebalance, "neoplasma.io/max-reconnects-per-second": str(budget)})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 1, proxies), 60, f"1 broker, {proxies} proxies")
    service = Service(clusters, "demo")
    refresher = asyncio.create_task(keep_refreshing(service))
    await wait_for(lambda: len(service.ready) == proxies, 20, "the proxies ready")
    browsers = [EventSource(service.pick, "t").start() for _ in range(subscribers)]

    async def all_subscribed() -> bool:
        return sum((await counts(clusters, "demo")).values()) == subscribers

    await wait_for(all_subscribed, 30, f"{subscribers} subscribers")
    return refresher, browsers


class Reconnects:
    """When each browser came back (a new connection), watched every 10 ms."""

    def __init__(self, browsers: list[EventSource]) -> None:
        self.browsers, self.at = browsers, list[float]()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        before = {id(b): len(b.statuses) for b in self.browsers}
        while True:
            for b in self.browsers:
                if len(b.statuses) > before[id(b)]:
                    before[id(b)] = len(b.statuses)
                    self.at.append(time.monotonic())
            await asyncio.sleep(0.01)

    def stop(self) -> list[float]:
        self._task.cancel()
        return sorted(self.at)

    @staticmethod
    def check_rate(at: list[float], rate: float, drains: int, window: float) -> None:
        """At most `rate` per second over any `window` (and one more per drain at its edge), and
        no faster than `rate` on the whole."""
        spread = [round(u - at[0], 2) for u in at]
        for t in at:
            assert len([u for u in at if t <= u < t + window]) <= rate * window + drains, f"over the budget: {spread}"
        # Paced at exactly `rate`, the clients see the closes a few ms off the proxy's schedule: 5 % slack
        # (a drain at twice the budget, or unpaced, is far outside it).
        assert at[-1] - at[0] >= 0.95 * (len(at) - drains) / rate, f"faster than the budget: {spread}"


async def test_plan_shows_the_moves_without_moving_then_approve_spreads_the_subscribers(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator()
    refresher, browsers = await subscribed(clusters, 1, 20, "plan", 30)
    brokers = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    publisher = Publisher(brokers).start(interval=0.02)

    clusters.patch_spec("demo", {"proxies": {"replicas": 3}})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 3), 60, "3 proxies")

    def planned() -> dict[str, Any]:
        rebalance = clusters.status("demo").get("rebalance") or {}
        return rebalance if rebalance.get("state") == "Planned" else {}

    shown = await wait_for(planned, 60, "a plan in status")
    plan = shown["plan"]
    assert plan["cap"] == 11 and plan["subscribers"] == 19 and len(plan["moves"]) == 1
    assert plan["reconnectsPerSecond"] == 20 and plan["etaSeconds"] == 1
    assert shown["mode"] == "plan" and "set neoplasma.io/rebalance=approve to run it" in shown["reason"]
    assert sorted((await counts(clusters, "demo")).values()) == [0, 0, 30]  # nothing moved

    clusters.annotate("demo", {"neoplasma.io/rebalance": "approve"})

    async def spread() -> dict[str, int]:
        now = await counts(clusters, "demo")
        return now if sum(now.values()) == 30 and max(now.values()) <= 11 else {}

    started = time.monotonic()
    await wait_for(spread, 60, "the subscribers spread, at most 11 per proxy")
    took = time.monotonic() - started

    def balanced() -> dict[str, Any]:
        rebalance = clusters.status("demo").get("rebalance") or {}
        return rebalance if rebalance.get("state") == "Balanced" else {}

    done = await wait_for(balanced, 60, "status Balanced")
    assert done["mode"] == "approve" and "approval" not in done
    reasons = [(e.reason, e.message) for e in clusters.events("demo") if e.reason == "Rebalance"]
    assert any(m.startswith("rebalance started") and "moving 19 from demo-proxy-" in m for _, m in reasons), reasons
    await asyncio.sleep(0.5)
    await delivered_exactly_once(publisher, browsers)
    print(f"19 moves after approve in {took:.1f} s (20/s budget)")
    for b in browsers:
        await b.close()
    refresher.cancel()


def in_progress(clusters: Clusters, kind: str) -> list[dict[str, Any]]:
    """status.reconnects.inProgress entries of `kind`."""
    progress = clusters.status("demo").get("reconnects") or {}
    return [e for e in progress.get("inProgress") or [] if e["kind"] == kind]


async def test_a_rollout_is_paced_by_the_budget_and_shows_in_status(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator()
    refresher, browsers = await subscribed(clusters, 1, 4, "off", 16)
    reconnects = Reconnects(browsers)
    # A new template (resources) rolls the proxy: the old pod drains at the budget's 4/s.
    clusters.patch_spec("demo", {"proxies": {"resources": {"requests": {"cpu": "150m"}}}})
    [entry] = await wait_for(lambda: in_progress(clusters, "rollout"), 60, "the rollout in status.reconnects")
    assert entry["reconnectsPerSecond"] == 4 and entry["subscribersLeft"] <= 16
    assert entry["name"].startswith("demo-proxy-")
    await wait_for(lambda: len(reconnects.at) >= 16, 60, "every subscriber reconnected to the new proxy")
    Reconnects.check_rate(reconnects.stop(), rate=4, drains=1, window=1.0)
    assert list((await counts(clusters, "demo")).values()) == [16]
    for b in browsers:
        await b.close()
    refresher.cancel()


async def test_a_scale_in_of_two_proxies_shares_the_budget_between_their_drains(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator()
    refresher, browsers = await subscribed(clusters, 3, 4, "off", 36)
    reconnects = Reconnects(browsers)
    clusters.patch_spec("demo", {"proxies": {"replicas": 1}})  # two pods stop at once
    drains = await wait_for(lambda: len(in_progress(clusters, "scale-in")) == 2 and in_progress(clusters, "scale-in"),
                            60, "two scale-in drains in status.reconnects")
    assert [d["reconnectsPerSecond"] for d in drains] == [2, 2]  # the budget, shared
    assert clusters.status("demo")["reconnects"]["reconnectsPerSecond"] == 4
    moved = 36 - max((await counts(clusters, "demo")).values())
    await wait_for(lambda: len(reconnects.at) >= moved, 60, "the stopped proxies' subscribers back")
    # Two drains at 2/s each: in any 2 s, at most the budget's 8 (and one more per drain at the edge).
    Reconnects.check_rate(reconnects.stop(), rate=4, drains=2, window=2.0)
    assert sum((await counts(clusters, "demo")).values()) == 36
    for b in browsers:
        assert set(b.statuses) == {200}
        await b.close()
    refresher.cancel()


def rebalance_status(clusters: Clusters, state: str) -> dict[str, Any]:
    """status.rebalance once its state is `state` ({} before)."""
    rebalance = clusters.status("demo").get("rebalance") or {}
    return rebalance if rebalance.get("state") == state else {}


ROUND_FIGURES = ("subscribersLeft", "reconnectsPerSecond", "etaSeconds", "plan")


async def test_turned_off_mid_round_status_keeps_no_figure_of_the_round(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    """status is written as a merge patch: a key left out of a write stays. Turned off while a round
    runs, status.rebalance shows Off and nothing of the round (its subscribers left, rate, ETA,
    plan), but the proxy that received moved subscribers (its cooldown goes on)."""
    operator()
    refresher, browsers = await subscribed(clusters, 1, 2, "auto", 20)  # 2/s: 10 moves take 5 s
    brokers = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    publisher = Publisher(brokers).start(interval=0.05)  # (every stream gets an id: movable)
    clusters.patch_spec("demo", {"proxies": {"replicas": 2}})
    running = await wait_for(lambda: rebalance_status(clusters, "Running"), 90, "a round running")
    assert set(ROUND_FIGURES) <= set(running), running
    clusters.annotate("demo", {"neoplasma.io/rebalance": "off"})
    off = await wait_for(lambda: rebalance_status(clusters, "Off"), 30, "status Off")
    assert not set(ROUND_FIGURES) & set(off), f"the round's figures stayed under Off: {off}"
    assert off["mode"] == "off" and off["reason"] == "neoplasma.io/rebalance is off"
    assert [r["proxy"] for r in off["received"]] and off["busiest"] <= 20
    await asyncio.sleep(0.5)
    await delivered_exactly_once(publisher, browsers)
    assert sum((await counts(clusters, "demo")).values()) == 20
    for b in browsers:
        await b.close()
    refresher.cancel()


async def test_a_restarted_operator_does_not_move_again_what_it_moved_before(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    """The first operator spreads 30 subscribers over 2 proxies (the new one receives 14) and
    stops. Another starts and the proxies go to 3: both old ones are over the new cap (11), but
    what the second one received less than 10 minutes ago is not moved again: its proxy counts
    those as unmovable (nothing the operator must remember), and status.rebalance.received,
    written by the first operator, is read back and still shown."""
    first = operator()
    refresher, browsers = await subscribed(clusters, 1, 50, "auto", 30)
    brokers = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    publisher = Publisher(brokers).start(interval=0.05)
    [source] = [p.metadata.name for p in clusters.ready_pods("demo", "proxy")]
    clusters.patch_spec("demo", {"proxies": {"replicas": 2}})

    def spread_once() -> dict[str, Any]:
        status = rebalance_status(clusters, "Balanced")
        ended = [e for e in clusters.events("demo") if e.message.startswith("rebalance ended")]
        return status if status.get("received") and ended else {}

    done = await wait_for(spread_once, 120, "a round done, its receiver in status")
    [receiver] = [r["proxy"] for r in done["received"]]
    assert receiver != source

    async def landed() -> dict[str, int]:  # (the round ends when the source is at its limit)
        now = await counts(clusters, "demo")
        return now if sum(now.values()) == 30 else {}

    held = (await wait_for(landed, 60, "every moved subscriber landed"))[receiver]
    assert held >= 14, f"{receiver} received {held}"
    assert first.stop() == 0

    operator()  # a new process: nothing in memory
    clusters.patch_spec("demo", {"proxies": {"replicas": 3}})

    def second_round() -> list[str]:
        return [e.message for e in clusters.events("demo")
                if e.reason == "Rebalance" and e.message.startswith("rebalance started")][1:]

    [started] = await wait_for(second_round, 120, "a second round")
    assert f"from {source}" in started and receiver not in started.split("; moving ")[1], started
    assert receiver in [r["proxy"] for r in (clusters.status("demo").get("rebalance") or {}).get("received", [])]
    assert (await counts(clusters, "demo"))[receiver] >= held  # held: it sheds nothing
    await asyncio.sleep(0.5)
    await delivered_exactly_once(publisher, browsers)
    for b in browsers:
        await b.close()
    refresher.cancel()
