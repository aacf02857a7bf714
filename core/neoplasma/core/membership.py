"""Broker membership: versioned snapshots, as pure data and decisions.

The operator (from broker pods) and the local runtime (from child processes)
build snapshots with `next_snapshot`; proxies check incoming ones with
`check_snapshot`. Neither does I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

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

    @property
    def serving(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.state is BrokerState.SERVING)


EMPTY = Snapshot(0, ())


def next_snapshot(current: Snapshot, members: Iterable[Member]) -> Snapshot:
    """The snapshot for `members`: `current` itself when nothing changed, else version + 1."""
    ordered = tuple(sorted(set(members)))
    if ordered == current.members:
        return current
    return Snapshot(current.version + 1, ordered, current.cluster)


class InvalidSnapshot(ValueError):
    """A membership snapshot a proxy must refuse (it keeps its previous one)."""


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidSnapshot(f"broker address {address!r} is not host:port")


def snapshot_from_proto(msg: pb.Membership) -> Snapshot:
    """Decode and validate a pushed snapshot; raises InvalidSnapshot with a reason."""
    members = []
    names: set[str] = set()
    for b in msg.brokers:
        if not b.name:
            raise InvalidSnapshot("a broker has no name")
        if b.name in names:
            raise InvalidSnapshot(f"broker {b.name!r} appears twice")
        names.add(b.name)
        _check_address(b.address)
        if b.state == pb.BrokerMember.State.STATE_UNSPECIFIED:
            raise InvalidSnapshot(f"broker {b.name!r} has no state (SERVING or DRAINING)")
        members.append(Member(b.name, b.address, BrokerState(pb.BrokerMember.State.Name(b.state))))
    if len(msg.cluster) > 256:
        raise InvalidSnapshot("the cluster id is longer than 256 characters")
    return Snapshot(msg.version, tuple(sorted(members)), msg.cluster)


def is_stale(applied_version: int, incoming_version: int) -> bool:
    """An incoming snapshot is stale unless its version is newer than the applied one.

    Re-sending the applied version is answered as applied (idempotent), not as stale.
    """
    return incoming_version < applied_version
