"""Topics and plasma's hierarchy.

A topic is a string of `:`-separated segments such as `program:1234:views`.
A subscriber of `program:1234` receives `program:1234` and every topic below
it (`program:1234:views`), but not `program:12345:views`.
"""

from __future__ import annotations

from functools import lru_cache

SEPARATOR = ":"
MAX_TOPIC_LENGTH = 256


class InvalidTopic(ValueError):
    """A topic a publisher or subscriber gave cannot be used."""


def check_topic(topic: str, max_length: int = MAX_TOPIC_LENGTH) -> str:
    """Return the topic unchanged, or raise InvalidTopic saying what is wrong."""
    if not topic:
        raise InvalidTopic("topic is empty; give a name such as 'program:1234:views'")
    if len(topic) > max_length:
        raise InvalidTopic(f"topic is {len(topic)} characters long; the limit is {max_length}")
    for ch in topic:
        if ch < " " or ch == "\x7f":
            raise InvalidTopic(f"topic {topic[:40]!r} contains the control character {ch!r}")
    if "," in topic:
        raise InvalidTopic(f"topic {topic[:40]!r} contains ',', which separates topics in a subscription")
    return topic


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


def parse_topic_list(raw: str, max_length: int = MAX_TOPIC_LENGTH) -> list[str]:
    """Parse plasma's `eventType=a,b` query value into checked, unique topics."""
    topics = [t for t in (part.strip() for part in raw.split(",")) if t]
    if not topics:
        raise InvalidTopic("no topic given; use ?eventType=topic[,topic...]")
    seen: dict[str, None] = {}
    for topic in topics:
        seen[check_topic(topic, max_length)] = None
    return list(seen)
