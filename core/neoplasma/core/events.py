"""Events as they cross the system, and their encodings.

An event is a topic and its data, kept as compact JSON text (bytes). The
broker checks and compacts publisher input once; every later stage forwards
bytes it can trust. Encoders here are the only place frames are built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any

import orjson

from neoplasma.core.topics import MAX_TOPIC_LENGTH, InvalidTopic, LimitExceeded, check_topic

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
# Per publish request (an HTTP body or a gRPC PublishRequest). Batches of a few hundred events
# are typical; larger ones gain nothing and hold the broker's loop while they are checked.
DEFAULT_MAX_EVENTS_PER_REQUEST = 10_000
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
# JSON values a publish body may hold (array elements and object members, counted before it is
# parsed): parsing makes a Python object of each, ~50-100 bytes, so this bounds what a body costs
# (16 MiB of tiny events was 466k events and 351 MB before they were counted). 25 per event of a
# full 10,000-event request.
DEFAULT_MAX_ELEMENTS_PER_REQUEST = 250_000
# How deeply an event's data may nest arrays and objects: far beyond real payloads, and far
# below where recursive JSON parsers give up (Python's, in subscribers too, near 1000).
MAX_JSON_DEPTH = 128


class InvalidEvent(ValueError):
    """A published event was refused; the message says why."""


class RequestTooLarge(InvalidEvent, LimitExceeded):
    """A publish request holds more events or bytes than allowed."""


@dataclass(frozen=True, slots=True)
class Event:
    topic: str
    data: bytes  # compact JSON text
    # The stamp (docs/resume.md), as a proxy received it; brokers keep them implied by position.
    epoch: int = 0
    seq: int = 0


# A JSON string literal (captured: splitting on it keeps the strings at odd indices).
_STRINGS = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")', re.DOTALL)
# In valid JSON: string literals and runs of anything but brackets, i.e. all but the nesting.
_NOT_NESTING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[^"\[\]{}]+', re.DOTALL)
_NESTING_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# What compact_json changes: whitespace, and the characters Go escapes.
_SPECIAL = re.compile("[ \t\n\r<>&\u2028\u2029]")
_WHITESPACE = re.compile(r"[ \t\n\r]")
# A \uD800-\uDFFF escape: only then can a decoded string hold an unpaired surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Characters Go's encoding/json escapes inside strings (plasma is written in Go).
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")
_PLAIN = bytes(sorted(set(range(256)) - set(b"[{ \t\n\r<>&\xe2")))  # U+2028 is \xe2\x80\xa8 in UTF-8
# Where orjson may write numbers unlike Python's json: an exponent (1e-5 for 1e-05, or 1.8e+19 for
# an integer beyond 64 bits, which it reads as a float) or 0.00001 for 1e-05. Regular expressions
# that start with a literal scan faster than `in` here; the exact pattern only runs after `e-`, `e+`.
_EXPONENT = re.compile(rb"\de[-+]")
_E_SIGN = re.compile(rb"e[-+]")
_TINY = re.compile(rb"0\.0000")


def _go_escape(text: str) -> str:
    return _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group(0)], text)


def _notable(utf8: bytes) -> bytes:
    """The bytes of JSON text `utf8` that the checks look at: brackets, whitespace and the starts of
    what Go escapes, in one pass (much faster than several scans or a regular expression)."""
    return utf8.translate(None, _PLAIN)


def _has_go_escapes(utf8: bytes, notable: bytes) -> bool:
    """True when `utf8` (with its `_notable` bytes) holds a character Go escapes."""
    rest = notable.translate(None, b"[{ \t\n\r")  # <, >, & and \xe2 (the start of U+2028, U+2029 and others)
    return bool(rest) and (bool(rest.strip(b"\xe2")) or b"\xe2\x80\xa8" in utf8 or b"\xe2\x80\xa9" in utf8)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _load(text: str | bytes, what: str) -> Any:
    try:  # bytes as json.loads reads them (UTF-8, -16 or -32)
        return _DECODER.decode(text) if isinstance(text, str) else json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # past ~1000 levels; shallower ones are measured by _check_depth
        raise InvalidEvent(f"{what} nests too deeply; event data may nest at most {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"{what} is not valid JSON: {exc}") from None


def _check_depth(text: str, what: str = "data", limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse valid JSON `text` whose arrays and objects nest deeper than `limit`, in linear time."""
    if text.count("[") + text.count("{") <= limit:  # it cannot nest deeper than it opens
        return
    depth = max(accumulate(map(_NESTING_STEP.__getitem__, _NOT_NESTING.sub("", text))), default=0)
    if depth > limit:
        raise InvalidEvent(f"{what} nests {depth} levels deep; the limit is {limit}")


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent(f"{what} contains the unpaired surrogate {exc.object[exc.start]!r}; "
                           "strings must be valid Unicode") from None


