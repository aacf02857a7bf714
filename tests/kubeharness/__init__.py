"""A real Kubernetes control plane for tests, and a stand-in kubelet.

`ControlPlane` runs etcd, kube-apiserver and kube-controller-manager (built by
`scripts/k8s-control-plane.sh`) on 127.0.0.1; `StandInKubelet` runs the pods those create as
local processes on their own loopback addresses. `kubeharness.fixtures` wraps both for pytest.
"""

from kubeharness.controlplane import BinariesMissing, ControlPlane, default_cache_dir
from kubeharness.kubelet import CommandMapper, StandInKubelet

__all__ = [
    "BinariesMissing",
    "CommandMapper",
    "ControlPlane",
    "StandInKubelet",
    "default_cache_dir",
]
