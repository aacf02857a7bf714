"""A stand-in kubelet: runs the pods of a test's control plane as local processes.

There is no real kubelet (nor container runtime) on the test machines. `StandInKubelet`
watches the pods of one namespace that match a label selector and, for each new one:

- binds it to the Node `harness-node` (created once) through the `binding` subresource;
- gives it its own loopback address (127.0.X.Y, never 127.0.0.1) as pod IP, so many pods can
  listen on the same port number; the process must bind that address (e.g. from a downward-API
  `status.podIP` env var), not 0.0.0.0;
- runs its first container's command locally (`$(VAR)` expanded, env with `value`, downward-API
  `fieldRef`, ConfigMap/Secret refs), through a `CommandMapper` that turns the image's command
  into a local one (e.g. `neoplasma ...` -> `python -m neoplasma ...`);
- runs the readiness probe (httpGet, tcpSocket, grpc, exec) against the pod IP and writes the
  pod status (phase, IPs, conditions, containerStatuses) through the `status` subresource;
- restarts a process that exits (bumping restartCount) as restartPolicy says;
- on graceful deletion sends SIGTERM, waits up to the grace period, kills, and deletes the pod
  with grace 0, as a kubelet does.

Other containers of a pod are not run; they are reported ready so that the pod can be Ready.
Init containers, liveness and startup probes, volumes and resource limits are ignored.
Each pod's stdout and stderr go to `<log_dir>/<namespace>_<pod>.log`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from base64 import b64decode
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import kubernetes.client
import urllib3
from kubernetes.client.exceptions import ApiException

from kubeharness.controlplane import Manifest, body, die_with_this_thread, json_of, new_api_client

log = logging.getLogger(__name__)

NODE_NAME = "harness-node"
HOST_IP = "127.0.0.1"

CommandMapper = Callable[[list[str], Manifest], list[str]]
"""Turns a container's expanded `command + args` (and the container) into a local argv."""


def identity_command(argv: list[str], container: Manifest) -> list[str]:
    """The default `CommandMapper`: run the container's command as is."""
    if not argv:
        raise ValueError(
            f"container {container['name']!r} (image {container.get('image')}) has no command or args; "
            "the stand-in kubelet cannot know the image's entrypoint: pass a command mapper"
        )
    return argv


def map_executables(
    executables: Mapping[str, Sequence[str]],
    entrypoints: Mapping[str, Sequence[str]] | None = None,
) -> CommandMapper:
    """A `CommandMapper` replacing the executable by a local command line.

    `executables` maps an executable name (e.g. "neoplasma") to what runs it here (e.g.
    `[sys.executable, "-m", "neoplasma"]`). `entrypoints` maps an image repository (without
    tag, e.g. "ghcr.io/x/neoplasma") to its ENTRYPOINT, used when a container has no `command`.
    """

    def mapper(argv: list[str], container: Manifest) -> list[str]:
        if not container.get("command") and entrypoints:
            repository = re.sub(r"(@.*|:[^/:]*)$", "", container.get("image", ""))
            if repository in entrypoints:
                argv = [*entrypoints[repository], *argv]
        argv = identity_command(argv, container)
        replacement = executables.get(argv[0]) or executables.get(os.path.basename(argv[0]))
        return [*replacement, *argv[1:]] if replacement else argv

    return mapper


