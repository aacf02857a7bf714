"""The operator's settings: `neoplasma operator`'s options (OperatorConfig), the controllers'
timings (Options, made from them in main.py), and where the operator's own pods run (Peers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from neoplasma.core.backoff import BackoffPolicy
from neoplasma.core.errors import UsageError
from neoplasma.core.settings import POSITIVE, Bound, Settings, setting


@dataclass(frozen=True)
class Peers:
    """Where the operator's own pods run (the chart's namespace and pod labels): NetworkPolicies
    let them reach the control port. Empty: not known (the operator runs outside the cluster)."""

    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


NO_PEERS = Peers()


@dataclass(frozen=True)
class Options:
    """The controllers' timings and what they render with (OperatorConfig.options)."""

    default_image: str
    policy_api: str = "policy/v1"
    operator: Peers = NO_PEERS  # where the operator's pods run (NetworkPolicies let them in)
    debounce: float = 0.2  # seconds after a pass for a pod change during which further ones are gathered into one
    anti_entropy: float = 5.0  # seconds between pushes of the current snapshot to each proxy (each at its own phase)
    resync: float = 60.0  # seconds between checks of the children with no event at all
    stats_interval: float = 10.0  # seconds between reads of the brokers' connection counts
    scale_interval: float = 10.0  # seconds between autoscaling decisions (load reads)
    # Seconds a membership push may take before status says MembershipSynced=False (status
    # is not written meanwhile), so that Ready does not flicker on every broker change.
    sync_grace: float = 2.0
    retry_initial: float = 1.0  # first delay after a failed API call, doubling...
    retry_max: float = 60.0  # ...up to this
    read_timeout: float = 2.0  # seconds each read of a pass (Stats, Status, /stats) and each push may take

    @property
    def retry(self) -> BackoffPolicy:
        return BackoffPolicy(self.retry_initial, self.retry_max)


@dataclass
class OperatorConfig(Settings):
    """The operator's settings; `neoplasma operator` has an option for each one."""

    namespaces: list[str] = setting(factory=list, flag="--namespace",
                                    help="watch only this namespace (repeatable; default: all namespaces)")
    liveness_port: int = setting(8080, bound=Bound(1, 65535), help="liveness endpoint port, at /healthz")
    metrics_port: int = setting(0, bound=Bound(0, 65535, note="0: off"),
                                help="serve Prometheus metrics on this port at /metrics")
    scale_interval: float = setting(Options.scale_interval, bound=POSITIVE,
                                    help="seconds between autoscaling decisions of annotated clusters")
    pod_namespace: str = setting("", env="NEOPLASMA_OPERATOR_NAMESPACE",
                                 help="the operator's own namespace (NetworkPolicies let its pods reach control ports)")
    pod_labels: str = setting("", env="NEOPLASMA_OPERATOR_POD_LABELS",
                              help="the operator's pod labels, as k=v,k=v (NetworkPolicies select its pods by them)")

    def options(self, default_image: str, policy_api: str) -> Options:
        return Options(default_image=default_image, policy_api=policy_api, scale_interval=self.scale_interval,
                       operator=self.peers())

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
