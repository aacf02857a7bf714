"""Connections at the door: the listen backlog of every subscriber and publish port."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from neoplasma.core.net import DEFAULT_BACKLOG, effective_backlog, somaxconn


def listen_backlogs(port: int) -> list[int]:
    """The backlog of each socket listening on 127.0.0.1:`port`, as the kernel reports it
    (`ss -ltn`: a listening socket's Send-Q is its backlog)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


def test_the_backlog_is_capped_by_the_kernel() -> None:
    assert effective_backlog(4096, 128) == 128
    assert effective_backlog(300, 4096) == 300
    assert effective_backlog(300, None) == 300


def test_proxy_and_broker_ports_listen_with_the_backlog_asked_for(start: Any) -> None:
    proxy = start("proxy", "p0", "--listen-backlog", "300")
    broker = start("broker", "b0", "--listen-backlog", "301")
    assert listen_backlogs(proxy.port("http")) == [300]
    assert listen_backlogs(proxy.port("grpc")) == [300]
    assert listen_backlogs(broker.port("http")) == [301]


def test_the_default_backlog_is_the_kernels_cap_at_most(start: Any) -> None:
    proxy = start("proxy", "p0")
    expected = effective_backlog(DEFAULT_BACKLOG, somaxconn())
    assert listen_backlogs(proxy.port("http")) == [expected]
    assert listen_backlogs(proxy.port("grpc")) == [expected]


def test_every_worker_listens_with_the_backlog(start: Any) -> None:
    proxy = start("proxy", "p0", "--workers", "2", "--listen-backlog", "302")
    assert listen_backlogs(proxy.port("http")) == [302, 302]
    assert listen_backlogs(proxy.port("grpc")) == [302, 302]


def test_a_backlog_above_the_kernels_cap_is_logged(start: Any) -> None:
    cap = somaxconn()
    if cap is None or cap >= 65535:
        pytest.skip("net.core.somaxconn is unknown or not below the largest backlog")
    proxy = start("proxy", "p0", "--listen-backlog", "65535")
    assert listen_backlogs(proxy.port("http")) == [cap]
    assert f'"event": "listen_backlog_capped", "address": "127.0.0.1:{proxy.port("http")}"' in proxy.log()
