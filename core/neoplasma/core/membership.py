"""Broker membership: versioned snapshots, as pure data and decisions.

The operator (from broker pods) and the local runtime (from child processes)
build snapshots with `next_snapshot`; proxies check incoming ones with
`check_snapshot`. Neither does I/O here.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from neoplasma.core.scaling import HARD_MAX
from neoplasma.core.text import excerpt
from neoplasma.wire.v1 import neoplasma_pb2 as pb


class BrokerState(StrEnum):
    SERVING = "SERVING"
    DRAINING = "DRAINING"


@dataclass(frozen=True, order=True)
class Member:
    name: str
    address: str  # host:port of the broker's gRPC endpoint
    state: BrokerState = BrokerState.SERVING


@dataclass(frozen=True)
class Snapshot:
    version: int
    members: tuple[Member, ...]
    cluster: str = ""  # the cluster's identity, named by resume tokens

    def to_proto(self) -> pb.Membership:
        return pb.Membership(
            version=self.version, cluster=self.cluster,
            brokers=[pb.BrokerMember(name=m.name, address=m.address,
                                     state=m.state.value)
                     for m in self.members],
        )


EMPTY = Snapshot(0, ())


def next_snapshot(current: Snapshot, members: Iterable[Member]) -> Snapshot:
    """The snapshot for `members`: `current` itself when nothing changed, else version + 1."""
    ordered = tuple(sorted(set(members)))
    if ordered == current.members:
        return current
    return Snapshot(current.version + 1, ordered, current.cluster)


class InvalidSnapshot(ValueError):
    """A membership snapshot a proxy must refuse (it keeps its previous one)."""


# The most brokers the operator ever scales to: far below what costs a proxy.
MAX_MEMBERS = HARD_MAX
# The operator adds 1 per change: at 1000 changes a second it needs 285,000 years to get here.
# Refusing more keeps a hostile push from pinning a proxy at 2**64-1 (which no later push
# could exceed), and keeps versions exact as JSON numbers in the resource's status.
MAX_VERSION = 2**53 - 1
MAX_NAME_LENGTH = 253  # a pod name, or a host, is at most a DNS subdomain
_MAX_ADDRESS_LENGTH = MAX_NAME_LENGTH + 8  # "[host]:65535"
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?")
_STATES = {pb.BrokerMember.State.SERVING: BrokerState.SERVING, pb.BrokerMember.State.DRAINING: BrokerState.DRAINING}


@functools.lru_cache(maxsize=2 * MAX_MEMBERS)
def _check_address(address: str) -> tuple[str, int]:
    """`address` as (host, port), the host normalised so that two spellings of one broker compare equal.
    Remembered for the last 2 * MAX_MEMBERS valid addresses: a proxy is pushed the same brokers' addresses
    change after change, and parsing them with `ipaddress` was a tenth of its control server's CPU per push
    (bench/membership.py); an invalid one is checked (and refused) each time."""
    host, _, port = address.rpartition(":")
    key = _host(host) if len(address) <= _MAX_ADDRESS_LENGTH and port.isascii() and port.isdigit() else None
    if key is None or not 0 < int(port) < 65536:
        raise InvalidSnapshot(f"broker address {excerpt(address)} is not host:port (a DNS name, an IPv4 "
                              "address or a bracketed IPv6 address, and a port 1..65535)")
    return key, int(port)


def _host(host: str) -> str | None:
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        dns = not bracketed and all(_DNS_LABEL.fullmatch(label) for label in host.split("."))
        return host.lower() if dns else None
    return ip.compressed if ip.version == (6 if bracketed else 4) else None


def snapshot_from_proto(msg: pb.Membership) -> Snapshot:
    """Decode and validate a pushed snapshot; raises InvalidSnapshot with a reason."""
    if msg.version > MAX_VERSION:
        raise InvalidSnapshot(f"version {msg.version} is beyond {MAX_VERSION}, which no operator reaches")
    if len(msg.brokers) > MAX_MEMBERS:
        raise InvalidSnapshot(f"{len(msg.brokers)} brokers; a membership holds at most {MAX_MEMBERS}")
    members = []
    names: set[str] = set()
    addresses: set[tuple[str, int]] = set()
    for b in msg.brokers:
        if not b.name:
            raise InvalidSnapshot("a broker has no name")
        if len(b.name) > MAX_NAME_LENGTH or not b.name.isprintable():
            raise InvalidSnapshot(f"broker name {excerpt(b.name)} is not a pod name (printable, "
                                  f"at most {MAX_NAME_LENGTH} characters)")
        if b.name in names:
            raise InvalidSnapshot(f"broker {b.name!r} appears twice")
        names.add(b.name)
        address = _check_address(b.address)
        if address in addresses:
            raise InvalidSnapshot(f"broker address {b.address!r} appears twice (broker {b.name!r})")
        addresses.add(address)
        state = _STATES.get(b.state)
        if state is None:
            unknown = f"; {b.state} is unknown" if b.state else ""
            raise InvalidSnapshot(f"broker {b.name!r} has no state (SERVING or DRAINING){unknown}")
        members.append(Member(b.name, b.address, state))
    if len(msg.cluster) > 256:
        raise InvalidSnapshot("the cluster id is longer than 256 characters")
    return Snapshot(msg.version, tuple(sorted(members)), msg.cluster)


def is_stale(applied_version: int, incoming_version: int) -> bool:
    """An incoming snapshot is stale unless its version is newer than the applied one.

    Re-sending the applied version is answered as applied (idempotent), not as stale.
    """
    return incoming_version < applied_version


def conflicts(applied: Snapshot, incoming: Snapshot) -> bool:
    """`incoming` has the applied version but other contents: a change must come with a newer version
    (versions only grow; a proxy that had applied nothing yet takes any)."""
    return incoming.version == applied.version and incoming != applied and applied != EMPTY
