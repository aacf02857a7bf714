"""`neoplasma`: one command for every tier; each tier adds its subcommands from its own `cli` module
(with neoplasma.core.commands).

What every command shares is here: the log level, and turning the errors library code raises
(neoplasma.core.errors) into messages and exit codes. Only this module imports the tiers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from neoplasma.core.errors import NeoplasmaError
from neoplasma.core.logs import setup_logging


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
