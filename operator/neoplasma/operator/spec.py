"""Parse a NeoplasmaCluster resource into frozen dataclasses.

Pure and total: any input either parses (with the CRD's defaults filled in) or raises
`InvalidSpec` naming the field and the problem, so the operator never crashes on a
half-created or garbage resource. The defaults and bounds here mirror
`crds/neoplasmaclusters.yaml`; `tests/test_render.py` checks that they agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from neoplasma.broker.settings import BrokerConfig
from neoplasma.core.text import clip, excerpt
from neoplasma.core.topics import MAX_TOPIC_LENGTH, InvalidTopic, check_topic

ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
SERVICE_TYPES: tuple[ServiceType, ...] = ("ClusterIP", "NodePort", "LoadBalancer")
NODE_PORT_MIN = 30000
NODE_PORT_MAX = 32767
# Leaves room for "-broker-NNN" within the 63 characters of a Service name or label value.
MAX_NAME_LENGTH = 50

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes' resource.Quantity syntax, as in the CRD's schema.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(QUANTITY_PATTERN)
MAX_QUANTITY_LENGTH = 64  # "1.5Gi", "250m": real quantities are short; longer ones are refused unread
_Default = TypeVar("_Default", int, None)
# Broker retention (docs/resume.md): at least a reconnect's worth, at most what a pod can hold.
RETENTION_SECONDS_MAX = 86400
RETENTION_BYTES_MIN = 1024 * 1024
RETENTION_BYTES_MAX = 64 * 1024**3
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_SECRET_NAME_LENGTH = 253
MAX_IMAGE_LENGTH = 1024
# spec.ingest.redis: what a reader may be told to read (channels are passed comma-separated).
_REDIS_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?)(:(?P<port>[0-9]{1,5}))?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
MAX_REDIS_ADDRESS_LENGTH = 261  # a DNS name and a port
MAX_CHANNEL_LENGTH = 256
MAX_CHANNELS = 64
AUTH_PATH = "spec.subscribers.auth"
MAX_AUDIENCE_LENGTH = 253
MAX_PUBLIC_TOPICS = 1000
SUBSCRIBER_KEYS_KEY = "keys"  # the default key of jwt.keysSecretRef: HS256 secrets, one per line
SUBSCRIBER_JWKS_KEY = "jwks.json"  # the default key of jwt.jwksSecretRef: a JWKS document


class InvalidSpec(ValueError):
    """A NeoplasmaCluster field has a value the operator cannot use."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Resources:
    """A container's ResourceRequirements: quantities by resource name."""

    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The Kubernetes shape, leaving out empty maps."""
        parts = {"requests": self.requests, "limits": self.limits}
        return {key: dict(value) for key, value in parts.items() if value}


def _default_resources() -> Resources:
    return Resources(requests={"cpu": "100m", "memory": "128Mi"})


@dataclass(frozen=True)
class Retention:
    """How long and how much of the accepted events each broker keeps for resuming subscribers;
    the broker's own defaults."""

    seconds: int = int(BrokerConfig.retention_seconds)
    max_bytes: int = BrokerConfig.retention_bytes


@dataclass(frozen=True)
class Brokers:
    replicas: int = 1
    max_per_deployment: int = 10
    resources: Resources = field(default_factory=_default_resources)
    retention: Retention = field(default_factory=Retention)


@dataclass(frozen=True)
class NodePorts:
    sse: int | None = None
    grpc: int | None = None


@dataclass(frozen=True)
class ProxyService:
    type: ServiceType = "ClusterIP"
    node_ports: NodePorts = field(default_factory=NodePorts)


@dataclass(frozen=True)
class Proxies:
    replicas: int = 2
    resources: Resources = field(default_factory=_default_resources)
    service: ProxyService = field(default_factory=ProxyService)