class _Unsure(Exception):
    """orjson's reading or writing of an input may differ from the json path's: that path decides."""


def _shallow(notable: bytes) -> bool:
    """True when JSON text (given by its `_notable` bytes) surely nests within MAX_JSON_DEPTH (opens fewer brackets)."""
    return len(notable) <= MAX_JSON_DEPTH or notable.count(b"[") + notable.count(b"{") <= MAX_JSON_DEPTH


def _compact_by_orjson(raw: bytes) -> bytes | None:
    """`compact_json(raw)` when orjson vouches for it, else None.

    orjson refuses all that the json path refuses (and more, such as 1e400): valid and shallow
    with nothing to escape, `raw` less its whitespace is the answer when no string holds a space,
    i.e. when that is what orjson writes for the value (numbers too must be written as orjson would).
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    notable = _notable(raw)
    if not _shallow(notable) or _has_go_escapes(raw, notable):
        return None
    if not notable.translate(None, b"[{\xe2"):  # no whitespace: compact as given
        return raw
    compact = raw.translate(None, b" \t\n\r")
    return compact if compact == orjson.dumps(value) else None


def compact_json(raw: str | bytes) -> bytes:
    """Check that `raw` is JSON and return it compacted the way plasma (Go) does.

    Numbers and string escapes are kept exactly as given; only whitespace
    between tokens goes, and `<`, `>`, `&`, U+2028, U+2029 are escaped.
    Raises InvalidEvent for anything else: not UTF-8, not JSON, too deeply
    nested, or a string holding an unpaired surrogate (`"\\ud800"`).
    """
    if isinstance(raw, bytes) and (compact := _compact_by_orjson(raw)) is not None:
        return compact
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"data is not valid JSON: {exc}") from None
    value = _load(text, "data")
    _check_depth(text)
    if _SURROGATE_ESCAPE.search(text):
        _utf8(json.dumps(value, ensure_ascii=False), "data")
    if not _SPECIAL.search(text):  # compact already (the usual case): valid UTF-8 as given
        return raw if isinstance(raw, bytes) else _utf8(text, "data")
    if _WHITESPACE.search(text):  # strings stay, whitespace between tokens goes
        pieces = _STRINGS.split(text)
        pieces[::2] = ["".join(between.split()) for between in pieces[::2]]
        text = "".join(pieces)
    if _GO_ESCAPE_RE.search(text):
        text = _go_escape(text)
    return _utf8(text, "data")


# Publishers send few distinct topics, many times over: each is checked once (valid ones are kept).
_checked_topic = lru_cache(maxsize=16384)(check_topic)

# A published event as checked: (topic, data as compact JSON). The broker keeps events so rather
# than as Events: tuples are quicker to make, and the garbage collector soon stops tracking them.
Checked = tuple[str, bytes]


def _checked(topic: str, compact: bytes, max_bytes: int, max_topic_length: int) -> Checked:
    try:
        topic = _checked_topic(topic, max_topic_length)  # the cached str: kept events share one per topic
    except InvalidTopic as exc:
        raise InvalidEvent(f"meta.type: {exc}") from None
    if len(compact) > max_bytes:
        raise InvalidEvent(f"data is {len(compact)} bytes; the limit is {max_bytes} bytes")
    return topic, compact


# A JSON string: without commas or opening brackets, or (captured) with some.
_JSON_STRING = re.compile(rb'"(?:[^"\\,\[{]*(?:\\.[^"\\,\[{]*)*"|([^"\\]*(?:\\.[^"\\]*)*)")', re.DOTALL)


def json_elements(body: bytes, limit: int) -> int:
    """How many array elements and object members JSON text `body` holds (exactly when it is valid and
    within `limit`; some number over `limit` when it is not within), without parsing it: its commas and
    opening brackets outside strings. Beyond `limit` it is counted string by string, until the count is
    sure to be over (no copy of the body, no list of its pieces: bounded memory)."""
    quick = body.count(b",") + body.count(b"[") + body.count(b"{")
    if quick <= limit:
        return quick
    for n, found in enumerate(_JSON_STRING.finditer(body), 1):  # strings may hold commas and brackets
        text = found.group(1)
        if text is not None:
            quick -= text.count(b",") + text.count(b"[") + text.count(b"{")
        if n >= 4096 and not n & (n - 1):  # (now and then) over already, even if all that follows were in strings?
            end = found.end()
            if quick - (body.count(b",", end) + body.count(b"[", end) + body.count(b"{", end)) > limit:
                return quick
    return quick


def _check_request(events: int, size: int, max_events: int, max_request_bytes: int) -> None:
    if size > max_request_bytes:
        raise RequestTooLarge(f"the request is {size} bytes; the limit is {max_request_bytes} (send smaller batches)")
    if events > max_events:
        raise RequestTooLarge(f"the request holds {events} events; the limit is {max_events} (send smaller batches)")


def _check_published(topic: str, data: bytes | str, max_bytes: int, max_topic_length: int) -> Checked:
    if len(data) > max_bytes:  # refuse before parsing a huge input
        raise InvalidEvent(f"data is {len(data)} bytes; the limit is {max_bytes} bytes")
    return _checked(topic, compact_json(data), max_bytes, max_topic_length)


def make_event(topic: str, data: bytes | str, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
               max_topic_length: int = MAX_TOPIC_LENGTH) -> Event:
    """Check one published event (topic + JSON text) and return it normalised."""
    return Event(*_check_published(topic, data, max_bytes, max_topic_length))


def make_events(events: Iterable[tuple[str, bytes]], *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                max_topic_length: int = MAX_TOPIC_LENGTH, max_events: int = DEFAULT_MAX_EVENTS_PER_REQUEST,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                max_elements: int = DEFAULT_MAX_ELEMENTS_PER_REQUEST) -> list[Checked]:
    """Check a gRPC PublishRequest's (topic, data) pairs, all or nothing: one bad event refuses them all.

    Each event's data is parsed on its own, after its size is checked (`max_elements` bounds a whole
    HTTP body, parsed at once; here one event of at most `max_bytes` is parsed at a time).

    RequestTooLarge (a LimitExceeded) when the request is beyond the per-request limits.
    """
    given = list(events)
    _check_request(len(given), sum(len(topic) + len(data) for topic, data in given), max_events, max_request_bytes)
    if not given:
        raise InvalidEvent("the request has no events; send at least one")
    checked = []
    for index, (topic, data) in enumerate(given):
        try:
            checked.append(_check_published(topic, data, max_bytes, max_topic_length))
        except InvalidEvent as exc:
            raise InvalidEvent(f"event {index}: {exc}") from None
    return checked


def _dump(value: Any, what: str) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except RecursionError:  # past ~1000 levels; shallower ones are measured by _check_depth
        raise InvalidEvent(f"{what} nests too deeply; event data may nest at most {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise InvalidEvent(f"{what} holds a number beyond the range of a double (such as 1e400)") from None
    _check_depth(text, what)
    return _utf8(_go_escape(text), what)


def _dump_by_orjson(value: Any, what: str) -> bytes:
    """`_dump(value)`, by orjson; _Unsure where it might differ."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested beyond orjson's limit
        raise _Unsure from None
    notable = _notable(text)
    if not _shallow(notable) or _TINY.search(text) or (_E_SIGN.search(text) and _EXPONENT.search(text)):
        raise _Unsure
    return _go_escape(text.decode()).encode() if _has_go_escapes(text, notable) else text


