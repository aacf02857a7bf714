"""The NeoplasmaCluster CRD and the pure rendering of its children.

Rendered objects are checked with kubernetes-validate's bundled strict JSON schemas (offline,
unknown fields refused); example resources are checked against the CRD's own openAPIV3Schema
with jsonschema, and the CRD's defaults are applied as the API server does and compared with
`spec.py`'s.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from neoplasma.broker.settings import BrokerConfig
from neoplasma.cli import build_parser
from neoplasma.core.scaling import DEFAULT_MAX_RECONNECTS
from neoplasma.ingest.settings import PASSWORD_ENV, IngestConfig
from neoplasma.operator import render as r
from neoplasma.operator.connections import SUBSCRIBERS_FLOOR, drain_sizing
from neoplasma.operator.spec import QUANTITY_PATTERN, Cluster, InvalidSpec, parse_cluster, parse_spec
from neoplasma.proxy.settings import ProxyConfig

CRD_PATH = Path(__file__).resolve().parents[1] / "crds" / "neoplasmaclusters.yaml"
# The oldest schemas kubernetes-validate bundles; the target server (1.20) has every field used.
KUBE_VERSION = "1.25"
IMAGE = "registry.example/neoplasma:1.0"

SPECS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no brokers": {"brokers": {"replicas": 0}, "proxies": {"replicas": 0}},
    "three broker deployments": {"brokers": {"replicas": 25, "maxPerDeployment": 10}},
    "node ports": {
        "image": "other:2",
        "proxies": {"service": {"type": "NodePort", "nodePorts": {"sse": 30080, "grpc": 30051}}},
    },
    "load balancer, limits": {
        "brokers": {"resources": {"limits": {"cpu": 2, "memory": "1Gi"}}},
        "proxies": {"resources": {}, "service": {"type": "LoadBalancer"}},
    },
    "redis ingest": {"ingest": {"redis": {"address": "redis.plasma:6380", "channels": ["plasma", "events"],
                                          "patterns": ["events:*"], "database": 2,
                                          "password": {"secretKeyRef": {"name": "redis-auth"}},
                                          "tls": {"enabled": True, "ca": {"secretKeyRef": {"name": "redis-ca"}}}}},
                     "publishers": {"apiKeysSecret": "keys"}, "tls": {"secretName": "demo-tls"}},
    "private topics": {"subscribers": {"auth": {"jwt": {"keysSecretRef": {"name": "subscriber-keys"},
                                                        "jwksSecretRef": {"name": "idp", "key": "jwks"}},
                                                "publicTopics": ["news", "status:public"]}}},
}


def cluster(spec: dict[str, Any] | None = None, name: str = "demo") -> Cluster:
    return Cluster(name=name, namespace="events", spec=parse_spec(spec or {}))


def by_name(manifests: list[r.Manifest]) -> dict[tuple[str, str], r.Manifest]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def pod_spec(manifest: r.Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def container(manifest: r.Manifest) -> dict[str, Any]:
    [only] = pod_spec(manifest)["containers"]
    return dict(only)


def rendered(spec: dict[str, Any] | None = None, **kwargs: Any) -> dict[tuple[str, str], Any]:
    return by_name(r.render(cluster(spec), default_image=IMAGE, **kwargs))


# --- split_replicas -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "max_per", "sizes"),
    [
        (0, 10, [0]),
        (1, 10, [1]),
        (10, 10, [10]),
        (11, 10, [10, 1]),
        (25, 10, [10, 10, 5]),
        (3, 1, [1, 1, 1]),
    ],
)
def test_split_replicas(total: int, max_per: int, sizes: list[int]) -> None:
    assert r.split_replicas(total, max_per) == sizes


@pytest.mark.parametrize(("total", "max_per"), [(-1, 10), (5, 0)])
def test_split_replicas_refuses_impossible_input(total: int, max_per: int) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        r.split_replicas(total, max_per)


@given(st.integers(0, 500), st.integers(1, 50))
def test_split_replicas_fills_deployments_in_order(total: int, max_per: int) -> None:
    sizes = r.split_replicas(total, max_per)
    assert sum(sizes) == total
    assert all(size == max_per for size in sizes[:-1])
    assert 0 <= sizes[-1] <= max_per
    assert len(sizes) == max(1, -(-total // max_per))


# --- what is rendered -----------------------------------------------------------------------


def test_render_lists_every_child_by_name() -> None:
    names = list(rendered(SPECS["three broker deployments"]))
    assert names == [
        ("Deployment", "demo-broker-0"),
        ("Deployment", "demo-broker-1"),
        ("Deployment", "demo-broker-2"),
        ("Service", "demo-broker"),
        ("PodDisruptionBudget", "demo-broker"),
        ("Deployment", "demo-proxy"),
        ("Service", "demo-proxy"),
        ("PodDisruptionBudget", "demo-proxy"),
        ("NetworkPolicy", "demo-broker"),
        ("NetworkPolicy", "demo-proxy"),
    ]


@pytest.mark.parametrize(("replicas", "sizes"), [(0, [0]), (7, [7]), (25, [10, 10, 5])])
def test_broker_deployment_sizes(replicas: int, sizes: list[int]) -> None:
    children = rendered({"brokers": {"replicas": replicas}})
    names = [f"demo-broker-{index}" for index in range(len(sizes))]
    assert [children["Deployment", name]["spec"]["replicas"] for name in names] == sizes
    assert ("Deployment", f"demo-broker-{len(sizes)}") not in children


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_child_is_a_valid_kubernetes_object(spec: dict[str, Any]) -> None:
    for policy_api in r.POLICY_APIS:
        for manifest in r.render(cluster(spec), default_image=IMAGE, policy_api=policy_api):
            kubernetes_validate.validate(as_validatable(manifest), KUBE_VERSION, strict=True)


def as_validatable(manifest: r.Manifest) -> r.Manifest:
    """policy/v1beta1 has no bundled schema; its PDB spec is policy/v1's, so check it as that."""
    if manifest["apiVersion"] == "policy/v1beta1":
        return {**manifest, "apiVersion": "policy/v1"}
    return manifest


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_child_is_namespaced_and_unowned(spec: dict[str, Any]) -> None:
    for manifest in rendered(spec).values():
        assert manifest["metadata"]["namespace"] == "events"
        assert "ownerReferences" not in manifest["metadata"]


