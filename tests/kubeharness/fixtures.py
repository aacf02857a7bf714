"""pytest fixtures for tests against a real control plane (load with
`pytest_plugins = ["kubeharness.fixtures"]`).

- `control_plane` (session): a started `ControlPlane`, with the CRDs of the repository's
  `crds/` folder installed before kube-controller-manager starts.
- `kubeconfig` (session): the path of its kubeconfig file.
- `namespace` (function): a fresh namespace, ready for pods, deleted afterwards.
- `kubelet` (function): a factory starting `StandInKubelet`s in that namespace; they are
  stopped after the test, and the pod logs' tails are printed when the test failed.
- `helm` (session): the helm binary ($NEOPLASMA_HELM, PATH, or the binaries' cache).

Without the binaries (or helm) the tests are skipped (reason printed at the end), or fail when
the environment variable CI is set: run `scripts/k8s-control-plane.sh`.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException

from kubeharness.controlplane import BinariesMissing, ControlPlane, body, default_cache_dir
from kubeharness.kubelet import CommandMapper, StandInKubelet, identity_command

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"

_notes: list[str] = []


def unavailable(reason: str) -> NoReturn:
    """Skip a test that needs what this machine lacks, with the reason printed at the end of the
    run; or fail it when the environment variable CI is set (there, everything must run)."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, so this is an error)", pytrace=False)
    _notes.append(f"skipped: {reason}")
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kube: needs the real Kubernetes control plane (scripts/k8s-control-plane.sh)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for note in _notes:
        terminalreporter.write_line(f"kubeharness: {note}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"kubeharness_{report.when}_failed", report.failed)
    return report


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    crd_dir = CRD_DIR if any(CRD_DIR.glob("*.yaml")) else None
    plane = ControlPlane(crd_dir=crd_dir)
    try:
        plane.start()
    except BinariesMissing as error:
        unavailable(f"real-control-plane tests: {error}")
    _notes.append(f"control plane {plane.server} started in {plane.start_seconds:.1f} s")
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def helm() -> str:
    cached = default_cache_dir() / "bin" / "helm"
    for candidate in (os.environ.get("NEOPLASMA_HELM"), shutil.which("helm"), str(cached)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    unavailable("helm not found (PATH, $NEOPLASMA_HELM or the k8s cache): run scripts/k8s-control-plane.sh")


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig_path


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base or 'test'}-{uuid.uuid4().hex[:6]}"
    with control_plane.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespace(body({"metadata": {"name": name, "labels": {"neoplasma.io/test": "true"}}}))
        control_plane.wait_for_default_service_account(name)
        yield name
        try:
            core.delete_namespace(name)
        except ApiException as error:
            if error.status != 404:
                raise


KubeletFactory = Callable[..., StandInKubelet]


@pytest.fixture
def kubelet(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[KubeletFactory]:
    """`kubelet(label_selector="app=x", command_mapper=..., namespace=..., **options)` starts a
    `StandInKubelet` (pod logs under tmp_path/pod-logs) and returns it."""
    started: list[StandInKubelet] = []
    default_namespace = namespace

    def start(
        label_selector: str = "",
        command_mapper: CommandMapper = identity_command,
        namespace: str = default_namespace,
        **options: Any,
    ) -> StandInKubelet:
        stand_in = StandInKubelet(
            control_plane.kubeconfig_path, namespace, log_dir=tmp_path / "pod-logs",
            label_selector=label_selector, command_mapper=command_mapper, **options,
        )
        started.append(stand_in.start())
        return stand_in

    yield start
    for stand_in in reversed(started):
        stand_in.stop()
    if getattr(request.node, "kubeharness_call_failed", False):
        for path in sorted((tmp_path / "pod-logs").glob("*.log")):
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-20:])
            print(f"----- {path} (last 20 lines)\n{tail}")