def check_publish_body(body: bytes, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                       max_topic_length: int = MAX_TOPIC_LENGTH, max_events: int = DEFAULT_MAX_EVENTS_PER_REQUEST,
                       max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                       max_elements: int = DEFAULT_MAX_ELEMENTS_PER_REQUEST) -> list[Checked]:
    """Check plasma's publisher JSON: one `{"meta": {"type": T}, "data": D}` or a list.

    All or nothing: one bad event refuses the whole body, naming its index.
    RequestTooLarge (a LimitExceeded) when the body is beyond the per-request limits: its bytes and its
    JSON values (`json_elements`: which bounds its events and nesting too) are counted before it is parsed.
    Floats in `data` come out in Python's shortest form (`1e3` -> `1000.0`).
    """
    _check_request(0, len(body), max_events, max_request_bytes)  # the size, before parsing
    if (elements := json_elements(body, max_elements)) > max_elements:
        raise RequestTooLarge(f"the request holds {elements} JSON values (array elements and object members); "
                              f"the limit is {max_elements} (send smaller batches)")
    limits = max_bytes, max_topic_length, max_events, max_request_bytes
    try:  # orjson first; where it might read or write anything unlike the json path, that path decides
        return _publish_events(orjson.loads(body), _dump_by_orjson, *limits)
    except (orjson.JSONDecodeError, _Unsure):
        return _publish_events(_load(body, "body"), _dump, *limits)


