"""Bytes on the wire per delivered event (docs/resume.md, "The token"; docs/capacity.md).

Starts N real brokers (this tree) and two proxies linked to all of them: one of this tree, one of
another (`--before REV`, default main: `git archive` exported to a temporary folder and put first on
its PYTHONPATH; the brokers are shared, since only the proxy writes ids). Subscribers on each proxy:
raw-socket SSE clients (they read every byte after the response headers, chunk framing included) and
one native gRPC stream. A publisher sends ~200-byte events round-robin over the brokers, first one per
broker (so every broker has a position), then at an idle rate, then under load. Both proxies get the
same events: the figures are side by side, from one run.

Per proxy and phase it prints bytes per delivered event, that over the event's plain SSE frame (what
plasma sends: `data: <json>\\n\\n`, no id), the ids: how many are full tokens and how many pointers
(docs/resume.md, "Pointer ids": a build that has them gives the full token to each write's last event
only) and the average length of each, events per write (HTTP chunk), what an id on each write's last
event and none on the others would give (the floor: not exactly-once), and for the native stream the
batch token's size and events per batch; and writes JSON (bench/results/wire_bytes_<N>.json).

With `--days-old` the brokers start numbering at 200-260 million (as after days at 1000 events/s each; the
test-only environment variable NEOPLASMA_TEST_FIRST_SEQ, not a setting), so full tokens carry the seqs of a
cluster that has run for days. A proxy of a build with checkpoints (docs/resume.md, "Checkpoints") issues
version 3 tokens once every broker stored its first checkpoint: the bench waits for that (up to 30 s, publishing
one event per broker every half second) before it measures, and reports, per phase, the checkpoints the brokers
stored per second (the relay messages they add: one up, per proxy and broker and second while positions move)
and what the brokers' stores count per checkpoint.

Usage: python bench/wire_bytes.py --brokers 10
       flock /work/bench.lock python bench/wire_bytes.py --brokers 60   (60 processes: take the lock)
       flock /work/bench.lock python bench/wire_bytes.py --brokers 60 --days-old
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import Server, apply_membership, counters, links_ready, start_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "program:1234"
DATA_LINE = re.compile(rb"^data: (.*)$", re.M)
ID_LINE = re.compile(rb"^id: ?(.*)$", re.M)
ID_FIELD = re.compile(rb"^id: ?.*\n", re.M)  # (the whole line)


def event_data(k: int) -> bytes:
    """~200 bytes of JSON, numbered."""
    body = {"n": k, "kind": "score", "program": 1234, "text": ""}
    raw = json.dumps(body, separators=(",", ":"))
    body["text"] = "x" * (200 - len(raw))
    return json.dumps(body, separators=(",", ":")).encode()


def exported_tree(rev: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="neoplasma-before-"))
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def dechunk(raw: bytes) -> list[bytes]:
    """The payloads of a chunked response's chunks, one per write (a cut last one is left out)."""
    out, i = [], 0
    while True:
        end = raw.find(b"\r\n", i)
        if end < 0:
            break
        size = int(raw[i:end], 16)
        if end + 2 + size + 2 > len(raw):
            break
        out.append(raw[end + 2:end + 2 + size])
        i = end + 2 + size + 2
    return out


def id_on_last_only(chunk: bytes) -> int:
    """Bytes `chunk` would take with an id on its last event only (not what is sent: not exactly-once)."""
    lines = ID_FIELD.findall(chunk)
    return len(chunk) - sum(map(len, lines[:-1]))


def token_version(token: bytes) -> int:
    """The version byte of a full token (docs/resume.md, "The token")."""
    return base64.urlsafe_b64decode(token[:4])[0] if token.startswith(b"A") else 0


def is_pointer(token: bytes) -> bool:
    """A pointer id (docs/resume.md, "Pointer ids"), not a full token (which begins with "A")."""
    return not token.startswith(b"A")