@dataclass(frozen=True)
class Trust:
    """Who may publish and how the tiers talk: the Secret of publisher API keys (key `keys`, one
    per line; "" for none: publishing is open), the `kubernetes.io/tls` Secret serving publish,
    relay and control over TLS ("" for none), and whether NetworkPolicies are rendered."""

    api_keys_secret: str = ""
    tls_secret: str = ""
    network_policies: bool = True


@dataclass(frozen=True)
class SecretKey:
    """One key of a Secret in the cluster's namespace (as a secretKeyRef names it)."""

    name: str
    key: str


@dataclass(frozen=True)
class RedisIngest:
    """`spec.ingest`: plasma's Redis Pub/Sub channels, read into the brokers by the ingest readers."""

    address: str  # HOST[:PORT]
    channels: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    database: int = 0
    password: SecretKey | None = None
    tls: bool = False
    ca: SecretKey | None = None  # TLS: the CA that signed Redis's certificate (None: the system's)
    resources: Resources = field(default_factory=_default_resources)


@dataclass(frozen=True)
class SubscriberAuth:
    """`spec.subscribers.auth`: subscribers need a signed token (JWT) for topics not in `public_topics`,
    verified with the HS256 secrets of `keys` and/or the public keys (a JWKS) of `jwks`; tokens must name
    `audience` in `aud` ("" here: the cluster's name)."""

    keys: SecretKey | None = None
    jwks: SecretKey | None = None
    audience: str = ""
    public_topics: tuple[str, ...] = ()

    def secrets(self) -> dict[str, SecretKey]:
        """The Secret keys it names, by their field (for messages)."""
        named = {f"{AUTH_PATH}.jwt.keysSecretRef": self.keys, f"{AUTH_PATH}.jwt.jwksSecretRef": self.jwks}
        return {path: ref for path, ref in named.items() if ref is not None}


@dataclass(frozen=True)
class ClusterSpec:
    """The `spec` of a NeoplasmaCluster; `image` "" means the operator's default image."""

    image: str = ""
    brokers: Brokers = field(default_factory=Brokers)
    proxies: Proxies = field(default_factory=Proxies)
    trust: Trust = field(default_factory=Trust)
    ingest: RedisIngest | None = None  # None: no reader
    subscriber_auth: SubscriberAuth | None = None  # None: every topic is public


@dataclass(frozen=True)
class Cluster:
    """A NeoplasmaCluster: where it lives and what it asks for."""

    name: str
    namespace: str
    spec: ClusterSpec = field(default_factory=ClusterSpec)


def parse_cluster(body: Mapping[str, Any]) -> Cluster:
    """Parse a whole NeoplasmaCluster object (as kopf's `body`)."""
    metadata = _object(body.get("metadata"), "metadata", known=None)
    return Cluster(
        name=check_name(metadata.get("name")),
        namespace=_string(metadata.get("namespace"), "metadata.namespace", default="default"),
        spec=parse_spec(body.get("spec")),
    )


