"""Render the children of a NeoplasmaCluster: pure functions from `Cluster` to manifests.

One jinja2 template per child kind (`templates/*.yaml.j2`), one builder per child below, and
`render` lists them all: reading it tells everything the operator creates. The output has no
ownerReferences (the operator adds them with `kopf.adopt`).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from neoplasma.broker.settings import BrokerConfig
from neoplasma.core.scaling import DEFAULT_MAX_RECONNECTS
from neoplasma.core.settings import Settings
from neoplasma.core.tiers import Tier
from neoplasma.ingest.settings import PASSWORD_ENV, IngestConfig
from neoplasma.operator.connections import DrainSizing, drain_sizing
from neoplasma.operator.settings import NO_PEERS, Peers
from neoplasma.operator.spec import Cluster, NodePorts, RedisIngest, Resources, ServiceType
from neoplasma.proxy.settings import ProxyConfig

Manifest = dict[str, Any]

# The pods' ports are the servers' own defaults (BrokerConfig, ProxyConfig).
BROKER_PORTS = {"grpc": BrokerConfig.grpc_port, "http": BrokerConfig.http_port}
PROXY_PORTS = {"http": ProxyConfig.http_port, "grpc": ProxyConfig.grpc_port, "control": ProxyConfig.control_port}
GRPC_PORT = BROKER_PORTS["grpc"]  # where proxies relay from and the operator reads Stats
CONTROL_PORT = PROXY_PORTS["control"]  # where the operator pushes membership
INGEST = "ingest"  # the component of the ingest readers (spec.ingest)
INGEST_PORTS = {"http": IngestConfig.http_port}  # /healthz, /metrics, and /stats that the operator reads
INGEST_REPLICAS = 2  # one reads, the other stands by to take the lease over
POLICY_APIS = ("policy/v1", "policy/v1beta1")
SECRETS_DIR = "/etc/neoplasma"  # where the pods' Secrets are mounted, one folder each
CREDENTIAL_KEY = "credential"  # the key of the cluster credential in its Secret
API_KEYS_KEY = "keys"  # the key of spec.publishers.apiKeysSecret holding the API keys, one per line
CA_KEY = "ca.crt"  # the CA in a kubernetes.io/tls Secret (as cert-manager writes)

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
BROKER_DEPLOYMENT_LABEL = "neoplasma.io/broker-deployment"
MANAGED_BY = "neoplasma-operator"

# Rollouts keep serving: a new proxy is ready before an old one is stopped.
_PROXY_STRATEGY = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
# A stopping proxy pod fails readiness at once and keeps serving for PROXY_DRAIN_DELAY seconds, so
# the Service's endpoints drop it before its subscribers are asked to reconnect (paced: the
# reconnect budget, neoplasma.operator.connections); the grace period covers the subscribers
# the busiest proxy holds (at least 25,000) at that pace, and a margin to stop.
PROXY_DRAIN_DELAY = 5
DEFAULT_DRAINS = drain_sizing(DEFAULT_MAX_RECONNECTS, 0, PROXY_DRAIN_DELAY, 1)


@dataclass(frozen=True)
class SecretVolume:
    """A Secret mounted read-only at SECRETS_DIR/NAME (files update in place when it changes)."""

    name: str
    secret: str

    @property
    def path(self) -> str:
        return f"{SECRETS_DIR}/{self.name}"

    def file(self, key: str) -> str:
        return f"{self.path}/{key}"


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target: str
    node_port: int | None = None


def render(
    cluster: Cluster, *, default_image: str, policy_api: str = "policy/v1", operator: Peers = NO_PEERS,
    drains: DrainSizing = DEFAULT_DRAINS,
) -> list[Manifest]:
    """Every child of `cluster`, in creation order (the credential Secret is not one: it is
    created once, see `credential_secret`); `drains`: how proxy pods drain (from the reconnect
    budget and the subscribers observed)."""
    image = cluster.spec.image or default_image
    sizes = split_replicas(cluster.spec.brokers.replicas, cluster.spec.brokers.max_per_deployment)
    policies = [network_policy(cluster, tier, operator) for tier in Tier] if cluster.spec.trust.network_policies else []
    return [
        *(broker_deployment(cluster, index, size, image=image) for index, size in enumerate(sizes)),
        broker_service(cluster),
        pod_disruption_budget(cluster, Tier.BROKER, policy_api=policy_api),
        proxy_deployment(cluster, image=image, drains=drains),
        proxy_service(cluster),
        pod_disruption_budget(cluster, Tier.PROXY, policy_api=policy_api, max_unavailable=drains.max_unavailable),
        *([ingest_deployment(cluster, cluster.spec.ingest, image=image)] if cluster.spec.ingest else []),
        *policies,
    ]


def credential_secret_name(cluster_name: str) -> str:
    return f"{cluster_name}-credential"


def credential_secret(cluster: Cluster, token: str) -> Manifest:
    """The Secret holding the cluster credential `token`, which proxies and brokers require on
    control, relay and Stats calls."""
    return _render_template("secret.yaml.j2", name=credential_secret_name(cluster.name),
                            namespace=cluster.namespace, labels=labels(cluster.name, "credential"),
                            data={CREDENTIAL_KEY: token})


def service_host(cluster: Cluster, tier: Tier) -> str:
    """The name a tier's TLS certificate must carry (its Service's)."""
    return f"{cluster.name}-{tier}.{cluster.namespace}.svc"


def trust_settings(cluster: Cluster, *, keys_setting: str = "",
                   broker_ca_settings: tuple[str, str] | None = None) -> tuple[list[SecretVolume], dict[str, str]]:
    """The Secrets a server's pods mount, and the settings that point it at them: the cluster credential;
    the publisher keys (as `keys_setting`, when spec.publishers sets them); with spec.tls its certificate
    and, for a client of the brokers, their CA and name (as `broker_ca_settings`: the CA's and the name's)."""
    trust = cluster.spec.trust
    credential = SecretVolume("credential", credential_secret_name(cluster.name))
    volumes, settings = [credential], {"credential_file": credential.file(CREDENTIAL_KEY)}
    if trust.api_keys_secret and keys_setting:
        keys = SecretVolume("publish-keys", trust.api_keys_secret)
        volumes.append(keys)
        settings[keys_setting] = keys.file(API_KEYS_KEY)
    if trust.tls_secret:
        tls = SecretVolume("tls", trust.tls_secret)
        volumes.append(tls)
        settings |= {"tls_cert": tls.file("tls.crt"), "tls_key": tls.file("tls.key")}
        if broker_ca_settings is not None:
            ca_setting, name_setting = broker_ca_settings
            settings |= {ca_setting: tls.file(CA_KEY), name_setting: service_host(cluster, Tier.BROKER)}
    return volumes, settings


def network_policy(cluster: Cluster, tier: Tier, operator: Peers) -> Manifest:
    """Ingress to a tier's pods: the ports its Service offers from anywhere; the proxies' control
    port only from the operator's pods and the cluster's own. (Brokers relay and take publishes
    on the same gRPC port, so relay is guarded by the credential alone.)"""
    own = {"podSelector": {"matchLabels": {NAME_LABEL: "neoplasma", INSTANCE_LABEL: cluster.name}}}
    peers = [own]
    if operator.namespace or operator.labels:
        peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(operator.labels)}}
        if operator.namespace and operator.namespace != cluster.namespace:
            # The label every namespace carries from Kubernetes 1.21 on.
            peer["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": operator.namespace}}
        peers.append(peer)
    ports = BROKER_PORTS if tier is Tier.BROKER else PROXY_PORTS
    guarded = [CONTROL_PORT] if tier is Tier.PROXY else []
    return _render_template(
        "networkpolicy.yaml.j2", name=f"{cluster.name}-{tier}", namespace=cluster.namespace,
        labels=labels(cluster.name, tier), selector=selector_labels(cluster.name, tier),
        open=[port for port in ports.values() if port not in guarded], guarded=guarded, peers=peers)


def split_replicas(total: int, max_per_deployment: int) -> list[int]:
    """Sizes of the broker Deployments: full ones, then the rest (25, 10 -> [10, 10, 5])."""
    if total < 0 or max_per_deployment < 1:
        raise ValueError(f"cannot split {total} replicas by {max_per_deployment}")
    full, rest = divmod(total, max_per_deployment)
    sizes = [max_per_deployment] * full + ([rest] if rest else [])
    return sizes or [0]


def broker_deployment_name(cluster_name: str, index: int) -> str:
    return f"{cluster_name}-broker-{index}"


def selector_labels(cluster_name: str, component: str) -> dict[str, str]:
    """The labels a selector matches on: stable, whatever the spec says."""
    return {
        NAME_LABEL: "neoplasma",
        INSTANCE_LABEL: cluster_name,
        COMPONENT_LABEL: component,
    }


def labels(cluster_name: str, component: str) -> dict[str, str]:
    """The labels on every child object and pod of `component` (a tier, or "credential")."""
    return {**selector_labels(cluster_name, component), MANAGED_BY_LABEL: MANAGED_BY}


def server_command(tier: str, config: type[Settings], ports: dict[str, int], **settings: int | str) -> list[str]:
    """The container's command: `neoplasma TIER` on every address, with each port (`NAME_port`)
    and setting as the option `config` has for it."""
    values: dict[str, int | str] = {**{f"{name}_port": port for name, port in ports.items()}, **settings}
    return ["neoplasma", tier, "--host", "0.0.0.0",
            *(arg for name, value in values.items() for arg in (config.option(name), str(value)))]


def cpu_cores(quantity: str) -> float:
    """A CPU quantity in cores: "2" -> 2.0, "1500m" -> 1.5, "0.5" -> 0.5."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def workers_for(resources: Resources) -> int:
    """How many worker processes a pod runs (`--workers`): the whole CPUs of its limit, else of
    its request, at least 1 (as the servers count a cgroup quota: neoplasma.core.workers)."""
    cpu = resources.limits.get("cpu") or resources.requests.get("cpu")
    return max(1, math.floor(cpu_cores(cpu))) if cpu else 1


