"""`neoplasma up` as a user runs it, and clean shutdown of every process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from typing import Any

import psutil
import pytest
from harness import (
    PlasmaClient,
    links_ready,
    port_is_free,
    proxy_status,
    publish_grpc,
    publish_http,
    sse,
    wait_for,
)


@pytest.fixture
def up(run_up: Any) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    return run_up("--brokers", "2", "--proxies", "2")


async def test_up_serves_sse_and_plasma_on_different_proxies(up: Any) -> None:
    _, endpoints = up
    assert [sorted(b) for b in endpoints["brokers"]] == [["grpc", "http"]] * 2
    assert len(endpoints["proxies"]) == 2
    p0, p1 = endpoints["proxies"]
    async with sse(p0["http"], "news") as browser:
        service = PlasmaClient(p1["grpc"])
        await service.subscribe("news")
        for p in (p0, p1):
            await wait_for(lambda p=p: links_ready(p["control"], 2), what="proxy linked to both brokers")
        await publish_grpc(endpoints["brokers"][0]["grpc"], [("news:1", "a")])
        await publish_http(endpoints["brokers"][1]["http"], {"meta": {"type": "news:2"}, "data": "b"})
        await wait_for(lambda: len(browser.events) == 2 and len(service.payloads) == 2)
        assert sorted(e["data"] for e in browser.events) == ["a", "b"]
        assert sorted(p.data for p in service.payloads) == ['"a"', '"b"']
        await service.close()


async def test_up_restarts_a_dead_child_and_stops_everything(up: Any) -> None:
    proc, endpoints = up
    children = psutil.Process(proc.pid).children()
    assert len(children) == 4
    broker0 = endpoints["brokers"][0]
    victim = next(c for c in children if "broker-0" in c.cmdline())
    victim.kill()
    p0 = endpoints["proxies"][0]
    async with sse(p0["http"], "t") as client:
        # The restarted broker comes back on the same ports; the proxy relinks by itself.
        await wait_for(lambda: len(psutil.Process(proc.pid).children()) == 4 and not victim.is_running(),
                       timeout=30, what="restart")
        await wait_for(lambda: links_ready(p0["control"], 2), timeout=30, what="relink to the restarted broker")
        await publish_grpc(broker0["grpc"], [("t", "after-restart")])
        await wait_for(lambda: client.events, what="delivery via the restarted broker")
    status = await proxy_status(p0["control"])
    assert status.membership_version == 1  # same broker, same address: nothing to push

    pids = [c.pid for c in psutil.Process(proc.pid).children()]
    ports = [int(a.rpartition(":")[2]) for tier in ("brokers", "proxies") for e in endpoints[tier]
             for a in e.values()]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert all(port_is_free(p) for p in ports), "a port is still bound after shutdown"


def test_up_refuses_zero_brokers() -> None:
    result = subprocess.run([sys.executable, "-m", "neoplasma", "up", "--brokers", "0"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "at least one broker" in result.stderr


def test_server_shutdown_frees_ports(start: Any) -> None:
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--brokers", broker.endpoints["grpc"])
    ports = [broker.port("grpc"), broker.port("http"), proxy.port("grpc"), proxy.port("http"), proxy.port("control")]
    assert proxy.stop() == 0
    assert broker.stop() == 0
    assert all(port_is_free(p) for p in ports)


def test_busy_port_gives_a_clear_error(start: Any) -> None:
    broker = start("broker", "b0")
    result = subprocess.run([sys.executable, "-m", "neoplasma", "broker", "--grpc-port", "0",
                             "--http-port", str(broker.port("http"))], capture_output=True, text=True, timeout=30,
                            env={**os.environ})
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{broker.port('http')}" in result.stderr


async def neoplasma(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "neoplasma", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_publish_and_subscribe_commands(start: Any) -> None:
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--brokers", broker.endpoints["grpc"])
    control = proxy.endpoints["control"]
    subscriber = await neoplasma("subscribe", "--proxy", proxy.endpoints["http"], "--count", "1", "demo")
    try:
        async def subscribed() -> bool:
            status = await proxy_status(control)
            return status.subscribers == 1 and all(link.interest_synced for link in status.links)

        await wait_for(subscribed, what="the subscribe command connected")
        published = await neoplasma("publish", "--broker", broker.endpoints["grpc"], "demo:hello", '{"hi": 1}')
        out, _ = await asyncio.wait_for(published.communicate(), 30)
        assert published.returncode == 0 and out.decode().strip() == "accepted 1"
        out, _ = await asyncio.wait_for(subscriber.communicate(), 30)
        assert out.decode().strip() == '{"meta":{"type":"demo:hello"},"data":{"hi":1}}'
        refused = await neoplasma("publish", "--broker", broker.endpoints["grpc"], "demo", "{not json")
        _, err = await asyncio.wait_for(refused.communicate(), 30)
        assert refused.returncode == 2 and "not valid JSON" in err.decode()
    finally:
        if subscriber.returncode is None:
            subscriber.kill()


async def test_children_die_with_a_killed_up(run_up: Any) -> None:
    proc, _ = run_up("--brokers", "1", "--proxies", "1")
    children = psutil.Process(proc.pid).children()
    assert len(children) == 2
    proc.kill()  # no chance to clean up: the children must notice by themselves
    await wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
                   timeout=30, what="children to exit after up was killed")


async def test_up_workers_runs_every_proxy_and_broker_as_a_pod_of_workers(run_up: Any) -> None:
    proc, endpoints = run_up("--brokers", "1", "--proxies", "1", "--workers", "2")
    children = psutil.Process(proc.pid).children()
    proxy = next(c for c in children if "proxy-0" in c.cmdline())
    assert "--workers" in proxy.cmdline() and proxy.cmdline()[proxy.cmdline().index("--workers") + 1] == "2"
    workers = [w for w in proxy.children() if "proxy" in w.cmdline()]
    assert len(workers) == 2
    p0 = endpoints["proxies"][0]
    await wait_for(lambda: links_ready(p0["control"], 1), what="both workers linked to the broker")
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(sse(p0["http"], "w")) for _ in range(12)]
        await wait_for(lambda: all(any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == int(
            p0["http"].rpartition(":")[2]) for c in w.net_connections()) for w in workers),
            what="subscribers on both workers")
        await publish_grpc(endpoints["brokers"][0]["grpc"], [("w", "to-all")])
        await wait_for(lambda: all(c.events for c in clients), what="the event on every subscriber")
        status = await proxy_status(p0["control"])
        assert status.sse_subscribers == 12  # the pod's, summed over its workers
    everyone = [*children, *workers]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    for p in everyone:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
