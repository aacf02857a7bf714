"""Sockets and small server plumbing shared by the broker and the proxy."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import socket
import sys
from typing import Any

import grpc

from neoplasma.core.errors import NeoplasmaError


class CannotListen(NeoplasmaError):
    def __init__(self, host: str, port: int, reason: str, flag: str) -> None:
        super().__init__(f"cannot listen on {hostport(host, port)}: {reason}; choose another {flag} "
                         "or stop what is using it")


class ParentGone(NeoplasmaError):
    """`neoplasma up`, which started this server, died before the server could follow it."""


def bind_socket(host: str, port: int, flag: str) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one (read it back with sock.getsockname()).
    `flag` names the option that chose the port, for the error if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CannotListen(host, port, exc.strerror or str(exc), flag) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def add_grpc_port(server: grpc.aio.Server, host: str, port: int, flag: str) -> int:
    """Have the grpc.aio `server` listen on host:port (0: any free port); the port it got."""
    try:
        return int(server.add_insecure_port(hostport(host, port)))
    except RuntimeError:  # grpc says no more than "failed to bind"
        raise CannotListen(host, port, "the address is in use or not available", flag) from None


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


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def announce(**fields: Any) -> None:
    """Print the one machine-readable line saying the server is serving (stdout)."""
    sys.stdout.write(json.dumps({"serving": fields}) + "\n")
    sys.stdout.flush()
