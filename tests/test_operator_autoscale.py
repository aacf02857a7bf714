"""Autoscaling, annotations and pause: the operator's side of issue 4.

Pure tests of the per-cluster autoscaler and of one controller against a fake API come first;
then (marked `kube`) the operator against the real control plane with real brokers and proxies:
load from `neoplasma.local.loadgen` scales the brokers out into a second Deployment and back in,
with a numbered publisher and an SSE subscriber checking that no accepted event is lost; bad
annotations and the pause annotation; a proxy rollout under subscribers that reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import test_operator_kube
from harness import SseClient, links_ready, proxy_status, wait_for
from kubeharness.kubelet import StandInKubelet
from test_operator_kube import NEOPLASMA_PODS, Clusters, OperatorProcess, membership_everywhere, neoplasma_command
from test_operator_units import OPTIONS, FakeKube, deployment, holds_for, resource

from neoplasma.core.autoscaler import Autoscaler
from neoplasma.core.scaling import Load
from neoplasma.core.tiers import Tier
from neoplasma.core.trust import Access
from neoplasma.local import loadgen
from neoplasma.operator import observe as observe_module
from neoplasma.operator.controller import ClusterController
from neoplasma.operator.members import Controlled, PodView
from neoplasma.operator.observe import Indexes
from neoplasma.operator.settings import Options
from neoplasma.operator.steps import Event
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

clusters = test_operator_kube.clusters  # fixtures
operator = test_operator_kube.operator

AUTOSCALE = {"neoplasma.io/autoscale": "true", "neoplasma.io/target-connections-per-broker": "4"}


# -- the autoscaler, pure ---------------------------------------------------------------------


def test_bounds_apply_at_once_and_only_with_autoscaling_on() -> None:
    scaler = Autoscaler()
    scaler.read({"neoplasma.io/min-brokers": "3"}, 1, 2)
    assert scaler.sizes(1, 2) == {Tier.BROKER: 1, Tier.PROXY: 2}  # autoscaling off: the spec as it is
    scaler.read({**AUTOSCALE, "neoplasma.io/min-brokers": "3"}, 1, 2)
    assert scaler.sizes(1, 2) == {Tier.BROKER: 3, Tier.PROXY: 2}  # before any load is read
    assert scaler.status(1, 2) == {"brokers": {"desired": 3, "reason": "bounds 3..100"},
                                   "proxies": {"desired": 2, "reason": "not autoscaled: no target annotation"}}


def test_decisions_use_the_shared_decide_and_keep_their_history() -> None:
    scaler = Autoscaler()
    policy = {**AUTOSCALE, "neoplasma.io/max-brokers": "3", "neoplasma.io/scale-down-delay": "10s"}
    scaler.read(policy, 1, 1)
    [up] = scaler.step(1, 1, {Tier.BROKER: Load(total=14, pods_read=1)}, now=0.0, wall="T0")
    assert (up.tier, up.before, up.after, up.direction) == (Tier.BROKER, 1, 3, "up")
    assert up.describe().startswith("brokers 1 -> 3: scale up")
    assert up.reason.startswith("scale up: average 14.0 per pod over 1 read, target 4")
    assert scaler.status(1, 1)["brokers"]["lastScaleTime"] == "T0"  # type: ignore[index]
    low = {Tier.BROKER: Load(total=3, pods_read=3)}
    assert scaler.step(1, 1, low, now=1.0, wall="T1") == []  # waiting out the delay
    assert scaler.step(1, 1, {Tier.BROKER: None}, now=5.0, wall="T5") == []  # unreadable: keep
    [down] = scaler.step(1, 1, low, now=11.0, wall="T11")
    assert (down.before, down.after) == (3, 1)


def test_bad_annotations_keep_the_last_good_policy_and_a_pause_is_still_honoured() -> None:
    scaler = Autoscaler()
    scaler.read({**AUTOSCALE, "neoplasma.io/min-brokers": "2"}, 1, 1)
    good = scaler.policy
    scaler.read({**AUTOSCALE, "neoplasma.io/min-brokers": "lots", "neoplasma.io/max-brokers": "5000",
                 "neoplasma.io/pause-reconciliation": "true"}, 1, 1)
    assert scaler.policy == good and scaler.paused
    assert sorted(e.annotation for e in scaler.errors) == ["neoplasma.io/max-brokers", "neoplasma.io/min-brokers"]
    assert scaler.sizes(1, 1) == {Tier.BROKER: 2, Tier.PROXY: 1}  # never anything absurd
    scaler.read(AUTOSCALE, 1, 1)
    assert scaler.errors == () and not scaler.paused


def test_a_restarted_operator_starts_from_the_sizes_in_status() -> None:
    scaler = Autoscaler({"brokers": {"desired": 5, "reason": "scale up: ..."}, "proxies": {"desired": "x"}})
    scaler.read(AUTOSCALE, 1, 2)
    assert scaler.sizes(1, 2) == {Tier.BROKER: 5, Tier.PROXY: 2}
    Autoscaler({"brokers": {"desired": 5}}).read({}, 1, 2)  # off: forgotten
    off = Autoscaler({"brokers": {"desired": 5}})
    off.read({}, 1, 2)
    assert off.sizes(1, 2) == {Tier.BROKER: 1, Tier.PROXY: 2} and off.status(1, 2) is None


# -- one controller, against a fake API ------------------------------------------------------


def annotated(spec: dict[str, Any], annotations: dict[str, str], generation: int = 1, version: str = "1"
              ) -> dict[str, Any]:
    body = resource(spec, generation, version)
    body["metadata"] = {**body["metadata"], "annotations": annotations}
    return body


def conditions_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


async def test_controller_scales_from_load_and_renders_a_second_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    loads = [Load(total=14, pods_read=1)]

    async def fake_broker_stats(addresses: Any, access: Any = None, timeout: Any = None,
                                channels: Any = None) -> dict[str, Any]:
        return {address: pb.BrokerStats(connections=int(loads[-1].total),  # one pod: the Load above
                                        events_in_per_second=loads[-1].events_per_second) for address in addresses}

    monkeypatch.setattr(observe_module, "broker_stats", fake_broker_stats)
    kube = FakeKube()
    # One ready broker pod of the cluster's own broker Deployment (through its ReplicaSet).
    pods = {("ns", "demo"): [PodView("ns", "demo", "broker", "demo-broker-0-a", "u1", "127.0.0.1", True,
                                     owner="rs-b")]}
    served = {("ns", "demo"): [deployment("d-b", "broker", owner="owner-uid")]}
    replicasets = {("ns", "demo"): [Controlled("rs-b", "d-b")]}
    body = annotated({"brokers": {"replicas": 1, "maxPerDeployment": 2}},
                     {**AUTOSCALE, "neoplasma.io/max-brokers": "3"})
    options = Options(**{**OPTIONS.__dict__, "scale_interval": 0.05})
    controller = ClusterController(("ns", "demo"), body, Indexes(pods, [served], replicasets),  # type: ignore[arg-type]
                                   kube, options)  # type: ignore[arg-type]
    controller.start()
    await wait_for(lambda: ("Deployment", "demo-broker-1") in kube.applied, 5, "a second broker Deployment")
    await wait_for(lambda: kube.statuses and (kube.statuses[-1].get("autoscaling") or {}).get("brokers", {})
                   .get("desired") == 3, 5, "status.autoscaling.brokers.desired 3")
    assert kube.statuses[-1]["brokers"]["desired"] == 3
    await controller.stop()


async def test_controller_reports_bad_annotations_once_and_pause_changes_nothing() -> None:
    kube = FakeKube()
    events: list[Event] = []
    body = annotated({"brokers": {"replicas": 1}}, {"neoplasma.io/tolerance": "lots"})
    controller = ClusterController(("ns", "demo"), body, Indexes({}, [{}]), kube, OPTIONS,  # type: ignore[arg-type]
                                   post=events.append)
    controller.start()
    await wait_for(lambda: kube.statuses, 5, "a status")
    condition = conditions_of(kube.statuses[-1])["AutoscalingPolicyValid"]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidAnnotation")
    assert "neoplasma.io/tolerance: 'lots' is not a number" in condition["message"]
    for generation in range(2, 5):  # passes again and again (each one seen in status): one warning
        controller.set_body({**annotated(body["spec"], {"neoplasma.io/tolerance": "lots"}, generation=generation,
                                         version=str(generation)), "status": kube.statuses[-1]})
        await wait_for(lambda g=generation: kube.statuses[-1]["observedGeneration"] == g, 5, f"generation {generation}")
    warnings = [e for e in events if e.reason == "InvalidAnnotation"]
    assert len(warnings) == 1 and warnings[0].warning
    assert "neoplasma.io/tolerance: 'lots' is not a number" in warnings[0].message

    applied = len(kube.applied)
    paused = {"neoplasma.io/pause-reconciliation": "true"}
    controller.set_body(annotated({"brokers": {"replicas": 4}}, paused, generation=5, version="9"))
    await wait_for(lambda: conditions_of(kube.statuses[-1])["ReconciliationPaused"]["status"] == "True", 5,
                   "ReconciliationPaused=True")
    assert conditions_of(kube.statuses[-1])["AutoscalingPolicyValid"]["status"] == "True"
    assert len(kube.applied) == applied and kube.deleted == []
    controller.set_body(annotated({"brokers": {"replicas": 4}}, {}, generation=5, version="10"))
    await wait_for(lambda: len(kube.applied) > applied, 5, "children applied once unpaused")
    await controller.stop()


# -- against the real control plane ---------------------------------------------------------

PUBLISHER_WINDOW = "3"  # seconds a publisher counts as a connection (the broker's default is 30)
SCALE_INTERVAL = 0.5  # the operator's --scale-interval in these tests


@pytest.fixture
def pods(kubelet: Callable[..., StandInKubelet]) -> StandInKubelet:
    return kubelet(NEOPLASMA_PODS, command_mapper=neoplasma_command, max_probe_period=0.2,
                   extra_env={"NEOPLASMA_PUBLISHER_WINDOW": PUBLISHER_WINDOW})


class NumberedPublisher:
    """Publishes 0, 1, 2, ... round-robin over the brokers `serving()` names, sending a refused
    event (UNAVAILABLE: draining or gone) again elsewhere: `accepted` is what brokers took."""

    def __init__(self, serving: Callable[[], Any], topic: str, pause: float = 0.02) -> None:
        self.serving = serving
        self.topic = topic
        self.pause = pause
        self.accepted: list[int] = []
        self.refused = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        channels: dict[str, grpc.aio.Channel] = {}
        n, turn = 0, 0
        try:
            while not self.stop.is_set():
                brokers = await self.serving()
                if not brokers:
                    await asyncio.sleep(0.05)
                    continue
                address = brokers[turn % len(brokers)]
                turn += 1
                channel = channels.setdefault(address, grpc.aio.insecure_channel(address))
                event = pb.Event(topic=self.topic, data=json.dumps(n).encode())
                try:
                    reply = await pb_grpc.BrokerStub(channel).Publish(pb.PublishRequest(events=[event]), timeout=5)
                except grpc.aio.AioRpcError as error:
                    # A broker going away refuses (UNAVAILABLE) or times out; one whose server stopped with the
                    # call on its way cancels it (CANCELLED), and by then it has left the membership.
                    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or (
                        error.code() == grpc.StatusCode.CANCELLED and address not in await self.serving()), error
                    self.refused += 1
                    await channels.pop(address).close()
                    continue
                if reply.accepted == 1:
                    self.accepted.append(n)
                    n += 1
                await asyncio.sleep(self.pause)
        finally:
            for channel in channels.values():
                await channel.close()


def lost(accepted: list[int], received: list[Any], upto: int | None = None) -> list[int]:
    got = set(received)
    return [n for n in accepted if (upto is None or n < upto) and n not in got]


async def caught_up(publisher: NumberedPublisher, received: Callable[[], list[Any]], timeout: float = 15.0) -> int:
    """Wait (bounded) until everything accepted so far was received; the number still missing."""
    upto = len(publisher.accepted)
    with contextlib.suppress(AssertionError):
        await wait_for(lambda: not lost(publisher.accepted[:upto], received()), timeout, "subscriber caught up")
    return len(lost(publisher.accepted[:upto], received()))


async def serving_via(control: str, access: Access) -> list[str]:
    status = await proxy_status(control, access)
    return [link.address for link in status.links if link.member_state == pb.BrokerMember.SERVING]


async def broker_connections(address: str, access: Access) -> int:
    async with access.channel(address) as channel:
        stats = await pb_grpc.BrokerStub(channel).Stats(pb.StatsRequest(), timeout=2, metadata=access.metadata())
        return int(stats.connections)


@pytest.mark.kube
@pytest.mark.timeout(150)
async def test_load_scales_brokers_out_to_a_second_deployment_and_back_without_losing_events(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator(extra_args=("--scale-interval", "0.5"))
    clusters.apply("demo", {"brokers": {"replicas": 1, "maxPerDeployment": 2}, "proxies": {"replicas": 1}},
                   {**AUTOSCALE, "neoplasma.io/min-brokers": "1", "neoplasma.io/max-brokers": "3",
                    "neoplasma.io/scale-down-delay": "3s"})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 1), 60, "1 broker, 1 proxy")
    [proxy] = [p.status.pod_ip for p in clusters.ready_pods("demo", "proxy")]
    [broker] = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    control = f"{proxy}:50052"
    access = clusters.access("demo")
    publisher = NumberedPublisher(lambda: serving_via(control, access), "numbered")
    stop_load = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        subscriber = await SseClient(f"{proxy}:8080", "numbered").start()
        stack.push_async_callback(subscriber.close)
        await wait_for(lambda: links_ready(control, 1, access), 20, "proxy linked with interest")

        def received() -> list[Any]:
            return [e["data"] for e in subscriber.events]

        publishing = asyncio.create_task(publisher.run())
        load = asyncio.create_task(loadgen.generate([broker], connections=12, duration=90, interval=0.5,
                                                    topic="bulk", stop=stop_load))
        # Scale-out: threshold crossed (more than target x (1 + tolerance) on the one broker)...
        await wait_for(lambda: _above(broker, 4.4, access), 20, "broker above its connection target", interval=0.05)
        crossed = time.monotonic()
        await wait_for(lambda: _linked(control, 2, access), 60, "a new broker in the proxy's membership")
        first_new_broker = time.monotonic() - crossed
        grown = await wait_for(lambda: membership_everywhere(clusters, "demo", 3, 1), 60, "3 brokers everywhere")
        all_three = time.monotonic() - crossed
        assert [d["name"] for d in grown["deployments"]] == ["demo-broker-0", "demo-broker-1"]
        assert grown["deploymentSizes"] == "2,1"
        assert grown["autoscaling"]["brokers"]["desired"] == 3
        assert grown["autoscaling"]["brokers"]["reason"].startswith(("scale up", "steady"))
        scaled = [e for e in clusters.events("demo") if e.reason == "ScaledBrokers"]
        assert scaled and "brokers 1 -> 3: scale up" in scaled[0].message
        lost_out = await caught_up(publisher, received)

        # Scale-in: the load stops; after the publisher window and the scale-down delay, back to 1.
        stop_load.set()
        result = await load
        mark = len(publisher.accepted)
        shrunk = await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 1), 90, "back to 1 broker")
        assert [d["name"] for d in shrunk["deployments"]] == ["demo-broker-0"]
        await wait_for(lambda: ("Deployment", "demo-broker-1") not in clusters.children("demo"), 30,
                       "demo-broker-1 deleted")
        await wait_for(lambda: len(publisher.accepted) > mark + 20, 20, "publishing goes on")
        publisher.stop.set()
        await publishing
        lost_in = await caught_up(publisher, received)
        missing = lost(publisher.accepted, received())
        print(f"\nautoscale: threshold crossed -> first new broker in membership {first_new_broker:.2f} s, "
              f"-> all 3 everywhere {all_three:.2f} s; loadgen accepted {result.accepted}, refused {result.refused}; "
              f"numbered accepted {len(publisher.accepted)} (refused and resent {publisher.refused}); "
              f"lost during scale-out {lost_out}, after scale-in {lost_in - lost_out}; missing {missing[:10]}")
        assert not missing
        down = [e.message for e in clusters.events("demo") if e.reason == "ScaledBrokers" and "scale down" in e.message]
        assert down


async def _above(broker: str, threshold: float, access: Access) -> bool:
    return await broker_connections(broker, access) > threshold


async def _linked(control: str, brokers: int, access: Access) -> bool:
    return len((await proxy_status(control, access)).links) >= brokers


@pytest.mark.kube
@pytest.mark.timeout(120)
async def test_bad_annotations_warn_once_keep_the_policy_and_pause_freezes_children(
    clusters: Clusters, operator: Callable[..., OperatorProcess]
) -> None:
    operator(extra_args=("--scale-interval", str(SCALE_INTERVAL)))
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 1}},
                   {"neoplasma.io/autoscale": "true", "neoplasma.io/target-connections-per-broker": "100",
                    "neoplasma.io/min-brokers": "2"})

    def broker_replicas() -> int:
        return int(clusters.apps.read_namespaced_deployment("demo-broker-0", clusters.namespace).spec.replicas)

    # The bounds apply at once, before any load is read (no pod runs here: no load at all).
    await wait_for(lambda: _quiet(broker_replicas) == 2, 30, "min-brokers 2 applied")
    await wait_for(lambda: (clusters.status("demo").get("autoscaling") or {}).get("brokers", {}).get("desired") == 2,
                   30, "status.autoscaling.brokers.desired 2")

    clusters.annotate("demo", {"neoplasma.io/min-brokers": "lots", "neoplasma.io/max-brokers": "5000"})
    condition = await wait_for(lambda: _condition_is(clusters, "AutoscalingPolicyValid", "False"), 30,
                               "AutoscalingPolicyValid=False")
    assert condition["reason"] == "InvalidAnnotation"
    for text in ("neoplasma.io/min-brokers: 'lots' is not a whole number", "neoplasma.io/max-brokers: 5000",
                 "the last good policy stays in force"):
        assert text in condition["message"]
    [warning] = await wait_for(lambda: [e for e in clusters.events("demo") if e.reason == "InvalidAnnotation"], 30,
                               "an InvalidAnnotation event")
    assert warning.type == "Warning" and "neoplasma.io/min-brokers" in warning.message
    # The operator reads the annotations on every pass and decides sizes every scale interval: over
    # four of them the warning is not repeated and the size does not move.
    await holds_for(lambda: [(e.count or 1) for e in clusters.events("demo") if e.reason == "InvalidAnnotation"]
                    == [1] and broker_replicas() == 2, 4 * SCALE_INTERVAL, "one InvalidAnnotation event, 2 brokers",
                    interval=0.1)

    clusters.annotate("demo", {"neoplasma.io/min-brokers": "1", "neoplasma.io/max-brokers": None})
    await wait_for(lambda: _condition_is(clusters, "AutoscalingPolicyValid", "True"), 30, "AutoscalingPolicyValid")

    # Paused: a spec change is not applied; membership is still pushed (see the condition).
    clusters.annotate("demo", {"neoplasma.io/pause-reconciliation": "true"})
    paused = await wait_for(lambda: _condition_is(clusters, "ReconciliationPaused", "True"), 30, "paused")
    assert "membership is still pushed" in paused["message"]
    before = {key: obj["metadata"]["resourceVersion"] for key, obj in clusters.children("demo").items()}
    clusters.patch_spec("demo", {"proxies": {"replicas": 3}})
    generation = clusters.get("demo")["metadata"]["generation"]
    # Status is still written while paused: once the condition reports this generation, the
    # operator has seen the change, and decided to do nothing.
    await wait_for(lambda: f"latest generation seen: {generation})" in _condition_is(clusters, "ReconciliationPaused",
                                                                                      "True").get("message", ""),
                   30, "the paused operator to see the spec change")
    after = {key: obj["metadata"]["resourceVersion"] for key, obj in clusters.children("demo").items()}
    assert after == before

    clusters.annotate("demo", {"neoplasma.io/pause-reconciliation": None})
    await wait_for(lambda: _condition_is(clusters, "ReconciliationPaused", "False"), 30, "unpaused")
    await wait_for(lambda: clusters.apps.read_namespaced_deployment("demo-proxy", clusters.namespace)
                   .spec.replicas == 3, 30, "the spec change applied once unpaused")


def _quiet(read: Callable[[], int]) -> int | None:
    try:
        return read()
    except Exception:  # not created yet
        return None


def _condition_is(clusters: Clusters, kind: str, status: str) -> dict[str, Any]:
    condition = clusters.condition("demo", kind)
    return condition if condition.get("status") == status else {}


class ReconnectingSubscriber:
    """An SSE subscriber that, when its stream ends (a proxy draining), reconnects to another
    ready proxy pod (no kube-proxy in the harness: it picks a pod IP itself)."""

    def __init__(self, clusters: Clusters, topic: str, index: int) -> None:
        self.clusters = clusters
        self.topic = topic
        self.index = index  # spreads the subscribers over the proxies
        self.past: list[Any] = []
        self.current: SseClient | None = None
        self.reconnects = -1
        self.stop = asyncio.Event()

    def received(self) -> list[Any]:
        return self.past + [e["data"] for e in (self.current.events if self.current else [])]

    async def run(self) -> None:
        last = ""
        while not self.stop.is_set():
            ips = [p.status.pod_ip for p in self.clusters.ready_pods("demo", "proxy")]
            choices = [ip for ip in ips if ip != last] or ips
            if not choices:
                await asyncio.sleep(0.05)
                continue
            last = choices[(self.index + self.reconnects + 1) % len(choices)]
            client = await SseClient(f"{last}:8080", self.topic).start()
            self.reconnects += 1
            self.current = client
            ended = asyncio.create_task(client.ended.wait())
            stopping = asyncio.create_task(self.stop.wait())
            await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            stopping.cancel()
            if self.stop.is_set():
                return  # leave `current` in place: its events count
            self.past += [e["data"] for e in client.events]
            self.current = None
            await client.close()

    async def close(self) -> None:
        self.stop.set()
        if self.current is not None:
            await self.current.close()


@pytest.mark.kube
@pytest.mark.timeout(150)
async def test_proxy_rollout_under_reconnecting_subscribers(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator()
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 2}})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 2), 60, "1 broker, 2 proxies")
    [broker] = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    old_pods = {p.metadata.name for p in clusters.ready_pods("demo", "proxy")}
    subscribers = [ReconnectingSubscriber(clusters, "numbered", i) for i in range(4)]
    running = [asyncio.create_task(s.run()) for s in subscribers]
    try:
        await _roll_out_proxies(clusters, broker, old_pods, subscribers)
    finally:
        for s in subscribers:
            s.stop.set()
        await asyncio.gather(*running, return_exceptions=True)
        for s in subscribers:
            await s.close()


async def _roll_out_proxies(clusters: Clusters, broker: str, old_pods: set[str],
                            subscribers: list[ReconnectingSubscriber]) -> None:
    access = clusters.access("demo")
    for control in clusters.proxy_controls("demo"):
        await wait_for(lambda control=control: _subscribers_at(control, 1, access), 20, "subscribers at every proxy")

    async def serving() -> list[str]:
        return [broker]

    publisher = NumberedPublisher(serving, "numbered")
    publishing = asyncio.create_task(publisher.run())
    try:
        await wait_for(lambda: len(publisher.accepted) > 20, 20, "publishing")
        started = time.monotonic()
        clusters.patch_spec("demo", {"proxies": {"resources": {"requests": {"cpu": "150m", "memory": "128Mi"}}}})

        async def rolled() -> dict[str, Any]:
            names = {p.metadata.name for p in clusters.ready_pods("demo", "proxy")}
            return await membership_everywhere(clusters, "demo", 1, 2) if names and not names & old_pods else {}

        await wait_for(rolled, 90, "every proxy replaced")
        rollout = time.monotonic() - started
        await wait_for(lambda: all(s.current is not None for s in subscribers), 20, "every subscriber connected")
        for control in clusters.proxy_controls("demo"):
            await wait_for(lambda control=control: links_ready(control, 1, access), 20,
                           "new proxies linked with interest")
        mark = len(publisher.accepted)
        await wait_for(lambda: len(publisher.accepted) > mark + 20, 20, "publishing after the rollout")
    finally:
        publisher.stop.set()
        await publishing
    losses = [await caught_up(publisher, s.received, timeout=3) for s in subscribers]
    print(f"\nproxy rollout: {rollout:.1f} s, {len(publisher.accepted)} events accepted, reconnects "
          f"{[s.reconnects for s in subscribers]}, events lost per subscriber {losses}")
    assert all(s.reconnects >= 1 for s in subscribers)  # every one of them was moved
    # These subscribers reconnect without their last id (as plasma clients do), so they may miss
    # what is published while they reconnect; what is published once they are back arrives, every
    # event. Resuming with Last-Event-ID loses nothing: test_operator_kube.py's rollout test.
    after = [lost(publisher.accepted[mark:], s.received()) for s in subscribers]
    assert after == [[]] * len(subscribers), after


async def _subscribers_at(control: str, least: int, access: Access) -> bool:
    return (await proxy_status(control, access)).subscribers >= least


def test_metrics_flag_and_per_cluster_gauges() -> None:
    from prometheus_client import generate_latest

    from neoplasma.cli import build_parser
    from neoplasma.operator import metrics
    from neoplasma.operator.conditions import MembershipProgress
    from neoplasma.operator.status import Observed

    args = build_parser().parse_args(["operator", "--metrics-port", "9090", "--scale-interval", "0.5"])
    assert (args.metrics_port, args.scale_interval) == (9090, 0.5)
    assert build_parser().parse_args(["operator"]).metrics_port == 0
    key, owned = ("ns", "metrics-demo"), metrics.Metrics()
    owned.observe(key, Observed(generation=1, spec_error=None, brokers=(3, 2), proxies=(2, 2), deployments=[],
                                membership=MembershipProgress(7, 2, 2, 2, {})))
    owned.scaled(key, "brokers", "up")
    text = generate_latest(owned.registry).decode()
    assert 'neoplasma_cluster_brokers_desired{cluster="metrics-demo",namespace="ns"} 3.0' in text
    assert 'neoplasma_cluster_membership_version{cluster="metrics-demo",namespace="ns"} 7.0' in text
    assert ('neoplasma_cluster_scaling_decisions_total{cluster="metrics-demo",direction="up",namespace="ns",'
            'tier="brokers"} 1.0') in text
    owned.forget(key)
    assert "metrics-demo" not in generate_latest(owned.registry).decode()