def broker_deployment(cluster: Cluster, index: int, replicas: int, *, image: str) -> Manifest:
    name = broker_deployment_name(cluster.name, index)
    selector = {**selector_labels(cluster.name, Tier.BROKER), BROKER_DEPLOYMENT_LABEL: name}
    retention = cluster.spec.brokers.retention
    volumes, trust = trust_settings(cluster, keys_setting="publish_keys_file")  # brokers check the keys
    return _render_template(
        "deployment.yaml.j2",
        name=name,
        namespace=cluster.namespace,
        component=Tier.BROKER,
        labels={**labels(cluster.name, Tier.BROKER), BROKER_DEPLOYMENT_LABEL: name},
        selector=selector,
        replicas=replicas,
        image=image,
        command=server_command(Tier.BROKER, BrokerConfig, BROKER_PORTS, retention_seconds=retention.seconds,
                               retention_bytes=retention.max_bytes, **trust,
                               workers=workers_for(cluster.spec.brokers.resources)),
        ports=BROKER_PORTS,
        secrets=volumes,
        probe_scheme="HTTPS" if cluster.spec.trust.tls_secret else "HTTP",  # the broker serves HTTP with TLS too
        resources=cluster.spec.brokers.resources.to_dict(),
        grace_seconds=30,
        strategy=None,
        env=[],
        liveness_path="/healthz",
    )


