"""`neoplasma operator`: run the kopf operator for NeoplasmaClusters."""

from __future__ import annotations

import asyncio
import logging

import kopf
import kubernetes.client
import kubernetes.config
import urllib3.exceptions

from neoplasma.core.errors import NeoplasmaError
from neoplasma.core.logs import get_logger
from neoplasma.core.memory import settle_heap
from neoplasma.core.net import bind_socket
from neoplasma.operator import handlers, metrics
from neoplasma.operator.controller import OperatorState
from neoplasma.operator.kube import Kube, api_client
from neoplasma.operator.settings import OperatorConfig

log = get_logger("operator")


class KubernetesUnreachable(NeoplasmaError):
    """No in-cluster service account and no usable kubeconfig, or the API server did not answer."""


def run_operator(config: OperatorConfig) -> int:
    """Run until SIGTERM or SIGINT; watch `config.namespaces`, or every namespace when empty.

    Kubernetes is reached with the in-cluster service account, else $KUBECONFIG (or
    ~/.kube/config). The liveness endpoint is http://0.0.0.0:PORT/healthz; with a metrics
    port, Prometheus metrics are at http://0.0.0.0:METRICS_PORT/metrics. Autoscaled clusters
    decide their sizes every `config.scale_interval` seconds.
    """
    ports = {"--liveness-port": config.liveness_port, "--metrics-port": config.metrics_port}
    for flag, port in ports.items():
        if port:  # fail here, with the flag to change, rather than later inside kopf
            bind_socket("0.0.0.0", port, flag).close()
    try:
        kube = Kube(api_client())
        policy_api = kube.policy_api()
    except (kubernetes.config.ConfigException, kubernetes.client.ApiException,
            urllib3.exceptions.HTTPError, OSError) as error:
        raise KubernetesUnreachable(f"cannot reach Kubernetes: {error}. Run it in a pod with a service "
                                    "account, or point KUBECONFIG at a kubeconfig file.") from None
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # A line per watch event ("Handler ... succeeded") and per liveness probe would bury
        # what the operator does; they come back with --log-level debug.
        for name in ("kopf.objects", "kopf.activities.probe", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
    options = config.options(handlers.default_image(), policy_api)
    state = OperatorState(kube, options)
    if config.metrics_port:
        metrics.serve(config.metrics_port, state.metrics)
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    memo = kopf.Memo()
    memo[handlers.STATE] = state
    scope = {"namespaces": config.namespaces} if config.namespaces else {"clusterwide": True}
    log.info("operator_starting", namespaces=config.namespaces or "all", liveness_port=config.liveness_port,
             metrics_port=config.metrics_port or None, scale_interval=config.scale_interval,
             policy_api=policy_api, default_image=options.default_image)
    settle_heap("operator_started")  # everything imported and made so far lives as long as the operator
    asyncio.run(kopf.operator(
        settings=settings,
        memo=memo,
        standalone=True,  # one replica (the chart's Deployment uses Recreate): no peering
        liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz",
        **scope,
    ))
    log.info("operator_stopped")
    return 0

