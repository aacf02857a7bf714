"""etcd + kube-apiserver + kube-controller-manager on 127.0.0.1, for tests.

The binaries come from `scripts/k8s-control-plane.sh` (kube-apiserver and
kube-controller-manager v1.20.2 in a cache directory, etcd from Debian). Everything runs on
free loopback ports in a temporary directory and is stopped by `ControlPlane.stop()`.

    with ControlPlane(crd_dir=Path("crds")) as cp:
        core = kubernetes.client.CoreV1Api(cp.api_client())
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import kubernetes.client
import kubernetes.config
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

K8S_VERSION = "v1.20.2"
INSTALL_SCRIPT = "scripts/k8s-control-plane.sh"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
# Controllers that need a cloud, a scheduler, real nodes or volumes are left out.
CONTROLLERS = (
    "*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route,-attachdetach,"
    "-persistentvolume-binder,-persistentvolume-expander,-ttl,-bootstrapsigner,-tokencleaner"
)

T = TypeVar("T")
Manifest = dict[str, Any]
"""A Kubernetes object as JSON (camelCase keys, as in YAML manifests)."""


class BinariesMissing(RuntimeError):
    """The control plane's binaries are not installed."""


class ControlPlaneError(RuntimeError):
    """A control plane process failed to start or become ready."""


