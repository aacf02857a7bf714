"""`--workers N`: the CPUs a process may use, a proxy pod of workers sharing its ports behind one
control port, and a broker checking publishes on other processes."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import grpc
import psutil
import pytest
from harness import (
    SseClient,
    apply_membership,
    links_ready,
    proxy_status,
    publish_grpc,
    publish_http,
    wait_for,
)

from neoplasma.core.events import InvalidEvent, make_events
from neoplasma.core.workers import Offload, Supervisor, sum_expositions, usable_cpus
from neoplasma.proxy.pod import PodControl, merge_applied, sum_status
from neoplasma.proxy.settings import ProxyConfig
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

# -- the CPUs a process may use -----------------------------------------------------------


@pytest.mark.parametrize(("affinity", "cpu_max", "quota", "period", "cpus"), [
    (8, None, None, None, 8),  # no cgroup files: the CPUs it may run on
    (8, "max 100000", None, None, 8),  # cgroup v2, no quota
    (8, "200000 100000", None, None, 2),  # v2: 2 CPUs' worth
    (8, "150000 100000", None, None, 1),  # a fraction rounds down
    (8, "50000 100000", None, None, 1),  # never below 1
    (2, "400000 100000", None, None, 2),  # the affinity is the lower bound
    (8, None, "-1", "100000", 8),  # cgroup v1, no quota
    (8, None, "300000", "100000", 3),  # v1: 3 CPUs' worth
    (4, "", "300000", "100000", 3),  # an empty v2 file: v1's
])
def test_usable_cpus(affinity: int, cpu_max: str | None, quota: str | None, period: str | None, cpus: int) -> None:
    assert usable_cpus(affinity, cpu_max, quota, period) == cpus


# -- pod-wide figures ---------------------------------------------------------------------


def test_expositions_add_up_except_the_lowest_families() -> None:
    def worker(subs: int, version: int) -> str:
        return ("# TYPE neoplasma_proxy_subscribers gauge\n"
                f'neoplasma_proxy_subscribers{{kind="sse"}} {subs}\nneoplasma_proxy_subscribers{{kind="plasma"}} 1\n'
                "# TYPE neoplasma_proxy_deliveries counter\n"
                f"neoplasma_proxy_deliveries_total {subs * 10}\n"
                "# TYPE neoplasma_proxy_membership_version gauge\n"
                f"neoplasma_proxy_membership_version {version}\n")

    text = sum_expositions([worker(3, 7), worker(4, 6)], {"neoplasma_proxy_membership_version": min}).decode()
    assert 'neoplasma_proxy_subscribers{kind="sse"} 7.0' in text
    assert 'neoplasma_proxy_subscribers{kind="plasma"} 2.0' in text
    assert "neoplasma_proxy_deliveries_total 70.0" in text
    assert "neoplasma_proxy_membership_version 6.0" in text


def test_status_and_apply_of_a_pod_add_up() -> None:
    connected = pb.BrokerLink(name="b0", state=pb.BrokerLink.CONNECTED, events_received=5, interest_synced=True)
    backoff = pb.BrokerLink(name="b0", state=pb.BrokerLink.BACKOFF, events_received=2, last_error="refused")
    only_one = pb.BrokerLink(name="b1", state=pb.BrokerLink.CONNECTED, interest_synced=True)
    status = sum_status("p", [
        pb.ProxyStatus(subscribers=2, sse_subscribers=1, grpc_subscribers=1, membership_version=4, deliveries=10,
                       links=[connected, only_one], topics=3, movable_subscribers=1),
        pb.ProxyStatus(subscribers=5, sse_subscribers=5, membership_version=3, deliveries=1, links=[backoff],
                       draining=True, movable_subscribers=4),
    ])
    assert (status.name, status.subscribers, status.sse_subscribers, status.grpc_subscribers) == ("p", 7, 6, 1)
    assert status.movable_subscribers == 5
    assert (status.membership_version, status.deliveries, status.topics, status.draining) == (3, 11, 3, True)
    # A topic subscribed on both workers is one topic: the pod's count is its busiest worker's, not the sum.
    both = sum_status("p", [pb.ProxyStatus(topics=3), pb.ProxyStatus(topics=2)])
    assert both.topics == 3
    b0, b1 = status.links
    assert (b0.name, b0.state, b0.events_received, b0.interest_synced, b0.last_error) == (
        "b0", pb.BrokerLink.BACKOFF, 7, False, "refused")
    assert (b1.name, b1.state, b1.interest_synced) == ("b1", pb.BrokerLink.CONNECTING, False)  # one worker lacks it
    applied = merge_applied([pb.ApplyResponse(applied_version=2, accepted=True),
                             pb.ApplyResponse(applied_version=1, accepted=False, reason="refused: bad")])
    assert (applied.applied_version, applied.accepted, applied.reason) == (1, False, "refused: bad")


class ReadyWorker(pb_grpc.ProxyControlServicer):  # type: ignore[misc]
    """A worker's control server whose one link is ready and which accepts every push."""

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.ProxyStatus:  # noqa: N802  (the RPC names)
        link = pb.BrokerLink(name="b0", state=pb.BrokerLink.CONNECTED, interest_synced=True)
        return pb.ProxyStatus(subscribers=4, membership_version=3, links=[link])

    async def Apply(self, request: pb.Membership, context: grpc.aio.ServicerContext) -> pb.ApplyResponse:  # noqa: N802  (the RPC names)
        return pb.ApplyResponse(applied_version=request.version, accepted=True)


