"""Peak broker RSS while it refuses oversize publishes (issue 20, item 5; goal: under 64 MiB above idle).

Each case gets a fresh broker (one worker, no publisher keys: the default) whose RSS is sampled every
10 ms from before the request until the answer (and 0.5 s after it); the figure is the peak over its
idle RSS. With `--before REF`, the same cases run on that commit's code (exported with `git archive`,
first on PYTHONPATH), interleaved, side by side.

Prints a table and writes JSON (bench/results/publish_refusals.json).

Usage: python bench/publish_refusals.py [--before 5d773e4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psutil

from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import start_server, trees

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TINY = b'{"meta":{"type":"t"},"data":1}'



def tiny_events(size: int) -> bytes:
    n = (size - 2) // (len(TINY) + 1)
    return b"[" + b",".join([TINY] * n) + b"]"


def numbers_event(size: int) -> bytes:
    head, tail = b'{"meta":{"type":"t"},"data":[', b"]}"
    n = (size - len(head) - len(tail)) // 2
    return head + b",".join([b"1"] * n) + tail


def string_event(size: int) -> bytes:
    head, tail = b'{"meta":{"type":"t"},"data":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def nested(size: int) -> bytes:
    return b"[" * (size // 2) + b"]" * (size // 2)


async def http_post(address: str, body: bytes | None, chunked_bytes: int = 0) -> str:
    """POST /publish by hand: `body` with its length, or `chunked_bytes` of a chunked body (sent until the
    broker answers or closes); the status line, or what ended the exchange."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if body is not None:
            writer.write(b"POST /publish HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            writer.write(body)
        else:
            writer.write(b"POST /publish HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (MIB, b"[" + b"1," * (MIB // 2 - 1) + b"1")
            answer = asyncio.ensure_future(reader.readline())
            sent = 0
            while sent < chunked_bytes and not answer.done():
                writer.write(chunk)
                sent += MIB
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
            with contextlib.suppress(ConnectionError):
                line = await asyncio.wait_for(answer, 60)
                return f"{line.decode().strip()} after {sent // MIB} MiB sent"
            return f"connection closed after {sent // MIB} MiB sent"
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 60)).decode().strip()
    finally:
        writer.close()


async def grpc_publish(address: str, request: pb.PublishRequest) -> str:
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        try:
            await pb_grpc.BrokerStub(ch).Publish(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {(exc.details() or '')[:80]}"
    return "OK"


def cases(size: int) -> dict[str, Callable[[Server], Awaitable[str]]]:
    limit = size - 1024  # just under --max-request-bytes
    return {
        "http: 16 MiB of tiny events": lambda b: http_post(b.endpoints["http"], tiny_events(limit)),
        "http: one 16 MiB event (numbers)": lambda b: http_post(b.endpoints["http"], numbers_event(limit)),
        "http: one 16 MiB event (a string)": lambda b: http_post(b.endpoints["http"], string_event(limit)),
        "http: 16 MiB of nesting": lambda b: http_post(b.endpoints["http"], nested(limit)),
        "http: 100 MiB chunked": lambda b: http_post(b.endpoints["http"], None, chunked_bytes=100 * MIB),
        "grpc: 16 MiB of tiny events": lambda b: grpc_publish(b.endpoints["grpc"], pb.PublishRequest(
            events=[pb.Event(topic="t", data=b"1")] * ((limit - 16) // 8))),
        "grpc: one 16 MiB event (numbers)": lambda b: grpc_publish(b.endpoints["grpc"], pb.PublishRequest(
            events=[pb.Event(topic="t", data=b"[" + b"1," * (limit // 2 - 16) + b"1]")])),
    }


Server = Any


async def one_case(tmp: Path, env: dict[str, str], run: Callable[[Server], Awaitable[str]]) -> dict[str, Any]:
    broker = start_server("broker", "refusals", tmp, env=env)
    try:
        proc = psutil.Process(broker.proc.pid)
        await asyncio.sleep(0.5)  # settle after start (not a synchronisation: the idle figure)
        idle = proc.memory_info().rss
        peak = idle
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, proc.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        try:
            answer = await run(broker)
            took = time.monotonic() - started
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            sampler.join()
        return {"answer": answer, "idle_rss_mb": round(idle / MIB, 1),
                "peak_above_idle_mb": round((peak - idle) / MIB, 1), "seconds": round(took, 2)}
    finally:
        broker.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="also run this commit's code, side by side")
    args = parser.parse_args()
    codes = trees(args.before)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in cases(16 * MIB).items():
            for tree, env in codes.items():
                row = {"case": name, "tree": tree, **await one_case(Path(tmp), env, run)}
                results.append(row)
                print(f"{name:<36} {tree:>14}: peak +{row['peak_above_idle_mb']:6.1f} MB over {row['idle_rss_mb']} MB "
                      f"in {row['seconds']} s: {row['answer'][:90]}", flush=True)
    out = ROOT / "bench" / "results" / "publish_refusals.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