def subscriber_auth_settings(cluster: Cluster) -> tuple[list[SecretVolume], dict[str, str]]:
    """spec.subscribers.auth for the proxies: its Secrets mounted whole (a subPath mount would never see a
    rotation; the proxies re-read the files when they change), the options pointing at them, the audience
    (default: the cluster's name) and the public topics. Nothing when unset: every topic is public."""
    auth = cluster.spec.subscriber_auth
    if auth is None:
        return [], {}
    volumes, settings = [], {"subscriber_jwt_audience": auth.audience or cluster.name}
    for volume_name, setting, ref in (("subscriber-keys", "subscriber_jwt_keys_file", auth.keys),
                                      ("subscriber-jwks", "subscriber_jwks_file", auth.jwks)):
        if ref is not None:
            volume = SecretVolume(volume_name, ref.name)
            volumes.append(volume)
            settings[setting] = volume.file(ref.key)
    if auth.public_topics:
        settings["public_topics"] = ",".join(auth.public_topics)
    return volumes, settings


def proxy_deployment(cluster: Cluster, *, image: str, drains: DrainSizing = DEFAULT_DRAINS) -> Manifest:
    volumes, trust = trust_settings(cluster, broker_ca_settings=("tls_ca", "tls_server_name"))
    auth_volumes, auth = subscriber_auth_settings(cluster)
    return _render_template(
        "deployment.yaml.j2",
        name=f"{cluster.name}-proxy",
        namespace=cluster.namespace,
        component=Tier.PROXY,
        labels=labels(cluster.name, Tier.PROXY),
        selector=selector_labels(cluster.name, Tier.PROXY),
        replicas=cluster.spec.proxies.replicas,
        image=image,
        command=server_command(Tier.PROXY, ProxyConfig, PROXY_PORTS, drain_delay=PROXY_DRAIN_DELAY,
                               drain_rate=f"{drains.drain_rate:g}", drain_within=drains.drain_within, **trust,
                               **auth, workers=workers_for(cluster.spec.proxies.resources)),
        ports=PROXY_PORTS,
        secrets=volumes + auth_volumes,
        probe_scheme="HTTP",  # subscribers' port: plaintext
        resources=cluster.spec.proxies.resources.to_dict(),
        grace_seconds=drains.grace_seconds,
        strategy=_PROXY_STRATEGY,
        env=[],
        liveness_path="/livez",  # alive while not ready: draining, or full while subscribers are spread
    )


def ingest_lease_key(cluster: Cluster) -> str:
    """The readers' lease in the Redis they read: one per cluster, so two clusters may read one Redis."""
    return f"neoplasma:ingest:{cluster.namespace}/{cluster.name}"


