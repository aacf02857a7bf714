"""Validation at every edge, as pure units: each bad input is refused whole, with a short, clear message."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neoplasma.core import events as ev
from neoplasma.core import scaling as sc
from neoplasma.core.events import (
    MAX_JSON_DEPTH,
    Event,
    InvalidEvent,
    RequestTooLarge,
    compact_json,
    make_events,
    parse_publish_body,
)
from neoplasma.core.membership import MAX_MEMBERS, MAX_VERSION, BrokerState, InvalidSnapshot, snapshot_from_proto
from neoplasma.core.topics import (
    MAX_TOPICS_PER_SUBSCRIPTION,
    InvalidTopic,
    LimitExceeded,
    TooManyTopics,
    check_topics,
    parse_topic_list,
)
from neoplasma.operator.spec import InvalidSpec, check_name, parse_spec
from neoplasma.wire.v1 import neoplasma_pb2 as pb

GOOD = b'{"meta": {"type": "t"}, "data": 1}'


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def body(*data: bytes, topic: bytes = b'"t"') -> bytes:
    """A batch: one good event first, then one event per `data`."""
    return b"[" + b",".join([GOOD] + [b'{"meta": {"type": ' + topic + b'}, "data": ' + d + b"}" for d in data]) + b"]"


# -- publishes ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    (body(nested(100_000)), "body nests too deeply; event data may nest at most 128 levels"),
    (body(nested(900)), "event 1: data nests 900 levels deep; the limit is 128"),
    (body(nested(MAX_JSON_DEPTH + 1)), "event 1: data nests 129 levels deep; the limit is 128"),
    (body(b'{"a": ' * 129 + b"1" + b"}" * 129), "event 1: data nests 129 levels deep"),
    (body(b"1", topic=b'"\\ud800"'), "event 1: meta.type: topic '\\ud800' contains the unpaired surrogate '\\ud800'"),
    (body(b"1", topic=b'"a\\udfffb"'), "contains the unpaired surrogate '\\udfff'; topics must be valid Unicode"),
    (body(b'"\\udc00"'), "event 1: data contains the unpaired surrogate '\\udc00'; strings must be valid Unicode"),
    (body(b'{"\\ud83d": 1}'), "event 1: data contains the unpaired surrogate '\\ud83d'"),
    (body(b'["\\ude00\\ud83d"]'), "unpaired surrogate '\\ude00'"),  # a pair in the wrong order
    (body(b'"\xed\xa0\x80"'), "event 1: data contains the unpaired surrogate '\\ud800'"),  # CESU-8, not UTF-8
    (body(b"1e400"), "event 1: data holds a number beyond the range of a double"),
    (body(b'{"x": [-1e999]}'), "beyond the range of a double"),
    (GOOD[:-1] + b', "x": ' + nested(100_000) + b"}", "body nests too deeply"),  # deep where nobody looks
])
def test_http_publish_refuses_the_whole_body(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidEvent) as refused:
        parse_publish_body(raw)
    assert message in str(refused.value)
    assert not isinstance(refused.value, LimitExceeded)


@pytest.mark.parametrize("data, expected", [
    (nested(MAX_JSON_DEPTH), nested(MAX_JSON_DEPTH)),
    (b'"' + b"[" * 1000 + b'"', b'"' + b"[" * 1000 + b'"'),  # brackets in strings do not nest
    (b'"\\ud83d\\ude00"', '"\U0001f600"'.encode()),  # a surrogate pair is one character
    (b'"\\\\ud800"', b'"\\\\ud800"'),  # an escaped backslash, then text
    (b"[" + b",".join([nested(MAX_JSON_DEPTH - 1)] * 500) + b"]",) * 2,  # many brackets, none too deep
])
def test_http_publish_accepts_what_is_within_bounds(data: bytes, expected: bytes) -> None:
    events = parse_publish_body(body(data))
    assert events == [Event("t", b"1"), Event("t", expected)]


@pytest.mark.parametrize("data, message", [
    (nested(100_000), "data nests too deeply; event data may nest at most 128 levels"),
    (nested(MAX_JSON_DEPTH + 1), "data nests 129 levels deep; the limit is 128"),
    (b'"\\ud800"', "data contains the unpaired surrogate '\\ud800'; strings must be valid Unicode"),
    (b'{"k": ["\\uDFFF"]}', "unpaired surrogate '\\udfff'"),
    (b'"\xed\xa0\x80"', "data is not valid JSON"),  # bytes must be UTF-8
    (b"NaN", "NaN is not valid JSON"),
])
def test_grpc_publish_refuses_bad_data(data: bytes, message: str) -> None:
    with pytest.raises(InvalidEvent) as refused:
        make_events([("t", b"1"), ("t", data)])
    assert str(refused.value).startswith("event 1: ") and message in str(refused.value)


@pytest.mark.parametrize("data, compact", [
    (b' [ "\\ud83d\\ude00" ] ', b'["\\ud83d\\ude00"]'),  # escapes are kept as given
    (b'"\\\\udc00"', b'"\\\\udc00"'),
    (b"1e400", b"1e400"),  # numbers too: kept as text, never turned into Infinity
    (nested(MAX_JSON_DEPTH), nested(MAX_JSON_DEPTH)),
])
def test_grpc_publish_keeps_valid_data_as_given(data: bytes, compact: bytes) -> None:
    assert compact_json(data) == compact
    assert make_events([("t", data)]) == [("t", compact)]


# JSON as publishers write it: odd numbers (exponents, big integers, 2.50), escapes, Go's specials, spaces.
_scalar = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(st.sampled_from("a <&>\u2028\u2019\u00e9\U0001f600\\\"\n\x01"), max_size=6))
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text("ab <", max_size=3), inner, max_size=4), max_leaves=12)
_numbers = st.sampled_from(["1e3", "2.50", "-0", "1E-7", "0.00001", "18446744073709551616", "1e400", "NaN"])


@st.composite
def _raw_json(draw: st.DrawFn) -> bytes:
    """What a publisher might send: JSON written one of several ways, sometimes with a number or
    a character spliced in (valid or not)."""
    value = draw(_json)
    spaced = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), separators=spaced)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_numbers | st.sampled_from(["[", "]", '"', "\\ud800", " ", ","])) + text[at:]
    return text.encode("utf-8", "surrogatepass")


def _outcome(check: Any, raw: bytes) -> Any:
    try:
        return check(raw)
    except InvalidEvent as exc:
        return str(exc)


@settings(max_examples=400)
@given(raw=_raw_json())
def test_orjson_checks_answer_as_the_json_path_does(raw: bytes) -> None:
    """orjson only speeds the checks: the results and refusals are those of the json path."""
    body = b'[{"meta": {"type": "t"}, "data": ' + raw + b"}]"
    fast = _outcome(compact_json, raw), _outcome(parse_publish_body, body)
    def refuse(doc: bytes) -> Any:
        raise ev.orjson.JSONDecodeError("not asked", "", 0)

    with pytest.MonkeyPatch.context() as patch:  # the json path alone
        patch.setattr(ev.orjson, "loads", refuse)
        assert fast == (_outcome(compact_json, raw), _outcome(parse_publish_body, body))


def test_grpc_topics_with_surrogates_and_empty_requests() -> None:
    with pytest.raises(InvalidEvent, match=r"^event 2: meta.type: topic 'x\\udc00' contains the unpaired"):
        make_events([("t", b"1"), ("u", b"2"), ("x\udc00", b"3")])
    with pytest.raises(InvalidEvent, match="the request has no events; send at least one"):
        make_events([])


@pytest.mark.parametrize("publish", [
    lambda: parse_publish_body(b"[" + b",".join([GOOD] * 11) + b"]", max_events=10),
    lambda: parse_publish_body(GOOD + b" " * 100, max_request_bytes=100),
    lambda: make_events([("t", b"1")] * 11, max_events=10),
    lambda: make_events([("t", b"1" * 60), ("t", b"2" * 60)], max_request_bytes=100),
])
def test_requests_beyond_the_limits_are_refused_as_too_large(publish: Any) -> None:
    with pytest.raises(RequestTooLarge, match=r"the limit is (10|100) \(send smaller batches\)") as refused:
        publish()
    assert isinstance(refused.value, InvalidEvent) and isinstance(refused.value, LimitExceeded)


def test_default_request_limits_fit_real_batches() -> None:
    batch = [{"meta": {"type": f"program:{i}:views"}, "data": {"views": i, "tags": ["a", "b"]}} for i in range(10_000)]
    assert len(parse_publish_body(json.dumps(batch).encode())) == 10_000
    with pytest.raises(RequestTooLarge, match="10001 events; the limit is 10000"):
        parse_publish_body(json.dumps([*batch, batch[0]]).encode())


# -- subscriptions -----------------------------------------------------------------------


def test_subscriptions_are_bounded_and_checked() -> None:
    most = [f"t{i}" for i in range(MAX_TOPICS_PER_SUBSCRIPTION)]
    assert check_topics([*most, "t0"][1:]) == [*most[1:], "t0"]  # repeats dropped, order kept
    with pytest.raises(TooManyTopics, match=r"^1001 topics in one subscription; the limit is 1000 \(subscribe to"):
        check_topics([*most, "x"])
    with pytest.raises(TooManyTopics, match="3 topics in one subscription; the limit is 2"):
        parse_topic_list("a,b,c", max_topics=2)
    assert issubclass(TooManyTopics, InvalidTopic) and issubclass(TooManyTopics, LimitExceeded)
    with pytest.raises(InvalidTopic, match="unpaired surrogate") as refused:
        check_topics(["ok", "bad\ud800"])
    assert not isinstance(refused.value, LimitExceeded)
    with pytest.raises(InvalidTopic, match=r"^topic 'x{40}\.\.\.' contains the control character"):
        check_topics(["x" * 200 + "\n"])


# -- membership snapshots ------------------------------------------------------------------

S = pb.BrokerMember.State


def membership(*brokers: tuple[Any, ...], version: int = 1) -> pb.Membership:
    """(name, address[, state]) each; the state may be any number, as on the wire."""
    return pb.Membership(version=version, brokers=[
        pb.BrokerMember(name=name, address=address, state=state[0] if state else S.SERVING)
        for name, address, *state in brokers])


@pytest.mark.parametrize("msg, reason", [
    (membership(("a", "h:1"), ("b", "h:1")), "broker address 'h:1' appears twice (broker 'b')"),
    (membership(("a", "h:1"), ("b", "H:01")), "broker address 'H:01' appears twice"),
    (membership(("a", "[::1]:5"), ("b", "[0:0::1]:5")), "broker address '[0:0::1]:5' appears twice"),
    (membership(("a", "h:1"), ("a", "h:2")), "broker 'a' appears twice"),
    (membership(("a", "h")), "not host:port"),
    (membership(("a", ":1")), "not host:port"),
    (membership(("a", "h:0")), "not host:port"),
    (membership(("a", "h:65536")), "not host:port"),
    (membership(("a", "h:\uff11")), "not host:port"),  # a fullwidth digit is not a port
    (membership(("a", "h:-1")), "not host:port"),
    (membership(("a", "::1:5")), "not host:port"),  # IPv6 needs brackets
    (membership(("a", "[1.2.3.4]:5")), "not host:port"),
    (membership(("a", "evil host:1")), "not host:port"),
    (membership(("a", "-h.example:1")), "not host:port"),
    (membership(("a", "h..example:1")), "not host:port"),
    (membership(("a", "a" * 64 + ".example:1")), "not host:port"),  # a DNS label has at most 63
    (membership(("a", ("a" * 60 + ".") * 5 + "x:1")), "'" + "a" * 40 + "...' is not host:port"),
    (membership(("a", "h:1", S.STATE_UNSPECIFIED)), "broker 'a' has no state (SERVING or DRAINING)"),
    (membership(("a", "h:1", 7)), "broker 'a' has no state (SERVING or DRAINING); 7 is unknown"),
    (membership(("", "h:1")), "a broker has no name"),
    (membership(("a\nb", "h:1")), "broker name 'a\\nb' is not a pod name"),
    (membership(("n" * 254, "h:1")), "is not a pod name (printable, at most 253 characters)"),
    (membership(*[(f"b{i}", f"h:{i + 1}") for i in range(MAX_MEMBERS + 1)]),
     "1001 brokers; a membership holds at most 1000"),
    (membership(version=MAX_VERSION + 1), "version 9007199254740992 is beyond 9007199254740991"),
    (membership(version=2**64 - 1), "which no operator reaches"),
])
def test_snapshots_are_refused_with_a_reason(msg: pb.Membership, reason: str) -> None:
    with pytest.raises(InvalidSnapshot) as refused:
        snapshot_from_proto(msg)
    assert reason in str(refused.value)


def test_snapshots_within_bounds_are_accepted() -> None:
    msg = membership(("b2", "[fd00::1]:50051", S.DRAINING), ("b1", "10.0.0.1:50051"),
                     ("b0", "broker-0.neoplasma.svc.cluster.local:50051"),
                     *[(f"x{i}", f"h{i}:1") for i in range(MAX_MEMBERS - 3)], version=MAX_VERSION)
    snapshot = snapshot_from_proto(msg)
    assert snapshot.version == MAX_VERSION and len(snapshot.members) == MAX_MEMBERS
    assert [(m.name, m.state) for m in snapshot.members[:3]] == [
        ("b0", BrokerState.SERVING), ("b1", BrokerState.SERVING), ("b2", BrokerState.DRAINING)]


def test_a_snapshot_pushed_again_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy is pushed the same brokers change after change: their addresses are checked once, not per push
    (the IP parse was a tenth of its control server's CPU); an invalid one is refused every time."""
    from neoplasma.core import membership as module

    parsed: list[str] = []
    parse = module.ipaddress.ip_address

    def counted(text: str) -> Any:
        parsed.append(text)
        return parse(text)

    monkeypatch.setattr(module.ipaddress, "ip_address", counted)
    brokers = [(f"b{i}", f"10.9.8.{i}:50051") for i in range(1, 8)]
    for version in (1, 2, 3):
        assert len(snapshot_from_proto(membership(*brokers, version=version)).members) == 7
    assert sorted(parsed) == sorted(f"10.9.8.{i}" for i in range(1, 8))
    for _ in range(2):
        with pytest.raises(InvalidSnapshot, match="not host:port"):
            snapshot_from_proto(membership(("a", "10.9.8.1:0")))


