"""The cluster credential and TLS on real processes: TLS round trip, credential rotation while
subscribers stay connected, and `neoplasma up`'s credential per run."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from harness import CREDENTIAL, links_ready, proxy_status, publish_grpc, sse, wait_for

from neoplasma.core.trust import Access, Tokens, bearer_metadata
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl); (ca, cert, key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=neoplasma")
    (folder / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:neoplasma\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "ext")
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


async def status(access: Access, control: str) -> pb.ProxyStatus:
    async with access.channel(control) as ch:
        reply: pb.ProxyStatus = await pb_grpc.ProxyControlStub(ch).Status(pb.StatusRequest(), timeout=5,
                                                                          metadata=access.metadata())
    return reply


async def test_tls_round_trip(start: Any, tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    broker = start("broker", "b0", *tls)
    proxy = start("proxy", "p0", *tls, "--tls-ca", str(ca), "--brokers", broker.endpoints["grpc"])
    access = Access(Tokens(given=[CREDENTIAL]), str(ca))
    control = proxy.endpoints["control"]

    async def linked() -> bool:
        return [link.interest_synced for link in (await proxy_status(control, access)).links] == [True]

    async with sse(proxy.endpoints["http"], "t") as client:  # subscribers stay plain
        await wait_for(linked, what="the relay over TLS")
        async with access.channel(broker.endpoints["grpc"]) as ch:
            reply = await pb_grpc.BrokerStub(ch).Publish(pb.PublishRequest(events=[pb.Event(topic="t", data=b"1")]))
        assert reply.accepted == 1
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca)))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"https://{broker.endpoints['http']}/publish", json={"meta": {"type": "t"},
                                                                                       "data": 2}) as resp:
                assert resp.status == 200
        await wait_for(lambda: len(client.events) == 2, what="both events through the TLS relay")
        assert [e["data"] for e in client.events] == [1, 2]
    async with grpc.aio.insecure_channel(control) as plain:  # a plaintext client gets nowhere
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.ProxyControlStub(plain).Status(pb.StatusRequest(), timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_credential_rotation_keeps_subscribers(start: Any, tmp_path: Path) -> None:
    """The credential file is replaced (as the kubelet swaps a mounted Secret): the new one works
    within a second or so, the old one is refused, and relay streams and subscribers stay."""
    credential = tmp_path / "credential"
    credential.write_text("old-credential\n")
    env = {"NEOPLASMA_CREDENTIAL": ""}
    broker = start("broker", "b0", "--credential-file", str(credential), env=env)
    proxy = start("proxy", "p0", "--credential-file", str(credential), "--brokers", broker.endpoints["grpc"],
                  env=env)
    control = proxy.endpoints["control"]
    old, new = Access(Tokens(given=["old-credential"])), Access(Tokens(given=["new-credential"]))

    async def answers(access: Access) -> bool:
        try:
            return bool(await proxy_status(control, access))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

    async with sse(proxy.endpoints["http"], "t") as client:
        await wait_for(lambda: links_ready(control, 1, old), what="the relay link")
        assert await publish_grpc(broker.endpoints["grpc"], [("t", 1)]) == 1
        await wait_for(lambda: client.events, what="the event before")
        replacement = tmp_path / "credential.new"
        replacement.write_text("new-credential\n")
        os.replace(replacement, credential)
        await wait_for(lambda: answers(new), what="the new credential accepted")
        assert not await answers(old)
        assert await publish_grpc(broker.endpoints["grpc"], [("t", 2)]) == 1
        await wait_for(lambda: len(client.events) == 2, what="the event after")
        assert [e["data"] for e in client.events] == [1, 2] and not client.ended.is_set()
        links = (await proxy_status(control, new)).links
        assert [(link.state, link.events_received) for link in links] == [(pb.BrokerLink.CONNECTED, 2)]
        async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
            stub = pb_grpc.BrokerStub(ch)

            async def broker_stats() -> pb.BrokerStats | None:  # the broker reads the file on its own clock
                try:
                    return await stub.Stats(pb.StatsRequest(), timeout=5, metadata=bearer_metadata("new-credential"))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    return None

            stats = await wait_for(broker_stats, what="the new credential accepted by the broker")
        assert stats.relay_streams == 1  # the proxy's relay stream was never dropped


async def test_up_makes_a_credential_per_run(run_up: Any) -> None:
    _, endpoints = run_up("--brokers", "1", "--proxies", "1", "--credential-file", "")
    path = endpoints["credential_file"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    control = endpoints["proxies"][0]["control"]
    async with grpc.aio.insecure_channel(control) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.ProxyControlStub(ch).Status(pb.StatusRequest(), timeout=5, metadata=bearer_metadata(
                CREDENTIAL))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    applied = await proxy_status(control, Access(Tokens(path)))
    assert applied.membership_version >= 1  # up pushed its membership with the credential
