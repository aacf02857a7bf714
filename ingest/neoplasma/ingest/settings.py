"""The Redis reader's settings (`neoplasma ingest-redis` has an option for each), apart from the
reader: the operator's renderer reads their defaults from here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from neoplasma.core.errors import UsageError
from neoplasma.core.events import DEFAULT_MAX_EVENT_BYTES
from neoplasma.core.settings import NON_NEGATIVE, PORT, POSITIVE, Bound, pod_name, setting
from neoplasma.core.topics import MAX_TOPIC_LENGTH
from neoplasma.core.trust import Access, Tokens, TrustSettings
from neoplasma.ingest.resp import RedisAddress

PASSWORD_ENV = "NEOPLASMA_REDIS_PASSWORD"
LEASES = ("redis", "none")


@dataclass
class IngestConfig(TrustSettings):
    """The reader's settings; `neoplasma ingest-redis` has an option for each one with help. The
    cluster credential (--credential-file) guards /stats; --tls-cert/--tls-key serve HTTPS."""

    name: str = setting(factory=lambda: pod_name("ingest"),
                        help="reader name, its lease identity (default $NEOPLASMA_POD_NAME, else ingest-HOST-PID)")
    host: str = setting("127.0.0.1", help="address to bind, 0.0.0.0 in a pod")
    http_port: int = setting(8080, bound=PORT, help="HTTP port: /healthz (readiness with the reason), /metrics")
    redis: str = setting("127.0.0.1:6379", help="Redis: HOST:PORT or redis[s]://[USER:PASSWORD@]HOST:PORT "
                         "(rediss: TLS)")
    redis_db: int = setting(0, bound=NON_NEGATIVE, help="Redis database")
    redis_password_file: str = setting("", help=f"file holding the Redis password (a mounted Secret); else "
                                       f"${PASSWORD_ENV}, else none")
    redis_ca_file: str = setting("", help="TLS: CA bundle that signed Redis's certificate (default: the system's)")
    channels: list[str] = setting(factory=list, help="Redis channels to SUBSCRIBE to")
    patterns: list[str] = setting(factory=list, help="Redis channel patterns to PSUBSCRIBE to (e.g. 'events:*')")
    brokers: list[str] = setting(factory=list, help="broker gRPC addresses (HOST:PORT, e.g. the broker Service)")
    publish_key_file: str = setting("", help="file of publisher API keys (the brokers' --publish-keys-file); "
                                    "the first is presented on Publish")
    broker_ca_file: str = setting("", help="TLS to the brokers: the CA bundle that signed their certificate")
    broker_server_name: str = setting("", help="TLS to the brokers: the name their certificate must carry "
                                      "(default: the address's host)")
    lease: str = setting("redis", help="who reads: 'redis' (a lease key in the Redis read: one active reader "
                         "of those sharing --lease-key) or 'none' (every reader reads)")
    lease_key: str = setting("neoplasma:ingest:lease", help="the lease's Redis key, one per cluster")
    lease_ttl: float = setting(5.0, bound=Bound(0.1), help="seconds the lease lasts unrenewed: the longest "
                               "hand-over after a reader dies")
    batch_events: int = setting(1000, bound=Bound(1, 10_000), help="most events per broker publish")
    batch_ms: float = setting(2.0, bound=NON_NEGATIVE, help="milliseconds to wait for a batch to fill")
    in_flight: int = setting(1, bound=Bound(1, 64), help="broker publishes in flight (more than 1 may reorder "
                             "messages: concurrent batches go to different brokers)")
    buffer_events: int = setting(200_000, bound=POSITIVE, help="events held while no broker takes them; "
                                 "beyond, new ones are dropped")
    publish_timeout: float = setting(5.0, bound=POSITIVE)
    max_event_bytes: int = setting(DEFAULT_MAX_EVENT_BYTES, bound=POSITIVE, help="largest event data, in bytes")
    max_topic_length: int = setting(MAX_TOPIC_LENGTH, bound=POSITIVE)
    drain_timeout: float = setting(10.0, bound=NON_NEGATIVE)  # on SIGTERM: to publish what is buffered

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.channels or self.patterns):
            raise UsageError("nothing to read: give --channels and/or --patterns")
        if not self.brokers:
            raise UsageError("nowhere to publish: give --brokers")
        if self.lease not in LEASES:
            raise UsageError(f"--lease must be one of {', '.join(LEASES)}, not {self.lease!r}")

    def address(self) -> RedisAddress:
        password = (Path(self.redis_password_file).read_text().strip() if self.redis_password_file
                    else os.environ.get(PASSWORD_ENV) or None)
        return RedisAddress.parse(self.redis, db=self.redis_db, password=password, ca_file=self.redis_ca_file or None)

    def broker_access(self) -> Access:
        return Access(Tokens.optional(self.publish_key_file), self.broker_ca_file, self.broker_server_name)
