"""`neoplasma operator`, the one way to run the operator: its options are OperatorConfig's settings."""

from __future__ import annotations

import argparse

from neoplasma.core.commands import Commands
from neoplasma.operator.settings import OperatorConfig


def add_commands(commands: Commands) -> None:
    parser = commands.add_parser("operator", help="run the Kubernetes operator (kopf)")
    OperatorConfig.add_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neoplasma.operator.main import run_operator

    return run_operator(OperatorConfig.from_args(args))