def check_name(name: object) -> str:
    """Return `name` if every child name derived from it is a valid DNS-1035 label."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _DNS_LABEL.match(name):
        raise InvalidSpec(
            "metadata.name",
            f"must be lower-case letters, digits and '-', start with a letter and be at most "
            f"{MAX_NAME_LENGTH} characters (children are named NAME-broker-N), got {excerpt(name)}",
        )
    return name


def parse_spec(spec: object) -> ClusterSpec:
    """Parse a NeoplasmaCluster `spec` (None or missing fields take the defaults)."""
    fields = _object(spec, "spec", known={"image", "brokers", "proxies", "publishers", "tls", "networkPolicies",
                                          "ingest", "subscribers"})
    publishers = _object(fields.get("publishers"), "spec.publishers", known={"apiKeysSecret"})
    tls = _object(fields.get("tls"), "spec.tls", known={"secretName"})
    policies = _object(fields.get("networkPolicies"), "spec.networkPolicies", known={"enabled"})
    enabled = policies.get("enabled", True)
    if not isinstance(enabled, bool):
        raise InvalidSpec("spec.networkPolicies.enabled", f"must be true or false, got {excerpt(enabled)}")
    return ClusterSpec(
        image=_string(fields.get("image"), "spec.image", default="", max_length=MAX_IMAGE_LENGTH),
        brokers=_brokers(fields.get("brokers"), "spec.brokers"),
        proxies=_proxies(fields.get("proxies"), "spec.proxies"),
        trust=Trust(_secret_name(publishers.get("apiKeysSecret"), "spec.publishers.apiKeysSecret"),
                    _secret_name(tls.get("secretName"), "spec.tls.secretName"), enabled),
        ingest=_ingest(fields.get("ingest"), "spec.ingest"),
        subscriber_auth=_subscriber_auth(fields.get("subscribers")),
    )


def _subscriber_auth(value: object) -> SubscriberAuth | None:
    auth = _object(value, "spec.subscribers", known={"auth"}).get("auth")
    if auth is None:
        return None
    fields = _object(auth, AUTH_PATH, known={"jwt", "audience", "publicTopics"})
    keys = _object(fields.get("jwt"), f"{AUTH_PATH}.jwt", known={"keysSecretRef", "jwksSecretRef"})
    refs = {name: _secret_ref(keys.get(name), f"{AUTH_PATH}.jwt.{name}", default)
            for name, default in (("keysSecretRef", SUBSCRIBER_KEYS_KEY), ("jwksSecretRef", SUBSCRIBER_JWKS_KEY))}
    if refs["keysSecretRef"] is None and refs["jwksSecretRef"] is None:
        raise InvalidSpec(f"{AUTH_PATH}.jwt", "needs keysSecretRef (HS256 secrets) and/or jwksSecretRef (a JWKS of "
                          "public keys): the keys subscriber tokens are verified with")
    audience = _string(fields.get("audience"), f"{AUTH_PATH}.audience", "", MAX_AUDIENCE_LENGTH)
    if audience and not audience.isprintable():
        raise InvalidSpec(f"{AUTH_PATH}.audience", f"must be printable text, got {excerpt(audience)}")
    return SubscriberAuth(refs["keysSecretRef"], refs["jwksSecretRef"], audience,
                          _public_topics(fields.get("publicTopics"), f"{AUTH_PATH}.publicTopics"))


def _public_topics(value: object, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_PUBLIC_TOPICS:
        raise InvalidSpec(path, f"must be a list of at most {MAX_PUBLIC_TOPICS} topic prefixes, got {excerpt(value)}")
    topics = []
    for i, topic in enumerate(value):
        try:
            topics.append(check_topic(_string(topic, f"{path}[{i}]", "", MAX_TOPIC_LENGTH)))
        except InvalidTopic as exc:
            raise InvalidSpec(f"{path}[{i}]", str(exc)) from None
    return tuple(dict.fromkeys(topics))


def _secret_ref(value: object, path: str, default_key: str) -> SecretKey | None:
    """`{name, key}` naming a key of a Secret in the cluster's namespace, None when unset."""
    if value is None:
        return None
    ref = _object(value, path, known={"name", "key"})
    name = _secret_name(ref.get("name"), f"{path}.name")
    key = _string(ref.get("key"), f"{path}.key", default_key, MAX_SECRET_NAME_LENGTH)
    if not name:
        raise InvalidSpec(f"{path}.name", "is required: the Secret's name")
    if not _SECRET_KEY.match(key):
        raise InvalidSpec(f"{path}.key", f"must be a Secret key (letters, digits, '-', '_', '.'), got {excerpt(key)}")
    return SecretKey(name, key)


