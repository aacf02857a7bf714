"""Sockets and small server plumbing shared by the broker and the proxy."""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import resource
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any, cast

import grpc
from aiohttp import web

from neoplasma.core.errors import NeoplasmaError
from neoplasma.core.logs import get_logger
from neoplasma.core.settings import DEFAULT_BACKLOG

log = get_logger("net")

SOMAXCONN = "/proc/sys/net/core/somaxconn"


def somaxconn() -> int | None:
    """The kernel's cap on a listen backlog (net.core.somaxconn); None when it cannot be read."""
    try:
        with open(SOMAXCONN) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def effective_backlog(asked: int, cap: int | None) -> int:
    """The backlog a listening socket gets when `asked` for under the kernel's `cap` (None: unknown)."""
    return asked if cap is None else min(asked, cap)


class CannotListen(NeoplasmaError):
    def __init__(self, host: str, port: int, reason: str, flag: str) -> None:
        super().__init__(f"cannot listen on {hostport(host, port)}: {reason}; choose another {flag} "
                         "or stop what is using it")


class ParentGone(NeoplasmaError):
    """`neoplasma up`, which started this server, died before the server could follow it."""


def bind_socket(host: str, port: int, flag: str, reuse_port: bool = False, listen: bool = True,
                backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one (read it back with sock.getsockname()).
    `flag` names the option that chose the port, for the error if it is taken. With `reuse_port`,
    other sockets with SO_REUSEPORT (a pod's workers) may listen on it too; without `listen`, it
    only holds the port (a supervisor's, while its workers serve it). A server that takes the
    socket over (`HttpServer`, `GrpcServer`) must listen with the same `backlog` again: asyncio's
    create_server calls listen() itself, with 100 unless told."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CannotListen(host, port, exc.strerror or str(exc), flag) from None
    if listen:
        cap = somaxconn()
        if effective_backlog(backlog, cap) < backlog:
            log.warning("listen_backlog_capped", address=hostport(host, sock.getsockname()[1]), asked=backlog,
                        somaxconn=cap, fix="raise the sysctl net.core.somaxconn")
        sock.listen(backlog)
        sock.setblocking(False)
    return sock


def add_grpc_port(server: grpc.aio.Server, host: str, port: int, flag: str,
                  tls: grpc.ServerCredentials | None = None) -> int:
    """Have the grpc.aio `server` listen on host:port (0: any free port), with `tls` if given; the port it got."""
    address = hostport(host, port)
    try:
        return int(server.add_secure_port(address, tls) if tls else server.add_insecure_port(address))
    except RuntimeError:  # grpc says no more than "failed to bind"
        raise CannotListen(host, port, "the address is in use or not available", flag) from None


class _HeaderDeadline(asyncio.Protocol):
    """Wraps an HTTP server protocol: aborts the connection unless its first request's headers
    are complete within `timeout` (a slow-header client); later requests on the connection are
    bounded by the keep-alive timeout, which counts from the previous response."""

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self.inner, self.timeout = inner, timeout
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        abort = cast(asyncio.Transport, transport).abort  # uvloop's transports are not asyncio.Transport
        self._timer = asyncio.get_running_loop().call_later(self.timeout, abort)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            if b"\r\n\r\n" in self._tail + data:
                self._timer.cancel()
                self._timer = None
            self._tail = data[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


Front = Callable[[Callable[[], asyncio.Protocol]], asyncio.Protocol]


class HttpServer:
    """An aiohttp app on a listening socket, with TLS when `tls` is given; a request's headers must
    arrive within `header_timeout` seconds (also the keep-alive timeout between requests). `backlog`
    is the listen backlog `sock` was bound with (`bind_socket`). With `front`, each connection is
    `front(make_handler)`, which makes aiohttp's handler for it only if it needs one (the proxy's SSE
    fast path). Accepted connections have TCP keepalive on (as aiohttp sets it; here it comes from
    the listening socket, at no cost per connection)."""

    def __init__(self, app: web.Application, sock: socket.socket, header_timeout: float,
                 tls: ssl.SSLContext | None = None, backlog: int = DEFAULT_BACKLOG, front: Front | None = None,
                 **handler_args: Any) -> None:
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=header_timeout,
                                    **handler_args)
        self.sock, self.header_timeout, self.tls, self.backlog = sock, header_timeout, tls, backlog
        self.front = front
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        await self.runner.setup()
        handlers = self.runner.server
        assert handlers is not None
        front, timeout = self.front, self.header_timeout

        def connection() -> asyncio.Protocol:
            return _HeaderDeadline(front(handlers) if front else handlers(), timeout)

        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # inherited by accepted sockets
        self._server = await asyncio.get_running_loop().create_server(connection, sock=self.sock, ssl=self.tls,
                                                                      backlog=self.backlog)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.runner.cleanup()


PARENT_PID_ENV = "NEOPLASMA_PARENT_PID"


def die_with_parent() -> None:
    """When started by `neoplasma up` ($NEOPLASMA_PARENT_PID), get SIGTERM if `up` dies (Linux)."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # `up` died before the line above took effect
        raise ParentGone("neoplasma up (the parent) is gone; not starting")


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (each subscriber is a socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# The descriptors a server's table is made for at start (`presize_fd_table`): 512 KiB of kernel memory at most.
FD_TABLE_AT_START = 1 << 16


def presize_fd_table(limit: int, most: int = FD_TABLE_AT_START) -> int:
    """Grow this process's descriptor table now to hold min(`limit`, `most`) descriptors; returns that size (0: it
    was left as it is).

    Linux grows a process's descriptor table by doubling as descriptors are opened, and in a process with threads
    (gRPC's) each growth stops the thread that opened the descriptor for an RCU grace period (expand_fdtable:
    synchronize_rcu). A proxy accepting 1000 connections at once grew its table three times, and its event loop stood
    7-12 ms in the kernel at each (perf's sched_switch during bench/forged_resumes.py's attack: the honest
    subscribers' worst latencies). A table never shrinks: growing it once, before any thread exists, takes those
    stalls away, for 8 bytes of kernel memory per descriptor. Beyond `most` it grows as before."""
    size = min(limit, most)
    if size <= 64:  # (what a table holds from the start)
        return 0
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, size - 1)  # the lowest free one from there: none is replaced
        os.close(high)
    except OSError:  # (no free descriptor from there under the limit: the table is that large already)
        return 0
    finally:
        os.close(fd)
    return size


def identity(data: bytes) -> bytes:
    """The gRPC (de)serializer of messages that are bytes already (encoded once, sent as they are)."""
    return data


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def announce(**fields: Any) -> None:
    """Print the one machine-readable line saying the server is serving (stdout)."""
    sys.stdout.write(json.dumps({"serving": fields}) + "\n")
    sys.stdout.flush()
