"""spec.subscribers.auth on the real control plane: the operator reports a missing key Secret (condition and
event), mounts it once it exists, and the proxy pods (real processes under the stand-in kubelet) then answer
private topics by token, with the cluster's name as audience; a rotated Secret reaches them without a restart."""

from __future__ import annotations

import base64
from collections.abc import Callable

import aiohttp
import pytest
import test_operator_kube
from harness import links_ready, publish_grpc, sse, wait_for
from kubeharness.kubelet import StandInKubelet
from test_operator_kube import Clusters, OperatorProcess, membership_everywhere

from neoplasma.proxy.auth import mint

pytestmark = [pytest.mark.kube, pytest.mark.timeout(180)]

clusters = test_operator_kube.clusters  # fixtures
operator = test_operator_kube.operator
pods = test_operator_kube.pods

SECRET = "k" * 40
NEW_SECRET = "n" * 40


def keys_condition(clusters: Clusters, status: str, says: str) -> bool:
    condition = clusters.condition("demo", "SubscriberKeysReady")
    return condition.get("status") == status and says in condition.get("message", "")


async def answer(proxy: str, query: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{proxy}:8080/?{query}") as response:
            return response.status


async def test_private_topics_through_the_operator(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator()
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 1}, "subscribers": {"auth": {
        "jwt": {"keysSecretRef": {"name": "subscriber-keys"}}, "publicTopics": ["news"]}}})
    await wait_for(lambda: keys_condition(clusters, "False", "Secret subscriber-keys"), 60,
                   "SubscriberKeysReady False: the Secret does not exist")
    await wait_for(lambda: any(e.reason == "SubscriberKeysInvalid" and "does not exist" in e.message
                               for e in clusters.events("demo")), 30, "the Warning event")

    clusters.core.create_namespaced_secret(clusters.namespace, {
        "metadata": {"name": "subscriber-keys"}, "stringData": {"keys": SECRET + "\n"}})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 1), 90, "cluster Ready, 1+1")
    await wait_for(lambda: keys_condition(clusters, "True", "in place"), 30, "SubscriberKeysReady True")

    [control] = clusters.proxy_controls("demo")
    proxy = control.rsplit(":", 1)[0]
    [broker] = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    token = mint(SECRET.encode(), ["user:42"], 600, audience="demo")  # the audience: the cluster's name
    assert await answer(proxy, "eventType=user:42") == 401
    assert await answer(proxy, f"eventType=user:42&token={mint(SECRET.encode(), ['user:42'], 600)}") == 401  # no aud
    assert await answer(proxy, f"eventType=user:420&token={token}") == 403
    assert await answer(proxy, "eventType=news") == 200
    async with sse(f"{proxy}:8080", f"user:42&token={token}") as subscriber:
        await wait_for(lambda: links_ready(control, 1, clusters.access("demo")), 20, "the proxy's interest")
        await publish_grpc(broker, [("user:42:inbox", {"n": 1})])
        await wait_for(lambda: subscriber.events, 20, "the private event")
    assert subscriber.status == 200 and [e["data"] for e in subscriber.events] == [{"n": 1}]

    # Rotation: the Secret changes, the mounted file follows, the proxy re-reads it; no restart.
    restarts = [c.restart_count for p in clusters.ready_pods("demo", "proxy") for c in p.status.container_statuses]
    clusters.core.patch_namespaced_secret("subscriber-keys", clusters.namespace,
                                          {"data": {"keys": base64.b64encode(NEW_SECRET.encode()).decode()}})
    fresh = mint(NEW_SECRET.encode(), ["user:42"], 600, audience="demo")

    async def rotated() -> bool:
        return await answer(proxy, f"eventType=user:42&token={fresh}") == 200
    await wait_for(rotated, 30, "the new key accepted")
    assert await answer(proxy, f"eventType=user:42&token={token}") == 401
    assert [c.restart_count for p in clusters.ready_pods("demo", "proxy") for c in p.status.container_statuses] == \
        restarts
    assert clusters.ready_pods("demo", "proxy")[0].status.pod_ip == proxy

    # A key the proxies would refuse: the condition says so (they keep the last good keys).
    clusters.core.patch_namespaced_secret("subscriber-keys", clusters.namespace, {"stringData": {"keys": "short"}})
    await wait_for(lambda: keys_condition(clusters, "False", "at least 32 bytes"), 30, "SubscriberKeysReady False")
    assert await answer(proxy, f"eventType=user:42&token={fresh}") == 200
