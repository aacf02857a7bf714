"""A real browser (Debian's chromium, headless) subscribed with EventSource across a proxy restart.

The page, served by a small aiohttp app in the test, subscribes to the proxy (another origin:
CORS) and posts every event it receives back to the app. The proxy is stopped with SIGTERM
(drain: 200 with `retry:`) and started again on the same ports, as `neoplasma up` does; the
browser's own EventSource reconnects with `Last-Event-ID` and must get every event exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import web
from harness import AUTH, Publisher, links_ready, proxy_status, publish_grpc, wait_for
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


def reporting_app(html: str, reports: dict[str, int], events: list[dict[str, Any]]) -> web.Application:
    """A page (`html`) that reports to the test: each POST /event's JSON into `events`, each POST /KIND counted in
    `reports` (its keys: the kinds the page may report)."""
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    async def report(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if kind == "event":
            events.append(json.loads(await request.text()))
        else:
            reports[kind] += 1
        return web.Response()

    app = web.Application()
    app.router.add_get("/", page)
    kinds = "|".join(["event", *reports])
    app.router.add_post(f"/{{kind:{kinds}}}", report)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """`app` served on 127.0.0.1 (an ephemeral port): its runner (to clean up) and its URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/"


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
        # Its helper processes (its session's group) can outlive it, still writing to the profile: a profile removed
        # meanwhile failed with "Directory not empty" now and then.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
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
    runner, url = await serve(page.app())
    try:
        browser(url)

        async def subscribed(control: str) -> bool:
            return (await proxy_status(control)).subscribers == 1 and await links_ready(control, 1)

        await wait_for(lambda: subscribed(proxy.endpoints["control"]), 30, "the page's EventSource at the proxy")
        publisher = Publisher([broker.endpoints["grpc"]]).start(interval=0.02)
        await wait_for(lambda: len(page.events) >= 20, 20, "events in the page")

        ports = {"grpc-port": proxy.port("grpc"), "http-port": proxy.port("http"),
                 "control-port": proxy.port("control")}
        assert proxy.stop(signal.SIGTERM) == 0  # drains: 200 with `retry:`, the stream ends
        stopped_at, sent_at_stop = len(page.events), sum(publisher.sent)
        await wait_for(lambda: sum(publisher.sent) >= sent_at_stop + 20, 20,
                       "events the browser misses while no proxy runs")
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
    assert sum(publisher.sent) >= 60  # 20 before, 20 while no proxy runs, 20 after
    assert page.opens >= 2 and not page.gaps


TOKEN_PAGE = """<!doctype html><title>neoplasma</title><script>
let queue = Promise.resolve();
const post = (path, body) => { queue = queue.then(() => fetch(path, {method: "POST", body: body})); };
let lastId = "";
async function connect() {
  // The application's backend hands out the token; EventSource cannot set headers: ?token=.
  const token = await (await fetch("/token")).text();
  const resume = lastId ? "&lastEventId=" + encodeURIComponent(lastId) : "";
  const source = new EventSource("http://%(proxy)s/?eventType=user:42&token=" + encodeURIComponent(token) + resume);
  source.onopen = () => post("/open", "");
  source.onmessage = (e) => { lastId = e.lastEventId; post("/event", e.data); };
  source.addEventListener("neoplasma-expired", () => { source.close(); post("/expired", ""); connect(); });
}
connect();
// Without a token a private topic is refused (401): EventSource gives up for good.
const anonymous = new EventSource("http://%(proxy)s/?eventType=user:42");
anonymous.onerror = () => { if (anonymous.readyState === EventSource.CLOSED) post("/refused", ""); };
</script>"""


