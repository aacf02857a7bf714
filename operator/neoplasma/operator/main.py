"""`neoplasma operator`: run the kopf operator for NeoplasmaClusters."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import kopf
import kubernetes.client
import kubernetes.config
import urllib3.exceptions

from neoplasma.core.logs import get_logger
from neoplasma.operator import handlers, metrics
from neoplasma.operator.controller import OperatorState, Options
from neoplasma.operator.kube import Kube, api_client

log = get_logger("operator")


def run_operator(namespaces: list[str], liveness_port: int, metrics_port: int = 0,
                 scale_interval: float = 10.0) -> int:
    """Run until SIGTERM or SIGINT; watch `namespaces`, or every namespace when empty.

    Kubernetes is reached with the in-cluster service account, else $KUBECONFIG (or
    ~/.kube/config). The liveness endpoint is http://0.0.0.0:PORT/healthz; with
    `metrics_port`, Prometheus metrics are at http://0.0.0.0:METRICS_PORT/metrics.
    Autoscaled clusters decide their sizes every `scale_interval` seconds.
    """
    ports = [("liveness endpoint", "--liveness-port", liveness_port)]
    if metrics_port:
        ports.append(("metrics endpoint", "--metrics-port", metrics_port))
    if metrics_port and metrics_port == liveness_port:
        print(f"neoplasma operator: --metrics-port and --liveness-port are both {liveness_port}; choose two "
              "different ports.", file=sys.stderr)
        return 1
    for what, flag, port in ports:
        problem = _port_problem(port)
        if problem:
            print(f"neoplasma operator: cannot listen on 0.0.0.0:{port} for the {what}: "
                  f"{problem}; choose another {flag} or stop what is using it.", file=sys.stderr)
            return 1
    try:
        kube = Kube(api_client())
        policy_api = kube.policy_api()
    except (kubernetes.config.ConfigException, kubernetes.client.ApiException,
            urllib3.exceptions.HTTPError, OSError) as error:
        print(f"neoplasma operator: cannot reach Kubernetes: {error}. Run it in a pod with a service "
              "account, or point KUBECONFIG at a kubeconfig file.", file=sys.stderr)
        return 1
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # A line per watch event ("Handler ... succeeded") and per liveness probe would bury
        # what the operator does; they come back with --log-level debug.
        for name in ("kopf.objects", "kopf.activities.probe", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
    options = Options(default_image=handlers.default_image(), policy_api=policy_api, scale_interval=scale_interval)
    state = OperatorState(kube, options)
    if metrics_port:
        metrics.serve(metrics_port, state.metrics)
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    memo = kopf.Memo()
    memo[handlers.STATE] = state
    scope = {"namespaces": namespaces} if namespaces else {"clusterwide": True}
    log.info("operator_starting", namespaces=namespaces or "all", liveness_port=liveness_port,
             metrics_port=metrics_port or None, scale_interval=scale_interval,
             policy_api=policy_api, default_image=options.default_image)
    asyncio.run(kopf.operator(
        settings=settings,
        memo=memo,
        standalone=True,  # one replica (the chart's Deployment uses Recreate): no peering
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz",
        **scope,
    ))
    log.info("operator_stopped")
    return 0


def _port_problem(port: int) -> str:
    """Why the liveness endpoint could not listen on `port` ("" when it can)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as error:
            return error.strerror or str(error)
    return ""
