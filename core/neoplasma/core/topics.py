"""Topics and plasma's hierarchy.

A topic is a string of `:`-separated segments such as `program:1234:views`.
A subscriber of `program:1234` receives `program:1234` and every topic below
it (`program:1234:views`), but not `program:12345:views`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from functools import lru_cache
from typing import Generic, TypeVar

from neoplasma.core.text import excerpt

SEPARATOR = ":"
MAX_TOPIC_LENGTH = 256
# A subscriber (SSE, plasma gRPC or batch gRPC) names at most this many topics at once.
MAX_TOPICS_PER_SUBSCRIPTION = 1000

H = TypeVar("H")


class InvalidTopic(ValueError):
    """A topic a publisher or subscriber gave cannot be used."""


class LimitExceeded(ValueError):
    """Well-formed input beyond a size limit: servers answer 413 / RESOURCE_EXHAUSTED, not 400."""


class TooManyTopics(InvalidTopic, LimitExceeded):
    """A subscription names more topics than allowed."""


def check_topic(topic: str, max_length: int = MAX_TOPIC_LENGTH) -> str:
    """Return the topic unchanged, or raise InvalidTopic saying what is wrong."""
    if not topic:
        raise InvalidTopic("topic is empty; give a name such as 'program:1234:views'")
    if len(topic) > max_length:
        raise InvalidTopic(f"topic is {len(topic)} characters long; the limit is {max_length}")
    for ch in topic:
        if ch < " " or ch == "\x7f":
            raise InvalidTopic(f"topic {excerpt(topic)} contains the control character {ch!r}")
        if "\ud800" <= ch <= "\udfff":
            raise InvalidTopic(f"topic {excerpt(topic)} contains the unpaired surrogate {ch!r}; "
                               "topics must be valid Unicode")
    if "," in topic:
        raise InvalidTopic(f"topic {excerpt(topic)} contains ',', which separates topics in a subscription")
    return topic


def check_topics(topics: Iterable[str], max_length: int = MAX_TOPIC_LENGTH,
                 max_topics: int = MAX_TOPICS_PER_SUBSCRIPTION) -> list[str]:
    """A subscription's topics, checked and without repeats (in order); TooManyTopics beyond `max_topics`."""
    given = list(topics)
    if len(given) > max_topics:
        raise TooManyTopics(f"{len(given)} topics in one subscription; the limit is {max_topics} "
                            "(subscribe to a common parent topic instead, e.g. 'program' for 'program:*')")
    return list(dict.fromkeys(check_topic(topic, max_length) for topic in given))


@lru_cache(maxsize=65536)
def prefixes(topic: str) -> tuple[str, ...]:
    """Every subscription key that matches `topic`: its `:`-prefixes and itself.

    >>> prefixes("program:1234:views")
    ('program', 'program:1234', 'program:1234:views')
    """
    keys: list[str] = []
    start = 0
    while True:
        idx = topic.find(SEPARATOR, start)
        if idx < 0:
            keys.append(topic)
            return tuple(keys)
        keys.append(topic[:idx])
        start = idx + 1


def matches(subscription: str, topic: str) -> bool:
    """True when a subscriber of `subscription` receives events of `topic`."""
    return topic == subscription or topic.startswith(subscription + SEPARATOR)


def parse_topic_list(raw: str, max_length: int = MAX_TOPIC_LENGTH,
                     max_topics: int = MAX_TOPICS_PER_SUBSCRIPTION) -> list[str]:
    """Parse plasma's `eventType=a,b` query value into checked, unique topics."""
    topics = [t for t in (part.strip() for part in raw.split(",")) if t]
    if not topics:
        raise InvalidTopic("no topic given; use ?eventType=topic[,topic...]")
    return check_topics(topics, max_length, max_topics)


class TopicIndex(Generic[H]):
    """Subscription keys -> holders (relay streams, subscriber groups).

    Answers which holders want an event's topic, each holder once even when it
    holds several matching keys (`a` and `a:b` for `a:b`).

    A key held by one holder maps to it directly; a set is made only for a key held by several. Most keys
    of a large interest have one holder (a proxy's 100,000 topics, one subscriber group each): a set per
    key was ~216 bytes more per key, allocated and freed in bulk as subscribers come and go, and what
    the allocator then kept (bench/interest_memory.py).
    """

    def __init__(self) -> None:
        self._keys: dict[str, H | set[H]] = {}
        self._peak = 0  # the most keys since the table was last rebuilt

    def add(self, holder: H, topics: Iterable[str]) -> set[str]:
        """Index `holder` under `topics`; returns the topics nobody wanted before."""
        keys = self._keys
        new = set()
        for topic in topics:
            held = keys.get(topic)
            if held is None:
                keys[topic] = holder
                new.add(topic)
            elif isinstance(held, set):
                held.add(holder)
            elif held is not holder:
                keys[topic] = {held, holder}
        self._peak = max(self._peak, len(keys))
        return new

    def remove(self, holder: H, topics: Iterable[str]) -> set[str]:
        """Unindex `holder` from `topics`; returns the topics nobody wants any more."""
        keys = self._keys
        gone = set()
        for topic in topics:
            held = keys.get(topic)
            if isinstance(held, set):
                held.discard(holder)
                if len(held) == 1:
                    keys[topic] = next(iter(held))
            elif held is holder and held is not None:
                del keys[topic]
                gone.add(topic)
        if self._peak > 1024 and len(keys) < self._peak // 4:  # a dict never shrinks its table: rebuild it
            self._keys = dict(keys)
            self._peak = len(self._keys)
        return gone

    def __len__(self) -> int:
        return len(self._keys)

    def new_keys(self, topics: Iterable[str]) -> int:
        """How many of `topics` nobody wants yet."""
        return sum(topic not in self._keys for topic in topics)

    def topics(self) -> set[str]:
        return set(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def matching(self, topic: str) -> Collection[H]:
        """The holders that want `topic` (read-only: do not change what is returned)."""
        first: H | set[H] | None = None
        merged: set[H] | None = None
        for key in prefixes(topic):
            held = self._keys.get(key)
            if held is None:
                continue
            if first is None:
                first = held
                continue
            if merged is None:
                merged = set(first) if isinstance(first, set) else {first}
            if isinstance(held, set):
                merged |= held
            else:
                merged.add(held)
        if merged is not None:
            return merged
        if first is None:
            return ()
        return first if isinstance(first, set) else (first,)
