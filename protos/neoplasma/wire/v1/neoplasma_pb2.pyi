from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("topic", "data", "seq")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    topic: str
    data: bytes
    seq: int
    def __init__(self, topic: _Optional[str] = ..., data: _Optional[bytes] = ..., seq: _Optional[int] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class Interest(_message.Message):
    __slots__ = ("add", "remove", "replace", "proxy", "epoch", "after", "backfill_ms", "instance", "resolved", "more", "nonce", "checkpoint")
    ADD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    PROXY_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    BACKFILL_MS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    add: _containers.RepeatedScalarFieldContainer[str]
    remove: _containers.RepeatedScalarFieldContainer[str]
    replace: bool
    proxy: str
    epoch: int
    after: int
    backfill_ms: int
    instance: int
    resolved: _containers.RepeatedCompositeFieldContainer[PointerAnswer]
    more: bool
    nonce: int
    checkpoint: Checkpoint
    def __init__(self, add: _Optional[_Iterable[str]] = ..., remove: _Optional[_Iterable[str]] = ..., replace: _Optional[bool] = ..., proxy: _Optional[str] = ..., epoch: _Optional[int] = ..., after: _Optional[int] = ..., backfill_ms: _Optional[int] = ..., instance: _Optional[int] = ..., resolved: _Optional[_Iterable[_Union[PointerAnswer, _Mapping]]] = ..., more: _Optional[bool] = ..., nonce: _Optional[int] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("instance", "counter", "epochs", "seqs")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    instance: int
    counter: int
    epochs: _containers.RepeatedScalarFieldContainer[int]
    seqs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, instance: _Optional[int] = ..., counter: _Optional[int] = ..., epochs: _Optional[_Iterable[int]] = ..., seqs: _Optional[_Iterable[int]] = ...) -> None: ...

class PointerQuery(_message.Message):
    __slots__ = ("id", "pointer")
    ID_FIELD_NUMBER: _ClassVar[int]
    POINTER_FIELD_NUMBER: _ClassVar[int]
    id: int
    pointer: str
    def __init__(self, id: _Optional[int] = ..., pointer: _Optional[str] = ...) -> None: ...

class PointerAnswer(_message.Message):
    __slots__ = ("id", "token")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: int
    token: str
    def __init__(self, id: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("events", "interest_applied", "epoch", "head", "token", "gap", "accepted_unix_nanos", "resolve", "max_request_bytes", "checkpoint_stored", "checkpoint_refused")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    INTEREST_APPLIED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STORED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_REFUSED_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    interest_applied: int
    epoch: int
    head: int
    token: str
    gap: bool
    accepted_unix_nanos: int
    resolve: _containers.RepeatedCompositeFieldContainer[PointerQuery]
    max_request_bytes: int
    checkpoint_stored: int
    checkpoint_refused: str
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., interest_applied: _Optional[int] = ..., epoch: _Optional[int] = ..., head: _Optional[int] = ..., token: _Optional[str] = ..., gap: _Optional[bool] = ..., accepted_unix_nanos: _Optional[int] = ..., resolve: _Optional[_Iterable[_Union[PointerQuery, _Mapping]]] = ..., max_request_bytes: _Optional[int] = ..., checkpoint_stored: _Optional[int] = ..., checkpoint_refused: _Optional[str] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("pointer", "instance", "checkpoint")
    POINTER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    pointer: str
    instance: int
    checkpoint: int
    def __init__(self, pointer: _Optional[str] = ..., instance: _Optional[int] = ..., checkpoint: _Optional[int] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("token", "checkpoint")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    token: str
    checkpoint: Checkpoint
    def __init__(self, token: _Optional[str] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ...) -> None: ...

class ReplayRequest(_message.Message):
    __slots__ = ("epoch", "after", "topics", "since_ms")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    after: int
    topics: _containers.RepeatedScalarFieldContainer[str]
    since_ms: int
    def __init__(self, epoch: _Optional[int] = ..., after: _Optional[int] = ..., topics: _Optional[_Iterable[str]] = ..., since_ms: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BrokerStats(_message.Message):
    __slots__ = ("name", "connections", "relay_streams", "publishers", "events_in", "events_out", "events_dropped", "events_rejected", "draining", "events_in_per_second")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    RELAY_STREAMS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHERS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_IN_FIELD_NUMBER: _ClassVar[int]
    EVENTS_OUT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    EVENTS_IN_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    name: str
    connections: int
    relay_streams: int
    publishers: int
    events_in: int
    events_out: int
    events_dropped: int
    events_rejected: int
    draining: bool
    events_in_per_second: float
    def __init__(self, name: _Optional[str] = ..., connections: _Optional[int] = ..., relay_streams: _Optional[int] = ..., publishers: _Optional[int] = ..., events_in: _Optional[int] = ..., events_out: _Optional[int] = ..., events_dropped: _Optional[int] = ..., events_rejected: _Optional[int] = ..., draining: _Optional[bool] = ..., events_in_per_second: _Optional[float] = ...) -> None: ...

class BrokerMember(_message.Message):
    __slots__ = ("name", "address", "state")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[BrokerMember.State]
        SERVING: _ClassVar[BrokerMember.State]
        DRAINING: _ClassVar[BrokerMember.State]
    STATE_UNSPECIFIED: BrokerMember.State
    SERVING: BrokerMember.State
    DRAINING: BrokerMember.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    state: BrokerMember.State
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[BrokerMember.State, str]] = ...) -> None: ...

class Membership(_message.Message):
    __slots__ = ("version", "brokers", "cluster")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BROKERS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    version: int
    brokers: _containers.RepeatedCompositeFieldContainer[BrokerMember]
    cluster: str
    def __init__(self, version: _Optional[int] = ..., brokers: _Optional[_Iterable[_Union[BrokerMember, _Mapping]]] = ..., cluster: _Optional[str] = ...) -> None: ...

class BrokerLink(_message.Message):
    __slots__ = ("name", "address", "state", "member_state", "events_received", "last_error", "interest_synced")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[BrokerLink.State]
        CONNECTING: _ClassVar[BrokerLink.State]
        CONNECTED: _ClassVar[BrokerLink.State]
        BACKOFF: _ClassVar[BrokerLink.State]
    STATE_UNSPECIFIED: BrokerLink.State
    CONNECTING: BrokerLink.State
    CONNECTED: BrokerLink.State
    BACKOFF: BrokerLink.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_STATE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    INTEREST_SYNCED_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    state: BrokerLink.State
    member_state: BrokerMember.State
    events_received: int
    last_error: str
    interest_synced: bool
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[BrokerLink.State, str]] = ..., member_state: _Optional[_Union[BrokerMember.State, str]] = ..., events_received: _Optional[int] = ..., last_error: _Optional[str] = ..., interest_synced: _Optional[bool] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("applied_version", "accepted", "reason", "links")
    APPLIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    applied_version: int
    accepted: bool
    reason: str
    links: _containers.RepeatedCompositeFieldContainer[BrokerLink]
    def __init__(self, applied_version: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., links: _Optional[_Iterable[_Union[BrokerLink, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProxyStatus(_message.Message):
    __slots__ = ("name", "subscribers", "sse_subscribers", "grpc_subscribers", "membership_version", "links", "events_received", "deliveries", "slow_subscribers_dropped", "topics", "draining", "keep_at_most", "movable_subscribers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    SSE_SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    GRPC_SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_VERSION_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    SLOW_SUBSCRIBERS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    KEEP_AT_MOST_FIELD_NUMBER: _ClassVar[int]
    MOVABLE_SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    subscribers: int
    sse_subscribers: int
    grpc_subscribers: int
    membership_version: int
    links: _containers.RepeatedCompositeFieldContainer[BrokerLink]
    events_received: int
    deliveries: int
    slow_subscribers_dropped: int
    topics: int
    draining: bool
    keep_at_most: int
    movable_subscribers: int
    def __init__(self, name: _Optional[str] = ..., subscribers: _Optional[int] = ..., sse_subscribers: _Optional[int] = ..., grpc_subscribers: _Optional[int] = ..., membership_version: _Optional[int] = ..., links: _Optional[_Iterable[_Union[BrokerLink, _Mapping]]] = ..., events_received: _Optional[int] = ..., deliveries: _Optional[int] = ..., slow_subscribers_dropped: _Optional[int] = ..., topics: _Optional[int] = ..., draining: _Optional[bool] = ..., keep_at_most: _Optional[int] = ..., movable_subscribers: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("reconnects_per_second", "keep_at_most", "hold_seconds")
    RECONNECTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    KEEP_AT_MOST_FIELD_NUMBER: _ClassVar[int]
    HOLD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reconnects_per_second: float
    keep_at_most: int
    hold_seconds: float
    def __init__(self, reconnects_per_second: _Optional[float] = ..., keep_at_most: _Optional[int] = ..., hold_seconds: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("subscribers_remaining",)
    SUBSCRIBERS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    subscribers_remaining: int
    def __init__(self, subscribers_remaining: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("topics", "resume_token")
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    topics: _containers.RepeatedScalarFieldContainer[str]
    resume_token: str
    def __init__(self, topics: _Optional[_Iterable[str]] = ..., resume_token: _Optional[str] = ...) -> None: ...