async def test_a_worker_that_cannot_answer_makes_the_pod_not_ready_not_an_error(tmp_path: Any) -> None:
    # Worker 0 has died and the supervisor has not reaped it yet: its control socket is gone. The
    # pod answers Status and Apply from the other worker, marked not ready (not UNKNOWN).
    server = grpc.aio.server()
    pb_grpc.add_ProxyControlServicer_to_server(ReadyWorker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pod = PodControl(ProxyConfig(name="p"), None)
    pod.supervisor = Supervisor([], 2)
    try:
        pod.supervisor.workers[0].endpoints = {"control": f"unix:{tmp_path}/gone.sock"}
        pod.supervisor.workers[1].endpoints = {"control": f"127.0.0.1:{port}"}
        status = await pod.Status(pb.StatusRequest(), None)  # type: ignore[arg-type]  (no context is used)
        assert (status.subscribers, status.membership_version) == (4, 0)
        [link] = status.links
        assert (link.state, link.interest_synced) == (pb.BrokerLink.CONNECTING, False)  # one worker lacks it
        reply = await pod.Apply(pb.Membership(version=5), None)  # type: ignore[arg-type]
        assert (reply.accepted, reply.applied_version) == (False, 0)
        assert "proxy worker 0 did not answer (UNAVAILABLE)" in reply.reason
        assert pod.membership is not None and pod.membership.version == 5  # for worker 0 once it is back
        pod.supervisor.workers[0].endpoints = {}  # reaped, its successor not yet serving: still not ready
        status = await pod.Status(pb.StatusRequest(), None)  # type: ignore[arg-type]
        assert (status.subscribers, status.membership_version, status.links[0].interest_synced) == (4, 0, False)
        pod.supervisor.workers[0].endpoints = {"control": f"127.0.0.1:{port}"}  # back
        status = await pod.Status(pb.StatusRequest(), None)  # type: ignore[arg-type]
        assert (status.subscribers, status.membership_version, status.links[0].interest_synced) == (8, 3, True)
    finally:
        await server.stop(None)
        await pod.supervisor.close()


class CountingWorker(ReadyWorker):
    """A ReadyWorker that keeps the versions pushed to it."""

    def __init__(self) -> None:
        self.applied: list[int] = []

    async def Apply(self, request: pb.Membership, context: grpc.aio.ServicerContext) -> pb.ApplyResponse:  # noqa: N802  (the RPC names)
        self.applied.append(request.version)
        return await super().Apply(request, context)


async def test_a_restarted_worker_gets_the_membership_though_calls_to_its_last_life_failed(tmp_path: Any) -> None:
    # Worker 0 was killed; calls made before the supervisor reaped it failed to connect, which put
    # the pod's channel to its socket in reconnect backoff (1 s or more). Its next life serves on the
    # same socket path: the membership pushed when it starts must reach it, not fail at once on
    # the old channel (CI once saw a restarted worker without links for 20 s so).
    socket = f"unix:{tmp_path}/control-0.sock"
    pod = PodControl(ProxyConfig(name="p"), None)
    pod.supervisor = Supervisor([], 1)
    worker = pod.supervisor.workers[0]
    server = grpc.aio.server()
    try:
        worker.endpoints, worker.life = {"control": socket}, 1
        status = await pod.Status(pb.StatusRequest(), None)  # type: ignore[arg-type]  (no context is used)
        assert status.membership_version == 0  # it could not answer: not ready
        pod.membership = pb.Membership(version=7)
        restarted = CountingWorker()
        pb_grpc.add_ProxyControlServicer_to_server(restarted, server)
        server.add_insecure_port(socket)
        await server.start()
        worker.endpoints, worker.life = {"control": socket}, 2
        await asyncio.wait_for(pod.started(worker), timeout=5)
        assert restarted.applied == [7]
        status = await pod.Status(pb.StatusRequest(), None)  # type: ignore[arg-type]
        assert status.membership_version == 3
    finally:
        await server.stop(None)
        await pod.close()
        await pod.supervisor.close()


# -- a proxy pod ----------------------------------------------------------------------------


def children(server: Any, kind: str) -> list[psutil.Process]:
    """The live child processes of `server` whose command line has `kind`."""
    found = []
    for child in psutil.Process(server.proc.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and kind in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def workers_of(server: Any) -> list[psutil.Process]:
    return children(server, "neoplasma proxy")


def serving_port(proc: psutil.Process, port: int) -> int:
    """How many connections `proc` has accepted on `port`."""
    return sum(1 for c in proc.net_connections() if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


async def subscribers_on_both(proxy: Any, topic: str, n: int = 16) -> list[SseClient]:
    clients = [await SseClient(proxy.endpoints["http"], topic).start() for _ in range(n)]
    await wait_for(lambda: all(serving_port(w, proxy.port("http")) for w in workers_of(proxy)),
                   what="subscribers on every worker")
    return clients


async def test_proxy_workers_share_ports_and_each_gets_membership(start: Any) -> None:
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--workers", "2")
    assert len(workers_of(proxy)) == 2
    reply = await apply_membership(proxy.endpoints["control"], 1, [(broker.name, broker.endpoints["grpc"])])
    assert reply.accepted and reply.applied_version == 1
    clients = await subscribers_on_both(proxy, "t")
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="every worker's link")
    status = await proxy_status(proxy.endpoints["control"])
    assert (status.subscribers, status.sse_subscribers, status.membership_version) == (16, 16, 1)  # summed
    await publish_grpc(broker.endpoints["grpc"], [("t", {"n": 1})])
    await wait_for(lambda: all(c.events for c in clients), what="the event on both workers' subscribers")
    assert [c.events for c in clients] == [[{"meta": {"type": "t"}, "data": {"n": 1}}]] * 16
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{proxy.endpoints['http']}/metrics") as resp:
            metrics = await resp.text()
    assert 'neoplasma_proxy_subscribers{kind="sse"} 16.0' in metrics  # summed over the workers
    assert "neoplasma_proxy_membership_version 1.0" in metrics
    for client in clients:
        await client.close()


async def test_a_killed_proxy_worker_is_restarted_with_the_membership(start: Any) -> None:
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--workers", "2")
    await apply_membership(proxy.endpoints["control"], 3, [(broker.name, broker.endpoints["grpc"])])
    victim = workers_of(proxy)[0]
    victim.kill()
    await wait_for(lambda: len(workers_of(proxy)) == 2 and victim.pid not in [w.pid for w in workers_of(proxy)],
                   timeout=20, what="a new worker")
    # The new worker has the pod's membership (pushed by the supervisor, not the operator).
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), timeout=20, what="the new worker's link")
    assert (await proxy_status(proxy.endpoints["control"])).membership_version == 3
    assert "worker_exited" in proxy.log()


