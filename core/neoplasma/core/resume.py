"""Resumable streams, as pure data: resume tokens and the broker's retention log (docs/resume.md)."""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import hashlib
import itertools
import math
import mmap
import random
import struct
from array import array
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from neoplasma.core.bounded import put_newest
from neoplasma.core.events import Checked, Event, stamped_entry, topic_field, varint
from neoplasma.core.topics import prefixes
from neoplasma.wire.v1 import neoplasma_pb2 as pb

TOKEN_VERSION = 2  # what encode_token writes without a checkpoint; decode_token also reads version 1 (docs/resume.md)
CHECKPOINT_VERSION = 3  # what encode_token writes relative to a checkpoint (docs/resume.md, "Encoding, version 3")
# The longest token accepted (characters). A version 2 token is 5 bytes, then 2 (the broker's mark) + at most 10
# (a seq, or its difference from the next smaller one, below 2**64) per broker, in unpadded base64: at most 967
# characters at 60 brokers (1927 while all 60 are replaced, old and new in one membership). A version 1 token has
# 4 bytes per broker instead of 2, and whole seqs (1127 characters at 60 brokers). 8192 characters cover 511
# brokers in version 2 (438 in version 1) at the largest seqs; the proxy's HTTP server takes headers and request
# lines that long.
MAX_TOKEN_CHARS = 8192
MAX_SEQ = (1 << 64) - 1  # what the protocol's uint64 fields carry
# Combinations of known brokers tried for the entries of one token whose marks match several (rare: a
# mark is 16 bits, and the check says which combination is right).
MAX_COMBINATIONS = 64


class InvalidToken(ValueError):
    """A resume token that cannot be used; the message says why (sent with the gap signal)."""


def cluster_tag(cluster: str) -> bytes:
    return hashlib.sha256(cluster.encode("utf-8")).digest()[:4]


@functools.lru_cache(maxsize=65536)
def epoch_mark(epoch: int) -> bytes:
    """A broker epoch's 2-byte mark: how a version 2 token names it (a hash: epochs need not be random)."""
    return hashlib.blake2b(epoch.to_bytes(4, "big"), digest_size=2).digest()


@functools.lru_cache(maxsize=256)
def positions_check(tag: bytes, epochs: tuple[int, ...], checkpoint: Checkpoint | None = None,
                    ordered: bool = True) -> bytes:
    """4 bytes naming the cluster (`tag`) and exactly these epochs in this order (a token's: its entries'
    order, a version 3 token's checkpoint brokers first): a decoder that resolved a token's marks to known
    epochs knows it resolved each entry to the right broker, even when two of them share a mark (and that the
    token is this cluster's). With the `checkpoint` a version 3 token is relative to, its whole content too: a
    decoder that was given another checkpoint under its name (another process's of the same instance) knows
    it. `ordered=False`: the check of version 2 tokens issued before it bound the order (`epochs` ascending),
    which never equals an ordered one but by chance (it is keyed apart)."""
    named = tag + b"".join(e.to_bytes(4, "big") for e in epochs)
    if checkpoint is not None:
        named += checkpoint.instance.to_bytes(3, "big") + checkpoint.counter.to_bytes(8, "big")
        named += pack_positions(dict(zip(checkpoint.epochs, checkpoint.seqs, strict=True)))
    return hashlib.blake2b(named, digest_size=4, key=b"ordered" if ordered else b"").digest()


class Checkpoint(NamedTuple):
    """A proxy process's whole position vector, registered with every broker it links to (docs/resume.md,
    "Checkpoints"): version 3 tokens name it (instance, counter) and carry only each broker's advance since."""

    instance: int  # the proxy process's pointer instance (3 bytes), under which brokers store it
    counter: int  # its number among that process's checkpoints (from 1)
    epochs: tuple[int, ...]  # in the order the token's advances follow
    seqs: tuple[int, ...]

    @classmethod
    def of(cls, instance: int, counter: int, positions: Mapping[int, int]) -> Checkpoint:
        ordered = sorted(positions.items())
        return cls(instance, counter, tuple(e for e, _ in ordered), tuple(s for _, s in ordered))

    def positions(self) -> dict[int, int]:
        return dict(zip(self.epochs, self.seqs, strict=True))

    def to_proto(self) -> pb.Checkpoint:
        return pb.Checkpoint(instance=self.instance, counter=self.counter, epochs=self.epochs, seqs=self.seqs)

    @classmethod
    def from_proto(cls, msg: pb.Checkpoint) -> Checkpoint:
        """As a message carries it (unchecked: `check_checkpoint`)."""
        return cls(msg.instance, msg.counter, tuple(msg.epochs), tuple(msg.seqs))


# A checkpoint names at most this many brokers (a membership of 60 is the size aimed at; what a broker stores is
# bounded by it). A registration naming more is refused.
MAX_CHECKPOINT_BROKERS = 1024


def check_checkpoint(checkpoint: Checkpoint) -> None:
    """ValueError, saying what is wrong, for a checkpoint no proxy makes (what a broker refuses to store)."""
    n = len(checkpoint.epochs)
    if n != len(checkpoint.seqs):
        raise ValueError(f"the checkpoint has {n} epochs but {len(checkpoint.seqs)} seqs")
    if n > MAX_CHECKPOINT_BROKERS:
        raise ValueError(f"the checkpoint names {n} brokers; the most is {MAX_CHECKPOINT_BROKERS}")
    if not checkpoint.counter or not MIN_INSTANCE <= checkpoint.instance <= MAX_INSTANCE:
        raise ValueError("the checkpoint has counter 0 or no proxy instance")
    if 0 in checkpoint.epochs or len(set(checkpoint.epochs)) != n:
        raise ValueError("the checkpoint names epoch 0 or a broker twice")
    if any(not 0 <= seq <= MAX_SEQ for seq in checkpoint.seqs):
        raise ValueError("the checkpoint holds a seq beyond 64 bits")


# Below this many brokers a version 2 token may be the shorter (version 3 spends 5 bytes or more on naming its
# checkpoint; version 2 two per broker on marks): both are made and the shorter sent. From it on, version 3 is.
SHORTEST_BELOW = 8


