"""Parsing a NeoplasmaCluster spec: defaults, clear errors, and never a crash."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neoplasma.operator.spec import (
    Brokers,
    Cluster,
    ClusterSpec,
    InvalidSpec,
    NodePorts,
    Proxies,
    ProxyService,
    Resources,
    Retention,
    Trust,
    check_name,
    parse_cluster,
    parse_spec,
)

DEFAULT_RESOURCES = Resources(requests={"cpu": "100m", "memory": "128Mi"})


@pytest.mark.parametrize("spec", [None, {}, {"brokers": None, "proxies": {"service": None}}])
def test_missing_fields_take_the_crd_defaults(spec: object) -> None:
    assert parse_spec(spec) == ClusterSpec(
        image="",
        brokers=Brokers(replicas=1, max_per_deployment=10, resources=DEFAULT_RESOURCES,
                        retention=Retention(seconds=300, max_bytes=256 * 1024 * 1024)),
        proxies=Proxies(
            replicas=2,
            resources=DEFAULT_RESOURCES,
            service=ProxyService(type="ClusterIP", node_ports=NodePorts()),
        ),
    )


def test_a_full_spec() -> None:
    spec = {
        "image": "registry.example/neoplasma:1.0",
        "brokers": {
            "replicas": 25,
            "maxPerDeployment": 8,
            "resources": {"requests": {"cpu": 1}, "limits": {"memory": "1Gi"}},
            "retention": {"seconds": 600, "maxBytes": 2**30},
        },
        "proxies": {
            "replicas": 0,
            "resources": {},
            "service": {"type": "LoadBalancer", "nodePorts": {"sse": 30080, "grpc": 30051}},
        },
    }
    assert parse_spec(spec) == ClusterSpec(
        image="registry.example/neoplasma:1.0",
        brokers=Brokers(
            replicas=25,
            max_per_deployment=8,
            resources=Resources(requests={"cpu": "1"}, limits={"memory": "1Gi"}),
            retention=Retention(seconds=600, max_bytes=2**30),
        ),
        proxies=Proxies(
            replicas=0,
            resources=Resources(),
            service=ProxyService(type="LoadBalancer", node_ports=NodePorts(sse=30080, grpc=30051)),
        ),
    )


@pytest.mark.parametrize(
    ("resources", "as_dict"),
    [
        (DEFAULT_RESOURCES, {"requests": {"cpu": "100m", "memory": "128Mi"}}),
        (Resources(limits={"cpu": "2"}), {"limits": {"cpu": "2"}}),
        (Resources(), {}),
    ],
)
def test_resources_to_dict_leaves_out_empty_maps(
    resources: Resources, as_dict: dict[str, Any]
) -> None:
    assert resources.to_dict() == as_dict


@pytest.mark.parametrize(
    ("spec", "field", "problem"),
    [
        ([], "spec", "must be an object, got list"),
        ({"brokers": 3}, "spec.brokers", "must be an object, got int"),
        ({"replicas": 3}, "spec.replicas",
         "unknown field; known fields are brokers, image, ingest, networkPolicies, proxies, publishers, "
         "subscribers, tls"),
        ({"brokers": {"replicas": -1}}, "spec.brokers.replicas", "must be at least 0, got -1"),
        ({"brokers": {"replicas": True}}, "spec.brokers.replicas", "must be an integer, got True"),
        ({"brokers": {"replicas": 1.5}}, "spec.brokers.replicas", "must be an integer, got 1.5"),
        ({"brokers": {"maxPerDeployment": 0}}, "spec.brokers.maxPerDeployment",
         "must be at least 1, got 0"),
        ({"proxies": {"replicas": "2"}}, "spec.proxies.replicas", "must be an integer, got '2'"),
        ({"image": ["a"]}, "spec.image", "must be a string, got ['a']"),
        ({"proxies": {"service": {"type": "Foo"}}}, "spec.proxies.service.type",
         "must be one of ClusterIP, NodePort, LoadBalancer, got 'Foo'"),
        ({"proxies": {"service": {"type": "NodePort", "nodePorts": {"sse": 80}}}},
         "spec.proxies.service.nodePorts.sse", "must be at least 30000, got 80"),
        ({"proxies": {"service": {"type": "NodePort", "nodePorts": {"grpc": 40000}}}},
         "spec.proxies.service.nodePorts.grpc", "must be at most 32767, got 40000"),
        ({"proxies": {"service": {"nodePorts": {"sse": 30080}}}}, "spec.proxies.service.nodePorts",
         "needs service type NodePort or LoadBalancer, not ClusterIP"),
        ({"proxies": {"service": {"type": "NodePort", "nodePorts": {"sse": 30080, "grpc": 30080}}}},
         "spec.proxies.service.nodePorts", "sse and grpc must differ, both are 30080"),
        ({"brokers": {"resources": {"requests": {"cpu": "fast"}}}},
         "spec.brokers.resources.requests.cpu", "must be a quantity such as 100m or 128Mi, got 'fast'"),
        ({"brokers": {"resources": {"limits": {"cpu": False}}}},
         "spec.brokers.resources.limits.cpu", "must be a quantity such as 100m or 128Mi, got False"),
        ({"brokers": {"resources": {"claims": []}}}, "spec.brokers.resources.claims",
         "unknown field; known fields are limits, requests"),
        ({"brokers": {"retention": 300}}, "spec.brokers.retention", "must be an object, got int"),
        ({"brokers": {"retention": {"seconds": 0}}}, "spec.brokers.retention.seconds", "must be at least 1, got 0"),
        ({"brokers": {"retention": {"seconds": 90000}}}, "spec.brokers.retention.seconds",
         "must be at most 86400, got 90000"),
        ({"brokers": {"retention": {"seconds": "5m"}}}, "spec.brokers.retention.seconds",
         "must be an integer, got '5m'"),
        ({"brokers": {"retention": {"maxBytes": 1000}}}, "spec.brokers.retention.maxBytes",
         "must be at least 1048576, got 1000"),
        ({"brokers": {"retention": {"maxBytes": 2**40}}}, "spec.brokers.retention.maxBytes",
         "must be at most 68719476736, got 1099511627776"),
        ({"publishers": {"apiKeysSecret": "Keys!"}}, "spec.publishers.apiKeysSecret",
         "must be the name of a Secret (lower-case letters, digits, '-' and '.'), got 'Keys!'"),
        ({"tls": {"secretName": 5}}, "spec.tls.secretName", "must be a string, got 5"),
        ({"networkPolicies": {"enabled": "no"}}, "spec.networkPolicies.enabled", "must be true or false, got 'no'"),
        ({"brokers": {"retention": {"bytes": 5}}}, "spec.brokers.retention.bytes",
         "unknown field; known fields are maxBytes, seconds"),
    ],
)
def test_bad_values_name_the_field_and_the_problem(spec: object, field: str, problem: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec(spec)
    assert (refused.value.field, refused.value.problem) == (field, problem)
    assert str(refused.value) == f"{field}: {problem}"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-40000, 40000) | st.floats(allow_nan=False)
    | st.sampled_from(["", "ClusterIP", "NodePort", "100m", "x"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(
        st.sampled_from(["image", "brokers", "proxies", "replicas", "maxPerDeployment",
                         "resources", "requests", "limits", "cpu", "service", "type",
                         "nodePorts", "sse", "grpc", "retention", "seconds", "maxBytes", "other"]),
        children,
        max_size=4,
    ),
    max_leaves=20,
)


@given(JSON)
def test_any_garbage_parses_or_is_refused_with_invalid_spec(spec: object) -> None:
    try:
        parsed = parse_spec(spec)
    except InvalidSpec as refused:
        assert refused.field.startswith("spec")
    else:
        assert isinstance(parsed, ClusterSpec)


LONG = "a" * 65536
LONG_STRINGS = [  # every string the parser reads, 64k long (keys too: quantities' names, unknown fields)
    {"image": LONG}, {"publishers": {"apiKeysSecret": LONG}}, {"tls": {"secretName": LONG}},
    {"proxies": {"service": {"type": LONG}}}, {"brokers": {"resources": {"requests": {"cpu": LONG}}}},
    {"brokers": {"resources": {"requests": {LONG: "x"}}}}, {"brokers": {LONG: 1}},
    {"networkPolicies": {"enabled": LONG}}, {"brokers": {"replicas": LONG}},
]


@pytest.mark.parametrize("spec", LONG_STRINGS)
def test_a_64k_string_anywhere_is_refused_at_once_with_a_short_message(spec: object) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidSpec) as refused:
        for _ in range(100):
            parse_spec(spec)
    assert time.perf_counter() - started < 0.5  # 100 parses: linear, capped before any pattern runs
    assert len(str(refused.value)) < 300


def test_trust_fields() -> None:
    spec = parse_spec({"publishers": {"apiKeysSecret": "keys"}, "tls": {"secretName": "a.tls"},
                       "networkPolicies": {"enabled": False}})
    assert spec.trust == Trust(api_keys_secret="keys", tls_secret="a.tls", network_policies=False)
    assert parse_spec({}).trust == Trust("", "", True)


def test_parse_cluster() -> None:
    body = {"metadata": {"name": "demo", "namespace": "events"}, "spec": {"image": "x:1"}}
    assert parse_cluster(body) == Cluster("demo", "events", ClusterSpec(image="x:1"))


@pytest.mark.parametrize("name", ["demo", "a", "a-1", "x" * 50])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", [None, "", "Demo", "1demo", "demo-", "a.b", "x" * 51])
def test_names_whose_children_would_be_invalid_are_refused(name: object) -> None:
    with pytest.raises(InvalidSpec, match=r"^metadata\.name: must be lower-case"):
        parse_cluster({"metadata": {"name": name}})