class AddressPool:
    """Loopback addresses 127.0.X.Y (X >= 16, so never 127.0.0.1 nor Debian's 127.0.1.1).

    Allocation walks forward from a random start, so an address released by one pod is reused
    only after the whole pool has gone round, and addresses of concurrent test runs rarely meet.
    An address is skipped when one of the ports the pod will listen on is taken there.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_use: set[str] = set()
        self._addresses = [f"127.0.{x}.{y}" for x in range(16, 255) for y in range(1, 255)]
        self._cursor = random.randrange(len(self._addresses))

    def allocate(self, ports: Sequence[int] = ()) -> str:
        with self._lock:
            for _ in range(len(self._addresses)):
                address = self._addresses[self._cursor]
                self._cursor = (self._cursor + 1) % len(self._addresses)
                if address not in self._in_use and all(_port_free(address, p) for p in ports):
                    self._in_use.add(address)
                    return address
        raise RuntimeError("no free loopback address left in 127.0.16.0-127.0.254.255")

    def release(self, address: str) -> None:
        with self._lock:
            self._in_use.discard(address)


ADDRESS_POOL = AddressPool()
"""Shared by every kubelet in this process, so their pods never share an address."""


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_VAR_REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined references are replaced, `$$` escapes `$`, and
    references to undefined variables stay as they are."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return variables.get(match.group(1), match.group(0))

    return _VAR_REFERENCE.sub(replace, text)


class StandInKubelet:
    """Runs the pods matching `label_selector` in `namespace` as local processes.

    Start with `start()` (a background thread watches the pods); `stop()` stops every process
    and deletes the pods it ran. Pod logs go to `log_dir`.
    """

    def __init__(
        self,
        kubeconfig: Path | str,
        namespace: str,
        log_dir: Path | str,
        label_selector: str = "",
        command_mapper: CommandMapper = identity_command,
        extra_env: Mapping[str, str] | None = None,
        max_probe_period: float = 1.0,
        node_name: str = NODE_NAME,
        address_pool: AddressPool = ADDRESS_POOL,
    ) -> None:
        """`extra_env` is added to every process's environment (under the pod's own env), e.g.
        KUBECONFIG for an operator pod. Readiness probes run at most `max_probe_period`
        seconds apart (a test need not wait out a 10 s `periodSeconds`)."""
        self.kubeconfig = Path(kubeconfig)
        self.namespace = namespace
        self.log_dir = Path(log_dir)
        self.label_selector = label_selector
        self.command_mapper = command_mapper
        self.extra_env = dict(extra_env or {})
        self.max_probe_period = max_probe_period
        self.node_name = node_name
        self.address_pool = address_pool
        self._api = new_api_client(self.kubeconfig)
        self.core = kubernetes.client.CoreV1Api(self._api)
        self._runners: dict[str, _PodRunner] = {}  # by pod uid
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch_response: object = None

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> StandInKubelet:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_node()
        self._thread = threading.Thread(target=self._watch_loop, name=f"kubelet-{self.namespace}", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop watching, stop every process (SIGTERM, then SIGKILL after `grace` s) and
        delete the pods that ran here with grace 0."""
        self._stopping.set()
        _interrupt(self._watch_response)
        if self._thread is not None:
            self._thread.join(timeout=15)
        with self._lock:
            runners = list(self._runners.values())
        for runner in runners:
            runner.terminate(grace, delete_pod=True)
        for runner in runners:
            runner.join(timeout=grace + 15)
        self._api.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> StandInKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pod_names(self) -> list[str]:
        """Names of the pods whose processes are managed here right now."""
        with self._lock:
            return sorted(r.name for r in self._runners.values() if r.is_alive())

    def process(self, pod_name: str) -> subprocess.Popen[bytes] | None:
        """The current process of a pod run here (None if there is none)."""
        runner = self._runner(pod_name)
        return runner.process if runner else None

    def pod_ip(self, pod_name: str) -> str | None:
        runner = self._runner(pod_name)
        return runner.ip if runner else None

    def log_path(self, pod_name: str) -> Path:
        return self.log_dir / f"{self.namespace}_{pod_name}.log"

    # -- internals ----------------------------------------------------------------------------

    def _runner(self, pod_name: str) -> _PodRunner | None:
        with self._lock:
            live = [r for r in self._runners.values() if r.name == pod_name]
        return live[-1] if live else None

    def _ensure_node(self) -> None:
        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        try:
            self.core.create_node(body({"apiVersion": "v1", "kind": "Node",
                                         "metadata": {"name": self.node_name, "labels": labels}}))
        except ApiException as error:
            if error.status != 409:
                raise
        resources = {"cpu": "2", "memory": "8Gi", "pods": "1000"}
        self.core.patch_node_status(self.node_name, {"status": {
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": self.node_name}],
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "stand-in kubelet", "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}],
        }})

    def _watch_loop(self) -> None:
        """List, then watch from the list's resourceVersion; list again after any error
        (e.g. 410 Gone). `stop()` interrupts the current watch."""
        while not self._stopping.is_set():
            try:
                pods = json_of(self.core.list_namespaced_pod(
                    self.namespace, label_selector=self.label_selector, _preload_content=False))
                for pod in pods["items"]:
                    self._on_pod(pod)
                self._forget_missing({pod["metadata"]["uid"] for pod in pods["items"]})
                version = pods["metadata"]["resourceVersion"]
                while not self._stopping.is_set():
                    response = self.core.list_namespaced_pod(
                        self.namespace, label_selector=self.label_selector, watch=True,
                        resource_version=version, timeout_seconds=10, _preload_content=False)
                    self._watch_response = response
                    if self._stopping.is_set():  # stop() may have missed this response
                        _interrupt(response)
                    for kind, pod in _watch_events(response):
                        version = pod["metadata"]["resourceVersion"]
                        if kind == "DELETED":
                            self._on_pod_gone(pod["metadata"]["uid"])
                        else:
                            self._on_pod(pod)
            except Exception:
                if not self._stopping.is_set():
                    log.warning("kubelet watch on %s failed; listing again", self.namespace, exc_info=True)
                    self._stopping.wait(0.5)

    def _on_pod(self, pod: Manifest) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        with self._lock:
            runner = self._runners.get(meta["uid"])
        if meta.get("deletionTimestamp"):
            grace = meta.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds", 30))
            if runner is not None:
                runner.terminate(float(grace), delete_pod=True)
            elif spec.get("nodeName") == self.node_name:
                self._delete_now(meta["name"])
            return
        if runner is not None or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        if spec.get("nodeName") not in (None, "", self.node_name):
            return
        if not spec.get("nodeName"):
            self._bind(meta["name"])
        runner = _PodRunner(self, pod)
        with self._lock:
            self._runners[meta["uid"]] = runner
        runner.start()

    def _on_pod_gone(self, uid: str) -> None:
        with self._lock:
            runner = self._runners.pop(uid, None)
        if runner is not None:
            runner.terminate(0.0, delete_pod=False)

    def _forget_missing(self, present: set[str]) -> None:
        with self._lock:
            gone = [uid for uid in self._runners if uid not in present]
        for uid in gone:
            self._on_pod_gone(uid)

    def _bind(self, pod_name: str) -> None:
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod_name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        # Read the answer raw: the client cannot deserialise the Status the API returns here.
        json_of(
            self.core.create_namespaced_pod_binding(pod_name, self.namespace, body(binding), _preload_content=False)
        )
        log.info("bound pod %s/%s to %s", self.namespace, pod_name, self.node_name)

    def _delete_now(self, pod_name: str) -> None:
        try:
            self.core.delete_namespaced_pod(pod_name, self.namespace, grace_period_seconds=0)
        except ApiException as error:
            if error.status != 404:
                raise