# -- annotations and spec --------------------------------------------------------------------

HUGE = 65_536
# Shapes that made the old duration pattern backtrack quadratically, and plain garbage.
HOSTILE = ["1" + " " * HUGE + "x", " " * HUGE + "1", "1" * HUGE + "x", "9" * HUGE, "x" * HUGE]


class Untouchable:
    """Stands in for a pattern that must never be run."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the parser ran ({name}) on a value beyond the cap")


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("annotation", [sc.AUTOSCALE, sc.PAUSE, sc.TARGET_CONNECTIONS, sc.TARGET_EVENTS, sc.MIN_BROKERS,
                                        sc.MAX_BROKERS, sc.TARGET_SUBSCRIBERS, sc.MIN_PROXIES, sc.MAX_PROXIES,
                                        sc.SCALE_DOWN_DELAY, sc.TOLERANCE, sc.SCALE_UP_LIMIT])
def test_huge_annotation_values_are_refused_unread(monkeypatch: pytest.MonkeyPatch, annotation: str,
                                                   value: str) -> None:
    # Refused on its length before any parsing: constant work whatever the size.
    monkeypatch.setattr(sc, "_DURATION", Untouchable())
    policy, errors = sc.parse_policy({annotation: value}, 1, 1)
    assert policy is None
    [error] = errors
    assert error.annotation == annotation
    assert error.problem.endswith(f"...' is {len(value)} characters long; values are at most {sc.MAX_VALUE_LENGTH}")
    assert len(str(error)) < 200


@pytest.mark.parametrize("value, seconds", [
    ("300", 300.0), (" 5m ", 300.0), ("1.5 h", 5400.0), ("250ms", 0.25), ("2\ts", 2.0),
    ("1" + " " * 60 + "x", None), ("5 m x", None), ("m", None), ("1.m", None), (" " * 63 + "1", 1.0),
])
def test_durations_up_to_the_cap(value: str, seconds: float | None) -> None:
    policy, errors = sc.parse_policy({sc.SCALE_DOWN_DELAY: value}, 1, 1)
    if seconds is None:
        assert policy is None and "is not a duration" in errors[0].problem
    else:
        assert policy is not None and policy.scale_down_delay == seconds


def test_duration_pattern_is_linear_on_its_own() -> None:
    # Without the cap, the pattern still fails at once: after strip() one `\s*` run remains,
    # and the digits before it cannot be split again (no second run to trade spaces with).
    with pytest.raises(sc.PolicyError, match=r"^d: '1 {39}\.\.\.' is not a duration"):
        sc.parse_duration("d", "1" + " " * HUGE + "x")


@pytest.mark.parametrize("spec, field, problem", [
    ({"brokers": {"resources": {"requests": {"cpu": "1" * HUGE}}}}, "spec.brokers.resources.requests.cpu",
     "must be a quantity such as 100m or 128Mi, got '" + "1" * 40 + "...'"),
    ({"brokers": {"resources": {"requests": {"k" * HUGE: "fast"}}}},
     "spec.brokers.resources.requests." + "k" * 40 + "...", None),
    ({"image": list(range(HUGE))}, "spec.image", "must be a string, got [0, 1, 2, 3, 4, 5, ...]"),
    ({"brokers": {"replicas": "9" * HUGE}}, "spec.brokers.replicas", "must be an integer, got '" + "9" * 40 + "...'"),
    ({"proxies": {"service": {"type": "x" * HUGE}}}, "spec.proxies.service.type", None),
    ({"x" * HUGE: 1}, "spec." + "x" * 40 + "...",
     "unknown field; known fields are brokers, image, ingest, networkPolicies, proxies, publishers, "
     "subscribers, tls"),
])
def test_huge_spec_values_get_short_messages(spec: object, field: str, problem: str | None) -> None:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec(spec)
    assert refused.value.field == field and len(str(refused.value)) < 300
    assert problem is None or refused.value.problem == problem


def test_huge_names_get_short_messages() -> None:
    with pytest.raises(InvalidSpec, match=r"got 'a{40}\.\.\.'$") as refused:
        check_name("a" * HUGE)
    assert len(str(refused.value)) < 300
