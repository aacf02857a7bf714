"""`neoplasma` command line: one entry point for every tier and the local runtime."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Callable, Sequence

from neoplasma.core.logs import setup_logging
from neoplasma.core.net import die_with_parent, raise_fd_limit


def _env_name(default_prefix: str) -> str:
    return os.environ.get("NEOPLASMA_POD_NAME") or f"{default_prefix}-{socket.gethostname()}-{os.getpid()}"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def _run(coro_factory: Callable[[], object]) -> int:
    die_with_parent()
    raise_fd_limit()
    try:
        import uvloop

        runner: Callable[..., object] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
        runner = asyncio.run
    runner(coro_factory())
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from neoplasma.broker.server import BrokerConfig, serve

    config = BrokerConfig(name=args.name or _env_name("broker"), host=args.host, grpc_port=args.grpc_port,
                          http_port=args.http_port, max_event_bytes=args.max_event_bytes,
                          max_outbox_bytes=args.max_outbox_bytes, publisher_window=args.publisher_window,
                          retention_seconds=args.retention_seconds, retention_bytes=args.retention_bytes)
    return _run(lambda: serve(config))


def cmd_proxy(args: argparse.Namespace) -> int:
    from neoplasma.proxy.server import ProxyConfig, serve

    brokers = [b for b in (args.brokers or "").split(",") if b]
    config = ProxyConfig(name=args.name or _env_name("proxy"), host=args.host, http_port=args.http_port,
                         grpc_port=args.grpc_port, control_port=args.control_port, brokers=brokers,
                         heartbeat_seconds=args.heartbeat, retry_ms=args.retry_ms,
                         drain_rate=args.drain_rate, drain_retry_ms=args.drain_retry_ms,
                         resume_wait_seconds=args.resume_wait_seconds)
    return _run(lambda: serve(config))


def cmd_up(args: argparse.Namespace) -> int:
    from neoplasma.core import scaling
    from neoplasma.local.runtime import run_up

    flags = {
        scaling.AUTOSCALE: "true" if args.autoscale else None,
        scaling.TARGET_CONNECTIONS: args.target_connections_per_broker,
        scaling.MIN_BROKERS: args.min_brokers, scaling.MAX_BROKERS: args.max_brokers,
        scaling.TARGET_SUBSCRIBERS: args.target_subscribers_per_proxy,
        scaling.MIN_PROXIES: args.min_proxies, scaling.MAX_PROXIES: args.max_proxies,
        scaling.SCALE_DOWN_DELAY: args.scale_down_delay, scaling.TOLERANCE: args.tolerance,
        scaling.SCALE_UP_LIMIT: args.scale_up_limit,
    }
    annotations = {key: value for key, value in flags.items() if value is not None}
    return run_up(brokers=args.brokers, proxies=args.proxies, as_json=args.json, annotations=annotations,
                  interval=args.scale_interval)


def cmd_publish(args: argparse.Namespace) -> int:
    from neoplasma.local.tools import publish

    return asyncio.run(publish(args.broker, args.topic, args.data))


def cmd_subscribe(args: argparse.Namespace) -> int:
    from neoplasma.local.tools import subscribe

    return asyncio.run(subscribe(args.proxy, args.topics, args.count))


def cmd_operator(args: argparse.Namespace) -> int:
    from neoplasma.operator.main import run_operator

    return run_operator(namespaces=args.namespace, liveness_port=args.liveness_port, metrics_port=args.metrics_port,
                        scale_interval=args.scale_interval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoplasma", description="Real-time event push: brokers, proxies, "
                                     "an operator, and a local runtime.")
    parser.add_argument("--log-level", default=None, help="default: $NEOPLASMA_LOG_LEVEL or info; `up` passes "
                        "it to its children, which log at warning unless it is given",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run a broker (publish + relay to proxies)")
    p.add_argument("--name", help="broker name (default: $NEOPLASMA_POD_NAME or host-pid)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a pod)")
    p.add_argument("--grpc-port", type=_positive_int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--http-port", type=_positive_int, default=8080, help="HTTP publish/metrics port (0: any)")
    p.add_argument("--max-event-bytes", type=_positive_int, default=1024 * 1024, help="largest event data")
    p.add_argument("--max-outbox-bytes", type=_positive_int, default=64 * 1024 * 1024,
                   help="bytes held per slow relay stream before its events are dropped")
    p.add_argument("--publisher-window", type=float,
                   default=float(os.environ.get("NEOPLASMA_PUBLISHER_WINDOW", "30")),
                   help="seconds a publisher counts as connected after its last publish "
                        "(default 30, or $NEOPLASMA_PUBLISHER_WINDOW)")
    p.add_argument("--retention-seconds", type=_seconds, default=300.0,
                   help="how long accepted events are kept for resuming subscribers (default 300)")
    p.add_argument("--retention-bytes", type=_positive_int, default=256 * 1024 * 1024,
                   help="most bytes of events kept for resuming subscribers (default 256 MiB)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("proxy", help="run a proxy (SSE + plasma gRPC for subscribers)")
    p.add_argument("--name", help="proxy name (default: $NEOPLASMA_POD_NAME or host-pid)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a pod)")
    p.add_argument("--http-port", type=_positive_int, default=8080, help="SSE/health/metrics port (0: any)")
    p.add_argument("--grpc-port", type=_positive_int, default=50051, help="subscriber gRPC port (0: any)")
    p.add_argument("--control-port", type=_positive_int, default=50052, help="ProxyControl port (0: any)")
    p.add_argument("--brokers", help="static broker list host:port,... (until a membership push)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between SSE heartbeat comments")
    p.add_argument("--retry-ms", type=_positive_int, default=2000, help="SSE retry: hint in milliseconds")
    p.add_argument("--drain-retry-ms", type=_positive_int, default=250,
                   help="SSE retry: hint sent to subscribers asked to reconnect when shutting down")
    p.add_argument("--drain-rate", type=float, default=500.0,
                   help="subscribers asked to reconnect per second when shutting down")
    p.add_argument("--resume-wait-seconds", type=_seconds, default=10.0,
                   help="how long a resuming subscriber waits for the brokers' links (default 10)")
    p.set_defaults(func=cmd_proxy)

    p = sub.add_parser("up", help="run a whole cluster on this machine (127.0.0.1)")
    p.add_argument("--brokers", type=_positive_int, default=2, help="number of brokers (default 2)")
    p.add_argument("--proxies", type=_positive_int, default=2, help="number of proxies (default 2)")
    p.add_argument("--json", action="store_true", help="print the endpoints as one JSON line")
    scale = p.add_argument_group("autoscaling (the NeoplasmaCluster annotations of the same names)")
    scale.add_argument("--autoscale", action="store_true", help="resize brokers/proxies by load")
    for flag in ("target-connections-per-broker", "min-brokers", "max-brokers", "target-subscribers-per-proxy",
                 "min-proxies", "max-proxies", "scale-down-delay", "tolerance", "scale-up-limit"):
        scale.add_argument(f"--{flag}", metavar="VALUE", help=f"as annotation neoplasma.io/{flag}")
    scale.add_argument("--scale-interval", type=float, default=5.0, help="seconds between load readings")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("publish", help="publish one event to a broker")
    p.add_argument("topic", help="topic, e.g. program:1234:views")
    p.add_argument("data", help="event data as JSON, e.g. '{\"views\": 3}'")
    p.add_argument("--broker", default="127.0.0.1:50051", help="broker gRPC address")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("subscribe", help="print events from a proxy (SSE)")
    p.add_argument("topics", nargs="+", help="topics (a topic also receives every topic below it)")
    p.add_argument("--proxy", default="127.0.0.1:8080", help="proxy HTTP address")
    p.add_argument("--count", type=_positive_int, default=0, help="stop after N events (0: never)")
    p.set_defaults(func=cmd_subscribe)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    p.add_argument("--namespace", action="append", default=[],
                   help="watch only this namespace (repeatable; default: all namespaces)")
    p.add_argument("--liveness-port", type=_positive_int, default=8080, help="liveness endpoint port")
    p.add_argument("--metrics-port", type=_positive_int, default=0,
                   help="serve Prometheus metrics on this port at /metrics (default 0: off)")
    p.add_argument("--scale-interval", type=_seconds, default=10.0,
                   help="seconds between autoscaling decisions of annotated clusters (default 10)")
    p.set_defaults(func=cmd_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    explicit = args.log_level or os.environ.get("NEOPLASMA_LOG_LEVEL")
    setup_logging(explicit or "info")
    if args.command == "up" and not explicit:
        os.environ["NEOPLASMA_LOG_LEVEL"] = "warning"  # keep the table readable; children inherit it
    elif explicit:
        os.environ["NEOPLASMA_LOG_LEVEL"] = explicit
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
