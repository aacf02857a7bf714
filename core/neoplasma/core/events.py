"""Events as they cross the system, and their encodings.

An event is a topic and its data, kept as compact JSON text (bytes). The
broker checks and compacts publisher input once; every later stage forwards
bytes it can trust. Encoders here are the only place frames are built.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from neoplasma.core.topics import MAX_TOPIC_LENGTH, InvalidTopic, check_topic

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024


class InvalidEvent(ValueError):
    """A published event was refused; the message says why."""


@dataclass(frozen=True, slots=True)
class Event:
    topic: str
    data: bytes  # compact JSON text
    # The stamp (docs/resume.md), as a proxy received it; brokers keep them implied by position.
    epoch: int = 0
    seq: int = 0


# Matches a JSON string literal, or a run of whitespace outside one.
_TOKENS = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")|[ \t\n\r]+', re.DOTALL)
_WHITESPACE = re.compile(r"[ \t\n\r]")
# Characters Go's encoding/json escapes inside strings (plasma is written in Go).
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")


def _go_escape(text: str) -> str:
    return _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group(0)], text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def compact_json(raw: str | bytes) -> bytes:
    """Check that `raw` is JSON and return it compacted the way plasma (Go) does.

    Numbers and string escapes are kept exactly as given; only whitespace
    between tokens goes, and `<`, `>`, `&`, U+2028, U+2029 are escaped.
    """
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    json.loads(text, parse_constant=_reject_constant)
    if _WHITESPACE.search(text):
        text = _TOKENS.sub(r"\1", text)  # strings stay, whitespace between tokens goes
    if _GO_ESCAPE_RE.search(text):
        text = _go_escape(text)
    return text.encode("utf-8")


def _checked_event(topic: str, compact: bytes, max_bytes: int, max_topic_length: int) -> Event:
    try:
        check_topic(topic, max_topic_length)
    except InvalidTopic as exc:
        raise InvalidEvent(f"meta.type: {exc}") from None
    if len(compact) > max_bytes:
        raise InvalidEvent(f"data is {len(compact)} bytes; the limit is {max_bytes} bytes")
    return Event(topic, compact)


def make_event(topic: str, data: bytes | str, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
               max_topic_length: int = MAX_TOPIC_LENGTH) -> Event:
    """Check one published event (topic + JSON text) and return it normalised."""
    if len(data) > max_bytes:  # refuse before parsing a huge input
        raise InvalidEvent(f"data is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        compact = compact_json(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"data is not valid JSON: {exc}") from None
    return _checked_event(topic, compact, max_bytes, max_topic_length)


def parse_publish_body(body: bytes, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                       max_topic_length: int = MAX_TOPIC_LENGTH) -> list[Event]:
    """Parse plasma's publisher JSON: one `{"meta": {"type": T}, "data": D}` or a list.

    All or nothing: one bad event refuses the whole body, naming its index.
    Floats in `data` come out in Python's shortest form (`1e3` -> `1000.0`).
    """
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"body is not valid JSON: {exc}") from None
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise InvalidEvent("body is an empty list; send at least one event")
    events = []
    for index, item in enumerate(items):
        where = f"event {index}: " if isinstance(doc, list) else ""
        if not isinstance(item, dict):
            raise InvalidEvent(f'{where}expected an object {{"meta": {{"type": ...}}, "data": ...}}')
        meta = item.get("meta")
        if not isinstance(meta, dict) or not isinstance(meta.get("type"), str):
            raise InvalidEvent(f'{where}missing "meta": {{"type": "<topic>"}}')
        if "data" not in item:
            raise InvalidEvent(f'{where}missing "data"')
        data = _go_escape(json.dumps(item["data"], ensure_ascii=False, separators=(",", ":")))
        try:
            events.append(_checked_event(meta["type"], data.encode("utf-8"), max_bytes, max_topic_length))
        except InvalidEvent as exc:
            raise InvalidEvent(f"{where}{exc}") from None
    return events


# ---------------------------------------------------------------- encodings


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_field(field: int, value: int) -> bytes:
    """A protobuf varint field (wire type 0), encoded."""
    return _varint(field << 3) + _varint(value)


def _field_bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def fixed32_field(field: int, value: int) -> bytes:
    """A protobuf fixed32 field (wire type 5), encoded."""
    return _varint(field << 3 | 5) + value.to_bytes(4, "little")


def batch_entry(event: Event, seq: int = 0) -> bytes:
    """`event` as one element of `EventBatch.events` (field 1), encoded once, stamped with `seq`.

    Joining entries gives the serialised `EventBatch`, so a broker builds each
    relay message by concatenation, with no protobuf work per proxy.
    """
    body = _field_bytes(1, event.topic.encode("utf-8")) + _field_bytes(2, event.data)
    if seq:
        body += varint_field(3, seq)
    return _field_bytes(1, body)


def batch_trailer(*, epoch: int = 0, head: int = 0, token: bytes = b"", gap: bool = False) -> bytes:
    """The `EventBatch` fields after the events (joined after the entries)."""
    out = b""
    if epoch:
        out += fixed32_field(3, epoch)
    if head:
        out += varint_field(4, head)
    if token:
        out += _field_bytes(5, token)
    if gap:
        out += varint_field(6, 1)
    return out


def plasma_json(event: Event) -> bytes:
    """The JSON plasma sends to SSE clients: {"meta":{"type":T},"data":D}."""
    topic = _go_escape(json.dumps(event.topic, ensure_ascii=False))
    return b'{"meta":{"type":' + topic.encode("utf-8") + b'},"data":' + event.data + b"}"


def sse_frame(token: bytes, event: Event) -> bytes:
    """One SSE event as plasma writes it, its `id` being the resume token after it."""
    return b"id: %s\ndata: %s\n\n" % (token, plasma_json(event))


def sse_gap(reason: str) -> bytes:
    """The gap signal: a named event, which plasma clients' `onmessage` ignores."""
    return b"event: neoplasma-gap\ndata: %s\n\n" % json.dumps({"reason": reason}).encode()


def plasma_payload(event: Event) -> bytes:
    """plasma's gRPC `proto.Payload` for the event, serialised by hand.

    Field 1 eventType{type=1}, field 2 data (the JSON text as a string).
    """
    return _field_bytes(1, _field_bytes(1, event.topic.encode("utf-8"))) + _field_bytes(2, event.data)
