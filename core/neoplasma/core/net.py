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


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one (read it back with sock.getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port "
                         "or stop what is using it") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


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
        raise SystemExit("neoplasma up (the parent) is gone; not starting")


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
