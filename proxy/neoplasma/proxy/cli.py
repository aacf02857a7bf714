"""`neoplasma proxy`: its options are ProxyConfig's settings."""

from __future__ import annotations

from neoplasma.core.commands import Commands, add_server
from neoplasma.proxy.pod import PodService
from neoplasma.proxy.server import ProxyConfig, ProxyService


def add_commands(commands: Commands) -> None:
    add_server(commands, "proxy", "run a proxy (SSE + plasma gRPC for subscribers)", ProxyConfig, ProxyService,
               PodService)
