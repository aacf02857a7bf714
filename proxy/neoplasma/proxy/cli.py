"""`neoplasma proxy`: its options are ProxyConfig's settings; `neoplasma token` mints a subscriber token."""

from __future__ import annotations

import argparse
import re

from neoplasma.core.commands import Commands, add_server
from neoplasma.core.errors import UsageError
from neoplasma.proxy.pod import PodService
from neoplasma.proxy.server import ProxyService
from neoplasma.proxy.settings import ProxyConfig

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL = 366 * 86400


def duration(text: str) -> float:
    """`90`, `90s`, `10m`, `2h`, `1d`: seconds, more than 0 and at most a year."""
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match[1]) * _UNIT[match[2]] if match else 0.0
    if not 0 < seconds <= MAX_TTL:
        raise argparse.ArgumentTypeError(f"must be a duration such as 90s, 10m, 2h or 1d (at most 366d), not {text!r}")
    return seconds


def add_commands(commands: Commands) -> None:
    add_server(commands, "proxy", "run a proxy (SSE + plasma gRPC for subscribers)", ProxyConfig, ProxyService,
               PodService)
    p = commands.add_parser("token", help="mint an HS256 subscriber token for private topics (to try them out)")
    p.add_argument("--keys-file", required=True, help="the proxies' --subscriber-jwt-keys-file (its first key signs)")
    p.add_argument("--topics", required=True, help="topic prefixes the token allows, comma-separated")
    p.add_argument("--ttl", type=duration, default=600.0, help="how long it is valid: 90s, 10m, 2h, 1d (default 10m)")
    p.add_argument("--audience", default="", help="the `aud` claim: the proxies' --subscriber-jwt-audience")
    p.set_defaults(func=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    from neoplasma.core.topics import InvalidTopic, check_topics
    from neoplasma.core.trust import WatchedFile
    from neoplasma.proxy.auth import MAX_TOKEN_TOPICS, mint, secret_lines

    secret = WatchedFile(args.keys_file, secret_lines, "subscriber JWT keys").current()[0]
    try:
        topics = check_topics([t.strip() for t in args.topics.split(",") if t.strip()], max_topics=MAX_TOKEN_TOPICS)
    except InvalidTopic as exc:
        raise UsageError(f"--topics: {exc}") from None
    if not topics:
        raise UsageError("--topics: give at least one topic prefix, e.g. user:42")
    print(mint(secret, topics, args.ttl, args.audience))
    return 0
