"""The proxy's settings (`neoplasma proxy` has an option for each), apart from the server: the
operator's renderer reads their defaults from here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neoplasma.core.settings import NON_NEGATIVE, PORT, POSITIVE, backlog_setting, pod_name, setting
from neoplasma.core.topics import MAX_TOPIC_LENGTH, MAX_TOPICS_PER_SUBSCRIPTION
from neoplasma.core.trust import TrustSettings
from neoplasma.core.workers import cpus_now
from neoplasma.proxy.auth import SubscriberAuth

# Budgets for resuming subscribers (docs/resume.md, "Budgets"): live events kept for one while it catches
# up, and for all of a proxy's at once; Replay calls a proxy runs at once (resumes asking the same
# position share one); bytes of catch-up it writes per second, all resumes together.
MAX_HELD = 10_000
MAX_HELD_PER_PROXY = 200_000
MAX_REPLAYS = 8
CATCH_UP_BYTES_PER_SECOND = 32 * 1024 * 1024

# Checkpoints (docs/resume.md, "Checkpoints"): how often a proxy registers its positions with every broker.
CHECKPOINT_SECONDS = 1.0
# The journal of a proxy process's SSE pointer ids (docs/resume.md, "Pointer ids"): how long, and how many bytes
# of it, a pointer stays resolvable (longer than a client's reconnect; ~8 MiB at 1000 events/s and 60 brokers).
JOURNAL_SECONDS = 120.0
JOURNAL_BYTES = 64 * 1024 * 1024

LINGER = 0.02  # default longest pause between dispatch rounds, seconds (Hub.run_dispatcher)
MAX_LINGER = 0.05  # default longest pause when the event loop runs behind (Hub.run_dispatcher)


@dataclass
class ProxyConfig(TrustSettings):
    """The proxy's settings; `neoplasma proxy` has an option for each one with help."""

    workers: int = setting(factory=cpus_now, bound=POSITIVE, env="NEOPLASMA_WORKERS",
                           help="worker processes sharing the ports (default: the CPUs this process may use, "
                           "cgroup quota included)")
    name: str = setting(factory=lambda: pod_name("proxy"),
                        help="proxy name (default $NEOPLASMA_POD_NAME, else proxy-HOST-PID)")
    host: str = setting("127.0.0.1", help="address to bind, 0.0.0.0 in a pod")
    http_port: int = setting(8080, bound=PORT, help="SSE/health/metrics port")
    grpc_port: int = setting(50051, bound=PORT, help="subscriber gRPC port")
    control_port: int = setting(50052, bound=PORT, help="ProxyControl port")
    listen_backlog: int = backlog_setting()
    # Static brokers, applied as membership version 0 until a push replaces them.
    brokers: list[str] = setting(factory=list, help="static broker list host:port,... (until a membership push)")
    event_query: str = "eventType"  # plasma's default query parameter
    origin: str = "*"  # Access-Control-Allow-Origin on SSE responses
    heartbeat_seconds: float = setting(10.0, bound=POSITIVE, flag="--heartbeat",
                                       help="seconds between SSE heartbeat comments")
    retry_ms: int = setting(2000, bound=POSITIVE, help="SSE retry: hint in milliseconds")
    # Closes are paced when draining, so clients may come back quickly (to another proxy),
    # which shortens the gap in which they miss events.
    drain_retry_ms: int = setting(250, bound=POSITIVE,
                                  help="SSE retry: hint sent to subscribers asked to reconnect when shutting down")
    drain_rate: float = setting(500.0, bound=POSITIVE,
                                help="subscribers asked to reconnect per second when shutting down")
    # Behind a load balancer (a Kubernetes Service), new connections keep coming until it has seen
    # readiness fail: on SIGTERM, fail readiness at once, keep serving this long, then drain.
    drain_delay: float = setting(0.0, bound=NON_NEGATIVE,
                                 help="seconds between failing readiness and the drain on SIGTERM")
    # A drain cut short by SIGKILL closes every subscriber left at once (the storm pacing avoids):
    # the operator sets this from the pod's grace period, and the drain speeds up to end in time.
    drain_within: float = setting(0.0, bound=NON_NEGATIVE,
                                  help="most seconds the drain on SIGTERM may take (0: no limit); it goes faster "
                                  "than --drain-rate when it must, to end in time")
    max_topic_length: int = setting(MAX_TOPIC_LENGTH, bound=POSITIVE)
    max_topics_per_subscription: int = setting(MAX_TOPICS_PER_SUBSCRIPTION, bound=POSITIVE,
                                               help="most topics one subscriber may name")
    max_topics: int = setting(100_000, bound=POSITIVE, help="most distinct topics this proxy's subscribers may "
                              "want at once (what it asks every broker for); a subscription past it is refused")
    max_subscription_changes: int = setting(10, bound=POSITIVE,
                                            help="subscription changes a plasma gRPC stream may make per second")
    header_timeout: float = setting(10.0, bound=POSITIVE, help="seconds an HTTP request's headers may take")
    tls_ca: str = setting("", help="PEM CA file: reach brokers over TLS, trusting this CA")
    tls_server_name: str = setting("", help="the name brokers' certificates carry (addresses are IPs)")
    # Slow-subscriber limits: unsent bytes of an SSE response, of a gRPC stream.
    max_sse_buffer: int = setting(4 * 1024 * 1024, bound=POSITIVE)
    max_grpc_buffer: int = setting(4 * 1024 * 1024, bound=POSITIVE)
    grpc_keepalive: float = setting(30.0, bound=POSITIVE, help="seconds between PINGs to subscriber gRPC "
                                    "connections; one left unanswered that long closes the connection")
    max_message_bytes: int = setting(1024 * 1024, bound=POSITIVE)
    # plasma's Go server allows any number; services may multiplex thousands of streams on one channel.
    max_streams_per_connection: int = setting(10_000, bound=POSITIVE, help="most gRPC calls one subscriber "
                                              "connection may have open at once; a client opening more is cut off")
    linger_seconds: float = setting(LINGER, bound=NON_NEGATIVE, help="under load, the longest the proxy lets "
                                    "events pile up for fewer, larger writes (Hub.run_dispatcher)")
    max_linger_seconds: float = setting(MAX_LINGER, bound=NON_NEGATIVE, help="when the proxy's event loop runs "
                                        "behind (overloaded), the pause between delivery rounds grows up to this: "
                                        "fewer, larger writes until it keeps up (bounds the latency added)")
    max_held_events_per_resume: int = setting(MAX_HELD, bound=POSITIVE, help="live events kept for one resuming "
                                              "subscriber while it catches up; beyond, it resumes from now with a gap")
    max_held_events: int = setting(MAX_HELD_PER_PROXY, bound=POSITIVE, help="live events kept for all resuming "
                                   "subscribers at once; beyond, those over it resume from now with a gap")
    max_replays: int = setting(MAX_REPLAYS, bound=POSITIVE, help="Replay calls to brokers at once (resumes "
                               "from the same position share one); others wait their turn")
    catch_up_bytes_per_second: float = setting(CATCH_UP_BYTES_PER_SECOND, bound=POSITIVE, help="bytes of event "
                                               "data this proxy writes per second to resuming subscribers, all "
                                               "together (the rest of its time is for live events)")
    pointer_journal_seconds: float = setting(JOURNAL_SECONDS, bound=POSITIVE, help="seconds an SSE pointer id "
                                             "stays resolvable (the proxy's journal of what its pointers mean)")
    pointer_journal_bytes: int = setting(JOURNAL_BYTES, bound=POSITIVE, help="most bytes the journal of SSE "
                                         "pointer ids holds (the oldest go first)")
    checkpoint_seconds: float = setting(CHECKPOINT_SECONDS, bound=NON_NEGATIVE, help="seconds between checkpoints "
                                        "of this proxy's positions registered with every broker, while they move "
                                        "(full resume tokens are relative to the last: version 3); 0: none, "
                                        "version 2 tokens")
    # A resuming subscriber waits at most this long for the brokers' links (a restarted proxy's
    # membership, interest acknowledgements) and for each relay to reach its replay.
    resume_wait_seconds: float = setting(10.0, bound=POSITIVE,
                                         help="seconds a resuming subscriber waits for the broker links")
    # Private topics (neoplasma.proxy.auth): with a keys or JWKS file, only --public-topics are read without a token.
    subscriber_jwt_keys_file: str = setting("", help="file of HS256 secrets, one per line (re-read when it changes): "
                                            "subscribers need a token signed with one for private topics")
    subscriber_jwks_file: str = setting("", help="JWKS file of RS256/ES256/EdDSA public keys (re-read when it "
                                        "changes): subscribers need a token signed with one for private topics")
    subscriber_jwt_audience: str = setting("", help="the `aud` subscriber tokens must name (unset: not checked)")
    public_topics: list[str] = setting(factory=list, help="topic prefixes anyone may read without a token when "
                                       "keys are configured (without keys every topic is public)")

    def subscriber_auth(self) -> SubscriberAuth:
        return SubscriberAuth(self.subscriber_jwt_keys_file, self.subscriber_jwks_file, self.subscriber_jwt_audience,
                              self.public_topics)


# The settings of private topics, which `neoplasma up` takes too and passes to its proxies.
SUBSCRIBER_AUTH = ("subscriber_jwt_keys_file", "subscriber_jwks_file", "subscriber_jwt_audience", "public_topics")


def subscriber_auth_args(values: Mapping[str, Any]) -> list[str]:
    """The proxy options giving the private-topic settings in `values` (field name: value; unset ones left out).
    The files must be usable: UsageError otherwise, before any proxy starts."""
    given = {name: values[name] for name in SUBSCRIBER_AUTH if values.get(name)}
    config = ProxyConfig(**given)
    config.subscriber_auth()
    return config.to_args(only=given)