class RawSse:
    """A subscriber on a raw socket: the bytes after the response headers, as they came."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.raw = bytearray()
        self.mark = 0
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> RawSse:
        host, port = self.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /?eventType={TOPIC} HTTP/1.1\r\nHost: {self.address}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        self.writer = writer

        async def read() -> None:
            while chunk := await reader.read(1 << 16):
                self.raw += chunk

        self.task = asyncio.create_task(read())
        return self

    def events(self) -> int:
        return len(DATA_LINE.findall(b"".join(dechunk(bytes(self.raw)))))

    def last_full_version(self) -> int:
        """The version of the last full token it was given (0: none yet)."""
        full = [i for i in ID_LINE.findall(bytes(self.raw[-65536:])) if not is_pointer(i)]
        return token_version(full[-1]) if full else 0

    def phase(self, start: int) -> dict[str, Any]:
        """Figures for the bytes from `start` (a chunk boundary: taken while nothing was in flight)."""
        raw = bytes(self.raw[start:])
        pieces = dechunk(raw)
        body, chunks = b"".join(pieces), len(pieces)
        data = DATA_LINE.findall(body)
        last_only = len(raw) - len(body) + sum(map(id_on_last_only, pieces))
        ids = ID_LINE.findall(body)
        pointers = [i for i in ids if is_pointer(i)]
        full = [i for i in ids if not is_pointer(i)]
        plain = sum(len(b"data: \n\n") + len(d) for d in data)
        n = max(1, len(data))
        return {"events": len(data), "bytes": len(raw), "sse_bytes": len(body), "plain_bytes": plain,
                "bytes_per_event": round(len(raw) / n, 1), "plain_frame_bytes": round(plain / n, 1),
                "ratio": round(len(raw) / max(1, plain), 3), "ratio_sse_only": round(len(body) / max(1, plain), 3),
                "ids": len(ids), "id_chars_avg": round(sum(map(len, ids)) / max(1, len(ids)), 1),
                "full_ids": len(full), "full_id_chars_avg": round(sum(map(len, full)) / max(1, len(full)), 1),
                "full_id_versions": {str(v): n for v in (1, 2, 3)
                                     if (n := sum(1 for i in full if token_version(i) == v))},
                "pointer_ids": len(pointers),
                "pointer_chars_avg": round(sum(map(len, pointers)) / max(1, len(pointers)), 1),
                "writes": chunks, "events_per_write": round(len(data) / max(1, chunks), 2),
                "ratio_if_id_on_last_event_of_each_write_only": round(last_only / max(1, plain), 3)}

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            self.task.cancel()


class Native:
    """The native stream: each batch's size, token and events."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.batches: list[tuple[int, int, int]] = []  # (serialized bytes, token bytes, events)

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as ch:
            async for batch in pb_grpc.SubscriberStub(ch).Subscribe(pb.SubscribeRequest(topics=[TOPIC])):
                self.batches.append((batch.ByteSize() + 5, len(batch.token), len(batch.events)))

    def phase(self, start: int) -> dict[str, Any]:
        got = [b for b in self.batches[start:] if b[2]]
        events = sum(b[2] for b in got)
        return {"batches": len(got), "events": events,
                "token_bytes_avg": round(sum(b[1] for b in got) / max(1, len(got)), 1),
                "events_per_batch": round(events / max(1, len(got)), 2),
                "bytes_per_event": round(sum(b[0] for b in got) / max(1, events), 1),
                "token_share": round(sum(b[1] for b in got) / max(1, sum(b[0] for b in got)), 3)}


async def publish(stubs: list[Any], rate: float, seconds: float, counter: list[int], per_request: int = 1) -> None:
    """`rate` events/s round-robin over the brokers for `seconds`, `per_request` events per Publish."""
    loop = asyncio.get_running_loop()
    due, end, i = loop.time(), loop.time() + seconds, 0
    pending: set[asyncio.Future[Any]] = set()
    while loop.time() < end:
        stub = stubs[i % len(stubs)]
        i += 1
        events = [pb.Event(topic=TOPIC, data=event_data(counter[0] + k)) for k in range(per_request)]
        counter[0] += per_request
        task = asyncio.ensure_future(stub.Publish(pb.PublishRequest(events=events), timeout=10))
        pending.add(task)
        task.add_done_callback(pending.discard)
        due += per_request / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
    await asyncio.gather(*pending)