def encode_token(tag: bytes, positions: Mapping[int, int], checkpoint: Checkpoint | None = None) -> bytes:
    """The token (ASCII bytes) for `positions` {epoch: seq} in the cluster named by `tag`. Version 3 when
    `checkpoint` is given and `positions` are at or past it for every broker it names: version, check, the
    checkpoint's instance and counter, how many brokers follow by mark, those (mark and seq, as version 2 does),
    then each checkpoint broker's advance since it, in its order (with fewer than SHORTEST_BELOW brokers, the
    shorter of it and version 2). Else version 2: version, check, then per broker by ascending seq its mark and the
    seq's difference from the one before."""
    v3 = None
    if checkpoint is not None and all(positions.get(e, -1) >= s for e, s in zip(checkpoint.epochs, checkpoint.seqs,
                                                                                 strict=True)):
        named = set(checkpoint.epochs)
        extra = _by_seq({e: s for e, s in positions.items() if e not in named})
        raw = bytearray((CHECKPOINT_VERSION,))
        raw += positions_check(tag, (*checkpoint.epochs, *(e for e, _ in extra)), checkpoint)
        raw += checkpoint.instance.to_bytes(3, "big")
        raw += varint(checkpoint.counter)
        advances, sparse = _advances([positions[e] - s for e, s in zip(checkpoint.epochs, checkpoint.seqs,
                                                                         strict=True)])
        raw += varint(2 * len(extra) + sparse)
        raw += _entries(extra)
        raw += advances
        if len(positions) >= SHORTEST_BELOW:
            return base64.urlsafe_b64encode(raw).rstrip(b"=")
        v3 = bytes(raw)
    entries = _by_seq(positions)
    raw = bytearray((TOKEN_VERSION,))
    raw += positions_check(tag, tuple(e for e, _ in entries))
    raw += _entries(entries)
    if v3 is not None and len(v3) < len(raw):
        raw = bytearray(v3)
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _advances(advances: Sequence[int]) -> tuple[bytes, bool]:
    """A version 3 token's advances, and whether sparse: dense, a varint each; sparse (when shorter: most are 0, as
    when idle), a bitmap of those not 0 (bit k of byte k // 8 for the k-th), then theirs."""
    dense = b"".join(map(varint, advances))
    bitmap = bytearray((len(advances) + 7) // 8)
    moved = []
    for k, ahead in enumerate(advances):
        if ahead:
            bitmap[k >> 3] |= 1 << (k & 7)
            moved.append(varint(ahead))
    sparse = bytes(bitmap) + b"".join(moved)
    return (sparse, True) if len(sparse) < len(dense) else (dense, False)


def _read_advances(raw: bytes, n: int, sparse: bool) -> list[int]:
    """`n` advances from `raw` (see `_advances`), which they must fill exactly; InvalidToken when they do not."""
    advances, i = [], 0
    if sparse:
        size = (n + 7) // 8
        bitmap, i = raw[:size], size
        if len(bitmap) < size or (n % 8 and bitmap[-1] >> (n % 8)):
            raise InvalidToken("the resume token does not fit the checkpoint it names")
        for k in range(n):
            ahead = 0
            if bitmap[k >> 3] >> (k & 7) & 1:
                ahead, i = _varint_at(raw, i)
                if not ahead:
                    raise InvalidToken("the resume token is not one a proxy makes")
            advances.append(ahead)
    else:
        while i < len(raw) and len(advances) < n:
            ahead, i = _varint_at(raw, i)
            advances.append(ahead)
    if len(advances) != n or i != len(raw):
        raise InvalidToken("the resume token does not fit the checkpoint it names")
    return advances


def _by_seq(positions: Mapping[int, int]) -> list[tuple[int, int]]:
    """The (epoch, seq) entries of a token in its order: ascending seqs."""
    return sorted(positions.items(), key=lambda entry: (entry[1], entry[0]))


def _entries(entries: Sequence[tuple[int, int]]) -> bytes:
    """Per broker (in `_by_seq` order) its mark and the seq's difference from the one before (the first: the seq)."""
    raw = bytearray()
    before = 0
    for epoch, seq in entries:
        raw += epoch_mark(epoch)
        raw += varint(seq - before)  # brokers that took similar numbers of events: small differences
        before = seq
    return bytes(raw)


def tokens_after(tag: bytes, position: dict[int, int], events: Sequence[Event],
                 wanted: Container[int] | None = None, checkpoint: Checkpoint | None = None) -> dict[int, bytes]:
    """The token after each of `events` by index (after those at the indices `wanted` only, when given), advancing
    `position` {epoch: seq} in place over all of them (`advance`); relative to `checkpoint` where it can be.
    Each as `encode_token` makes it; along a run of one broker's events (a replayed step), from a prefix made once
    for the run (`_SeqTail`) while that broker's seq is the highest and the token is of version 2."""
    tokens = {}
    tail: _SeqTail | None = None
    for i, event in enumerate(events):
        epoch = event.epoch
        advance(position, (epoch,), (event.seq,))
        if tail is not None and tail.epoch != epoch:  # another broker's event ends a run
            tail = None
        if wanted is None or i in wanted:
            if tail is None:  # (the other brokers' seqs stay as they are along a run)
                tail = _SeqTail(tag, position, epoch, checkpoint)
            seq = position.get(epoch, 0)
            tokens[i] = tail.token(seq) if tail.lowest < seq < tail.v3_from else encode_token(tag, position,
                                                                                               checkpoint)
    return tokens


class _SeqTail:
    """The version 2 tokens of positions that differ only in broker `epoch`'s seq, while that seq is above every
    other's (its entry is the last: `_by_seq`) and the token is not of version 3 (`encode_token`: not at or past
    `checkpoint` everywhere): a prefix (version, check, the other entries, its mark) and its seq's difference
    from the next highest."""

    __slots__ = ("epoch", "lowest", "prefix", "v3_from")

    def __init__(self, tag: bytes, position: Mapping[int, int], epoch: int, checkpoint: Checkpoint | None) -> None:
        self.epoch = epoch
        others = _by_seq({e: s for e, s in position.items() if e != epoch})
        self.lowest = others[-1][1] if others else 0  # its seq must be above this (and epoch 0 is no broker's)
        if not epoch:
            self.lowest = MAX_SEQ
        self.prefix = bytes((TOKEN_VERSION,)) + positions_check(tag, (*(e for e, _ in others), epoch)) + \
            _entries(others) + epoch_mark(epoch)
        # From which of its seqs on the token is of version 3 (at or past the checkpoint everywhere).
        self.v3_from = math.inf
        if checkpoint is not None and all(position.get(e, -1) >= s for e, s in zip(checkpoint.epochs, checkpoint.seqs,
                                                                                   strict=True) if e != epoch):
            self.v3_from = checkpoint.positions().get(epoch, 0)

    def token(self, seq: int) -> bytes:
        return base64.urlsafe_b64encode(self.prefix + varint(seq - self.lowest)).rstrip(b"=")


class Resolved(NamedTuple):
    positions: dict[int, int]  # {epoch: seq} for the token's brokers this proxy knows
    unknown: int  # the token's entries naming brokers this proxy does not know (version 2: by mark)


class ParsedToken(NamedTuple):
    """A token checked for form; `resolve` names its brokers (version 2 names them by mark). A version 3 token
    names its checkpoint (`checkpoint`: instance, counter) and carries `advances` to be `completed` with it."""

    version: int
    tag: bytes
    check: bytes
    entries: tuple[tuple[bytes | int, int], ...]  # (epoch (version 1, a completed checkpoint's) or mark, seq)
    checkpoint: tuple[int, int] | None = None  # version 3, not completed yet: (instance, counter)
    advances: bytes = b""  # ... and each checkpoint broker's advance since it, in its order (`_advances`) ...
    sparse: bool = False  # ... dense or sparse
    base: Checkpoint | None = None  # version 3, completed: the checkpoint (which its check covers)

    def completed(self, checkpoint: Checkpoint) -> ParsedToken:
        """A version 3 token with the positions of its checkpoint (as stored by the brokers) filled in; InvalidToken
        when they do not fit (not the checkpoint it was made against)."""
        if len(checkpoint.epochs) != len(checkpoint.seqs) or len(checkpoint.epochs) > MAX_CHECKPOINT_BROKERS:
            raise InvalidToken("the resume token's checkpoint is not one a proxy makes")
        advances = _read_advances(self.advances, len(checkpoint.epochs), self.sparse)
        base: list[tuple[bytes | int, int]] = []
        for epoch, seq, ahead in zip(checkpoint.epochs, checkpoint.seqs, advances, strict=True):
            if seq + ahead > MAX_SEQ:
                raise InvalidToken("the resume token holds a position beyond 64 bits")
            base.append((epoch, seq + ahead))
        return self._replace(entries=(*base, *self.entries), checkpoint=None, advances=b"", base=checkpoint)

    def resolve(self, known: Iterable[int]) -> Resolved:
        """The positions, with the marks of a version 2 or 3 token matched to `known` epochs (those of the
        proxy's links and of the brokers it saw end). InvalidToken when none matches, or when all match
        but not as the check says (another cluster's token)."""
        if self.checkpoint is not None:
            raise InvalidToken("the resume token's checkpoint was not resolved")
        if self.version == 1:
            return Resolved({e: s for e, s in self.entries if isinstance(e, int)}, 0)
        by_mark: dict[bytes, list[int]] = {}
        for epoch in set(known):
            if epoch:
                by_mark.setdefault(epoch_mark(epoch), []).append(epoch)
        choices = [[key] if isinstance(key, int) else by_mark.get(key, []) for key, _ in self.entries]
        seqs = [seq for _, seq in self.entries]
        if all(choices):
            legacy: list[tuple[int, ...]] = []
            for combo in itertools.islice(itertools.product(*choices), MAX_COMBINATIONS):
                if len(set(combo)) != len(combo):
                    continue
                if positions_check(self.tag, combo, self.base) == self.check:
                    return Resolved(dict(zip(combo, seqs, strict=True)), 0)
                if self.version == 2 and positions_check(self.tag, tuple(sorted(combo)), ordered=False) == self.check:
                    legacy.append(combo)
            # Tokens issued before the check bound the order named the epochs ascending: right when only
            # one assignment of the entries to those epochs fits (two brokers sharing a mark in the token
            # fit either way round: that cannot be told apart, and is refused rather than guessed).
            if len(legacy) == 1:
                return Resolved(dict(zip(legacy[0], seqs, strict=True)), 0)
            raise InvalidToken("the resume token is from another cluster (or names brokers this proxy cannot tell "
                               "apart)")
        if not any(choices):
            raise InvalidToken("the resume token is from another cluster, or all its brokers are gone")
        # Some brokers are unknown here (gone before this proxy saw them end): the check cannot be
        # verified; the entries whose mark names one known broker are taken, the others are gaps.
        positions: dict[int, int] = {}
        unknown = 0
        for found, seq in zip(choices, seqs, strict=True):
            if len(found) == 1 and found[0] not in positions:
                positions[found[0]] = seq
            else:
                unknown += 1
        return Resolved(positions, unknown)


def _varint_at(raw: bytes, i: int) -> tuple[int, int]:
    """The varint at `raw[i:]` and the index after it; InvalidToken when truncated or beyond 64 bits."""
    seq = shift = 0
    while True:
        if shift > 63:
            raise InvalidToken("the resume token holds a position beyond 64 bits")
        if i >= len(raw):
            raise InvalidToken("the resume token is truncated")
        byte = raw[i]
        i += 1
        seq |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if seq > MAX_SEQ:
        raise InvalidToken("the resume token holds a position beyond 64 bits")
    return seq, i


def _parse_entries(raw: bytes, i: int, key_size: int, count: int | None, deltas: bool
                   ) -> tuple[list[tuple[bytes, int]], int]:
    """`count` (None: all up to the end) (key, seq) entries from `raw[i:]`, each seq the difference from the one
    before when `deltas`; and the index after them."""
    entries: list[tuple[bytes, int]] = []
    before = 0
    while (i < len(raw)) if count is None else (len(entries) < count):
        if i + key_size >= len(raw):
            raise InvalidToken("the resume token is truncated")
        key = raw[i:i + key_size]
        seq, i = _varint_at(raw, i + key_size)
        if deltas:  # each seq is the difference from the one before (ascending)
            seq = before = before + seq
            if seq > MAX_SEQ:
                raise InvalidToken("the resume token holds a position beyond 64 bits")
        entries.append((bytes(key), seq))
    return entries, i


def parse_token(token: str, tag: bytes) -> ParsedToken:
    """A token of version 3 or 2 (or 1, as issued before) checked for form; InvalidToken for anything else.
    A version 1 token names its cluster here; a version 2 or 3 token when resolved (a version 3 token's
    checkpoint is to be looked up and `completed` first)."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken(f"the resume token is empty or longer than {MAX_TOKEN_CHARS} characters")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidToken("the resume token is not URL-safe base64") from None
    if len(raw) < 5 or raw[0] not in (1, 2, CHECKPOINT_VERSION):
        raise InvalidToken("the resume token is not a neoplasma token")
    version = raw[0]
    if version == 1 and raw[1:5] != tag:
        raise InvalidToken("the resume token is from another cluster")
    if version == CHECKPOINT_VERSION:
        if len(raw) < 9:
            raise InvalidToken("the resume token is truncated")
        instance = int.from_bytes(raw[5:8], "big")
        counter, i = _varint_at(raw, 8)
        count, i = _varint_at(raw, i)
        count, sparse = count >> 1, bool(count & 1)
        if count > MAX_CHECKPOINT_BROKERS or not counter or instance < MIN_INSTANCE:
            raise InvalidToken("the resume token names no checkpoint a proxy makes")
        named, i = _parse_entries(raw, i, 2, count, True)
        return ParsedToken(version, tag, bytes(raw[1:5]), tuple(named), (instance, counter), bytes(raw[i:]), sparse)
    key_size = 4 if version == 1 else 2
    found, _ = _parse_entries(raw, 5, key_size, None, version == 2)
    if version == 2:
        return ParsedToken(version, tag, bytes(raw[1:5]), tuple(found))
    entries: list[tuple[bytes | int, int]] = []
    seen: set[int] = set()
    for key, seq in found:
        epoch = int.from_bytes(key, "big")
        if not epoch or epoch in seen:
            raise InvalidToken("the resume token names a broker twice or epoch 0")
        seen.add(epoch)
        entries.append((epoch, seq))
    return ParsedToken(version, tag, bytes(raw[1:5]), tuple(entries))


def decode_token(token: str, tag: bytes, known: Iterable[int] = (),
                 checkpoints: Callable[[int, int], Checkpoint | None] = lambda instance, counter: None
                 ) -> dict[int, int]:
    """{epoch: seq} from a token of the cluster named by `tag`, the brokers of a version 2 or 3 token among `known`
    epochs, a version 3 token's checkpoint from `checkpoints(instance, counter)`; InvalidToken for anything else
    (including a broker not among `known`, or a checkpoint not found)."""
    parsed = parse_token(token, tag)
    if parsed.checkpoint is not None:
        checkpoint = checkpoints(*parsed.checkpoint)
        if checkpoint is None:
            raise InvalidToken("the resume token's checkpoint is not known")
        parsed = parsed.completed(checkpoint)
    resolved = parsed.resolve(known)
    if resolved.unknown:
        raise InvalidToken(f"the resume token names {resolved.unknown} broker(s) not among those known")
    return resolved.positions


# -- checkpoints (docs/resume.md, "Checkpoints") ----------------------------------------------------------------

# Counted per stored checkpoint beyond its bytes: its tuple, key, bytes object, dict and deque entries.
CHECKPOINT_OVERHEAD = 256
# Counted per base (a checkpoint's epochs and seqs kept whole, that later ones of the instance are kept against)
# beyond its 12 bytes per broker.
CHECKPOINT_BASE_OVERHEAD = 256
# A base serves at most this many checkpoints of an instance (then the next is kept whole as a new base).
CHECKPOINTS_PER_BASE = 64
# The most checkpoints a broker keeps of one proxy instance (at one a second: over 17 minutes).
MAX_CHECKPOINTS_PER_INSTANCE = 1024


class _Base:
    """One checkpoint's epochs (array "I") and seqs (array "Q") kept whole: later checkpoints of its instance with
    the same epochs and seqs not below are kept as varint differences from it."""

    __slots__ = ("epochs", "seqs", "size", "users")

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.epochs = array("I", checkpoint.epochs).tobytes()
        self.seqs = array("Q", checkpoint.seqs).tobytes()
        self.size = len(self.epochs) + len(self.seqs) + CHECKPOINT_BASE_OVERHEAD
        self.users = 0  # stored checkpoints kept against it

    def fits(self, checkpoint: Checkpoint) -> bool:
        return (self.users < CHECKPOINTS_PER_BASE and array("I", checkpoint.epochs).tobytes() == self.epochs
                and all(s >= b for s, b in zip(checkpoint.seqs, array("Q", self.seqs), strict=True)))

    def differences(self, checkpoint: Checkpoint) -> bytes:
        return b"".join(varint(s - b) for s, b in zip(checkpoint.seqs, array("Q", self.seqs), strict=True))

    def checkpoint(self, instance: int, counter: int, differences: bytes) -> Checkpoint:
        seqs, i = [], 0
        for base in array("Q", self.seqs):
            ahead, i = _varint_at(differences, i)
            seqs.append(base + ahead)
        return Checkpoint(instance, counter, tuple(array("I", self.epochs)), tuple(seqs))


class _Held:
    """What a store keeps of one instance: the process (nonce) that holds it, its checkpoints by counter (when
    stored, their base, their differences from it), and the base the next one is kept against if it fits."""

    __slots__ = ("base", "kept", "nonce")

    def __init__(self, nonce: int) -> None:
        self.nonce = nonce
        self.kept: dict[int, tuple[float, _Base, bytes]] = {}
        self.base: _Base | None = None


class CheckpointStore:
    """The checkpoints proxy processes registered with a broker (docs/resume.md, "Checkpoints"), by instance and
    counter, each for the process (nonce) that holds the instance: bounded by age (`max_age`, the caller's clock),
    by what it counts (`max_bytes`: each checkpoint's varint differences from its base and CHECKPOINT_OVERHEAD,
    each base's 12 bytes per broker and CHECKPOINT_BASE_OVERHEAD; the oldest go first) and by
    MAX_CHECKPOINTS_PER_INSTANCE. No I/O, no clock of its own."""

    def __init__(self, max_age: float, max_bytes: int) -> None:
        self.max_age, self.max_bytes = max_age, max_bytes
        self.bytes = 0
        self._instances: dict[int, _Held] = {}
        self._order: deque[tuple[float, int, int, int]] = deque()  # (at, instance, nonce, counter), oldest first

    def __len__(self) -> int:
        return sum(len(held.kept) for held in self._instances.values())

    def put(self, checkpoint: Checkpoint, nonce: int, now: float) -> None:
        """Store `checkpoint` of the process `nonce` (which holds its instance here: a process that took the
        instance over replaces what another stored). ValueError, saying why, for one no proxy makes, or a counter
        stored before with other positions (the same again is fine: a relay stream reconnected)."""
        check_checkpoint(checkpoint)
        if not nonce:
            raise ValueError("the relay stream named no proxy nonce (a proxy of the version before checkpoints)")
        whole = 12 * len(checkpoint.epochs) + CHECKPOINT_BASE_OVERHEAD + CHECKPOINT_OVERHEAD
        if whole > self.max_bytes:
            raise ValueError(f"the checkpoint ({whole} bytes counted) is larger than the store ({self.max_bytes})")
        held = self._instances.get(checkpoint.instance)
        if held is not None and held.nonce != nonce:
            self._drop(checkpoint.instance)
            held = None
        if held is None:
            held = self._instances[checkpoint.instance] = _Held(nonce)
        stored = held.kept.get(checkpoint.counter)
        if stored is not None:
            if stored[1].checkpoint(checkpoint.instance, checkpoint.counter, stored[2]) != checkpoint:
                raise ValueError(f"checkpoint {checkpoint.counter} of proxy instance {checkpoint.instance} is stored "
                                 f"with other positions; a proxy numbers each checkpoint once")
            return
        base = held.base
        if base is None or not base.fits(checkpoint):
            self._unbase(held)
            base = held.base = _Base(checkpoint)
            self.bytes += base.size
        differences = base.differences(checkpoint)
        base.users += 1
        self._order.append((now, checkpoint.instance, nonce, checkpoint.counter))
        self.bytes += len(differences) + CHECKPOINT_OVERHEAD
        dropped = put_newest(held.kept, MAX_CHECKPOINTS_PER_INSTANCE, checkpoint.counter, (now, base, differences))
        if dropped is not None:  # the instance's oldest, beyond MAX_CHECKPOINTS_PER_INSTANCE
            self._release(held, dropped[1])
        self.evict(now)

    def get(self, instance: int, counter: int, now: float) -> Checkpoint | None:
        """The checkpoint stored as (`instance`, `counter`), None when none is (never stored, evicted, or too old)."""
        held = self._instances.get(instance)
        stored = None if held is None else held.kept.get(counter)
        if stored is None or stored[0] < now - self.max_age:
            return None
        return stored[1].checkpoint(instance, counter, stored[2])

    def _unbase(self, held: _Held) -> None:
        """`held` keeps no more checkpoints against its base: it goes once none is kept against it."""
        if held.base is not None and not held.base.users:
            self.bytes -= held.base.size
        held.base = None

    def _forget(self, instance: int, counter: int) -> None:
        held = self._instances.get(instance)
        if held is None or counter not in held.kept:
            return
        self._release(held, held.kept.pop(counter))
        if not held.kept:
            self._unbase(held)
            del self._instances[instance]

    def _release(self, held: _Held, stored: tuple[float, _Base, bytes]) -> None:
        """A checkpoint `held` kept (`stored`) is no longer kept: what it counted goes, and its base with the last
        one kept against it (unless the next one may be kept against that base)."""
        _, base, differences = stored
        self.bytes -= len(differences) + CHECKPOINT_OVERHEAD
        base.users -= 1
        if not base.users and base is not held.base:
            self.bytes -= base.size

    def _drop(self, instance: int) -> None:
        """Forget every checkpoint of `instance` (another process holds it now)."""
        held = self._instances[instance]
        for counter in list(held.kept):
            self._forget(instance, counter)
        if instance in self._instances:  # (it held none)
            self._unbase(held)
            del self._instances[instance]

    def evict(self, now: float) -> None:
        """Drop what is older than `max_age`, and the oldest while over `max_bytes`."""
        order = self._order
        cutoff = now - self.max_age
        while order and (order[0][0] < cutoff or self.bytes > self.max_bytes):
            at, instance, nonce, counter = order.popleft()
            held = self._instances.get(instance)
            if held is not None and held.nonce == nonce and held.kept.get(counter, (None,))[0] == at:
                self._forget(instance, counter)


# -- pointer ids (docs/resume.md, "Pointer ids") ---------------------------------------------------------------
#
# A pointer is 6 bytes, 8 characters of URL-safe base64: the issuing proxy process's instance (3 bytes, its first
# 6 bits never all 0, so the first character is never "A", which begins every version 1 and 2 token) and the
# event's place in that process's dispatch order (3 bytes, wrapping at POINTER_SPAN).
POINTER_CHARS = 8
POINTER_SPAN = 1 << 24
MIN_INSTANCE = 1 << 18  # the first character of a pointer is never "A"
MAX_INSTANCE = (1 << 24) - 1


def new_instance() -> int:
    """A proxy process's random instance, drawn at its start (what its pointers name)."""
    return random.randint(MIN_INSTANCE, MAX_INSTANCE)


def new_nonce() -> int:
    """A proxy process's nonce, drawn at its start: 64 random bits, never 0 (brokers tell its relay streams from
    those of another process that drew the same instance by it)."""
    return random.randint(1, 2**64 - 1)


def unwrap_counter(counter: int, next_counter: int) -> int:
    """The event number (unwrapped) that the wrapped `counter` of a pointer names, of those before `next_counter`
    (the next event's number): the latest with that counter."""
    last = next_counter - 1
    return last - (last - counter) % POINTER_SPAN


def pointer_prefix(instance: int) -> bytes:
    """The first 4 characters of every pointer of `instance` (its 3 bytes: exactly 4 base64 characters)."""
    if not MIN_INSTANCE <= instance <= MAX_INSTANCE:
        raise ValueError(f"a pointer instance is in [{MIN_INSTANCE}, {MAX_INSTANCE}], not {instance}")
    return base64.urlsafe_b64encode(instance.to_bytes(3, "big"))


def encode_pointer(prefix: bytes, counter: int) -> bytes:
    """The pointer of the event numbered `counter` (any int: it wraps) of the instance with `prefix`."""
    return prefix + base64.urlsafe_b64encode((counter % POINTER_SPAN).to_bytes(3, "big"))


def is_pointer(token: str) -> bool:
    """Whether an id the client sent is meant as a pointer (not a version 1 or 2 token, which begin with "A"). Its
    form is checked by `parse_pointer`."""
    return bool(token) and not token.startswith("A")


def parse_pointer(token: str) -> tuple[int, int]:
    """(instance, counter) of a pointer id; InvalidToken when it is not one."""
    if len(token) > MAX_TOKEN_CHARS or token.strip(_URL_SAFE):
        raise InvalidToken("the resume token is not URL-safe base64")
    if len(token) != POINTER_CHARS:
        raise InvalidToken(f"the resume token is neither a token (which begins with \"A\") nor a pointer "
                           f"({POINTER_CHARS} characters)")
    raw = base64.urlsafe_b64decode(token)
    instance = int.from_bytes(raw[:3], "big")
    if instance < MIN_INSTANCE:
        raise InvalidToken("the resume token is neither a token nor a pointer")
    return instance, int.from_bytes(raw[3:], "big")


_URL_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_GONE = 1 << 32  # in a journal round's changes: this epoch (below 2**32) left the positions


def pack_positions(positions: Mapping[int, int]) -> bytes:
    """{epoch: seq} as flat pairs of 8-byte ints (how a journal keeps positions: made and read in C, no varints)."""
    return array("Q", itertools.chain.from_iterable(positions.items())).tobytes()


def unpack_positions(raw: bytes) -> dict[int, int]:
    flat = array("Q", raw)
    return dict(zip(flat[::2], flat[1::2], strict=True))


def changes(before: Mapping[int, int], after: Mapping[int, int]) -> bytes:
    """What turns positions `before` into `after`: their differing entries, and epochs gone (`_GONE` added)."""
    differ = dict(after.items() - before.items())
    differ.update((epoch | _GONE, 0) for epoch in before.keys() - after.keys())
    return pack_positions(differ)


def apply_changes(position: dict[int, int], raw: bytes) -> None:
    for epoch, seq in unpack_positions(raw).items():
        if epoch & _GONE:
            position.pop(epoch & ~_GONE, None)
        else:
            position[epoch] = seq


def advance(position: dict[int, int], epochs: Sequence[int], seqs: Sequence[int]) -> None:
    """`position` {epoch: seq} advanced in place by events, given by their epochs and seqs (epoch 0 names no broker):
    the one rule for a position (tokens, the pointer journal)."""
    for epoch, seq in zip(epochs, seqs, strict=True):
        if epoch and seq > position.get(epoch, 0):
            position[epoch] = seq


# A journal round beyond its bytes: the tuple, its ints, and its bytes objects (counted, not measured per round).
JOURNAL_ROUND_OVERHEAD = 256
# A journal round keeps the positions before it whole at least every this many rounds (those between keep what
# changed since the round before, beyond its events): a lookup walks at most this many rounds.
JOURNAL_CHECKPOINT = 64


class _Round(NamedTuple):
    first: int  # the (unwrapped) counter of its first event
    at: float  # when it was dispatched (the caller's clock)
    base: bytes | None  # the positions before it (`pack_positions`), or None: ...
    changes: bytes | None  # ... those after the round before, with these `changes` (None: none)
    epochs: bytes  # its events' epochs (array "I") ...
    seqs: bytes  # ... and seqs (array "Q")


class PointerJournal:
    """What a proxy process's pointers mean (docs/resume.md, "Pointer ids"): per dispatch round, the positions
    before it (whole now and then, else what changed since the round before beyond its events) and each event's
    (epoch, seq), never the events' data. Bounded by age (`max_age`, the caller's clock), by `max_bytes` (what it
    counts: its rounds' bytes and JOURNAL_ROUND_OVERHEAD each) and by `max_events` (below POINTER_SPAN, so that a
    wrapped counter names one event). No I/O, no clock of its own."""

    def __init__(self, max_age: float, max_bytes: int, max_events: int = POINTER_SPAN // 2) -> None:
        self.max_age, self.max_bytes = max_age, max_bytes
        self.max_events = min(max_events, POINTER_SPAN // 2)
        self.next = random.randrange(POINTER_SPAN)  # the counter of the next event (unwrapped)
        self.bytes = 0
        self._rounds: deque[_Round] = deque()
        self._running: dict[int, int] = {}  # the positions after the last round's events
        self._since_base = 0  # rounds recorded since the last one with its base whole

    @property
    def events(self) -> int:
        return self.next - self._rounds[0].first if self._rounds else 0

    def record(self, base: Mapping[int, int], epochs: Sequence[int], seqs: Sequence[int], now: float) -> int:
        """Note a dispatch round: the positions before it (`base`) and its events' epochs and seqs. Returns the
        counter of its first event (the next ones follow)."""
        first = self.next
        if not epochs:
            return first
        rounds = self._rounds
        whole: bytes | None = None
        changed: bytes | None = None
        if not rounds or self._since_base >= JOURNAL_CHECKPOINT:
            whole = pack_positions(base)
            self._since_base = 0
        else:
            if base != self._running:  # heads, brokers retired or back: what changed
                changed = changes(self._running, base)
            self._since_base += 1
        running = self._running = dict(base)
        advance(running, epochs, seqs)
        entry = _Round(first, now, whole, changed, array("I", epochs).tobytes(), array("Q", seqs).tobytes())
        rounds.append(entry)
        self.bytes += self._size(entry)
        self.next = first + len(epochs)
        self.evict(now)
        return first

    @staticmethod
    def _size(entry: _Round) -> int:
        return (JOURNAL_ROUND_OVERHEAD + len(entry.base or b"") + len(entry.changes or b"") + len(entry.epochs)
                + len(entry.seqs))

    def evict(self, now: float) -> None:
        """Drop the rounds older than `max_age`, then the oldest while over `max_bytes` or `max_events`."""
        rounds = self._rounds
        cutoff = now - self.max_age
        while rounds and (rounds[0].at < cutoff or self.bytes > self.max_bytes
                          or self.next - rounds[0].first > self.max_events):
            gone = rounds.popleft()
            self.bytes -= self._size(gone)
            if rounds and rounds[0].base is None:  # the next round's base was this one's, advanced: keep it whole
                position = unpack_positions(gone.base or b"")
                advance(position, array("I", gone.epochs), array("Q", gone.seqs))
                old = rounds[0]
                if old.changes:
                    apply_changes(position, old.changes)
                kept = rounds[0] = old._replace(base=pack_positions(position), changes=None)
                self.bytes += self._size(kept) - self._size(old)

    def positions_at(self, counter: int) -> dict[int, int] | None:
        """The positions after the event numbered `counter` (wrapped, as a pointer carries it): what the full
        token after it named. None when it is not in the journal (too old, or never issued)."""
        rounds = self._rounds
        if not rounds or not 0 <= counter < POINTER_SPAN:
            return None
        n = unwrap_counter(counter, self.next)
        if n < rounds[0].first:
            return None
        index = bisect.bisect_right(rounds, n, key=lambda r: r.first) - 1
        start = index
        while rounds[start].base is None:  # (the oldest round always has it whole)
            start -= 1
        position = unpack_positions(rounds[start].base or b"")
        for k in range(start, index + 1):
            entry = rounds[k]
            if entry.changes:
                apply_changes(position, entry.changes)
            epochs, seqs = array("I", entry.epochs), array("Q", entry.seqs)
            upto = n - entry.first + 1 if k == index else len(epochs)
            advance(position, epochs[:upto], seqs[:upto])
        return position


def wanted(topic: str, topics: frozenset[str]) -> bool:
    """True when a subscriber of `topics` receives events of `topic` (plasma's prefix rule)."""
    return any(key in topics for key in prefixes(topic))


# Retention keeps events in segments: anonymous memory maps (never the Python heap) of this many bytes,
# or a 16th of --retention-bytes when that is smaller (at least a page), or one event's size when larger.
SEGMENT_BYTES = 1 << 20
MIN_SEGMENT_BYTES = mmap.PAGESIZE
# Counted per segment beyond its mapping: the Python object that refers to it.
SEGMENT_OVERHEAD = 512
# A retained event in a segment: its data's and topic's lengths (4 bytes each), then the topic, then the data.
_RECORD = struct.Struct("<II")
# A run (the events of one publish request within one segment), in the segment's index, which grows from
# its end towards its records: first seq, accepted at (monotonic seconds), where its records start, count.
_RUN = struct.Struct("<QdII")
# Bytes a retained event takes in a segment beyond its topic and data (one run per single-event request).
EVENT_OVERHEAD = _RECORD.size + _RUN.size


class _Segment:
    """A memory map of records (from its start) and the index of their runs (from its end)."""

    __slots__ = ("first_seq", "first_time", "map", "next_seq", "runs", "size", "used")

    def __init__(self, size: int, first_seq: int, now: float) -> None:
        self.map = mmap.mmap(-1, size)  # pages are only resident once written; closed when evicted
        self.size = size
        self.used = 0  # record bytes written
        self.runs = 0
        self.first_seq = first_seq
        self.first_time = now
        self.next_seq = first_seq

    def free(self) -> int:
        return self.size - self.used - _RUN.size * self.runs

    def run(self, index: int) -> tuple[int, float, int, int]:
        """(first seq, accepted at, offset, count) of run `index` (0 the oldest)."""
        first, at, offset, count = _RUN.unpack_from(self.map, self.size - _RUN.size * (index + 1))
        return first, at, offset, count

    def add(self, events: Sequence[Checked], now: float) -> int:
        """Write as many of `events` as fit, as one run; returns how many."""
        room = self.free() - _RUN.size
        pieces: list[bytes] = []
        size = 0
        for topic, data in events:
            name = topic.encode("utf-8")
            record = _RECORD.size + len(name) + len(data)
            if size + record > room:
                break
            pieces += (_RECORD.pack(len(data), len(name)), name, data)
            size += record
        n = len(pieces) // 3
        if n:
            self.map[self.used:self.used + size] = b"".join(pieces)
            _RUN.pack_into(self.map, self.size - _RUN.size * (self.runs + 1), self.next_seq, now, self.used, n)
            self.runs += 1
            self.used += size
            self.next_seq += n
        return n

    def find_seq(self, seq: int) -> int:
        """The index of the run holding `seq` (or the first run after it)."""
        return max(0, bisect.bisect_right(range(self.runs), seq, key=lambda k: self.run(k)[0]) - 1)

    def find_time(self, since: float, lo: int = 0) -> int:
        """The index of the first run from `lo` accepted at or after `since` (`runs` if none)."""
        return bisect.bisect_left(range(self.runs), since, lo=lo, key=lambda k: self.run(k)[1])

    def records(self, run: int) -> Iterator[tuple[int, bytes, bytes]]:
        """(seq, topic as UTF-8, data) of every event from run `run` on."""
        if run >= self.runs:
            return
        seq, _, pos, _ = self.run(run)
        view = self.map
        while pos < self.used:
            length, name = _RECORD.unpack_from(view, pos)
            pos += _RECORD.size
            yield seq, view[pos:pos + name], view[pos + name:pos + name + length]
            pos += name + length
            seq += 1


class RetentionLog:
    """A broker's accepted events, bounded by age and bytes. No I/O, no clock of its own.

    Events are written into segments (see `_Segment`), not kept as Python objects: what it counts
    (`bytes`: its segments' whole size, resident or not) is what it holds, and an evicted segment's
    memory goes back to the system at once.
    """

    def __init__(self, max_age: float, max_bytes: int) -> None:
        self.max_age = max_age
        self.max_bytes = max_bytes
        pages = max_bytes // 16 // mmap.PAGESIZE
        self.segment_bytes = min(SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, pages * mmap.PAGESIZE))
        self.bytes = 0
        self._segments: deque[_Segment] = deque()  # oldest first; seqs are contiguous across them
        self._start = 0  # the first run of the oldest segment still retained (older ones aged out)
        self._next = 1  # seq of the next event appended
        self._evicted_at = -math.inf  # when the newest evicted run was accepted

    @property
    def oldest(self) -> int:
        """The first retained seq (the next one to be appended when nothing is retained)."""
        if not self._segments:
            return self._next
        first = self._segments[0]
        return first.run(self._start)[0] if self._start < first.runs else first.next_seq

    @property
    def events(self) -> int:
        return self._next - self.oldest

    def append(self, first_seq: int, events: Sequence[Checked], now: float) -> None:
        if self._segments and self._segments[-1].next_seq != first_seq:  # a gap in seqs: start afresh
            self._drop_all(now)
        self._next = first_seq + len(events)
        rest = events
        while rest:
            last = self._segments[-1] if self._segments else None
            n = last.add(rest, now) if last is not None else 0
            if n:
                rest = rest[n:]
                continue
            topic, data = rest[0]
            need = _RECORD.size + len(topic.encode("utf-8")) + len(data) + _RUN.size
            size = max(self.segment_bytes, -(-need // mmap.PAGESIZE) * mmap.PAGESIZE)
            self._segments.append(_Segment(size, self._next - len(rest), now))
            self.bytes += size + SEGMENT_OVERHEAD
            self._evict_bytes()
        self.evict(now)

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest retained event was accepted (0 when none is): how far back a
        subscriber can resume."""
        for k, segment in enumerate(self._segments):
            start = self._start if k == 0 else 0
            if start < segment.runs:
                return now - segment.run(start)[1]
        return 0.0

    def _evict_bytes(self) -> None:
        """Drop the oldest segments while over `max_bytes` (the newest always stays)."""
        segments = self._segments
        while self.bytes > self.max_bytes and len(segments) > 1:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        gone = self._segments.popleft()
        if gone.runs:
            self._evicted_at = max(self._evicted_at, gone.run(gone.runs - 1)[1])
        self.bytes -= gone.size + SEGMENT_OVERHEAD
        gone.map.close()
        self._start = 0

    def _drop_all(self, now: float) -> None:
        while self._segments:
            self._drop_oldest()
        self._evicted_at = max(self._evicted_at, now)

    def evict(self, now: float) -> None:
        """Age out what was accepted more than `max_age` ago."""
        cutoff = now - self.max_age
        segments = self._segments
        while segments:
            first = segments[0]
            self._start = first.find_time(cutoff, self._start)
            if self._start:
                self._evicted_at = max(self._evicted_at, first.run(self._start - 1)[1])
            if self._start < first.runs or (len(segments) == 1 and first.free() > _RUN.size + _RECORD.size):
                return
            self._drop_oldest()  # wholly aged out (and full, or not the newest)

    def covers(self, after: int) -> bool:
        """True when every event with seq > `after` is still retained."""
        return after + 1 >= self.oldest

    def accepted_since(self, since: float) -> tuple[int, bool]:
        """(the seq after which every event was accepted at or after `since`, and whether
        all of those are still retained)."""
        for k, segment in enumerate(self._segments):
            index = segment.find_time(since, self._start if k == 0 else 0)
            if index < segment.runs:
                return segment.run(index)[0] - 1, self._evicted_at < since
        return self._next - 1, self._evicted_at < since

    def _walk(self, after: int, until: int) -> Iterator[tuple[int, bytes, bytes]]:
        """(seq, topic as UTF-8, data) of every retained event with after < seq <= until, in order."""
        segments = self._segments
        after = max(after, self.oldest - 1)
        index = max(0, bisect.bisect_right(segments, after + 1, key=lambda s: s.first_seq) - 1)
        for k in range(index, len(segments)):
            segment = segments[k]
            if segment.first_seq > until:
                return
            for seq, name, data in segment.records(segment.find_seq(after + 1)):
                if seq > until:
                    return
                if seq > after:
                    yield seq, name, data

    def replay(self, after: int, until: int, topics: frozenset[str]) -> Iterator[tuple[int, Event]]:
        """(seq, event) with after < seq <= until matching `topics`, in order.

        Consume it before the log changes again (no await in between): appends and
        evictions move the entries it walks.
        """
        names: dict[bytes, tuple[str, bool]] = {}  # each topic decoded and matched once
        for seq, name, data in self._walk(after, until):
            found = names.get(name)
            if found is None:
                topic = name.decode("utf-8")
                found = names[name] = (topic, wanted(topic, topics))
            if found[1]:
                yield seq, Event(found[0], data)

    def replay_part(self, after: int, until: int, topics: frozenset[str], max_bytes: int, deadline: float = math.inf,
                    clock: Callable[[], float] = lambda: 0.0, fields: dict[bytes, bytes | None] | None = None
                    ) -> tuple[list[bytes], int, int]:
        """The start of `replay(after, until, topics)` as relay entries (`stamped_entry`): up to about `max_bytes`
        of them, looking no longer than until `clock()` reaches `deadline` (checked every WALK_CHECK events).
        Returns them, the seq up to which it looked (`until` when done) and how many events it looked at.
        Between parts the log may change: the next part starts after that seq. `fields`: each topic (UTF-8)
        -> its encoded field if `topics` want it, else None, kept from part to part (a walk's topics are decoded
        and matched once)."""
        entries: list[bytes] = []
        fields = {} if fields is None else fields
        size = walked = 0
        last = after
        for seq, name, data in self._walk(after, until):
            last = seq
            walked += 1
            field = fields.get(name, b"")
            if field == b"":
                topic = name.decode("utf-8")
                field = fields[name] = topic_field(topic) if wanted(topic, topics) else None
            if field is not None:
                entry = stamped_entry(field, data, seq)
                entries.append(entry)
                size += len(entry)
                if size >= max_bytes:
                    return entries, last, walked
            if not walked % WALK_CHECK and clock() >= deadline:
                return entries, last, walked
        return entries, until, walked


# Events a retention walk looks at between looks at the clock (a few hundred microseconds' worth).
WALK_CHECK = 64
# Topics a walk remembers (decoded, matched, encoded) from part to part; beyond, it starts afresh.
WALK_TOPICS = 4096


class ReplayWalk:
    """A walk of a RetentionLog's events after `after` up to `until` for `topics`, a part at a time (a
    broker's loop serves others between parts, while the log changes). `gap`: some events it should have
    found were not (or are no longer) retained."""

    def __init__(self, log: RetentionLog, after: int, until: int, topics: frozenset[str], gap: bool = False) -> None:
        self.log, self.after, self.until, self.topics, self.gap = log, after, until, topics, gap
        self.walked = 0
        self._fields: dict[bytes, bytes | None] = {}  # topics seen, matched and encoded (at most WALK_TOPICS)

    @property
    def done(self) -> bool:
        return self.after >= self.until

    def part(self, max_bytes: int, deadline: float = math.inf,
             clock: Callable[[], float] = lambda: 0.0) -> list[bytes]:
        """The next part's entries (see `RetentionLog.replay_part`)."""
        if not self.log.covers(self.after):  # evicted since the last part
            self.gap = True
        if len(self._fields) > WALK_TOPICS:
            self._fields.clear()
        entries, self.after, walked = self.log.replay_part(self.after, self.until, self.topics, max_bytes,
                                                           deadline, clock, self._fields)
        self.walked += walked
        return entries
