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


async def test_plan_shows_the_moves_without_moving_then_approve_spreads_the_subscribers(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator()
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 1}},
                   {"neoplasma.io/rebalance": "plan", "neoplasma.io/max-reconnects-per-second": "20"})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 1), 60, "1 broker, 1 proxy")
    service = Service(clusters, "demo")
    refresher = asyncio.create_task(keep_refreshing(service))
    await wait_for(lambda: service.ready, 20, "a ready proxy")
    browsers = [EventSource(service.pick, "t").start() for _ in range(30)]

    async def all_at_one() -> bool:
        return list((await counts(clusters, "demo")).values()) == [30]

    await wait_for(all_at_one, 30, "30 subscribers at the one proxy")
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
    await publisher.stop()
    await wait_for(lambda: all(publisher.all_received(b.events) for b in browsers), 30, "every event")
    for k, b in enumerate(browsers):
        assert set(b.statuses) == {200}, f"browser {k} got {b.statuses}"
        publisher.assert_exactly_once_in_order(b.events, f"browser {k}")
        assert not b.gaps
    print(f"19 moves after approve in {took:.1f} s (20/s budget)")
    for b in browsers:
        await b.close()
    refresher.cancel()


async def test_a_rollout_is_paced_by_the_budget_and_shows_in_status(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator()
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 1}},
                   {"neoplasma.io/rebalance": "off", "neoplasma.io/max-reconnects-per-second": "4"})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 1), 60, "1 broker, 1 proxy")
    service = Service(clusters, "demo")
    refresher = asyncio.create_task(keep_refreshing(service))
    await wait_for(lambda: service.ready, 20, "a ready proxy")
    browsers = [EventSource(service.pick, "t").start() for _ in range(16)]

    async def all_subscribed() -> bool:
        return list((await counts(clusters, "demo")).values()) == [16]

    await wait_for(all_subscribed, 30, "16 subscribers")
    ended_at: list[float] = []

    async def watch_reconnects() -> None:  # when each subscriber came back (a new connection)
        before = {id(b): len(b.statuses) for b in browsers}
        while True:
            for b in browsers:
                if len(b.statuses) > before[id(b)]:
                    before[id(b)] = len(b.statuses)
                    ended_at.append(time.monotonic())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_reconnects())
    # A new template (resources) rolls the proxy: the old pod drains at the budget's 4/s.
    clusters.patch_spec("demo", {"proxies": {"resources": {"requests": {"cpu": "150m"}}}})

    def rollout_in_status() -> dict[str, Any]:
        progress = clusters.status("demo").get("reconnects") or {}
        rolling = [e for e in progress.get("inProgress") or [] if e["kind"] == "rollout"]
        return rolling[0] if rolling else {}

    entry = await wait_for(rollout_in_status, 60, "the rollout in status.reconnects")
    assert entry["reconnectsPerSecond"] == 4 and entry["subscribersLeft"] <= 16
    assert entry["name"].startswith("demo-proxy-")
    await wait_for(lambda: len(ended_at) >= 16, 60, "every subscriber reconnected to the new proxy")
    watcher.cancel()
    # 16 at 4/s: ~4 s, never a burst above the budget (a second's worth, and one of slack).
    for t in ended_at:
        within = [u for u in ended_at if t <= u < t + 1.0]
        spread = [round(u - ended_at[0], 2) for u in ended_at]
        assert len(within) <= 4 + 1, f"more than the budget in a second: {spread}"
    assert ended_at[-1] - ended_at[0] >= 3.0, ended_at
    assert list((await counts(clusters, "demo")).values()) == [16]
    for b in browsers:
        await b.close()
    refresher.cancel()


async def test_a_scale_in_of_two_proxies_shares_the_budget_between_their_drains(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator()
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 3}},
                   {"neoplasma.io/rebalance": "off", "neoplasma.io/max-reconnects-per-second": "4"})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 3), 60, "1 broker, 3 proxies")
    service = Service(clusters, "demo")
    refresher = asyncio.create_task(keep_refreshing(service))
    await wait_for(lambda: len(service.ready) == 3, 20, "three ready proxies")
    browsers = [EventSource(service.pick, "t").start() for _ in range(36)]

    async def all_subscribed() -> bool:
        return sum((await counts(clusters, "demo")).values()) == 36

    await wait_for(all_subscribed, 30, "36 subscribers")
    ended_at: list[float] = []

    async def watch_reconnects() -> None:
        before = {id(b): len(b.statuses) for b in browsers}
        while True:
            for b in browsers:
                if len(b.statuses) > before[id(b)]:
                    before[id(b)] = len(b.statuses)
                    ended_at.append(time.monotonic())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_reconnects())
    clusters.patch_spec("demo", {"proxies": {"replicas": 1}})  # two pods stop at once

    def two_drains() -> list[dict[str, Any]]:
        progress = clusters.status("demo").get("reconnects") or {}
        drains = [e for e in progress.get("inProgress") or [] if e["kind"] == "scale-in"]
        return drains if len(drains) == 2 else []

    drains = await wait_for(two_drains, 60, "two scale-in drains in status.reconnects")
    assert [d["reconnectsPerSecond"] for d in drains] == [2, 2]  # the budget, shared
    assert clusters.status("demo")["reconnects"]["reconnectsPerSecond"] == 4
    moved = 36 - max((await counts(clusters, "demo")).values())
    await wait_for(lambda: len(ended_at) >= moved, 60, "the stopped proxies' subscribers back")
    watcher.cancel()
    # Two drains at 2/s each: in any 2 s, at most the budget's 8 (and one more per drain at the edge).
    ended_at.sort()
    spread = [round(u - ended_at[0], 2) for u in ended_at]
    for t in ended_at:
        assert len([u for u in ended_at if t <= u < t + 2.0]) <= 8 + 2, f"over the budget: {spread}"
    assert ended_at[-1] - ended_at[0] >= (moved - 2) / 4, f"faster than the budget: {spread}"
    assert sum((await counts(clusters, "demo")).values()) == 36
    for b in browsers:
        assert set(b.statuses) == {200}
        await b.close()
    refresher.cancel()
