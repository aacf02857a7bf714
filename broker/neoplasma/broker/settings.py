"""The broker's settings (`neoplasma broker` has an option for each), apart from the server: the
operator's renderer and spec parser read their defaults from here."""

from __future__ import annotations

from dataclasses import dataclass

from neoplasma.core.events import (
    DEFAULT_MAX_ELEMENTS_PER_REQUEST,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_MAX_EVENTS_PER_REQUEST,
    DEFAULT_MAX_REQUEST_BYTES,
)
from neoplasma.core.settings import NON_NEGATIVE, PORT, POSITIVE, backlog_setting, pod_name, setting
from neoplasma.core.topics import MAX_TOPIC_LENGTH
from neoplasma.core.trust import TrustSettings
from neoplasma.core.workers import cpus_now


@dataclass
class BrokerConfig(TrustSettings):
    """The broker's settings; `neoplasma broker` has an option for each one with help."""

    workers: int = setting(factory=cpus_now, bound=POSITIVE, env="NEOPLASMA_WORKERS",
                           help="processes checking publishes: this one and N - 1 others (default: the CPUs "
                           "this process may use, cgroup quota included)")
    name: str = setting(factory=lambda: pod_name("broker"),
                        help="broker name (default $NEOPLASMA_POD_NAME, else broker-HOST-PID)")
    host: str = setting("127.0.0.1", help="address to bind, 0.0.0.0 in a pod")
    grpc_port: int = setting(50051, bound=PORT, help="gRPC port")
    http_port: int = setting(8080, bound=PORT, help="HTTP publish/metrics port")
    listen_backlog: int = backlog_setting()
    max_event_bytes: int = setting(DEFAULT_MAX_EVENT_BYTES, bound=POSITIVE, help="largest event data, in bytes")
    max_topic_length: int = setting(MAX_TOPIC_LENGTH, bound=POSITIVE)
    max_request_bytes: int = setting(DEFAULT_MAX_REQUEST_BYTES, bound=POSITIVE, help="largest publish request")
    max_events_per_request: int = setting(DEFAULT_MAX_EVENTS_PER_REQUEST, bound=POSITIVE,
                                          help="most events in one publish request")
    max_elements_per_request: int = setting(DEFAULT_MAX_ELEMENTS_PER_REQUEST, bound=POSITIVE,
                                            help="most JSON values (array elements and object members) in one "
                                            "HTTP publish body, counted before it is parsed")
    publish_keys_file: str = setting("", help="file of publisher API keys, one per line (re-read when it "
                                     "changes); when given, publishing needs `Authorization: Bearer KEY`")
    max_interest_topics: int = setting(500_000, bound=POSITIVE,
                                       help="most topics a relay stream may ask for (in all and per message)")
    header_timeout: float = setting(10.0, bound=POSITIVE, help="seconds an HTTP request's headers may take")
    max_outbox_bytes: int = setting(64 * 1024 * 1024, bound=POSITIVE,
                                    help="bytes held per slow relay stream before its events are dropped")
    # Largest relay message (a single bigger event still goes alone).
    max_message_bytes: int = setting(1024 * 1024, bound=POSITIVE)
    publisher_window: float = setting(30.0, bound=POSITIVE, env="NEOPLASMA_PUBLISHER_WINDOW",
                                      help="seconds a publisher counts as connected after its last publish")
    # On SIGTERM: how long to wait for relay outboxes to drain before exiting.
    drain_timeout: float = setting(20.0, bound=NON_NEGATIVE)
    # Retention for resumable streams (docs/resume.md): longer than any rollout or reconnect.
    retention_seconds: float = setting(300.0, bound=POSITIVE, help="seconds accepted events are kept for resuming "
                                       "subscribers")
    retention_bytes: int = setting(256 * 1024 * 1024, bound=POSITIVE,
                                   help="bytes of accepted events kept for resuming subscribers")
    checkpoint_bytes: int = setting(64 * 1024 * 1024, bound=POSITIVE,
                                    help="bytes of proxies' checkpoints kept for resolving their version 3 resume "
                                    "tokens (each kept --retention-seconds and a minute more at most)")
    max_replays: int = setting(4, bound=POSITIVE, help="Replay calls (resuming subscribers' catch-up) served at once")
    max_replays_waiting: int = setting(64, bound=NON_NEGATIVE, help="Replay calls that may wait for one of those; "
                                       "more are refused (RESOURCE_EXHAUSTED)")
    replay_events_per_second: int = setting(250_000, bound=POSITIVE, help="retained events all Replay calls "
                                            "together may walk per second (~a quarter of a core)")
    # An idle relay stream is told the new head at most this often.
    head_interval: float = setting(1.0, bound=POSITIVE)