def _ingest(value: object, path: str) -> RedisIngest | None:
    if value is None:
        return None
    fields = _object(value, path, known={"redis", "resources"})
    redis = _object(fields.get("redis"), f"{path}.redis", known={"address", "channels", "patterns", "database",
                                                                 "password", "tls"})
    if "redis" not in fields:
        raise InvalidSpec(f"{path}.redis", "is required: the Redis to read")
    address = _string(redis.get("address"), f"{path}.redis.address", "", MAX_REDIS_ADDRESS_LENGTH)
    match = _REDIS_ADDRESS.match(address)
    if not match or not 0 < int(match.group("port") or 6379) < 65536:
        raise InvalidSpec(f"{path}.redis.address", f"must be HOST or HOST:PORT (no scheme, no password: give it "
                          f"in password.secretKeyRef), got {excerpt(address)}")
    channels = _channels(redis.get("channels"), f"{path}.redis.channels")
    patterns = _channels(redis.get("patterns"), f"{path}.redis.patterns")
    if not (channels or patterns):
        raise InvalidSpec(f"{path}.redis", "names nothing to read: give channels and/or patterns")
    tls = _object(redis.get("tls"), f"{path}.redis.tls", known={"enabled", "ca"})
    enabled = tls.get("enabled", False)
    if not isinstance(enabled, bool):
        raise InvalidSpec(f"{path}.redis.tls.enabled", f"must be true or false, got {excerpt(enabled)}")
    return RedisIngest(
        address=address, channels=channels, patterns=patterns,
        database=_integer(redis.get("database"), f"{path}.redis.database", 0, 0, 2**31 - 1),
        password=_secret_key(redis.get("password"), f"{path}.redis.password", "password"),
        tls=enabled, ca=_secret_key(tls.get("ca"), f"{path}.redis.tls.ca", "ca.crt"),
        resources=_resources(fields.get("resources"), f"{path}.resources"),
    )


