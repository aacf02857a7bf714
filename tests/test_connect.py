"""Connections at the door: the listen backlog of every subscriber and publish port, and a proxy at
its open-file limit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from harness import sse, start_server, wait_for

from neoplasma.core.net import FD_TABLE_AT_START, effective_backlog, somaxconn
from neoplasma.core.settings import DEFAULT_BACKLOG


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


async def status_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ConnectionError:
        return b""


def fd_table_size(pid: int) -> int:
    """The size of process `pid`'s descriptor table (what the kernel has grown it to: /proc's FDSize)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("FDSize:")))


def test_a_servers_descriptor_table_is_made_for_its_open_file_limit_at_start(start: Any) -> None:
    # Grown one doubling at a time as connections arrive, in a process with threads, it stopped the proxy's loop for
    # an RCU grace period at each growth (7-12 ms; the latency of subscribers already there in a burst of connects).
    proxy, broker = start("proxy", "p0"), start("broker", "b0")
    limit = psutil.Process(proxy.proc.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
    for server in (proxy, broker):
        assert fd_table_size(server.proc.pid) >= min(limit, FD_TABLE_AT_START)
        assert len(psutil.Process(server.proc.pid).open_files()) < 50  # (made for them, not opened)


def test_making_the_descriptor_table_replaces_no_open_descriptor() -> None:
    script = """
import os
from neoplasma.core.net import presize_fd_table
r, w = os.pipe()
os.dup2(w, 999)  # a descriptor where the table would be grown from
print(presize_fd_table(4096, 1000), presize_fd_table(4096, 50))
os.write(999, b"still open")
print(os.read(r, 64).decode())
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("FDSize:")))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["1000 0", "still open"]  # grown from the first free one after 999; too small to bother: 0
    assert int(out[2]) >= 1024


async def test_at_its_open_file_limit_a_proxy_closes_the_excess_at_once_and_recovers(tmp_path: Path) -> None:
    """Beyond its open-file limit the proxy neither crashes nor spins: the event loop (libuv's
    reserve-descriptor trick) accepts and closes the excess connections at once (clients see the
    connection end and retry); once descriptors are free it serves again."""
    wrapper = tmp_path / "low-nofile"
    wrapper.write_text(f'#!/bin/sh\nexec prlimit --nofile=150:150 {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    proxy = start_server("proxy", "p0", tmp_path, python=str(wrapper))
    try:
        port = proxy.port("http")
        conns = []
        for _ in range(300):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /?eventType=t HTTP/1.1\r\nHost: p\r\n\r\n")
            conns.append((reader, writer))
        lines = await asyncio.wait_for(asyncio.gather(*(status_line(r) for r, _ in conns)), 20)
        served = [c for c, line in zip(conns, lines, strict=True) if line.startswith(b"HTTP/1.1 200")]
        closed = [line for line in lines if not line]
        assert len(served) + len(closed) == 300 and len(served) > 100 and len(closed) > 100
        process = psutil.Process(proxy.proc.pid)
        assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        cpu0 = sum(process.cpu_times()[:2])
        await asyncio.sleep(1.0)  # a window to measure CPU in, not a wait for a condition
        assert sum(process.cpu_times()[:2]) - cpu0 < 0.5, "the proxy spins at its open-file limit"
        for _, writer in served:
            writer.close()
        async with aiohttp.ClientSession() as session:
            async def metrics() -> str:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        return await resp.text()
                except aiohttp.ClientError:
                    return ""
            text = await wait_for(metrics, timeout=20, what="the proxy to serve again")
        assert "process_max_fds 150.0" in text and "process_open_fds" in text
        async with sse(f"127.0.0.1:{port}", "t") as client:
            assert client.status == 200
    finally:
        proxy.stop()