def parse_publish_body(body: bytes, **limits: int) -> list[Event]:
    """`check_publish_body`, as Events."""
    return [Event(topic, data) for topic, data in check_publish_body(body, **limits)]


def _publish_events(doc: Any, dump: Callable[[Any, str], bytes], max_bytes: int, max_topic_length: int,
                    max_events: int, max_request_bytes: int) -> list[Checked]:
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise InvalidEvent("body is an empty list; send at least one event")
    _check_request(len(items), 0, max_events, max_request_bytes)
    events = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise InvalidEvent('expected an object {"meta": {"type": ...}, "data": ...}')
            meta = item.get("meta")
            if not isinstance(meta, dict) or not isinstance(meta.get("type"), str):
                raise InvalidEvent('missing "meta": {"type": "<topic>"}')
            if "data" not in item:
                raise InvalidEvent('missing "data"')
            events.append(_checked(meta["type"], dump(item["data"], "data"), max_bytes, max_topic_length))
        except InvalidEvent as exc:
            raise InvalidEvent(f"event {index}: {exc}" if isinstance(doc, list) else str(exc)) from None
    return events


# ---------------------------------------------------------------- encodings


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def varint(value: int) -> bytes:
    """`value` as a protobuf base-128 varint."""
    if value <= 0x7F:
        return _ONE_BYTE[value]
    if value <= 0x3FFF:  # the length of most events
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_field(field: int, value: int) -> bytes:
    """A protobuf varint field (wire type 0), encoded."""
    return varint(field << 3) + varint(value)


def string_field_size(text: str) -> int:
    """The bytes one entry of a repeated string field (fields 1-15) takes in an encoded message."""
    size = len(text.encode())
    return 1 + len(varint(size)) + size