def _channels(value: object, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_CHANNELS:
        raise InvalidSpec(path, f"must be a list of at most {MAX_CHANNELS} names, got {excerpt(value)}")
    names = tuple(_string(name, f"{path}[{i}]", "", MAX_CHANNEL_LENGTH) for i, name in enumerate(value))
    for i, name in enumerate(names):
        if not name or "," in name or not name.isprintable():
            raise InvalidSpec(f"{path}[{i}]", f"must be a non-empty printable name without ',', got {excerpt(name)}")
    return names


def _secret_key(value: object, path: str, default_key: str) -> SecretKey | None:
    """`{secretKeyRef: {name, key}}` as a SecretKey, None when unset."""
    if value is None:
        return None
    ref = _object(value, path, known={"secretKeyRef"}).get("secretKeyRef")
    return _secret_ref({} if ref is None else ref, f"{path}.secretKeyRef", default_key)


def _secret_name(value: object, path: str) -> str:
    """A Secret's name (a DNS subdomain), or "" when unset."""
    name = _string(value, path, default="", max_length=MAX_SECRET_NAME_LENGTH)
    if name and not _SECRET_NAME.match(name):
        raise InvalidSpec(path, f"must be the name of a Secret (lower-case letters, digits, '-' and '.'), "
                          f"got {excerpt(name)}")
    return name


def _brokers(value: object, path: str) -> Brokers:
    fields = _object(value, path, known={"replicas", "maxPerDeployment", "resources", "retention"})
    default = Brokers()
    return Brokers(
        replicas=_integer(fields.get("replicas"), f"{path}.replicas", default.replicas, 0),
        max_per_deployment=_integer(
            fields.get("maxPerDeployment"), f"{path}.maxPerDeployment",
            default.max_per_deployment, 1,
        ),
        resources=_resources(fields.get("resources"), f"{path}.resources"),
        retention=_retention(fields.get("retention"), f"{path}.retention"),
    )


def _retention(value: object, path: str) -> Retention:
    fields = _object(value, path, known={"seconds", "maxBytes"})
    default = Retention()
    return Retention(
        seconds=_integer(fields.get("seconds"), f"{path}.seconds", default.seconds, 1, RETENTION_SECONDS_MAX),
        max_bytes=_integer(fields.get("maxBytes"), f"{path}.maxBytes", default.max_bytes,
                           RETENTION_BYTES_MIN, RETENTION_BYTES_MAX),
    )


def _proxies(value: object, path: str) -> Proxies:
    fields = _object(value, path, known={"replicas", "resources", "service"})
    return Proxies(
        replicas=_integer(fields.get("replicas"), f"{path}.replicas", Proxies().replicas, 0),
        resources=_resources(fields.get("resources"), f"{path}.resources"),
        service=_service(fields.get("service"), f"{path}.service"),
    )


def _service(value: object, path: str) -> ProxyService:
    fields = _object(value, path, known={"type", "nodePorts"})
    service_type = _string(fields.get("type"), f"{path}.type", default="ClusterIP")
    if service_type not in SERVICE_TYPES:
        raise InvalidSpec(
            f"{path}.type", f"must be one of {', '.join(SERVICE_TYPES)}, got {excerpt(service_type)}"
        )
    node_ports = _node_ports(fields.get("nodePorts"), f"{path}.nodePorts")
    if service_type == "ClusterIP" and node_ports != NodePorts():
        raise InvalidSpec(
            f"{path}.nodePorts", "needs service type NodePort or LoadBalancer, not ClusterIP"
        )
    return ProxyService(type=service_type, node_ports=node_ports)


def _node_ports(value: object, path: str) -> NodePorts:
    fields = _object(value, path, known={"sse", "grpc"})
    ports = {
        key: _integer(fields.get(key), f"{path}.{key}", None, NODE_PORT_MIN, NODE_PORT_MAX)
        for key in ("sse", "grpc")
    }
    if ports["sse"] is not None and ports["sse"] == ports["grpc"]:
        raise InvalidSpec(path, f"sse and grpc must differ, both are {ports['sse']}")
    return NodePorts(sse=ports["sse"], grpc=ports["grpc"])


def _resources(value: object, path: str) -> Resources:
    if value is None:
        return _default_resources()
    fields = _object(value, path, known={"requests", "limits"})
    return Resources(
        requests=_quantities(fields.get("requests"), f"{path}.requests"),
        limits=_quantities(fields.get("limits"), f"{path}.limits"),
    )


def _quantities(value: object, path: str) -> dict[str, str]:
    quantities: dict[str, str] = {}
    for key, quantity in _object(value, path, known=None).items():
        # The API server keeps a bare integer (int-or-string); it means the same as its text.
        text = str(quantity) if type(quantity) is int else quantity
        if not isinstance(text, str) or len(text) > MAX_QUANTITY_LENGTH or not _QUANTITY.match(text):
            raise InvalidSpec(
                f"{path}.{clip(str(key))}", f"must be a quantity such as 100m or 128Mi, got {excerpt(quantity)}"
            )
        quantities[str(key)] = text
    return quantities


def _object(value: object, path: str, known: set[str] | None) -> Mapping[str, Any]:
    """A mapping (None is empty); with `known`, other keys are refused."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSpec(path, f"must be an object, got {type(value).__name__}")
    unknown = sorted(str(key) for key in value if known is not None and key not in known)
    if unknown:
        expected = ", ".join(sorted(known or ()))
        raise InvalidSpec(f"{path}.{clip(unknown[0])}", f"unknown field; known fields are {expected}")
    return value


def _string(value: object, path: str, default: str, max_length: int = 64) -> str:
    """A string of at most `max_length` characters (longer ones are refused unread)."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidSpec(path, f"must be a string, got {excerpt(value)}")
    if len(value) > max_length:
        raise InvalidSpec(path, f"must be at most {max_length} characters, got {len(value)}: {excerpt(value)}")
    return value


def _integer(
    value: object, path: str, default: _Default, minimum: int, maximum: int | None = None
) -> int | _Default:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(path, f"must be an integer, got {excerpt(value)}")
    if value < minimum:
        raise InvalidSpec(path, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidSpec(path, f"must be at most {maximum}, got {value}")
    return value