def default_cache_dir() -> Path:
    """Where `scripts/k8s-control-plane.sh` puts the binaries (same default as the script)."""
    env = os.environ.get("NEOPLASMA_K8S_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "neoplasma" / f"k8s-{K8S_VERSION}"


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    description: str,
    interval: float = 0.1,
) -> T:
    """Poll `condition` until it returns a truthy value and return that value.

    Exceptions raised by `condition` count as "not yet"; the last one is chained to the
    `TimeoutError` raised after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
            last_error = None
        except Exception as error:
            last_error = error
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {description}") from last_error
        time.sleep(interval)


def new_api_client(kubeconfig: Path | str) -> kubernetes.client.ApiClient:
    """A new API client for the current context of a kubeconfig file."""
    client: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    return client


def body(manifest: Manifest) -> Any:
    """Pass a JSON object as a request body: the client accepts them, though typed for models."""
    return manifest


def json_of(response: object) -> Manifest:
    """The JSON body of a client call made with `_preload_content=False`; raises
    `ApiException` for an error status. (Sidesteps the client's models where they get in the
    way, e.g. the Status answering a pod binding.)"""
    assert isinstance(response, urllib3.BaseHTTPResponse), type(response)
    data = response.data
    response.release_conn()
    if not 200 <= response.status < 300:
        raise ApiException(status=response.status, reason=data.decode(errors="replace"))
    result: Manifest = json.loads(data)
    return result


def die_with_this_thread() -> list[str]:
    """A command prefix making the child get SIGKILL when the thread starting it ends (also
    when the test process is killed), so no process outlives a killed test run; [] when
    util-linux's setpriv is missing. Use it only from threads that outlive their children."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path

    @classmethod
    def find(cls, cache_dir: Path) -> Binaries:
        """Locate the binaries, or raise `BinariesMissing` saying how to install them."""
        etcd = shutil.which("etcd") or "/usr/bin/etcd"
        found = cls(
            etcd=Path(etcd),
            kube_apiserver=cache_dir / "bin" / "kube-apiserver",
            kube_controller_manager=cache_dir / "bin" / "kube-controller-manager",
        )
        missing = [str(path) for path in vars(found).values() if not os.access(path, os.X_OK)]
        if missing:
            raise BinariesMissing(
                f"Kubernetes control plane binaries missing: {', '.join(missing)}. "
                f"Run `{INSTALL_SCRIPT}` (as root; builds {K8S_VERSION} into {cache_dir}, "
                "about 5 minutes) or set NEOPLASMA_K8S_CACHE to where they are."
            )
        return found


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_running(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ControlPlaneError(
                f"{self.name} exited with code {code}; log {self.log_path}:\n{self.log_tail()}"
            )


class ControlPlane:
    """A single-node Kubernetes control plane (no scheduler, no kubelet) on 127.0.0.1."""

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        crd_dir: Path | str | None = None,
        work_dir: Path | str | None = None,
        keep_work_dir: bool = False,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.crd_dir = Path(crd_dir) if crd_dir else None
        self._given_work_dir = Path(work_dir) if work_dir else None
        self.keep_work_dir = keep_work_dir or os.environ.get("NEOPLASMA_K8S_KEEP") == "1"
        self.work_dir: Path | None = None
        self.server = ""
        self.token = secrets.token_hex(16)
        self.start_seconds = 0.0
        self._processes: list[_Process] = []
        self._etcd_data: Path | None = None

    # -- public API ---------------------------------------------------------------------------

    @property
    def kubeconfig_path(self) -> Path:
        return self._dir / "kubeconfig"

    @property
    def ca_path(self) -> Path:
        return self._dir / "pki" / "ca.crt"

    def start(self, timeout: float = 60.0) -> ControlPlane:
        """Start etcd, kube-apiserver, install CRDs, start kube-controller-manager, and wait
        until pods can be created in namespace `default`."""
        binaries = Binaries.find(self.cache_dir)
        began = time.monotonic()
        self.work_dir = self._given_work_dir or Path(tempfile.mkdtemp(prefix="neoplasma-k8s-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            pki = self._make_pki()
            etcd_url = self._start_etcd(binaries.etcd, timeout)
            self._start_apiserver(binaries.kube_apiserver, pki, etcd_url, timeout)
            self._write_kubeconfig()
            if self.crd_dir is not None:
                self.install_crds(self.crd_dir, timeout)
            self._start_controller_manager(binaries.kube_controller_manager, pki)
            self.wait_for_default_service_account("default", timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        log.info("control plane ready at %s in %.1f s", self.server, self.start_seconds)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process, last started first (SIGTERM, wait up to `timeout` s, SIGKILL),
        and remove the files (but not a `work_dir` given by the caller)."""
        for proc in reversed(self._processes):
            if proc.popen.poll() is None:
                began = time.monotonic()
                proc.popen.terminate()
                try:
                    proc.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %g s of SIGTERM; killing it", proc.name, timeout)
                    proc.popen.kill()
                    proc.popen.wait()
                log.debug("%s stopped in %.1f s", proc.name, time.monotonic() - began)
        self._processes.clear()
        atexit.unregister(self.stop)
        if self.keep_work_dir:
            log.info("keeping control plane files in %s and %s", self.work_dir, self._etcd_data)
            return
        if self._etcd_data is not None:
            shutil.rmtree(self._etcd_data, ignore_errors=True)
        if self.work_dir is not None and self._given_work_dir is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """The running etcd, kube-apiserver and kube-controller-manager processes."""
        return [proc.popen for proc in self._processes]

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new client authenticated as a cluster admin (group system:masters)."""
        return new_api_client(self.kubeconfig_path)

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG pointing at this control plane (for kubectl, helm, kopf)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig_path)}

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this control plane and return its result (text output)."""
        return subprocess.run(
            ["kubectl", *args], env=self.env(), capture_output=True, text=True, check=check, timeout=timeout
        )

    def install_crds(self, directory: Path | str, timeout: float = 30.0) -> list[str]:
        """Create every apiextensions.k8s.io/v1 CustomResourceDefinition in `directory`'s
        *.yaml / *.yml files and wait until each is Established; return their names.

        Install CRDs before kube-controller-manager starts (as `start()` does with `crd_dir`):
        its garbage collector only learns new types at its 30 s discovery resync.
        """
        api = kubernetes.client.ApiextensionsV1Api(self.api_client())
        names = []
        for doc in _yaml_documents(Path(directory)):
            if doc.get("kind") != "CustomResourceDefinition" or doc.get("apiVersion") != "apiextensions.k8s.io/v1":
                raise ValueError(
                    f"{directory}: expected only apiextensions.k8s.io/v1 CustomResourceDefinitions, "
                    f"found {doc.get('apiVersion')} {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
                )
            name = doc["metadata"]["name"]
            try:
                api.create_custom_resource_definition(body(doc))
            except ApiException as error:
                if error.status != 409:
                    raise
                existing = json_of(api.read_custom_resource_definition(name, _preload_content=False))
                doc["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                api.replace_custom_resource_definition(name, body(doc))
            names.append(name)
        for name in names:
            wait_for(partial(_crd_established, api, name), timeout, f"CRD {name} to be Established")
        log.info("installed CRDs: %s", ", ".join(names) or "(none)")
        return names

    def wait_for_default_service_account(self, namespace: str, timeout: float = 60.0) -> None:
        """Wait until ServiceAccount `default` in `namespace` has its token secret, which the
        ServiceAccount admission plugin of Kubernetes 1.20 needs before it admits pods."""
        core = kubernetes.client.CoreV1Api(self.api_client())

        def ready() -> bool:
            self._check_processes()
            account = core.read_namespaced_service_account("default", namespace)
            return bool(account.secrets)

        wait_for(ready, timeout, f"ServiceAccount default (with token) in namespace {namespace}")

    # -- internals ----------------------------------------------------------------------------

    @property
    def _dir(self) -> Path:
        if self.work_dir is None:
            raise RuntimeError("control plane not started")
        return self.work_dir

    def _check_processes(self) -> None:
        for proc in self._processes:
            proc.check_running()

    def _spawn(self, name: str, args: list[str]) -> _Process:
        log_path = self._dir / f"{name}.log"
        if threading.current_thread() is threading.main_thread():
            args = [*die_with_this_thread(), *args]
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = _Process(name, popen, log_path)
        self._processes.append(proc)
        return proc

    def _make_pki(self) -> dict[str, Path]:
        pki = self._dir / "pki"
        pki.mkdir()
        ca_key, ca_crt = pki / "ca.key", pki / "ca.crt"
        key, csr, crt = pki / "apiserver.key", pki / "apiserver.csr", pki / "apiserver.crt"
        ext = pki / "apiserver.ext"
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
            "extendedKeyUsage=serverAuth\n"
        )
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt,
                 "-days", "2", "-subj", "/CN=neoplasma-test-ca")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=kube-apiserver")
        _openssl("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
                 "-out", crt, "-days", "2", "-extfile", ext)
        sa_key, sa_pub = pki / "sa.key", pki / "sa.pub"
        _openssl("genrsa", "-out", sa_key, "2048")
        _openssl("rsa", "-in", sa_key, "-pubout", "-out", sa_pub)
        tokens = pki / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin,"system:masters"\n')
        return {"ca.crt": ca_crt, "apiserver.crt": crt, "apiserver.key": key,
                "sa.key": sa_key, "sa.pub": sa_pub, "tokens.csv": tokens}

    def _start_etcd(self, etcd: Path, timeout: float) -> str:
        client, peer = free_port(), free_port()
        # etcd fsyncs a lot; keep its data on tmpfs (in RAM) when there is one.
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self._dir
        _remove_orphaned_etcd_data(base)
        self._etcd_data = Path(tempfile.mkdtemp(prefix=f"neoplasma-etcd-{os.getpid()}-", dir=base))
        url = f"http://127.0.0.1:{client}"
        proc = self._spawn("etcd", [
            str(etcd), "--name", "harness", "--data-dir", str(self._etcd_data),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"harness=http://127.0.0.1:{peer}",
            "--initial-cluster-state", "new", "--log-level", "warn", "--logger", "zap",
        ])

        def healthy() -> bool:
            proc.check_running()
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return bool(json.load(response).get("health") == "true")

        wait_for(healthy, timeout, f"etcd at {url} to be healthy")
        return url

    def _start_apiserver(self, binary: Path, pki: dict[str, Path], etcd_url: str, timeout: float) -> None:
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        cert_dir = self._dir / "apiserver-certs"
        proc = self._spawn("kube-apiserver", [
            str(binary), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={port}", "--insecure-port=0", f"--cert-dir={cert_dir}",
            f"--tls-cert-file={pki['apiserver.crt']}", f"--tls-private-key-file={pki['apiserver.key']}",
            f"--token-auth-file={pki['tokens.csv']}", "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={pki['sa.pub']}",
            f"--service-account-signing-key-file={pki['sa.key']}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--profiling=false", "--v=1",
        ])
        context = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        request = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})

        def ready() -> bool:
            proc.check_running()
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return bool(response.status == 200)

        wait_for(ready, timeout, f"kube-apiserver at {self.server} to be ready (/readyz)")

    def _write_kubeconfig(self) -> None:
        ca_data = base64.b64encode(self.ca_path.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "harness", "cluster": {"server": self.server, "certificate-authority-data": ca_data}}
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [
                {"name": "harness", "context": {"cluster": "harness", "user": "admin", "namespace": "default"}}
            ],
            "current-context": "harness",
        }
        self.kubeconfig_path.write_text(yaml.safe_dump(config))
        self.kubeconfig_path.chmod(0o600)

    def _start_controller_manager(self, binary: Path, pki: dict[str, Path]) -> None:
        self._spawn("kube-controller-manager", [
            str(binary), f"--kubeconfig={self.kubeconfig_path}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--port=0",
            "--leader-elect=false", f"--service-account-private-key-file={pki['sa.key']}",
            f"--root-ca-file={pki['ca.crt']}", f"--controllers={CONTROLLERS}", "--v=1",
        ])


def _remove_orphaned_etcd_data(base: Path) -> None:
    """Remove etcd data left in `base` by test processes that were killed (they are gone)."""
    for path in base.glob("neoplasma-etcd-*-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(map(str, args))} failed:\n{result.stderr}")


def _yaml_documents(directory: Path) -> list[Manifest]:
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    docs: list[Manifest] = []
    for path in files:
        with open(path) as stream:
            docs.extend(doc for doc in yaml.safe_load_all(stream) if doc)
    return docs


def _crd_established(api: kubernetes.client.ApiextensionsV1Api, name: str) -> bool:
    crd = json_of(api.read_custom_resource_definition(name, _preload_content=False))
    conditions = crd.get("status", {}).get("conditions", [])
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

