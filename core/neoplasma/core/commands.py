"""What every tier's `cli` module shares: the subparsers it adds its commands to, and running a
server (neoplasma.core.lifecycle). The `neoplasma` command itself (neoplasma.cli) imports the
tiers; the tiers import this."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from neoplasma.core.lifecycle import Service, announce_serving, serve
from neoplasma.core.memory import settle_heap
from neoplasma.core.net import die_with_parent, presize_fd_table, raise_fd_limit
from neoplasma.core.settings import Settings
from neoplasma.core.workers import Place

# What `add_commands(commands)` of a tier's cli module adds its subcommands to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Config = TypeVar("Config", bound=Settings)


def run_server(service: Callable[[], Service]) -> int:
    """Run a server (`neoplasma broker`, `proxy`, `ingest-redis`) on uvloop until it stops; its exit code.
    The service is made in the event loop. Once it serves, its heap is settled (`settle_heap`): what start-up
    made is left out of every later garbage collection. Without it a proxy's full collection, visiting the
    modules' objects with those of a burst of 1000 connecting subscribers, held its loop 65-89 ms
    (bench/forged_resumes.py: the honest subscribers' p99 under attack was that pause). Its descriptor table is
    made for the open-file limit (up to 65,536) first, for the same reason (`presize_fd_table`)."""
    die_with_parent()
    presize_fd_table(raise_fd_limit())  # (before gRPC starts its threads)
    try:
        import uvloop

        runner: Callable[..., int] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
        runner = asyncio.run

    def announced(started: Service, fields: dict[str, object]) -> None:
        announce_serving(started, fields)
        settle_heap(f"{started.kind}_started")

    async def main() -> int:
        return await serve(service(), announced=announced)

    return runner(main())


def add_server(commands: Commands, name: str, help: str, config: type[Config],
               service: Callable[[Config], Service], supervise: Callable[[Config], Service] | None = None) -> None:
    """The command `name`, with an option per setting of `config`, running `service(config)`, or
    `supervise(config)` when given and the config asks for more than one worker (neoplasma.core.workers)."""
    parser = commands.add_parser(name, help=help)
    config.add_options(parser)

    def run(args: argparse.Namespace) -> int:
        settings = config.from_args(args)
        if supervise is not None and getattr(settings, "workers", 1) > 1 and Place.here() is None:
            return run_server(lambda: supervise(settings))
        return run_server(lambda: service(settings))

    parser.set_defaults(func=run)
