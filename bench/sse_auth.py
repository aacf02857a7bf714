"""SSE connects per second on one proxy, with and without subscriber token verification.

One broker and one proxy (one worker) as real processes on 127.0.0.1; the proxy has an HS256 keys
file, a JWKS (an ES256 key) and `--public-topics pub`, so the three cases run against the same
process, interleaved round by round:
  - public: `?eventType=pub:N` (no token looked at: what every connect cost before private topics);
  - hs256:  `?eventType=user:N`, `Authorization: Bearer` an HS256 token for `user:N`;
  - es256:  the same with ES256 tokens (kid named).
N cycles over as many distinct topics (and tokens) as there are connects in flight, in every case.
Also measured in this process: one `verify` call (neoplasma.proxy.auth) per algorithm.
The client is a raw asyncio protocol on uvloop (it writes one request, reads until the proxy's
first chunk, then resets the connection), far cheaper per connect than the proxy; CPU seconds of
both are reported. A connect counts once its 200 and first SSE bytes arrived.

Prints a table and writes bench/results/sse_auth.json; the figure the issue asks for is the
HS256 connect rate as a share of the public one (verification may cost at most a fifth).

    python bench/sse_auth.py [--connects N] [--concurrency C] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import psutil
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from neoplasma.core.net import raise_fd_limit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import links_ready, start_server, wait_for

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"b" * 48
CASES = ("public", "hs256", "es256")
_LINGER_RESET = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT left behind by the client


class Connect(asyncio.Protocol):
    """One SSE connect: the request, then the response's head and first chunk."""

    def __init__(self, request: bytes, done: asyncio.Future[bool]) -> None:
        self.request, self.done = request, done
        self.seen = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.seen += data
        if b"retry:" in self.seen or (b"\r\n\r\n" in self.seen and not self.seen.startswith(b"HTTP/1.1 200")):
            if not self.done.done():
                self.done.set_result(self.seen.startswith(b"HTTP/1.1 200"))
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


def requests(case: str, port: int, pool: int, ec_key: Any, connects: int, salt: int) -> list[bytes]:
    """The requests of one case and round: `pool` distinct topics and, in the private cases, a new token for
    every connect (as many users connecting for the first time; none is in the proxy's memory of recently
    verified tokens), named apart by `salt`."""
    head = f"Host: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
    if case == "public":  # as many distinct topics as the private cases: the same hub and interest work
        return [f"GET /?eventType=pub:{i} HTTP/1.1\r\n{head}\r\n".encode() for i in range(pool)]
    exp = int(time.time()) + 3600
    out = []
    for i in range(connects):
        claims = {"topics": [f"user:{i % pool}"], "exp": exp, "aud": "bench", "jti": f"{salt}-{i}"}
        token = (jwt.encode(claims, SECRET, algorithm="HS256") if case == "hs256"
                 else jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "bench-ec"}))
        out.append(f"GET /?eventType=user:{i % pool} HTTP/1.1\r\n{head}Authorization: Bearer {token}\r\n\r\n"
                   .encode())
    return out