class _PodRunner(threading.Thread):
    """Runs one pod's process, probes it, writes its status; one thread per pod."""

    def __init__(self, kubelet: StandInKubelet, pod: Manifest) -> None:
        super().__init__(name=f"pod-{pod['metadata']['name']}", daemon=True)
        self.kubelet = kubelet
        self.core = kubelet.core
        self.pod = pod
        self.name: str = pod["metadata"]["name"]
        self.namespace: str = pod["metadata"]["namespace"]
        self.uid: str = pod["metadata"]["uid"]
        self.container: Manifest = pod["spec"]["containers"][0]
        self.ip: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._wake = threading.Event()
        self._terminate_grace: float | None = None
        self._delete_pod = False
        self._restart_count = 0
        self._last_exit: Manifest | None = None
        self._conditions: dict[str, tuple[str, str]] = {}
        self._start_time = _now()
        self._started_at = ""
        self._ready = False

    def terminate(self, grace: float, delete_pod: bool) -> None:
        if self._terminate_grace is None or grace < self._terminate_grace:
            self._terminate_grace = grace
        self._delete_pod = self._delete_pod or delete_pod
        self._wake.set()

    def run(self) -> None:
        try:
            self.ip = self.kubelet.address_pool.allocate(_declared_ports(self.pod))
            while not self._sync_volumes():  # as a kubelet: wait for the Secrets to exist
                if self._wake.wait(0.2) or self._terminate_grace is not None:
                    return
            variables = self._pod_variables()
            argv = self._argv(variables)
            self._supervise(argv, self._environment(variables))
        except Exception:
            log.exception("pod %s/%s failed in the stand-in kubelet", self.namespace, self.name)
            self._append_log("--- stand-in kubelet: error, see the test's log\n")
            self._wait_for_termination()
        finally:
            self._stop_process()
            if self.ip:
                self.kubelet.address_pool.release(self.ip)
            if self._delete_pod:
                self.kubelet._delete_now(self.name)
            with self.kubelet._lock:
                if self.kubelet._runners.get(self.uid) is self:
                    del self.kubelet._runners[self.uid]

    # -- process life cycle -----------------------------------------------------------------

    def _supervise(self, argv: list[str], env: dict[str, str]) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        backoff = 0.2
        while self._terminate_grace is None:
            self._start_process(argv, env)
            self._ready = False
            self._write_status()
            code = self._run_until_exit_or_termination()
            if code is None:
                return
            self._last_exit = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                               "startedAt": self._started_at, "finishedAt": _now()}
            self._append_log(f"--- stand-in kubelet: process exited with code {code}\n")
            self._ready = False
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                self._write_status(phase="Succeeded" if code == 0 else "Failed", terminated=True)
                self._wait_for_termination()
                return
            self._write_status(waiting="CrashLoopBackOff")
            if self._wake.wait(backoff):
                return
            backoff = min(backoff * 2, 5.0)
            self._restart_count += 1

    def _start_process(self, argv: list[str], env: dict[str, str]) -> None:
        self.kubelet.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.kubelet.log_path(self.name), "ab") as out:
            out.write(f"--- stand-in kubelet: starting {argv} on {self.ip} at {_now()}\n".encode())
            out.flush()
            self.process = subprocess.Popen(  # this thread outlives the process
                [*die_with_this_thread(), *argv],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._started_at = _now()
        log.info("pod %s/%s: started pid %d on %s", self.namespace, self.name, self.process.pid, self.ip)

    def _run_until_exit_or_termination(self) -> int | None:
        """Probe until the process exits (return its code) or termination is asked (None)."""
        assert self.process is not None
        probe: Manifest | None = self.container.get("readinessProbe")
        if probe is None:
            self._set_ready(True)
            probe = {}
        period = min(float(probe.get("periodSeconds", 10)), self.kubelet.max_probe_period)
        next_probe = time.monotonic() + float(probe.get("initialDelaySeconds", 0))
        successes = failures = 0
        next_sync = time.monotonic() + 1.0
        while True:
            if time.monotonic() >= next_sync:  # mounted Secrets' files update in place, as a kubelet's do
                self._sync_volumes()
                next_sync = time.monotonic() + 1.0
            code = self.process.poll()
            if code is not None:
                return code
            if self._terminate_grace is not None:
                return None
            if probe and time.monotonic() >= next_probe:
                if self._probe(probe):
                    successes, failures = successes + 1, 0
                    if successes >= probe.get("successThreshold", 1):
                        self._set_ready(True)
                else:
                    successes, failures = 0, failures + 1
                    if failures >= probe.get("failureThreshold", 3):
                        self._set_ready(False)
                next_probe = time.monotonic() + period
            self._wake.wait(0.05)

    def _wait_for_termination(self) -> None:
        while self._terminate_grace is None and not self.kubelet._stopping.is_set():
            self._wake.wait(1.0)

    def _stop_process(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        grace = self._terminate_grace or 0.0
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.info("pod %s/%s: no exit within %g s of SIGTERM; killing", self.namespace, self.name, grace)
        _signal_group(process, signal.SIGKILL)
        process.wait()
        self._append_log(f"--- stand-in kubelet: stopped (exit code {process.returncode}) at {_now()}\n")

    # -- readiness ---------------------------------------------------------------------------

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self._write_status()

    def _probe(self, probe: Manifest) -> bool:
        """One readiness probe (httpGet, tcpSocket, grpc or exec) against the pod IP."""
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                action = probe["httpGet"]
                scheme = action.get("scheme", "HTTP").lower()
                url = f"{scheme}://{action.get('host', self.ip)}:{self._port(action['port'])}{action.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in action.get("httpHeaders", [])}
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
                    return 200 <= int(response.status) < 400
            if "tcpSocket" in probe:
                action = probe["tcpSocket"]
                with socket.create_connection((action.get("host", self.ip), self._port(action["port"])), timeout):
                    return True
            if "grpc" in probe:
                action = probe["grpc"]
                return _grpc_health(f"{self.ip}:{action['port']}", action.get("service", ""), timeout)
            if "exec" in probe:
                env = self._environment(self._pod_variables())
                result = subprocess.run(probe["exec"]["command"], env=env, timeout=timeout, capture_output=True)
                return result.returncode == 0
        except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
            return False
        raise ValueError(f"pod {self.name}: readiness probe without a known action: {probe}")

    def _port(self, port: int | str) -> int:
        if isinstance(port, int) or port.isdigit():
            return int(port)
        for declared in self.container.get("ports", []):
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise ValueError(f"pod {self.name}: probe port {port!r} is not a named container port")

    # -- status ------------------------------------------------------------------------------

    def _condition(self, kind: str, status: bool) -> Manifest:
        value = "True" if status else "False"
        previous = self._conditions.get(kind)
        changed_at = previous[1] if previous and previous[0] == value else _now()
        self._conditions[kind] = (value, changed_at)
        condition: Manifest = {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": changed_at}
        if not status and kind in ("Ready", "ContainersReady"):
            condition["reason"] = "ContainersNotReady"
            condition["message"] = f"containers with unready status: [{self.container['name']}]"
        return condition

    def _write_status(self, phase: str = "Running", waiting: str | None = None, terminated: bool = False) -> None:
        running = waiting is None and not terminated
        ready = self._ready and running
        state: Manifest
        if running:
            state = {"running": {"startedAt": self._started_at}}
        elif terminated:
            state = {"terminated": self._last_exit}
        else:
            state = {"waiting": {"reason": waiting, "message": "back-off restarting failed container"}}
        statuses = [{
            "name": self.container["name"], "image": self.container.get("image", ""),
            "imageID": f"stand-in://{self.container.get('image', '')}", "containerID": f"stand-in://{self.uid}",
            "ready": ready, "started": running, "restartCount": self._restart_count, "state": state,
            "lastState": {"terminated": self._last_exit} if self._last_exit else {},
        }]
        for other in self.pod["spec"]["containers"][1:]:  # not run; reported ready so the pod can be
            statuses.append({
                "name": other["name"], "image": other.get("image", ""), "imageID": f"stand-in://{other.get('image')}",
                "ready": True, "started": True, "restartCount": 0,
                "state": {"running": {"startedAt": self._start_time}},
            })
        status = {
            "phase": phase, "hostIP": HOST_IP, "podIP": self.ip, "podIPs": [{"ip": self.ip}],
            "startTime": self._start_time, "qosClass": "BestEffort",
            "conditions": [
                self._condition("PodScheduled", True),
                self._condition("Initialized", True),
                self._condition("ContainersReady", ready),
                self._condition("Ready", ready),
            ],
            "containerStatuses": statuses,
        }
        try:
            self.core.patch_namespaced_pod_status(self.name, self.namespace, {"status": status})
        except ApiException as error:
            if error.status != 404:
                raise
        log.info("pod %s/%s: %s ip=%s ready=%s restarts=%d", self.namespace, self.name,
                 phase, self.ip, ready, self._restart_count)

    # -- environment -------------------------------------------------------------------------

    def _environment(self, pod_vars: Mapping[str, str]) -> dict[str, str]:
        """The process's environment: ours, `extra_env`, HOSTNAME, then the container's env."""
        return {**os.environ, **self.kubelet.extra_env, "HOSTNAME": self.name, **pod_vars}

    def _pod_variables(self) -> dict[str, str]:
        """The container's envFrom and env, resolved as Kubernetes does."""
        pod_vars: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            values = self._env_source(source)
            pod_vars.update({f"{source.get('prefix', '')}{k}": v for k, v in values.items()})
        for var in self.container.get("env", []):
            value = self._env_value(var, pod_vars)
            if value is not None:
                pod_vars[var["name"]] = value
        return pod_vars

    def _env_value(self, var: Manifest, defined: Mapping[str, str]) -> str | None:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), defined)
        source = var["valueFrom"]
        if "fieldRef" in source:
            return self._field(source["fieldRef"]["fieldPath"])
        for kind, key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
            if key in source:
                ref = source[key]
                data = self._read_data(kind, ref["name"], ref.get("optional", False))
                return data.get(ref["key"]) if ref.get("optional") else data[ref["key"]]
        log.warning("pod %s: env %s: %s is not supported; left unset", self.name, var["name"], list(source))
        return None

    def _env_source(self, source: Manifest) -> dict[str, str]:
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if key in source:
                return self._read_data(kind, source[key]["name"], source[key].get("optional", False))
        return {}

    def _read_data(self, kind: str, name: str, optional: bool) -> dict[str, str]:
        try:
            if kind == "secret":
                secret = json_of(self.core.read_namespaced_secret(name, self.namespace, _preload_content=False))
                return {k: b64decode(v).decode() for k, v in secret.get("data", {}).items()}
            config_map = json_of(self.core.read_namespaced_config_map(name, self.namespace, _preload_content=False))
            return dict(config_map.get("data", {}))
        except ApiException as error:
            if error.status == 404 and optional:
                return {}
            raise

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.kubelet.node_name,
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", "default"),
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": HOST_IP,
        }
        if path in simple:
            return str(simple[path] or "")
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str(meta.get(match.group(1), {}).get(match.group(2), ""))
        raise ValueError(f"pod {self.name}: downward-API fieldRef {path!r} is not supported")

    def _argv(self, variables: Mapping[str, str]) -> list[str]:
        parts = [*self.container.get("command", []), *self.container.get("args", [])]
        argv = [expand(part, variables) for part in parts]
        for mount_path, local in self._mounts().items():  # mounted Secrets live in a local folder
            argv = [str(local) + arg[len(mount_path):] if arg.startswith(mount_path + "/") else arg for arg in argv]
        return self.kubelet.command_mapper(argv, self.container)

    def _mounts(self) -> dict[str, Path]:
        """The container's Secret volumes: mount path -> the local folder standing for it."""
        secrets = {v["name"]: v["secret"]["secretName"] for v in self.pod["spec"].get("volumes", []) if "secret" in v}
        root = self.kubelet.log_dir.parent / "volumes" / self.name
        mounts = self.container.get("volumeMounts", [])
        return {m["mountPath"]: root / m["name"] for m in mounts if m["name"] in secrets}

    def _sync_volumes(self) -> bool:
        """Write the Secret volumes' files (replaced atomically when they change); False while a
        Secret is missing."""
        secrets = {v["name"]: v["secret"]["secretName"] for v in self.pod["spec"].get("volumes", []) if "secret" in v}
        for local in self._mounts().values():
            try:
                data = self._read_data("secret", secrets[local.name], optional=False)
            except Exception:
                return False
            local.mkdir(parents=True, exist_ok=True)
            for key, value in data.items():
                path = local / key
                if not path.exists() or path.read_text() != value:
                    (local / f".{key}.new").write_text(value)
                    os.replace(local / f".{key}.new", path)
        return True

    def _append_log(self, text: str) -> None:
        try:
            with open(self.kubelet.log_path(self.name), "a") as out:
                out.write(text)
        except OSError:
            pass


