"""The names the operator tests import from here; the helpers live in `neoplasma.local.harness`."""

from neoplasma.local.harness import SseClient, links_ready, proxy_status, publish_grpc, sse, stop_process, wait_for

__all__ = ["SseClient", "links_ready", "proxy_status", "publish_grpc", "sse", "stop_process", "wait_for"]
