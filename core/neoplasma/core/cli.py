"""`neoplasma`: one command for every tier; each tier adds its subcommands from its own `cli` module.

What every tier shares is here: the log level, running a server, and turning the errors library
code raises (neoplasma.core.errors) into messages and exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeAlias, TypeVar

from neoplasma.core.errors import NeoplasmaError
from neoplasma.core.logs import setup_logging
from neoplasma.core.net import die_with_parent, raise_fd_limit
from neoplasma.core.settings import Settings
from neoplasma.core.workers import Place

# What `add_commands(commands)` of a tier's cli module adds its subcommands to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Config = TypeVar("Config", bound=Settings)


def run_server(server: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run a server (`neoplasma broker`, `proxy`) on uvloop until it stops."""
    die_with_parent()
    raise_fd_limit()
    try:
        import uvloop

        runner: Callable[..., object] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
        runner = asyncio.run
    runner(server())
    return 0


def add_server(commands: Commands, name: str, help: str, config: type[Config],
               serve: Callable[[Config], Coroutine[Any, Any, None]],
               supervise: Callable[[Config], Coroutine[Any, Any, None]] | None = None) -> None:
    """The command `name`, with an option per setting of `config`, running `serve(config)`, or
    `supervise(config)` when given and the config asks for more than one worker (neoplasma.core.workers)."""
    parser = commands.add_parser(name, help=help)
    config.add_options(parser)

    def run(args: argparse.Namespace) -> int:
        settings = config.from_args(args)
        if supervise is not None and getattr(settings, "workers", 1) > 1 and Place.here() is None:
            return run_server(lambda: supervise(settings))
        return run_server(lambda: serve(settings))

    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    from neoplasma.broker import cli as broker
    from neoplasma.ingest import cli as ingest
    from neoplasma.local import cli as local
    from neoplasma.operator import cli as operator
    from neoplasma.proxy import cli as proxy

    parser = argparse.ArgumentParser(prog="neoplasma", description="Real-time event push: brokers, proxies, "
                                     "an operator, and a local runtime.")
    parser.add_argument("--log-level", default=None, help="default: $NEOPLASMA_LOG_LEVEL or info; `up` passes "
                        "it to its children, which log at warning unless it is given",
                        choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for tier in (broker, proxy, ingest, local, operator):
        tier.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    explicit = args.log_level or os.environ.get("NEOPLASMA_LOG_LEVEL")
    setup_logging(explicit or "info")
    if explicit:
        os.environ["NEOPLASMA_LOG_LEVEL"] = explicit  # servers started by `up` inherit it
    try:
        return int(args.func(args))
    except NeoplasmaError as error:
        for line in str(error).splitlines():
            print(f"neoplasma {args.command}: {line}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
