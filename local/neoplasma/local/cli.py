"""`neoplasma up`, `publish` and `subscribe`: a cluster on this machine, and trying it by hand."""

from __future__ import annotations

import argparse
import asyncio
import os

from neoplasma.core.commands import Commands
from neoplasma.core.errors import UsageError
from neoplasma.core.settings import NON_NEGATIVE, POSITIVE, argument_type
from neoplasma.proxy.settings import SUBSCRIBER_AUTH, ProxyConfig, subscriber_auth_args


def add_commands(commands: Commands) -> None:
    p = commands.add_parser("up", help="run a whole cluster on this machine (127.0.0.1)")
    p.add_argument("--brokers", type=argument_type(int, NON_NEGATIVE), default=2,
                   help="number of brokers (default 2)")
    p.add_argument("--proxies", type=argument_type(int, NON_NEGATIVE), default=2,
                   help="number of proxies (default 2)")
    p.add_argument("--workers", type=argument_type(int, POSITIVE), default=1,
                   help="worker processes per broker and per proxy, as their --workers (default 1: one core each)")
    p.add_argument("--json", action="store_true", help="print the endpoints as one JSON line")
    p.add_argument("--credential-file", default="", help="file holding the cluster credential (default: a new "
                   "random one per run, in a 0600 temporary file)")
    private = p.add_argument_group("private topics: subscribers need a signed token (passed to every proxy)")
    ProxyConfig.add_options(private, only=SUBSCRIBER_AUTH)
    redis = p.add_argument_group("ingest from Redis Pub/Sub (plasma's publishers): two readers, one active")
    redis.add_argument("--redis", metavar="URL", help="Redis to read: HOST:PORT or "
                       "redis[s]://[USER:PASSWORD@]HOST:PORT "
                       "(password also from $NEOPLASMA_REDIS_PASSWORD)")
    redis.add_argument("--redis-channels", default="", help="channels to read, comma-separated")
    redis.add_argument("--redis-patterns", default="", help="channel patterns to read, comma-separated")
    scale = p.add_argument_group("autoscaling (the NeoplasmaCluster annotations of the same names)")
    scale.add_argument("--autoscale", action="store_true", help="resize brokers/proxies by load")
    for flag in ("target-connections-per-broker", "target-events-per-broker", "min-brokers", "max-brokers",
                 "target-subscribers-per-proxy", "min-proxies", "max-proxies", "scale-down-delay", "tolerance",
                 "scale-up-limit"):
        scale.add_argument(f"--{flag}", metavar="VALUE", help=f"as annotation neoplasma.io/{flag}")
    scale.add_argument("--scale-interval", type=argument_type(float, POSITIVE), default=5.0,
                       help="seconds between load readings (default 5)")
    p.set_defaults(func=cmd_up)

    p = commands.add_parser("publish", help="publish one event to a broker")
    p.add_argument("topic", help="topic, e.g. program:1234:views")
    p.add_argument("data", help="event data as JSON, e.g. '{\"views\": 3}'")
    p.add_argument("--broker", default="127.0.0.1:50051", help="broker gRPC address")
    p.set_defaults(func=cmd_publish)

    p = commands.add_parser("subscribe", help="print events from a proxy (SSE)")
    p.add_argument("topics", nargs="+", help="topics (a topic also receives every topic below it)")
    p.add_argument("--proxy", default="127.0.0.1:8080", help="proxy HTTP address")
    p.add_argument("--count", type=argument_type(int, NON_NEGATIVE), default=0,
                   help="stop after N events (0: never)")
    p.add_argument("--token", default="", help="a subscriber token for private topics (see `neoplasma token`), "
                   "sent as Authorization: Bearer")
    p.set_defaults(func=cmd_subscribe)


def cmd_up(args: argparse.Namespace) -> int:
    from neoplasma.core import scaling
    from neoplasma.local.runtime import run_up

    os.environ.setdefault("NEOPLASMA_LOG_LEVEL", "warning")  # unless given: keeps the table readable
    flags = {
        scaling.AUTOSCALE: "true" if args.autoscale else None,
        scaling.TARGET_CONNECTIONS: args.target_connections_per_broker,
        scaling.TARGET_EVENTS: args.target_events_per_broker,
        scaling.MIN_BROKERS: args.min_brokers, scaling.MAX_BROKERS: args.max_brokers,
        scaling.TARGET_SUBSCRIBERS: args.target_subscribers_per_proxy,
        scaling.MIN_PROXIES: args.min_proxies, scaling.MAX_PROXIES: args.max_proxies,
        scaling.SCALE_DOWN_DELAY: args.scale_down_delay, scaling.TOLERANCE: args.tolerance,
        scaling.SCALE_UP_LIMIT: args.scale_up_limit,
    }
    annotations = {key: value for key, value in flags.items() if value is not None}
    if args.redis and not (args.redis_channels or args.redis_patterns):
        raise UsageError("--redis needs --redis-channels and/or --redis-patterns: what to read")
    ingest = None if not args.redis else ["--redis", args.redis, "--channels", args.redis_channels,
                                          "--patterns", args.redis_patterns]
    return run_up(brokers=args.brokers, proxies=args.proxies, as_json=args.json, annotations=annotations,
                  interval=args.scale_interval, credential_file=args.credential_file, ingest=ingest,
                  proxy_args=subscriber_auth_args(vars(args)), workers=args.workers)


def cmd_publish(args: argparse.Namespace) -> int:
    from neoplasma.local.tools import publish

    return asyncio.run(publish(args.broker, args.topic, args.data))


def cmd_subscribe(args: argparse.Namespace) -> int:
    from neoplasma.local.tools import subscribe

    return asyncio.run(subscribe(args.proxy, args.topics, args.count, args.token))