async def test_sigterm_drains_every_proxy_worker(start: Any) -> None:
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--workers", "2")
    await apply_membership(proxy.endpoints["control"], 1, [(broker.name, broker.endpoints["grpc"])])
    clients = await subscribers_on_both(proxy, "t")
    assert await asyncio.to_thread(proxy.stop, signal.SIGTERM) == 0
    for client in clients:  # each told to come back soon (the drain's retry), stream ended cleanly
        await asyncio.wait_for(client.ended.wait(), 10)
        assert client.retry == 250
        await client.close()


# -- a broker checking on other processes -----------------------------------------------------


def checkers(broker: Any) -> list[psutil.Process]:
    """The broker's checking processes (not multiprocessing's resource tracker)."""
    return children(broker, "spawn_main")


def test_offload_runs_inline_without_workers() -> None:
    offload = Offload(0)
    assert not offload.free()
    events = asyncio.run(offload.run(make_events, [("t", b'{"a": 1}')]))
    assert [data for _, data in events] == [b'{"a":1}']


async def test_broker_workers_check_publishes_and_a_killed_one_is_replaced(start: Any) -> None:
    broker = start("broker", "b0", "--workers", "2")
    proxy = start("proxy", "p0")
    await apply_membership(proxy.endpoints["control"], 1, [(broker.name, broker.endpoints["grpc"])])
    big = [("t", {"n": i, "pad": "x" * 100}) for i in range(100)]  # past OFFLOAD_BYTES
    client = await SseClient(proxy.endpoints["http"], "t").start()
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1))
    assert await publish_grpc(broker.endpoints["grpc"], big) == 100
    [checker] = checkers(broker)
    checker.kill()
    checker.wait(10)
    status, body = await publish_http(broker.endpoints["http"], [{"meta": {"type": "t"}, "data": d} for _, d in big])
    assert (status, body) == (200, {"accepted": 100})  # checked inline while the pool is replaced
    await wait_for(lambda: len(checkers(broker)) == 1 and checkers(broker)[0].pid != checker.pid, timeout=20,
                   what="a new checking process")
    assert await publish_grpc(broker.endpoints["grpc"], big) == 100
    await wait_for(lambda: len(client.events) == 300, what="every accepted event")
    assert [e["data"]["n"] for e in client.events] == [i for _ in range(3) for i in range(100)]
    await client.close()


def test_refusals_are_the_same_from_a_worker() -> None:
    from neoplasma.broker.server import checked_pairs

    with pytest.raises(InvalidEvent, match="event 1: data is not valid JSON"):
        checked_pairs(make_events, [("t", b"1"), ("t", b"{")], {})
