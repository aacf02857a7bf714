"""Topics and plasma's hierarchy.

A topic is a string of `:`-separated segments such as `program:1234:views`.
A subscriber of `program:1234` receives `program:1234` and every topic below
it (`program:1234:views`), but not `program:12345:views`.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
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
    """

    def __init__(self) -> None:
        self._keys: dict[str, set[H]] = {}
        self._peak = 0  # the most keys since the table was last rebuilt

    def add(self, holder: H, topics: Iterable[str]) -> set[str]:
        """Index `holder` under `topics`; returns the topics nobody wanted before."""
        new = set()
        for topic in topics:
            holders = self._keys.get(topic)
            if holders is None:
                holders = self._keys[topic] = set()
                new.add(topic)
            holders.add(holder)
        self._peak = max(self._peak, len(self._keys))
        return new

    def remove(self, holder: H, topics: Iterable[str]) -> set[str]:
        """Unindex `holder` from `topics`; returns the topics nobody wants any more."""
        gone = set()
        for topic in topics:
            holders = self._keys.get(topic)
            if holders is not None:
                holders.discard(holder)
                if not holders:
                    del self._keys[topic]
                    gone.add(topic)
        if self._peak > 1024 and len(self._keys) < self._peak // 4:  # a dict never shrinks its table: rebuild it
            self._keys = dict(self._keys)
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

    def matching(self, topic: str) -> AbstractSet[H]:
        """The holders that want `topic` (read-only: do not change the returned set)."""
        first: set[H] | None = None
        merged: set[H] | None = None
        for key in prefixes(topic):
            holders = self._keys.get(key)
            if holders:
                if first is None:
                    first = holders
                elif merged is None:
                    merged = first | holders
                else:
                    merged |= holders
        if merged is not None:
            return merged
        return first if first is not None else frozenset()