def _watch_events(response: object) -> Iterator[tuple[str, Manifest]]:
    """(type, object) pairs from a watch made with `_preload_content=False`."""
    assert isinstance(response, urllib3.BaseHTTPResponse), type(response)
    try:
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.data.decode(errors="replace"))
        for line in response:
            if line.strip():
                event = json.loads(line)
                if event["type"] == "ERROR":
                    raise ApiException(status=event["object"].get("code"), reason=event["object"].get("message"))
                if event["type"] != "BOOKMARK":
                    yield event["type"], event["object"]
    finally:
        response.release_conn()


def _interrupt(response: object) -> None:
    """Make a blocked read of a streaming response (from another thread) return."""
    try:
        if isinstance(response, urllib3.HTTPResponse):
            response.shutdown()
    except (OSError, ValueError, RuntimeError):
        pass  # already finished


def _declared_ports(pod: Manifest) -> list[int]:
    return sorted({int(p["containerPort"]) for c in pod["spec"]["containers"] for p in c.get("ports", [])})


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _grpc_health(target: str, service: str, timeout: float) -> bool:
    """grpc.health.v1.Health/Check with hand-encoded protobuf (no extra package needed)."""
    import grpc

    encoded = service.encode()
    request = (b"\x0a" + _varint(len(encoded)) + encoded) if encoded else b""
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            response: bytes = check(request, timeout=timeout)
        except grpc.RpcError:
            return False
    return response == b"\x08\x01"  # status: SERVING


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