async def checkpoint_figures(brokers: list[Server]) -> dict[str, float]:
    """Summed over the brokers: checkpoints stored (registrations), held, and the bytes their stores count."""
    totals = {"registrations": 0.0, "held": 0.0, "bytes": 0.0}
    for b in brokers:
        found = await counters(b.endpoints["http"], "neoplasma_broker_checkpoint_registrations_total", "outcome")
        totals["registrations"] += found.get("stored", 0.0)
        text = await metrics_text(b.endpoints["http"])
        for key, name in (("held", "neoplasma_broker_checkpoints"), ("bytes", "neoplasma_broker_checkpoint_bytes")):
            found_gauge = re.search(rf"^{name} (\S+)$", text, re.M)
            totals[key] += float(found_gauge.group(1)) if found_gauge else 0.0
    return totals


async def metrics_text(http: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://{http}/metrics") as resp:
        return await resp.text()


async def run(brokers_n: int, before: str, subscribers: int, idle_rate: float, load_rate: float,
              seconds: float, days_old: bool = False) -> dict[str, Any]:
    logs = ROOT / "bench" / "results" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tree = exported_tree(before)
    old_env = {"PYTHONPATH": os.pathsep.join(str(tree / d) for d in ("core", "broker", "proxy", "protos"))}
    servers: list[Server] = []
    try:
        started = time.monotonic()
        brokers = []
        rng = random.Random(brokers_n)
        for i in range(brokers_n):
            env = {"NEOPLASMA_TEST_FIRST_SEQ": str(rng.randint(200_000_000, 260_000_000))} if days_old else None
            brokers.append(start_server("broker", f"wb-b{i}", logs, env=env))
            servers.append(brokers[-1])
        proxies = {"before": start_server("proxy", "wb-before", logs, env=old_env),
                   "after": start_server("proxy", "wb-after", logs)}
        servers += proxies.values()
        print(f"{brokers_n} brokers and 2 proxies up in {time.monotonic() - started:.1f} s", flush=True)
        members = [(b.name, b.endpoints["grpc"]) for b in brokers]
        for p in proxies.values():
            reply = await apply_membership(p.endpoints["control"], 1, members)
            assert reply.accepted, reply.reason
        clients = {label: [await RawSse(p.endpoints["http"]).start() for _ in range(subscribers)]
                   for label, p in proxies.items()}
        natives = {label: Native(p.endpoints["grpc"]) for label, p in proxies.items()}
        native_tasks = [asyncio.create_task(n.run()) for n in natives.values()]
        for p in proxies.values():
            await wait_for(lambda p=p: links_ready(p.endpoints["control"], brokers_n), timeout=120,
                           what="links with interest applied")
        channels = [grpc.aio.insecure_channel(b.endpoints["grpc"]) for b in brokers]
        stubs = [pb_grpc.BrokerStub(ch) for ch in channels]
        counter = [0]
        await publish(stubs, 200.0, brokers_n / 200.0, counter)  # one event per broker: every position set

        def delivered() -> bool:
            return all(c.events() >= counter[0] for cs in clients.values() for c in cs)

        await wait_for(delivered, timeout=30, what="the first events everywhere")
        waited = time.monotonic()
        while time.monotonic() - waited < 30 and any(c.last_full_version() != 3 for c in clients["after"]):
            await publish(stubs, 2 * brokers_n, 0.5, counter)  # checkpoints are made while positions move
        await wait_for(delivered, timeout=30, what="the events while waiting for version 3")
        print(f"after's last full token: version {clients['after'][0].last_full_version()} "
              f"({time.monotonic() - waited:.1f} s)", flush=True)
        results: dict[str, Any] = {}
        for phase, rate, per_request in (("idle", idle_rate, 1), ("load", load_rate, 5)):
            marks = {label: [len(c.raw) for c in cs] for label, cs in clients.items()}
            native_marks = {label: len(n.batches) for label, n in natives.items()}
            checkpoints_before, phase_started = await checkpoint_figures(brokers), time.monotonic()
            await publish(stubs, rate, seconds, counter, per_request)
            await wait_for(delivered, timeout=60, what=f"every {phase} event delivered")
            await asyncio.sleep(0.2)  # a heartbeat's bytes may be in flight
            checkpoints_after = await checkpoint_figures(brokers)
            elapsed = time.monotonic() - phase_started
            registered = checkpoints_after["registrations"] - checkpoints_before["registrations"]
            results[f"checkpoints_{phase}"] = {
                "stored_per_second_all_brokers": round(registered / elapsed, 1),
                "stored_per_second_per_broker": round(registered / elapsed / brokers_n, 2),
                "held_all_brokers": checkpoints_after["held"],
                "counted_bytes_per_checkpoint": round(checkpoints_after["bytes"] / max(1.0, checkpoints_after["held"]),
                                                      1)}
            print(f"{phase}: checkpoints stored {results[f'checkpoints_{phase}']}", flush=True)
            for label, cs in clients.items():
                figures = [c.phase(m) for c, m in zip(cs, marks[label], strict=True)]
                median = sorted(figures, key=lambda f: f["ratio"])[len(figures) // 2]
                results[f"{label}_{phase}"] = {"sse": median, "native": natives[label].phase(native_marks[label]),
                                               "rate_events_per_second": rate}
                print(f"{brokers_n} brokers, {phase} ({rate:g} events/s), {label}: "
                      f"{median['bytes_per_event']} B/event over a {median['plain_frame_bytes']} B plain frame = "
                      f"{median['ratio']}x (SSE alone {median['ratio_sse_only']}x), "
                      f"ids {median['id_chars_avg']} chars on average: {median['full_ids']} full tokens of "
                      f"{median['full_id_chars_avg']} and {median['pointer_ids']} pointers of "
                      f"{median['pointer_chars_avg']}, "
                      f"{median['events_per_write']} events/write (an id on each write's last event only "
                      f"would give {median['ratio_if_id_on_last_event_of_each_write_only']}x); native token "
                      f"{results[f'{label}_{phase}']['native']['token_bytes_avg']} B, "
                      f"{results[f'{label}_{phase}']['native']['events_per_batch']} events/batch", flush=True)
        for cs in clients.values():
            for c in cs:
                await c.close()
        for task in native_tasks:
            task.cancel()
        for ch in channels:
            await ch.close()
        return {"brokers": brokers_n, "before": before, "days_old": days_old, "subscribers_per_proxy": subscribers,
                "seconds_per_phase": seconds, "event_data_bytes": len(event_data(0)),
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                            "load_average": os.getloadavg()}, **results}
    finally:
        for s in servers:  # all at once: a broker's drain takes its own time
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        for s in servers:
            s.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", type=int, default=10)
    parser.add_argument("--before", default="main", help="git revision of the proxy to compare with")
    parser.add_argument("--subscribers", type=int, default=3, help="raw SSE subscribers per proxy")
    parser.add_argument("--idle-rate", type=float, default=5.0, help="events/s in the idle phase")
    parser.add_argument("--load-rate", type=float, default=1000.0, help="events/s in the load phase")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of publishing per phase")
    parser.add_argument("--days-old", action="store_true", help="brokers' seqs start at 200-260 million")
    args = parser.parse_args()
    out = asyncio.run(run(args.brokers, args.before, args.subscribers, args.idle_rate, args.load_rate, args.seconds,
                          args.days_old))
    path = ROOT / "bench" / "results" / f"wire_bytes_{args.brokers}{'_days_old' if args.days_old else ''}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    print(f"written to {path}")
