"""`neoplasma operator`, the one way to run the operator: its options are OperatorConfig's settings."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from neoplasma.core.commands import Commands
from neoplasma.core.errors import UsageError
from neoplasma.core.settings import POSITIVE, Bound, Settings, setting
from neoplasma.operator.render import Peers


@dataclass
class OperatorConfig(Settings):
    """The operator's settings; `neoplasma operator` has an option for each one."""

    namespaces: list[str] = setting(factory=list, flag="--namespace",
                                    help="watch only this namespace (repeatable; default: all namespaces)")
    liveness_port: int = setting(8080, bound=Bound(1, 65535), help="liveness endpoint port, at /healthz")
    metrics_port: int = setting(0, bound=Bound(0, 65535, note="0: off"),
                                help="serve Prometheus metrics on this port at /metrics")
    scale_interval: float = setting(10.0, bound=POSITIVE,
                                    help="seconds between autoscaling decisions of annotated clusters")
    pod_namespace: str = setting("", env="NEOPLASMA_OPERATOR_NAMESPACE",
                                 help="the operator's own namespace (NetworkPolicies let its pods reach control ports)")
    pod_labels: str = setting("", env="NEOPLASMA_OPERATOR_POD_LABELS",
                              help="the operator's pod labels, as k=v,k=v (NetworkPolicies select its pods by them)")

    def peers(self) -> Peers:
        pairs = [item.partition("=") for item in self.pod_labels.split(",") if item.strip()]
        if any(not sep or not key.strip() for key, sep, _ in pairs):
            raise UsageError(f"--pod-labels must be k=v,k=v, got {self.pod_labels!r}")
        return Peers(self.pod_namespace, {key.strip(): value.strip() for key, _, value in pairs})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metrics_port == self.liveness_port:
            raise UsageError(f"--metrics-port and --liveness-port are both {self.liveness_port}; "
                             "choose two different ports")


def add_commands(commands: Commands) -> None:
    parser = commands.add_parser("operator", help="run the Kubernetes operator (kopf)")
    OperatorConfig.add_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neoplasma.operator.main import run_operator

    return run_operator(OperatorConfig.from_args(args))
