"""Dicts that keep only their newest entries: what the proxy remembers of ended brokers, pointer instances,
checkpoints and verified tokens, and what a broker keeps of one proxy instance's checkpoints, each at most N.

A function over a plain dict rather than a class: the proxy reads some of these (`epoch in hub.retired`) for every
resuming subscriber on every dispatch round, and `in` or `[]` on a dict subclass costs about 10 ns more than on a
dict (Python 3.11)."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def put_newest(kept: dict[K, V], limit: int, key: K, value: V) -> tuple[K, V] | None:
    """Set `key` to `value` in `kept`, a dict held to its `limit` newest entries (every key put by this function),
    in the order keys were first put: a held key's value is replaced where it stands (it does not become the
    newest). Returns the oldest entry when this made one too many (removed, for the caller to account for), else
    None."""
    kept[key] = value
    if len(kept) <= limit:
        return None
    oldest = next(iter(kept))
    return oldest, kept.pop(oldest)