def test_values_that_look_like_yaml_keywords_stay_strings() -> None:
    manifests = r.render(cluster({"image": "on"}, name="yes"), default_image=IMAGE)
    assert {m["metadata"]["name"] for m in manifests} >= {"yes-broker", "yes-proxy"}
    assert container(manifests[0])["image"] == "on"


# --- labels and selectors -------------------------------------------------------------------

COMMON = {
    "app.kubernetes.io/name": "neoplasma",
    "app.kubernetes.io/instance": "demo",
    "app.kubernetes.io/managed-by": "neoplasma-operator",
}


def expected_labels(name: str) -> dict[str, str]:
    component = next(c for c in ("broker", "ingest", "proxy") if c in name or c == "proxy")
    extra = {"neoplasma.io/broker-deployment": name} if name.startswith("demo-broker-") else {}
    return {**COMMON, "app.kubernetes.io/component": component, **extra}


def selector_of(manifest: r.Manifest) -> dict[str, str]:
    selector: dict[str, str] = manifest["spec"]["selector"]
    return selector if manifest["kind"] == "Service" else dict(selector["matchLabels"])


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_labels_on_every_object_and_pod(spec: dict[str, Any]) -> None:
    for (kind, name), manifest in rendered(spec).items():
        assert manifest["metadata"]["labels"] == expected_labels(name)
        if kind == "Deployment":
            assert manifest["spec"]["template"]["metadata"]["labels"] == expected_labels(name)


@pytest.mark.parametrize(
    ("key", "selector"),
    [
        (("Deployment", "demo-broker-1"), {"app.kubernetes.io/component": "broker",
                                           "neoplasma.io/broker-deployment": "demo-broker-1"}),
        (("Service", "demo-broker"), {"app.kubernetes.io/component": "broker"}),
        (("PodDisruptionBudget", "demo-broker"), {"app.kubernetes.io/component": "broker"}),
        (("Deployment", "demo-proxy"), {"app.kubernetes.io/component": "proxy"}),
        (("Service", "demo-proxy"), {"app.kubernetes.io/component": "proxy"}),
        (("PodDisruptionBudget", "demo-proxy"), {"app.kubernetes.io/component": "proxy"}),
    ],
)
def test_selectors_are_stable_whatever_the_spec(
    key: tuple[str, str], selector: dict[str, str]
) -> None:
    expected = {"app.kubernetes.io/name": "neoplasma", "app.kubernetes.io/instance": "demo", **selector}
    for spec in SPECS.values():
        children = rendered({**spec, "brokers": {"replicas": 15}})
        assert selector_of(children[key]) == expected


def test_deployment_selectors_match_their_pods_and_do_not_overlap() -> None:
    children = rendered(SPECS["three broker deployments"])
    deployments = [m for m in children.values() if m["kind"] == "Deployment"]
    for deployment in deployments:
        pods = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector_of(deployment).items() <= pods.items()
        others = [d for d in deployments if d is not deployment]
        assert not any(selector_of(d).items() <= pods.items() for d in others)


# --- services -------------------------------------------------------------------------------


def ports_of(service: r.Manifest) -> dict[str, dict[str, Any]]:
    return {port["name"]: port for port in service["spec"]["ports"]}


