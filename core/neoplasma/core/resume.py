"""Resumable streams, as pure data: resume tokens and the broker's retention log (docs/resume.md)."""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import math
from array import array
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate

from neoplasma.core.events import Checked, Event, varint
from neoplasma.core.topics import prefixes

TOKEN_VERSION = 1
# Overhead counted per retained event on top of its topic and data bytes: a batch keeps its data as
# one block, a shared topic reference and a 4-byte end per event; bench/resume.py measures ~41 bytes
# held per event beyond its data (10-event requests; topics shared), less with larger requests.
EVENT_OVERHEAD = 40


class InvalidToken(ValueError):
    """A resume token that cannot be used; the message says why (sent with the gap signal)."""


def cluster_tag(cluster: str) -> bytes:
    return hashlib.sha256(cluster.encode("utf-8")).digest()[:4]


def encode_token(tag: bytes, positions: Mapping[int, int]) -> bytes:
    """The token (ASCII bytes) for `positions` {epoch: seq} in the cluster named by `tag`."""
    raw = bytearray((TOKEN_VERSION,))
    raw += tag
    for epoch in sorted(positions):
        raw += epoch.to_bytes(4, "big")
        raw += varint(positions[epoch])
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def tokens_after(tag: bytes, position: dict[int, int], events: Sequence[Event]) -> list[bytes]:
    """The token after each of `events`, advancing `position` {epoch: seq} in place."""
    tokens = []
    for event in events:
        if event.epoch and event.seq > position.get(event.epoch, 0):
            position[event.epoch] = event.seq
        tokens.append(encode_token(tag, position))
    return tokens


def decode_token(token: str, tag: bytes) -> dict[int, int]:
    """{epoch: seq} from a token of the cluster named by `tag`; InvalidToken for anything else."""
    if not token or len(token) > 8192:
        raise InvalidToken("the resume token is empty or too long")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidToken("the resume token is not URL-safe base64") from None
    if len(raw) < 5 or raw[0] != TOKEN_VERSION:
        raise InvalidToken("the resume token is not a neoplasma token")
    if raw[1:5] != tag:
        raise InvalidToken("the resume token is from another cluster")
    positions: dict[int, int] = {}
    i = 5
    while i < len(raw):
        if i + 4 >= len(raw):
            raise InvalidToken("the resume token is truncated")
        epoch = int.from_bytes(raw[i:i + 4], "big")
        i += 4
        seq = shift = 0
        while True:
            if i >= len(raw) or shift > 63:
                raise InvalidToken("the resume token is truncated")
            byte = raw[i]
            i += 1
            seq |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if not epoch or epoch in positions:
            raise InvalidToken("the resume token names a broker twice or epoch 0")
        positions[epoch] = seq
    return positions


def wanted(topic: str, topics: frozenset[str]) -> bool:
    """True when a subscriber of `topics` receives events of `topic` (plasma's prefix rule)."""
    return any(key in topics for key in prefixes(topic))


class RetentionLog:
    """A broker's accepted events, by batch, bounded by age and bytes. No I/O, no clock of its own."""

    def __init__(self, max_age: float, max_bytes: int) -> None:
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.bytes = 0
        self.events = 0
        # (first seq, accepted at, topics, the data joined, where each one's data ends, bytes), oldest
        # first; seqs are contiguous across entries. A batch's data is one block, not an object per
        # event: the broker's heap does not grow with every event retained.
        self._batches: deque[tuple[int, float, tuple[str, ...], bytes, array[int], int]] = deque()
        self._next = 1  # seq of the next event appended
        self._evicted_at = -math.inf  # when the newest evicted batch was accepted

    @property
    def oldest(self) -> int:
        """The first retained seq (the next one to be appended when nothing is retained)."""
        return self._batches[0][0] if self._batches else self._next

    def append(self, first_seq: int, events: Sequence[Checked], now: float) -> None:
        topics, datas = zip(*events, strict=True)
        ends = array("I", accumulate(map(len, datas)))  # 4 bytes an event: a request is far below 4 GiB
        size = ends[-1] + sum(map(len, topics)) + EVENT_OVERHEAD * len(events)
        self._batches.append((first_seq, now, topics, b"".join(datas), ends, size))
        self._next = first_seq + len(events)
        self.bytes += size
        self.events += len(events)
        self.evict(now)

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest retained event was accepted (0 when none is): how far back a
        subscriber can resume."""
        return now - self._batches[0][1] if self._batches else 0.0

    def evict(self, now: float) -> None:
        cutoff = now - self.max_age
        batches = self._batches
        while batches and (batches[0][1] < cutoff or self.bytes > self.max_bytes):
            _, self._evicted_at, topics, _, _, size = batches.popleft()
            self.bytes -= size
            self.events -= len(topics)

    def covers(self, after: int) -> bool:
        """True when every event with seq > `after` is still retained."""
        return after + 1 >= self.oldest

    def accepted_since(self, since: float) -> tuple[int, bool]:
        """(the seq after which every event was accepted at or after `since`, and whether
        all of those are still retained)."""
        batches = self._batches
        index = bisect.bisect_left(batches, since, key=lambda b: b[1])
        after = batches[index][0] - 1 if index < len(batches) else self._next - 1
        return after, self._evicted_at < since

    def replay(self, after: int, until: int, topics: frozenset[str]) -> Iterator[tuple[int, Event]]:
        """(seq, event) with after < seq <= until matching `topics`, in order.

        Consume it before the log changes again (no await in between): appends and
        evictions move the entries it walks.
        """
        batches = self._batches
        index = max(0, bisect.bisect_right(batches, after, key=lambda b: b[0]) - 1)
        for k in range(index, len(batches)):
            first, _, names, joined, ends, _ = batches[k]
            if first > until:
                return
            start = 0
            for seq, topic, end in zip(range(first, first + len(ends)), names, ends, strict=True):
                if after < seq <= until and wanted(topic, topics):
                    yield seq, Event(topic, joined[start:end])
                start = end