async def test_a_browser_with_a_token_in_the_query_resumes_exactly_once_after_expiry(
    start: Any, browser: Any, tmp_path: Any
) -> None:
    from neoplasma.proxy.auth import mint

    secret = b"c" * 40
    keys = tmp_path / "subscriber-keys"
    keys.write_text(secret.decode() + "\n")
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--subscriber-jwt-keys-file", str(keys))
    await push(proxy.endpoints["control"], broker)
    reports: dict[str, int] = {"open": 0, "expired": 0, "refused": 0}
    events: list[dict[str, Any]] = []
    tokens: list[str] = []

    async def token(request: web.Request) -> web.Response:
        tokens.append(mint(secret, ["user:42"], 3 if not tokens else 600))  # the first expires mid-stream
        return web.Response(text=tokens[-1])

    app = reporting_app(TOKEN_PAGE % {"proxy": proxy.endpoints["http"]}, reports, events)
    app.router.add_get("/token", token)
    runner, url = await serve(app)
    try:
        browser(url)
        await wait_for(lambda: reports["open"] == 1 and reports["refused"] == 1, 30, "the page's EventSources")
        await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), 10, "the relay link")
        publisher = Publisher([broker.endpoints["grpc"]], topic="user:42:inbox").start(interval=0.02)
        await wait_for(lambda: reports["expired"] == 1, 20, "the token's expiry in the page")
        before_expiry = sum(publisher.sent)
        await wait_for(lambda: reports["open"] == 2, 20, "the page back with a fresh token")
        await wait_for(lambda: len(events) > sum(publisher.sent) - 5 and len(tokens) == 2
                       and sum(publisher.sent) >= before_expiry + 50, 20, "live events again")
        await publisher.stop()
        await wait_for(lambda: publisher.all_received(events), 20, "every event in the page")
        await asyncio.sleep(0.3)  # a duplicate would arrive after the last event
    finally:
        await runner.cleanup()
    publisher.assert_exactly_once_in_order(events, "chromium")
    assert before_expiry >= 20  # events before the expiry (~3 s of them), and 50 after it
    assert not any(t in proxy.log() for t in tokens)  # ?token= never reaches the proxy's logs


POINTER_PAGE = """<!doctype html><title>neoplasma</title><script>
let queue = Promise.resolve();
const post = (path, body) => { queue = queue.then(() => fetch(path, {method: "POST", body: body})); };
let moved = false;
const report = (at) => (e) => post("/event", JSON.stringify({at: at, id: e.lastEventId, event: JSON.parse(e.data)}));
const first = new EventSource("http://%(first)s/?eventType=t");
first.onopen = () => post("/open", "");
first.onmessage = (e) => {
  if (moved) return;
  report("first")(e);
  // Inside a write (an id that is no full token) and far enough in: leave as a cut would, and resume elsewhere.
  if (e.lastEventId[0] !== "A" && JSON.parse(e.data).data.n >= 12) {
    moved = true;
    first.close();
    const second = new EventSource("http://%(second)s/?eventType=t&lastEventId=" + encodeURIComponent(e.lastEventId));
    second.onmessage = report("second");
    second.addEventListener("neoplasma-gap", (g) => post("/gap", g.data));
  }
};
</script>"""


async def test_a_browser_leaving_inside_a_write_resumes_from_its_pointer_at_another_proxy(
    start: Any, browser: Any
) -> None:
    """chromium's EventSource takes pointer ids (`id:` without the space) inside a write and the full token on its
    last event; from a pointer it resumes at another proxy exactly once (docs/resume.md, "Pointer ids")."""
    broker = start("broker", "b0")
    proxies = [start("proxy", f"p{k}") for k in range(2)]
    for proxy in proxies:
        await push(proxy.endpoints["control"], broker)
    got: list[dict[str, Any]] = []
    reports = {"open": 0, "gap": 0}

    html = POINTER_PAGE % {"first": proxies[0].endpoints["http"], "second": proxies[1].endpoints["http"]}
    runner, url = await serve(reporting_app(html, reports, got))
    try:
        browser(url)
        await wait_for(lambda: reports["open"] == 1, 30, "the page's EventSource")
        for proxy in proxies:
            await wait_for(lambda proxy=proxy: links_ready(proxy.endpoints["control"], 1), 10, "the relay links")
        for k in range(0, 40, 5):  # 5 events a request: one relay message, one dispatch round, one write
            await publish_grpc(broker.endpoints["grpc"], [("t", {"n": n}) for n in range(k, k + 5)])
            await asyncio.sleep(0.1)
        await wait_for(lambda: {e["event"]["data"]["n"] for e in got} >= set(range(40)), 20, "every event")
        await asyncio.sleep(0.3)  # a duplicate would arrive after the last event
    finally:
        await runner.cleanup()
    numbers = [e["event"]["data"]["n"] for e in got]
    assert numbers == list(range(40)) and not reports["gap"], numbers
    first = [e for e in got if e["at"] == "first"]
    assert first and first[-1]["id"][0] != "A" and len(first[-1]["id"]) == 8  # it left holding a pointer
    assert len(first) >= 13
    for write in range(2):  # the whole writes: pointers, then the full token on the write's last event
        ids = [e["id"] for e in first[5 * write:5 * write + 5]]
        assert [i[0] != "A" and len(i) == 8 for i in ids] == [True] * 4 + [False] and len(ids[-1]) > 8, ids