def test_broker_service_serves_publishers() -> None:
    service = rendered()["Service", "demo-broker"]
    assert service["spec"]["type"] == "ClusterIP"
    assert ports_of(service) == {
        "grpc": {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP"},
        "http": {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"},
    }


@pytest.mark.parametrize(
    ("service", "node_ports"),
    [
        ({}, {"sse": None, "grpc": None}),
        ({"type": "NodePort"}, {"sse": None, "grpc": None}),
        ({"type": "NodePort", "nodePorts": {"sse": 30080}}, {"sse": 30080, "grpc": None}),
        ({"type": "LoadBalancer", "nodePorts": {"sse": 30080, "grpc": 30051}},
         {"sse": 30080, "grpc": 30051}),
    ],
)
def test_proxy_service_type_and_node_ports(
    service: dict[str, Any], node_ports: dict[str, int | None]
) -> None:
    rendered_service = rendered({"proxies": {"service": service}})["Service", "demo-proxy"]
    assert rendered_service["spec"]["type"] == service.get("type", "ClusterIP")
    ports = ports_of(rendered_service)
    assert {name: (port["port"], port["targetPort"]) for name, port in ports.items()} == {
        "sse": (8080, "http"),
        "grpc": (50051, "grpc"),
    }
    assert {name: port.get("nodePort") for name, port in ports.items()} == node_ports


# --- pod disruption budgets -----------------------------------------------------------------


@pytest.mark.parametrize("policy_api", ["policy/v1", "policy/v1beta1"])
def test_pod_disruption_budgets_use_the_given_policy_api(policy_api: str) -> None:
    children = rendered(policy_api=policy_api)
    for component in ("broker", "proxy"):
        budget = children["PodDisruptionBudget", f"demo-{component}"]
        assert budget["apiVersion"] == policy_api
        assert budget["spec"]["maxUnavailable"] == 1


def test_unknown_policy_api_is_refused() -> None:
    with pytest.raises(ValueError, match="policy/v1beta1"):
        r.render(cluster(), default_image=IMAGE, policy_api="policy/v2")


# --- containers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "image"),
    [({}, IMAGE), ({"image": ""}, IMAGE), ({"image": "mine:3"}, "mine:3")],
)
def test_image_defaults_to_the_operators(spec: dict[str, Any], image: str) -> None:
    for key, manifest in rendered(spec).items():
        if key[0] == "Deployment":
            assert container(manifest)["image"] == image


@pytest.mark.parametrize(
    ("spec", "broker", "proxy"),
    [
        ({}, {"requests": {"cpu": "100m", "memory": "128Mi"}},
         {"requests": {"cpu": "100m", "memory": "128Mi"}}),
        (SPECS["load balancer, limits"], {"limits": {"cpu": "2", "memory": "1Gi"}}, {}),
    ],
)
def test_resources_are_passed_through(
    spec: dict[str, Any], broker: dict[str, Any], proxy: dict[str, Any]
) -> None:
    children = rendered(spec)
    assert container(children["Deployment", "demo-broker-0"])["resources"] == broker
    assert container(children["Deployment", "demo-proxy"])["resources"] == proxy


@pytest.mark.parametrize(
    ("name", "command", "ports", "grace"),
    [
        ("demo-broker-0",
         ["neoplasma", "broker", "--host", "0.0.0.0", "--grpc-port", "50051",
          "--http-port", "8080", "--retention-seconds", "300", "--retention-bytes", "268435456",
          "--credential-file", "/etc/neoplasma/credential/credential", "--workers", "1"],
         {"grpc": 50051, "http": 8080}, 30),
        ("demo-proxy",
         ["neoplasma", "proxy", "--host", "0.0.0.0", "--http-port", "8080",
          "--grpc-port", "50051", "--control-port", "50052", "--drain-delay", "5", "--drain-rate", "200",
          "--drain-within", "130", "--credential-file", "/etc/neoplasma/credential/credential", "--workers", "1"],
         {"grpc": 50051, "http": 8080, "control": 50052}, 140),
    ],
)
def test_containers(name: str, command: list[str], ports: dict[str, int], grace: int) -> None:
    deployment = rendered()["Deployment", name]
    main = container(deployment)
    assert main["command"] == command
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == ports
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] == grace
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in main["env"]} == {
        "NEOPLASMA_POD_NAME": "metadata.name",
        "NEOPLASMA_POD_IP": "status.podIP",
    }
    assert main["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTP"}
    live = "/livez" if name == "demo-proxy" else "/healthz"  # a proxy is alive while not ready (full, draining)
    assert main["livenessProbe"]["httpGet"] == {"path": live, "port": "http", "scheme": "HTTP"}
    assert main["livenessProbe"]["failureThreshold"] > main["readinessProbe"]["failureThreshold"]
    assert main["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


OPERATOR = r.Peers("ops", {"app.kubernetes.io/name": "neoplasma-operator"})
TRUST = {"publishers": {"apiKeysSecret": "publish-keys"}, "tls": {"secretName": "demo-tls"}}


def secret_volumes(deployment: r.Manifest) -> dict[str, tuple[str, str]]:
    """Secret volumes: name -> (Secret, mount path)."""
    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    return {v["name"]: (v["secret"]["secretName"], mounts[v["name"]]["mountPath"])
            for v in pod_spec(deployment)["volumes"] if "secret" in v and mounts[v["name"]]["readOnly"]}


def test_every_pod_mounts_the_credential_and_the_servers_read_it() -> None:
    children = rendered()
    for name in ("demo-broker-0", "demo-proxy"):
        assert secret_volumes(children["Deployment", name]) == {
            "credential": ("demo-credential", "/etc/neoplasma/credential")}
        config = server_config(children["Deployment", name])
        assert config.credential_file == "/etc/neoplasma/credential/credential"
        assert (config.tls_cert, config.tls_key) == ("", "")
    assert server_config(children["Deployment", "demo-broker-0"]).publish_keys_file == ""  # type: ignore[union-attr]


def test_publisher_keys_and_tls_are_mounted_and_passed() -> None:
    children = rendered(TRUST)
    broker, proxy = children["Deployment", "demo-broker-0"], children["Deployment", "demo-proxy"]
    assert secret_volumes(broker) == {"credential": ("demo-credential", "/etc/neoplasma/credential"),
                                      "publish-keys": ("publish-keys", "/etc/neoplasma/publish-keys"),
                                      "tls": ("demo-tls", "/etc/neoplasma/tls")}
    assert set(secret_volumes(proxy)) == {"credential", "tls"}  # proxies take no publishes
    broker_config, proxy_config = server_config(broker), server_config(proxy)
    assert isinstance(broker_config, BrokerConfig) and isinstance(proxy_config, ProxyConfig)
    assert broker_config.publish_keys_file == "/etc/neoplasma/publish-keys/keys"
    for config in (broker_config, proxy_config):
        assert (config.tls_cert, config.tls_key) == ("/etc/neoplasma/tls/tls.crt", "/etc/neoplasma/tls/tls.key")
    assert (proxy_config.tls_ca, proxy_config.tls_server_name) == ("/etc/neoplasma/tls/ca.crt",
                                                                    "demo-broker.events.svc")
    assert container(broker)["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"  # the broker's HTTP port is TLS
    assert container(proxy)["readinessProbe"]["httpGet"]["scheme"] == "HTTP"  # subscribers' port is not
    for manifest in (broker, proxy):
        kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


def peers(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return list(rule.get("from", [{}]))


def ports(rule: dict[str, Any]) -> list[int]:
    return [p["port"] for p in rule["ports"]]


@pytest.mark.parametrize("operator", [OPERATOR, r.Peers("events", {"app": "op"})])
def test_network_policies_open_only_the_services_ports(operator: r.Peers) -> None:
    children = by_name(r.render(cluster(), default_image=IMAGE, operator=operator))
    own = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "neoplasma",
                                           "app.kubernetes.io/instance": "demo"}}}
    operator_peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(operator.labels)}}
    if operator.namespace != "events":
        operator_peer["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}
    for tier, service_ports in (("broker", [50051, 8080]), ("proxy", [8080, 50051])):
        policy = children["NetworkPolicy", f"demo-{tier}"]
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
        assert policy["spec"]["podSelector"]["matchLabels"] == r.selector_labels("demo", r.Tier(tier))
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        service = children["Service", f"demo-{tier}"]
        assert sorted(p["port"] for p in service["spec"]["ports"]) == sorted(service_ports)
        rules = policy["spec"]["ingress"]
        assert [(peers(rule), ports(rule)) for rule in rules] == [([{}], service_ports)] + (
            [([own, operator_peer], [50052])] if tier == "proxy" else [])


def test_network_policies_can_be_turned_off() -> None:
    kinds = {kind for kind, _ in rendered({"networkPolicies": {"enabled": False}})}
    assert "NetworkPolicy" not in kinds and "Deployment" in kinds


def test_credential_secret() -> None:
    secret = r.credential_secret(cluster(), "s3cret")
    kubernetes_validate.validate(secret, KUBE_VERSION, strict=True)
    assert secret["metadata"]["name"] == "demo-credential"
    assert secret["stringData"] == {"credential": "s3cret"}


def test_proxy_rollouts_keep_serving() -> None:
    strategy = rendered()["Deployment", "demo-proxy"]["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def server_config(manifest: r.Manifest) -> BrokerConfig | ProxyConfig | IngestConfig:
    """The config a container's command gives its server, parsed by `neoplasma`'s own CLI."""
    args = build_parser().parse_args(container(manifest)["command"][1:])
    config = {"broker": BrokerConfig, "proxy": ProxyConfig, "ingest-redis": IngestConfig}[args.command]
    return config.from_args(args)


def test_the_ingest_readers_read_the_specs_redis_into_the_broker_service() -> None:
    children = rendered(SPECS["redis ingest"])
    deployment = children["Deployment", "demo-ingest"]
    assert list(children)[-3:] == [("Deployment", "demo-ingest"), ("NetworkPolicy", "demo-broker"),
                                   ("NetworkPolicy", "demo-proxy")]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"] == r.selector_labels("demo", "ingest")
    reader = server_config(deployment)
    assert isinstance(reader, IngestConfig)
    assert (reader.redis, reader.redis_db, reader.channels, reader.patterns) == (
        "rediss://redis.plasma:6380", 2, ["plasma", "events"], ["events:*"])
    assert reader.brokers == ["demo-broker.events.svc:50051"]
    assert reader.lease == "redis" and reader.lease_key == "neoplasma:ingest:events/demo"
    mounts = {v["name"]: v["secret"]["secretName"] for v in pod_spec(deployment)["volumes"] if "secret" in v}
    assert mounts == {"credential": "demo-credential", "publish-keys": "keys", "tls": "demo-tls",
                      "redis-ca": "redis-ca"}
    assert (reader.credential_file, reader.publish_key_file, reader.redis_ca_file) == (
        "/etc/neoplasma/credential/credential", "/etc/neoplasma/publish-keys/keys", "/etc/neoplasma/redis-ca/ca.crt")
    assert (reader.tls_cert, reader.broker_ca_file, reader.broker_server_name) == (
        "/etc/neoplasma/tls/tls.crt", "/etc/neoplasma/tls/ca.crt", "demo-broker.events.svc")
    # The password: from its Secret through the environment, never in the manifest.
    password = [e for e in container(deployment)["env"] if e["name"] == PASSWORD_ENV]
    assert password == [{"name": PASSWORD_ENV,
                         "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}}]
    assert container(deployment)["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http",
                                                                   "scheme": "HTTPS"}
    assert container(deployment)["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_no_ingest_no_reader_and_a_plain_one_needs_no_secret_but_the_credential() -> None:
    assert not any(name.endswith("-ingest") for _, name in rendered())
    deployment = rendered({"ingest": {"redis": {"address": "10.0.0.5", "patterns": ["a*"]}}})["Deployment",
                                                                                              "demo-ingest"]
    reader = server_config(deployment)
    assert isinstance(reader, IngestConfig)
    assert (reader.redis, reader.channels, reader.patterns, reader.publish_key_file) == ("10.0.0.5", [], ["a*"], "")
    assert [e["name"] for e in container(deployment)["env"]] == ["NEOPLASMA_POD_NAME", "NEOPLASMA_POD_IP"]
    assert [v["name"] for v in pod_spec(deployment)["volumes"]] == ["tmp", "credential"]


@pytest.mark.parametrize(("ingest", "field"), [
    ({}, "spec.ingest.redis"),
    ({"redis": {"address": "redis://r:6379", "channels": ["a"]}}, "spec.ingest.redis.address"),
    ({"redis": {"address": "r:70000", "channels": ["a"]}}, "spec.ingest.redis.address"),
    ({"redis": {"address": "r:6379"}}, "spec.ingest.redis"),
    ({"redis": {"address": "r", "channels": ["a,b"]}}, "spec.ingest.redis.channels[0]"),
    ({"redis": {"address": "r", "channels": [""]}}, "spec.ingest.redis.channels[0]"),
    ({"redis": {"address": "r", "patterns": "a*"}}, "spec.ingest.redis.patterns"),
    ({"redis": {"address": "r", "channels": ["a"], "password": {"secretKeyRef": {"key": "k"}}}},
     "spec.ingest.redis.password.secretKeyRef.name"),
    ({"redis": {"address": "r", "channels": ["a"], "password": {"secretKeyRef": {"name": "s", "key": "a/b"}}}},
     "spec.ingest.redis.password.secretKeyRef.key"),
    ({"redis": {"address": "r", "channels": ["a"], "password": "hunter2"}}, "spec.ingest.redis.password"),
])
def test_bad_ingest_is_refused_naming_the_field(ingest: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec({"ingest": ingest})
    assert refused.value.field == field


def test_a_stopping_proxy_leaves_the_service_before_it_asks_subscribers_to_reconnect() -> None:
    deployment = rendered()["Deployment", "demo-proxy"]
    proxy = server_config(deployment)
    assert isinstance(proxy, ProxyConfig)
    # Readiness fails on SIGTERM; the endpoints have drain_delay seconds to drop the pod (a
    # probe period is not needed for that: a terminating pod leaves them at once).
    assert proxy.drain_delay == r.PROXY_DRAIN_DELAY >= 3
    assert "lifecycle" not in container(deployment)  # no preStop: the image need not have a shell
    # Then the paced drain of the expected subscribers (at the whole reconnect budget), and time
    # to stop, fit in the grace period; a drain that would take longer is sped up to end in time.
    drain = SUBSCRIBERS_FLOOR / proxy.drain_rate
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert proxy.drain_rate == DEFAULT_MAX_RECONNECTS
    assert grace >= proxy.drain_delay + drain + 5 and proxy.drain_delay + proxy.drain_within + 5 <= grace
    # Not ready is not dead: a proxy failing readiness while it drains or is full stays alive.
    assert container(deployment)["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_proxy_drains_follow_the_budget_and_the_subscribers_observed() -> None:
    spec = parse_cluster({"metadata": {"name": "demo", "namespace": "events"}, "spec": {"proxies": {"replicas": 8}}})
    drains = drain_sizing(50, 40_000, r.PROXY_DRAIN_DELAY, 8)
    children = {(m["kind"], m["metadata"]["name"]): m for m in r.render(spec, default_image="x", drains=drains)}
    deployment = children["Deployment", "demo-proxy"]
    proxy = server_config(deployment)
    assert isinstance(proxy, ProxyConfig)
    assert (proxy.drain_rate, proxy.drain_within) == (50, 1311 + 5)  # 65,536 (the next power of 2) at 50/s
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] == 5 + 1311 + 10
    assert children["PodDisruptionBudget", "demo-proxy"]["spec"]["maxUnavailable"] == 1
    assert drain_sizing(200, 100, r.PROXY_DRAIN_DELAY, 8) == r.DEFAULT_DRAINS  # the floor: 25,000 per proxy
    # A budget that drains two floors' worth at once within the window lets a node drain take two.
    assert drain_sizing(5000, 100, r.PROXY_DRAIN_DELAY, 8).max_unavailable == 2


@pytest.mark.parametrize(("retention", "seconds", "max_bytes"), [
    (None, 300.0, 256 * 1024 * 1024),
    ({"seconds": 60}, 60.0, 256 * 1024 * 1024),
    ({"seconds": 3600, "maxBytes": 1024**3}, 3600.0, 1024**3),
])
def test_broker_retention_reaches_the_broker(retention: dict[str, int] | None, seconds: float,
                                              max_bytes: int) -> None:
    children = rendered({"brokers": {"replicas": 12, "retention": retention}})
    for name in ("demo-broker-0", "demo-broker-1"):
        broker = server_config(children["Deployment", name])
        assert isinstance(broker, BrokerConfig)
        assert (broker.retention_seconds, broker.retention_bytes) == (seconds, max_bytes)
    assert (BrokerConfig.retention_seconds, BrokerConfig.retention_bytes) == (300.0, 256 * 1024 * 1024)


# --- the CRD --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return loaded


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    [version] = crd["spec"]["versions"]
    found: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return found


def test_crd_names(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "neoplasmaclusters.neoplasma.io"
    assert crd["spec"]["group"] == "neoplasma.io"
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "NeoplasmaCluster", "neoplasmaclusters", ["npc"])
    [version] = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_crd_is_a_valid_v1_crd(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from schema_nodes(node[key], f"{path}[]")


def test_crd_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in schema_nodes(schema):
        assert "x-kubernetes-validations" not in node, f"{path}: no CEL on Kubernetes 1.20"
        assert "$ref" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node, f"{path} has no type"
            assert "anyOf" not in node, path
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True


def test_crd_defaults_are_valid(schema: dict[str, Any]) -> None:
    defaulted = [(path, node) for path, node in schema_nodes(schema) if "default" in node]
    assert len(defaulted) >= 10
    for path, node in defaulted:
        errors = list(jsonschema.Draft4Validator(node).iter_errors(node["default"]))
        assert not errors, f"{path}: {errors}"


def test_crd_quantity_pattern_is_specs(schema: dict[str, Any]) -> None:
    patterns = {node["pattern"] for _, node in schema_nodes(schema) if "pattern" in node}
    assert patterns == {QUANTITY_PATTERN}


@pytest.mark.parametrize(
    ("column", "json_path", "status_path"),
    [
        ("Ready", '.status.conditions[?(@.type=="Ready")].status', ".status.conditions[].status"),
        ("Brokers", ".status.brokers.ready", ".status.brokers.ready"),
        ("Proxies", ".status.proxies.ready", ".status.proxies.ready"),
        ("Connections", ".status.connections", ".status.connections"),
        ("Membership", ".status.membership.version", ".status.membership.version"),
        ("Age", ".metadata.creationTimestamp", None),
    ],
)
def test_printer_columns_show_documented_status(
    crd: dict[str, Any], schema: dict[str, Any], column: str, json_path: str,
    status_path: str | None,
) -> None:
    [version] = crd["spec"]["versions"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns[column] == json_path
    if status_path is not None:
        assert status_path in dict(schema_nodes(schema))


@pytest.mark.parametrize(
    "field",
    ["observedGeneration", "deployments[].name", "deployments[].replicas", "deployments[].ready",
     "brokers.desired", "proxies.desired", "membership.brokers", "membership.acknowledged",
     "membership.lastConvergenceSeconds", "conditions[].reason", "conditions[].message",
     "conditions[].lastTransitionTime"],
)
def test_status_fields_are_documented(schema: dict[str, Any], field: str) -> None:
    assert f".status.{field}" in dict(schema_nodes(schema))


GOOD_SPECS = {
    **SPECS,
    "integer quantity": {"brokers": {"resources": {"requests": {"cpu": 1}}}},
    "highest node port": {"proxies": {"service": {"type": "NodePort",
                                                  "nodePorts": {"grpc": 32767}}}},
    "shortest, smallest retention": {"brokers": {"retention": {"seconds": 1, "maxBytes": 1024**2}}},
    "longest, largest retention": {"brokers": {"retention": {"seconds": 86400, "maxBytes": 64 * 1024**3}}},
    "private topics, JWKS only, an audience": {"subscribers": {"auth": {
        "jwt": {"jwksSecretRef": {"name": "idp"}}, "audience": "https://events.example"}}},
    "no subscriber auth": {"subscribers": {}},
}
BAD_SPECS = {
    "negative broker replicas": ({"brokers": {"replicas": -1}}, "spec.brokers.replicas"),
    "negative proxy replicas": ({"proxies": {"replicas": -2}}, "spec.proxies.replicas"),
    "zero maxPerDeployment": ({"brokers": {"maxPerDeployment": 0}},
                              "spec.brokers.maxPerDeployment"),
    "string replicas": ({"brokers": {"replicas": "3"}}, "spec.brokers.replicas"),
    "service type Foo": ({"proxies": {"service": {"type": "Foo"}}}, "spec.proxies.service.type"),
    "node port 80": ({"proxies": {"service": {"type": "NodePort", "nodePorts": {"sse": 80}}}},
                     "spec.proxies.service.nodePorts.sse"),
    "node port 32768": ({"proxies": {"service": {"type": "NodePort",
                                                 "nodePorts": {"grpc": 32768}}}},
                        "spec.proxies.service.nodePorts.grpc"),
    "bad quantity": ({"proxies": {"resources": {"limits": {"memory": "lots"}}}},
                     "spec.proxies.resources.limits.memory"),
    "image not a string": ({"image": 7}, "spec.image"),
    "retention of 0 s": ({"brokers": {"retention": {"seconds": 0}}}, "spec.brokers.retention.seconds"),
    "retention over a day": ({"brokers": {"retention": {"seconds": 86401}}}, "spec.brokers.retention.seconds"),
    "retention of 1 KiB": ({"brokers": {"retention": {"maxBytes": 1024}}}, "spec.brokers.retention.maxBytes"),
    "retention of 1 TiB": ({"brokers": {"retention": {"maxBytes": 1024**4}}}, "spec.brokers.retention.maxBytes"),
    "retention as text": ({"brokers": {"retention": {"maxBytes": "1Gi"}}}, "spec.brokers.retention.maxBytes"),
    "negative Redis database": ({"ingest": {"redis": {"address": "r", "channels": ["a"], "database": -1}}},
                                "spec.ingest.redis.database"),
    "Redis address too long": ({"ingest": {"redis": {"address": "r" * 262, "channels": ["a"]}}},
                               "spec.ingest.redis.address"),
    "Redis TLS as text": ({"ingest": {"redis": {"address": "r", "channels": ["a"], "tls": {"enabled": "yes"}}}},
                          "spec.ingest.redis.tls.enabled"),
    "subscriber keys with an empty name": ({"subscribers": {"auth": {"jwt": {"keysSecretRef": {"name": ""}}}}},
                                           "spec.subscribers.auth.jwt.keysSecretRef.name"),
    "public topics as text": ({"subscribers": {"auth": {"jwt": {"keysSecretRef": {"name": "k"}},
                                                        "publicTopics": "news"}}},
                              "spec.subscribers.auth.publicTopics"),
}


def resource(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "neoplasma.io/v1alpha1", "kind": "NeoplasmaCluster",
            "metadata": {"name": "demo", "namespace": "events"}, "spec": spec}


@pytest.mark.parametrize("spec", GOOD_SPECS.values(), ids=GOOD_SPECS.keys())
def test_good_resources_are_accepted(schema: dict[str, Any], spec: dict[str, Any]) -> None:
    jsonschema.Draft4Validator(schema).validate(resource(spec))
    parse_spec(spec)


@pytest.mark.parametrize(("spec", "field"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_resources_are_refused_by_crd_and_parser(
    schema: dict[str, Any], spec: dict[str, Any], field: str
) -> None:
    errors = list(jsonschema.Draft4Validator(schema).iter_errors(resource(spec)))
    assert [".".join(map(str, e.absolute_path)) for e in errors] == [field]
    with pytest.raises(ValueError) as refused:
        parse_spec(spec)
    assert getattr(refused.value, "field", None) == field


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Default `value` as the API server does: absent fields get `default`, then recurse."""
    if isinstance(value, dict) and "properties" in node:
        value = copy.deepcopy(value)
        for name, child in node["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(child, value[name])
    return value


@pytest.mark.parametrize("spec", GOOD_SPECS.values(), ids=GOOD_SPECS.keys())
def test_crd_defaults_are_the_parsers(schema: dict[str, Any], spec: dict[str, Any]) -> None:
    defaulted = apply_defaults(schema, resource(spec))
    jsonschema.Draft4Validator(schema).validate(defaulted)
    assert parse_spec(defaulted["spec"]) == parse_spec(spec)


def test_crd_defaults_an_empty_resource_fully(schema: dict[str, Any]) -> None:
    defaulted = apply_defaults(schema, {"apiVersion": "neoplasma.io/v1alpha1",
                                        "kind": "NeoplasmaCluster", "metadata": {}})
    assert defaulted["spec"] == {
        "brokers": {"replicas": 1, "maxPerDeployment": 10,
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "retention": {"seconds": 300, "maxBytes": 268435456}},
        "proxies": {"replicas": 2, "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "service": {"type": "ClusterIP"}},
        "networkPolicies": {"enabled": True},
    }


@pytest.mark.parametrize(("resources", "workers"), [
    (None, 1),  # the default: a request of 100m
    ({"requests": {"cpu": "2"}}, 2),
    ({"requests": {"cpu": "2"}, "limits": {"cpu": "3500m"}}, 3),  # the limit, in whole CPUs
    ({"limits": {"cpu": 4}}, 4),
    ({"requests": {"cpu": "0.5"}}, 1),
    ({"requests": {"memory": "1Gi"}}, 1),  # no CPU named
])
def test_worker_counts_follow_the_cpu_resources(resources: dict[str, Any] | None, workers: int) -> None:
    tier = {} if resources is None else {"resources": resources}
    children = rendered({"brokers": tier, "proxies": tier})
    for name in ("demo-broker-0", "demo-proxy"):
        command = container(children["Deployment", name])["command"]
        assert command[command.index("--workers") + 1] == str(workers)


# --- private topics (spec.subscribers.auth) ------------------------------------------------------


def test_private_topics_mount_the_secrets_whole_and_pass_the_files() -> None:
    children = rendered(SPECS["private topics"])
    deployment = children["Deployment", "demo-proxy"]
    proxy = server_config(deployment)
    assert isinstance(proxy, ProxyConfig)
    assert (proxy.subscriber_jwt_keys_file, proxy.subscriber_jwks_file) == (
        "/etc/neoplasma/subscriber-keys/keys", "/etc/neoplasma/subscriber-jwks/jwks")
    assert proxy.subscriber_jwt_audience == "demo"  # default: the cluster's name
    assert proxy.public_topics == ["news", "status:public"]
    volumes = {v["name"]: v["secret"] for v in pod_spec(deployment)["volumes"] if "secret" in v}
    assert volumes["subscriber-keys"] == {"secretName": "subscriber-keys"}  # whole: rotations reach the files
    assert volumes["subscriber-jwks"] == {"secretName": "idp"}
    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    assert "subPath" not in mounts["subscriber-keys"] and mounts["subscriber-keys"]["readOnly"] is True
    for name, manifest in children.items():  # only the proxies read subscriber tokens
        if name[0] == "Deployment" and name[1] != "demo-proxy":
            assert not any(v["name"].startswith("subscriber-") for v in pod_spec(manifest)["volumes"])


def test_without_subscriber_auth_the_proxy_is_public_and_an_audience_is_passed_as_given() -> None:
    proxy = server_config(rendered()["Deployment", "demo-proxy"])
    assert isinstance(proxy, ProxyConfig)
    assert (proxy.subscriber_jwt_keys_file, proxy.subscriber_jwks_file, proxy.public_topics) == ("", "", [])
    given = GOOD_SPECS["private topics, JWKS only, an audience"]
    proxy = server_config(rendered(given)["Deployment", "demo-proxy"])
    assert isinstance(proxy, ProxyConfig)
    assert (proxy.subscriber_jwks_file, proxy.subscriber_jwt_audience) == (
        "/etc/neoplasma/subscriber-jwks/jwks.json", "https://events.example")


@pytest.mark.parametrize(("auth", "field", "problem"), [
    ({}, "spec.subscribers.auth.jwt", "needs keysSecretRef"),
    ({"jwt": {}}, "spec.subscribers.auth.jwt", "needs keysSecretRef"),
    ({"jwt": {"keysSecretRef": {"name": "Bad_Name"}}}, "spec.subscribers.auth.jwt.keysSecretRef.name", "Secret"),
    ({"jwt": {"jwksSecretRef": {"name": "k", "key": "a/b"}}}, "spec.subscribers.auth.jwt.jwksSecretRef.key",
     "Secret key"),
    ({"jwt": {"keysSecretRef": {"name": "k"}}, "publicTopics": ["a,b"]}, "spec.subscribers.auth.publicTopics[0]",
     "contains ','"),
    ({"jwt": {"keysSecretRef": {"name": "k"}}, "publicTopics": "news"}, "spec.subscribers.auth.publicTopics",
     "list"),
    ({"jwt": {"keysSecretRef": {"name": "k"}}, "audience": "a\nb"}, "spec.subscribers.auth.audience", "printable"),
    ({"jwt": {"keysSecretRef": {"name": "k", "secret": "x"}}}, "spec.subscribers.auth.jwt.keysSecretRef.secret",
     "unknown field"),
])
def test_bad_subscriber_auth_is_refused_naming_the_field(auth: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec({"subscribers": {"auth": auth}})
    assert refused.value.field == field and problem in refused.value.problem


def test_the_production_example_has_private_topics(schema: dict[str, Any]) -> None:
    example = yaml.safe_load((CRD_PATH.parents[1] / "examples" / "production.yaml").read_text())
    jsonschema.Draft4Validator(schema).validate(example)
    auth = parse_spec(example["spec"]).subscriber_auth
    assert auth is not None and auth.keys is not None