async def run(port: int, reqs: list[bytes], connects: int, concurrency: int) -> tuple[float, int]:
    """`connects` connects, `concurrency` at a time: (seconds, failures)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with gate:
            done: asyncio.Future[bool] = loop.create_future()
            try:
                await loop.create_connection(lambda: Connect(reqs[i % len(reqs)], done), "127.0.0.1", port)
                ok = await asyncio.wait_for(done, 30)
            except (OSError, TimeoutError):
                ok = False
            failures += not ok

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(connects)))
    return time.perf_counter() - started, failures


async def main(connects: int, concurrency: int, rounds: int) -> dict[str, Any]:
    raise_fd_limit()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with tempfile.TemporaryDirectory(prefix="sse-auth-bench-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "keys").write_text(SECRET.decode() + "\n")
        public_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key())) | {"kid": "bench-ec"}
        (tmp_path / "jwks.json").write_text(json.dumps({"keys": [public_jwk]}))
        broker = start_server("broker", "bench-b", tmp_path)
        proxy = start_server("proxy", "bench-p", tmp_path, "--brokers", broker.endpoints["grpc"],
                             "--subscriber-jwt-keys-file", str(tmp_path / "keys"),
                             "--subscriber-jwks-file", str(tmp_path / "jwks.json"),
                             "--subscriber-jwt-audience", "bench", "--public-topics", "pub")
        try:
            await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the relay link")
            port = proxy.port("http")
            server, client = psutil.Process(proxy.proc.pid), psutil.Process()
            await run(port, requests("public", port, concurrency, ec_key, 0, 0), min(connects, 2000), concurrency)
            runs: list[dict[str, Any]] = []
            for r in range(rounds):
                reqs = {case: requests(case, port, concurrency, ec_key, connects, r) for case in CASES}
                for case in CASES if r % 2 == 0 else tuple(reversed(CASES)):
                    s0, c0 = sum(server.cpu_times()[:2]), sum(client.cpu_times()[:2])
                    seconds, failures = await run(port, reqs[case], connects, concurrency)
                    s1, c1 = sum(server.cpu_times()[:2]), sum(client.cpu_times()[:2])
                    row = {"round": r, "case": case, "connects": connects, "failures": failures,
                           "connects_per_second": round(connects / seconds),
                           "proxy_cpu_us_per_connect": round((s1 - s0) / connects * 1e6, 1),
                           "client_cpu_us_per_connect": round((c1 - c0) / connects * 1e6, 1)}
                    print(f"round {r} {case:6}: {row['connects_per_second']:6} connects/s, proxy "
                          f"{row['proxy_cpu_us_per_connect']} CPU-µs/connect, client "
                          f"{row['client_cpu_us_per_connect']} CPU-µs/connect, {failures} failed", flush=True)
                    runs.append(row)
        finally:
            proxy.stop()
            broker.stop()
    medians = {case: {figure: statistics.median(row[figure] for row in runs if row["case"] == case)
                      for figure in ("connects_per_second", "proxy_cpu_us_per_connect", "client_cpu_us_per_connect")}
               for case in CASES}
    public = medians["public"]["connects_per_second"]
    share = {case: round(medians[case]["connects_per_second"] / public, 3) for case in ("hs256", "es256")}
    # The proxy is CPU-bound at a connect storm: its connect rate is the inverse of its CPU per connect,
    # a figure other load on the machine disturbs far less than the wall-clock rate.
    cpu = medians["public"]["proxy_cpu_us_per_connect"]
    share_cpu = {case: round(cpu / medians[case]["proxy_cpu_us_per_connect"], 3) for case in ("hs256", "es256")}
    verify_us = verify_cost(ec_key)
    # The least noisy figure on a shared machine: one verify's CPU time against a public connect's.
    verify_share = {case: round(verify_us[case] / cpu, 3) for case in ("hs256", "es256")}
    return {"connects": connects, "concurrency": concurrency, "rounds": rounds, "medians": medians,
            "rate_vs_public": share, "rate_vs_public_by_cpu": share_cpu, "verify_us": verify_us,
            "verify_share_of_connect_cpu": verify_share, "runs": runs}


def verify_cost(ec_key: Any, n: int = 2000) -> dict[str, float]:
    """Microseconds of one `verify` (signature, claims, topics) per algorithm, in this process: of a token
    seen for the first time, and of one verified before (a reconnect)."""
    from neoplasma.proxy.auth import Keys, jwks_keys, verify

    public_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key())) | {"kid": "bench-ec"}
    keys = Keys.of([SECRET], jwks_keys(json.dumps({"keys": [public_jwk]})))
    exp = int(time.time()) + 3600
    tokens = {"hs256": [jwt.encode({"topics": ["user:1"], "exp": exp, "jti": str(i)}, SECRET, algorithm="HS256")
                        for i in range(n)],
              "es256": [jwt.encode({"topics": ["user:1"], "exp": exp, "jti": str(i)}, ec_key, algorithm="ES256",
                                   headers={"kid": "bench-ec"}) for i in range(n)]}
    out = {}
    now = time.time()
    for case, batch in tokens.items():
        for label, repeat in (("", batch), ("_remembered", [batch[-1]] * n)):
            started = time.process_time()  # CPU time: what a shared machine's other load does not inflate
            for token in repeat:
                verify(token, keys, "", now)
            out[case + label] = round((time.process_time() - started) / n * 1e6, 1)
    return out

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connects", type=int, default=5000, help="connects per case and round")
    parser.add_argument("--concurrency", type=int, default=1000, help="connects in flight at once")
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    import uvloop

    out = uvloop.run(main(opts.connects, opts.concurrency, opts.rounds))
    path = ROOT / "bench" / "results" / "sse_auth.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    m = out["medians"]
    print(f"\n{'case':8}{'connects/s':>12}{'proxy CPU-µs':>14}{'client CPU-µs':>15}")
    for case in CASES:
        print(f"{case:8}{m[case]['connects_per_second']:>12.0f}{m[case]['proxy_cpu_us_per_connect']:>14.1f}"
              f"{m[case]['client_cpu_us_per_connect']:>15.1f}")
    share = out["rate_vs_public"]
    by_cpu = out["rate_vs_public_by_cpu"]
    print(f"connect rate with verification, as a share of without: HS256 {share['hs256']:.0%}, "
          f"ES256 {share['es256']:.0%} (wall clock); HS256 {by_cpu['hs256']:.0%}, ES256 {by_cpu['es256']:.0%} "
          "(from the proxy's CPU per connect); HS256 must keep at least 80%")
    v = out["verify_us"]
    print(f"one verify call, a new token: HS256 {v['hs256']} µs, ES256 {v['es256']} µs; one verified before: "
          f"{v['hs256_remembered']} µs, {v['es256_remembered']} µs")
    vs = out["verify_share_of_connect_cpu"]
    print(f"one verify as a share of a public connect's proxy CPU: HS256 {vs['hs256']:.1%}, ES256 {vs['es256']:.1%}")
    print(json.dumps({"medians": m, "rate_vs_public": share, "rate_vs_public_by_cpu": by_cpu, "verify_us": v,
                      "verify_share_of_connect_cpu": vs}))
    print(f"written to {path}")
    sys.exit(0)
