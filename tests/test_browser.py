"""A real browser (Debian's chromium, headless) subscribed with EventSource across a proxy restart.

The page, served by a small aiohttp app in the test, subscribes to the proxy (another origin:
CORS) and posts every event it receives back to the app. The proxy is stopped with SIGTERM
(drain: 200 with `retry:`) and started again on the same ports, as `neoplasma up` does; the
browser's own EventSource reconnects with `Last-Event-ID` and must get every event exactly once.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import web
from harness import AUTH, Publisher, links_ready, proxy_status, wait_for
from kubeharness.fixtures import unavailable

from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

PAGE = """<!doctype html><title>neoplasma</title><script>
let queue = Promise.resolve();  // one report at a time, in the order the page got them
const post = (path, body) => { queue = queue.then(() => fetch(path, {method: "POST", body: body})); };
const source = new EventSource("http://%(proxy)s/?eventType=t");
source.onopen = () => post("/open", "");
source.onmessage = (e) => post("/event", e.data);
source.addEventListener("neoplasma-gap", (e) => post("/gap", e.data));
</script>"""


class Page:
    """The page and what it reports: opens, events (in the order the page received them), gaps."""

    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        self.opens = 0
        self.events: list[dict[str, Any]] = []
        self.gaps: list[str] = []

    def app(self) -> web.Application:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text=PAGE % {"proxy": self.proxy}, content_type="text/html")

        async def report(request: web.Request) -> web.Response:
            body = await request.text()
            kind = request.match_info["kind"]
            if kind == "open":
                self.opens += 1
            elif kind == "event":
                self.events.append(json.loads(body))
            else:
                self.gaps.append(body)
            return web.Response()

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_post("/{kind:open|event|gap}", report)
        return app


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        unavailable("chromium not found: apt-get install -y chromium (scripts/test.sh does)")
    return path


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    """`browser(url)` opens `url` in headless chromium, closed after the test."""
    processes: list[subprocess.Popen[bytes]] = []
    profiles: list[tempfile.TemporaryDirectory[str]] = []

    def open_page(url: str) -> None:
        profile = tempfile.TemporaryDirectory(prefix="neoplasma-chromium-")
        profiles.append(profile)
        processes.append(subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile.name}", url],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))

    yield open_page
    for process in processes:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for profile in profiles:
        profile.cleanup()


async def push(control: str, broker: Any) -> None:
    membership = pb.Membership(version=1, cluster="browser-test", brokers=[
        pb.BrokerMember(name=broker.name, address=broker.endpoints["grpc"], state="SERVING")])
    async with grpc.aio.insecure_channel(control) as channel:
        reply = await pb_grpc.ProxyControlStub(channel).Apply(membership, timeout=5, metadata=AUTH)
    assert reply.accepted, reply.reason


async def test_a_browser_gets_every_event_once_across_a_proxy_restart(
    start: Any, browser: Any
) -> None:
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--drain-retry-ms", "200")
    await push(proxy.endpoints["control"], broker)
    page = Page(proxy.endpoints["http"])
    runner = web.AppRunner(page.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        browser(f"http://127.0.0.1:{port}/")

        async def subscribed(control: str) -> bool:
            return (await proxy_status(control)).subscribers == 1 and await links_ready(control, 1)

        await wait_for(lambda: subscribed(proxy.endpoints["control"]), 30, "the page's EventSource at the proxy")
        publisher = Publisher([broker.endpoints["grpc"]]).start(interval=0.02)
        await wait_for(lambda: len(page.events) >= 20, 20, "events in the page")

        ports = {"grpc-port": proxy.port("grpc"), "http-port": proxy.port("http"),
                 "control-port": proxy.port("control")}
        assert proxy.stop(signal.SIGTERM) == 0  # drains: 200 with `retry:`, the stream ends
        stopped_at = len(page.events)
        await asyncio.sleep(0.5)  # events the browser misses while no proxy runs
        again = start("proxy", "p0", ports=ports)  # the same address, as `neoplasma up` restarts it
        await push(again.endpoints["control"], broker)
        await wait_for(lambda: subscribed(again.endpoints["control"]), 30, "the page back at the restarted proxy")
        await wait_for(lambda: len(page.events) > stopped_at + 20, 20, "live events after the restart")
        await publisher.stop()
        await wait_for(lambda: publisher.all_received(page.events), 20, "every event in the page")
        await asyncio.sleep(0.3)  # a duplicate would arrive after the last event
    finally:
        await runner.cleanup()
    publisher.assert_exactly_once_in_order(page.events, "chromium")
    assert sum(publisher.sent) >= 60  # 20 before, ~25 while no proxy runs, 20 after
    assert page.opens >= 2 and not page.gaps