def ingest_deployment(cluster: Cluster, ingest: RedisIngest, *, image: str) -> Manifest:
    """The readers of spec.ingest: `neoplasma ingest-redis`, publishing to the broker Service. The
    Redis password comes from its Secret through the environment (never in the manifest); the
    cluster credential guards /stats; with spec.tls they serve HTTPS and check the brokers' CA."""
    volumes, secrets = trust_settings(cluster, keys_setting="publish_key_file",  # readers present a key
                                      broker_ca_settings=("broker_ca_file", "broker_server_name"))
    settings: dict[str, int | str] = dict(secrets)
    if ingest.ca is not None:
        ca = SecretVolume("redis-ca", ingest.ca.name)
        volumes.append(ca)
        settings["redis_ca_file"] = ca.file(ingest.ca.key)
    reading = {"channels": ",".join(ingest.channels), "patterns": ",".join(ingest.patterns)}
    env = [] if ingest.password is None else [{"name": PASSWORD_ENV, "valueFrom": {"secretKeyRef": {
        "name": ingest.password.name, "key": ingest.password.key}}}]
    return _render_template(
        "deployment.yaml.j2",
        name=f"{cluster.name}-{INGEST}",
        namespace=cluster.namespace,
        component=INGEST,
        labels=labels(cluster.name, INGEST),
        selector=selector_labels(cluster.name, INGEST),
        replicas=INGEST_REPLICAS,
        image=image,
        command=server_command(
            "ingest-redis", IngestConfig, INGEST_PORTS, redis=f"rediss://{ingest.address}" if ingest.tls
            else ingest.address, redis_db=ingest.database, **{k: v for k, v in reading.items() if v},
            brokers=f"{service_host(cluster, Tier.BROKER)}:{GRPC_PORT}", lease_key=ingest_lease_key(cluster),
            **settings),
        ports=INGEST_PORTS,
        secrets=volumes,
        probe_scheme="HTTPS" if cluster.spec.trust.tls_secret else "HTTP",
        resources=ingest.resources.to_dict(),
        grace_seconds=30,  # it stops reading, hands the lease over, then publishes what it read
        strategy=None,
        env=env,
        liveness_path="/livez",  # alive, whether or not Redis is: /healthz says that
    )


def broker_service(cluster: Cluster) -> Manifest:
    """The Service publishers use (gRPC and HTTP publish)."""
    ports = [ServicePort(name, port, name) for name, port in BROKER_PORTS.items()]
    return _service(cluster, Tier.BROKER, "ClusterIP", ports)


def proxy_service(cluster: Cluster) -> Manifest:
    """The Service subscribers use (SSE and the gRPC stream), of the type the spec asks."""
    service = cluster.spec.proxies.service
    node_ports = service.node_ports if service.type != "ClusterIP" else NodePorts()
    ports = [
        ServicePort("sse", PROXY_PORTS["http"], "http", node_ports.sse),
        ServicePort("grpc", PROXY_PORTS["grpc"], "grpc", node_ports.grpc),
    ]
    return _service(cluster, Tier.PROXY, service.type, ports)


def pod_disruption_budget(
    cluster: Cluster, component: Tier, *, policy_api: str = "policy/v1", max_unavailable: int = 1
) -> Manifest:
    """A PodDisruptionBudget for `component`; `policy_api` is policy/v1 or (before 1.21) v1beta1."""
    if policy_api not in POLICY_APIS:
        raise ValueError(f"policy_api must be one of {', '.join(POLICY_APIS)}, got {policy_api!r}")
    return _render_template(
        "poddisruptionbudget.yaml.j2",
        api_version=policy_api,
        name=f"{cluster.name}-{component}",
        namespace=cluster.namespace,
        labels=labels(cluster.name, component),
        selector=selector_labels(cluster.name, component),
        max_unavailable=max_unavailable,
    )


def _service(
    cluster: Cluster, component: Tier, service_type: ServiceType, ports: list[ServicePort]
) -> Manifest:
    return _render_template(
        "service.yaml.j2",
        name=f"{cluster.name}-{component}",
        namespace=cluster.namespace,
        labels=labels(cluster.name, component),
        selector=selector_labels(cluster.name, component),
        type=service_type,
        ports=ports,
    )


def _render_template(template: str, **context: Any) -> Manifest:
    manifest = yaml.safe_load(_environment().get_template(template).render(**context))
    if not isinstance(manifest, dict):
        raise TypeError(f"{template} did not render to a mapping")
    return manifest


@functools.cache
def _environment() -> jinja2.Environment:
    """Templates whose every `{{ value }}` is written as JSON, which YAML reads back as is."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        undefined=jinja2.StrictUndefined,
        finalize=json.dumps,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