def _field_bytes(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def string_field(field: int, text: str) -> bytes:
    """A protobuf string field (wire type 2), encoded."""
    return _field_bytes(field, text.encode("utf-8"))


def fixed32_field(field: int, value: int) -> bytes:
    """A protobuf fixed32 field (wire type 5), encoded."""
    return varint(field << 3 | 5) + value.to_bytes(4, "little")


def fixed64_field(field: int, value: int) -> bytes:
    """A protobuf fixed64 field (wire type 1), encoded."""
    return varint(field << 3 | 1) + value.to_bytes(8, "little")


def topic_field(topic: str) -> bytes:
    """`Event.topic` encoded: the start of every entry of that topic (see `stamped_entry`)."""
    return _field_bytes(1, topic.encode("utf-8"))


def stamped_entry(topic: bytes, data: bytes, seq: int = 0) -> bytes:
    """An event (its `topic_field` and data) as one element of `EventBatch.events` (field 1),
    stamped with `seq`.

    Joining entries gives the serialised `EventBatch`, so a broker builds each
    relay message by concatenation, with no protobuf work per proxy.
    """
    size = varint(len(data))
    stamp = b"\x18" + varint(seq) if seq else b""  # field 3, varint
    length = len(topic) + 1 + len(size) + len(data) + len(stamp)
    return b"".join((b"\x0a", varint(length), topic, b"\x12", size, data, stamp))  # field 2: the data


def batch_entry(event: Event, seq: int = 0) -> bytes:
    """`event` as one element of `EventBatch.events`, stamped with `seq` (see `stamped_entry`)."""
    return stamped_entry(topic_field(event.topic), event.data, seq)


def batch_trailer(*, epoch: int = 0, head: int = 0, token: bytes = b"", gap: bool = False,
                  accepted_ns: int = 0) -> bytes:
    """The `EventBatch` fields after the events (joined after the entries)."""
    out = fixed64_field(7, accepted_ns) if accepted_ns else b""
    if epoch:
        out += fixed32_field(3, epoch)
    if head:
        out += varint_field(4, head)
    if token:
        out += _field_bytes(5, token)
    if gap:
        out += varint_field(6, 1)
    return out


@lru_cache(maxsize=16384)
def _plasma_head(topic: str) -> bytes:
    """What precedes an event's data in `plasma_json`: the same for every event of a topic (made once per topic;
    topics are bounded in length, the cache in count)."""
    return b'{"meta":{"type":' + _go_escape(json.dumps(topic, ensure_ascii=False)).encode("utf-8") + b'},"data":'


def plasma_json(event: Event) -> bytes:
    """The JSON plasma sends to SSE clients: {"meta":{"type":T},"data":D}."""
    return _plasma_head(event.topic) + event.data + b"}"


def sse_frame(token: bytes, event: Event) -> bytes:
    """One SSE event as plasma writes it, its `id` being the resume token after it."""
    return b"id: %s\ndata: %s\n\n" % (token, plasma_json(event))


def sse_pointed_frame(pointer: bytes, event: Event) -> bytes:
    """One SSE event with a pointer as its id (docs/resume.md, "Pointer ids"), written `id:` without the optional
    space (a byte per event: an EventSource takes either)."""
    return b"id:%s\ndata: %s\n\n" % (pointer, plasma_json(event))


def sse_gap(reason: str) -> bytes:
    """The gap signal: a named event, which plasma clients' `onmessage` ignores."""
    return b"event: neoplasma-gap\ndata: %s\n\n" % json.dumps({"reason": reason}).encode()


@dataclass(frozen=True)
class SseMessage:
    """One event block of an event stream, read as the HTML spec reads it: `name` is its `event:`
    field ("" for a plain message, what `onmessage` sees), `data` its `data:` lines joined by "\n",
    `id` its own `id:` field or None. A browser dispatches only blocks with data; their ids count
    either way (`SseReader.last_id`)."""

    name: str
    data: str
    id: str | None


class SseReader:
    """The client side of `sse_frame`: reads an event stream incrementally, as a browser's
    EventSource does. `feed` the bytes as they arrive (split anywhere) and get the event blocks they
    complete; `last_id` is what a reconnect sends as `Last-Event-ID` (kept until an `id:` replaces
    it), `retry` the reconnection time in ms the server asked for, `comments` the comment lines."""

    def __init__(self, last_id: str = "") -> None:
        self.last_id = last_id
        self.retry: int | None = None
        self.comments: list[str] = []
        self._pending = b""
        self._name = ""  # the block being read: its fields so far
        self._data: list[str] = []
        self._id: str | None = None
        self._fields = False

    def feed(self, chunk: bytes) -> list[SseMessage]:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        done: list[SseMessage] = []
        for raw in lines:
            line = raw.decode("utf-8", "replace").removesuffix("\r")
            if not line:
                if self._id is not None:
                    self.last_id = self._id
                if self._fields:
                    done.append(SseMessage(self._name, "\n".join(self._data), self._id))
                self._name, self._data, self._id, self._fields = "", [], None, False
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if not field:
                self.comments.append(line)
                continue
            if field == "event":
                self._name, self._fields = value, True
            elif field == "data":
                self._data.append(value)
                self._fields = True
            elif field == "id" and "\0" not in value:
                self._id, self._fields = value, True
            elif field == "retry" and value.isdigit():
                self.retry = int(value)
        return done


def grpc_frame(message: bytes) -> bytes:
    """`message` framed as gRPC sends it on a stream: uncompressed, its length, itself."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def plasma_payload(event: Event) -> bytes:
    """plasma's gRPC `proto.Payload` for the event, serialised by hand.

    Field 1 eventType{type=1}, field 2 data (the JSON text as a string).
    """
    return _field_bytes(1, _field_bytes(1, event.topic.encode("utf-8"))) + _field_bytes(2, event.data)
