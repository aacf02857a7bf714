"""spec.ingest on the real control plane: the operator renders the Redis readers, reports
IngestReady from their /stats, and a plasma-style PUBLISH reaches a subscriber through them.

The readers run under the stand-in kubelet as real `neoplasma ingest-redis` processes reading a
real redis-server on 127.0.0.1. There is no Service routing here, so a reader's `--brokers` (the
broker Service) is replaced by the ready broker pods' addresses, as kube-proxy would route it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

import aiohttp
import kubernetes.client
import pytest
import test_operator_kube
import test_redis_ingest
from harness import links_ready, sse, wait_for
from kubeharness.controlplane import ControlPlane
from kubeharness.kubelet import CommandMapper
from test_operator_kube import NEOPLASMA_PODS, Clusters, membership_everywhere, neoplasma_command
from test_redis_ingest import RedisServer, plasma_message

from neoplasma.ingest.settings import PASSWORD_ENV

pytestmark = [pytest.mark.kube, pytest.mark.timeout(180)]

clusters = test_operator_kube.clusters  # fixtures
operator = test_operator_kube.operator
redis_server = test_redis_ingest.redis_server


def service_routed(control_plane: ControlPlane, namespace: str) -> CommandMapper:
    """`neoplasma_command`, with a reader's broker Service (NAME-broker.NS.svc:PORT) replaced by
    the cluster's ready broker pods."""
    pods = Clusters(control_plane, namespace)  # its own API client: called from the kubelet's threads

    def mapper(argv: list[str], container: Mapping[str, Any]) -> list[str]:
        if "--brokers" in argv:
            at = argv.index("--brokers") + 1
            name, port = re.fullmatch(r"(.+)-broker\.[^:]+:(\d+)", argv[at]).groups()  # type: ignore[union-attr]
            brokers = ",".join(f"{p.status.pod_ip}:{port}" for p in pods.ready_pods(name, "broker"))
            argv = [*argv[:at], brokers, *argv[at + 1:]]
        return neoplasma_command(argv, container)

    return mapper


def ingest_condition(clusters: Clusters, name: str, status: str, reason: str, says: str = "") -> dict[str, Any]:
    condition = clusters.condition(name, "IngestReady")
    wanted = (condition.get("status"), condition.get("reason")) == (status, reason) and says in condition["message"]
    return condition if wanted else {}


async def messages_in(clusters: Clusters, name: str) -> float:
    """Messages the cluster's readers read from Redis, by their /metrics."""
    total = 0.0
    async with aiohttp.ClientSession() as session:
        for pod in clusters.ready_pods(name, "ingest"):
            async with session.get(f"http://{pod.status.pod_ip}:8080/metrics") as response:
                text = await response.text()
            total += sum(float(v) for v in re.findall(r"^neoplasma_ingest_messages_in_total (\S+)$", text, re.M))
    return total


async def test_spec_ingest_renders_readers_that_feed_the_cluster_and_report_ingest_ready(
    control_plane: ControlPlane, namespace: str, clusters: Clusters, operator: Any, kubelet: Any,
    redis_server: Any,
) -> None:
    redis: RedisServer = redis_server(password="s3cret")
    kubelet(NEOPLASMA_PODS, command_mapper=service_routed(control_plane, namespace), max_probe_period=0.2)
    clusters.core.create_namespaced_secret(namespace, kubernetes.client.V1Secret(
        metadata=kubernetes.client.V1ObjectMeta(name="redis-auth"),
        data={"password": base64.b64encode(b"s3cret").decode()}))
    operator()
    spec: dict[str, Any] = {"brokers": {"replicas": 1}, "proxies": {"replicas": 1}}
    clusters.apply("demo", spec)
    await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 1), 60, "cluster Ready, 1+1")

    ingest = {"redis": {"address": redis.address, "channels": ["plasma"],
                        "password": {"secretKeyRef": {"name": "redis-auth"}}}}
    clusters.apply("demo", {**spec, "ingest": ingest})
    reading = await wait_for(lambda: ingest_condition(clusters, "demo", "True", "Reading", "; 1 reader standing by"),
                             60, "IngestReady True, one reader standing by", 0.2)
    assert reading["message"].startswith("reader demo-ingest-")

    # Two readers; the password only as a reference to its Secret.
    deployment = clusters.children("demo")["Deployment", "demo-ingest"]
    assert deployment["spec"]["replicas"] == 2
    assert "s3cret" not in json.dumps(deployment)
    [reader] = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": PASSWORD_ENV, "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}} in \
        reader["env"]
    assert [o["kind"] for o in deployment["metadata"]["ownerReferences"]] == ["NeoplasmaCluster"]

    # A plasma publisher's PUBLISH reaches a subscriber of the cluster, once.
    [proxy] = [p.status.pod_ip for p in clusters.ready_pods("demo", "proxy")]
    publisher = redis.client()
    async with sse(f"{proxy}:8080", "news") as browser:
        await wait_for(lambda: links_ready(f"{proxy}:50052", 1, clusters.access("demo")), 20, "proxy linked")
        for n in range(20):
            await publisher.publish("plasma", plasma_message("news", n))
        await wait_for(lambda: len(browser.events) >= 20, 20, "every message at the subscriber")
        assert await wait_for(lambda: messages_in(clusters, "demo"), 20, "messages counted") == 20
        assert [e["data"] for e in browser.events] == list(range(20))

    # Redis gone: IngestReady False, with the reason.
    redis.stop()
    down = await wait_for(lambda: ingest_condition(clusters, "demo", "False", "RedisUnreachable"), 60,
                          "IngestReady False: RedisUnreachable", 0.2)
    assert "cannot" in down["message"]
    redis.start()
    await wait_for(lambda: ingest_condition(clusters, "demo", "True", "Reading"), 60, "IngestReady True again", 0.2)

    # spec.ingest removed: the readers and the condition go.
    clusters.patch_spec("demo", {"ingest": None})
    await wait_for(lambda: ("Deployment", "demo-ingest") not in clusters.children("demo"), 30, "readers deleted")
    await wait_for(lambda: not clusters.condition("demo", "IngestReady"), 30, "IngestReady gone")
    assert ("Deleted", "deleted Deployment demo-ingest: spec.ingest is not set") in {
        (e.reason, e.message) for e in clusters.events("demo")}
