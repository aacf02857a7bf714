"""Who may call what: bearer tokens (the cluster credential, publisher keys) and optional TLS.

Tokens come from a file, one per line (blank lines and `#` comments ignored): a mounted Kubernetes
Secret key is such a file. The file is re-read when it changes (checked at most once a second), so
a rotated Secret takes effect without a restart and without dropping anyone. A file may hold
several tokens: all are accepted, and a client presents the first (add the new one, move clients,
then drop the old). For local use the cluster credential may instead be given in $NEOPLASMA_CREDENTIAL.
Tokens travel as `authorization: Bearer TOKEN` (gRPC metadata, HTTP header) and are compared in
constant time.
"""

from __future__ import annotations

import hmac
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError

from neoplasma.core.errors import UsageError
from neoplasma.core.logs import get_logger
from neoplasma.core.settings import Settings, setting
from neoplasma.core.topics import LimitExceeded

log = get_logger("trust")

CREDENTIAL_ENV = "NEOPLASMA_CREDENTIAL"  # the cluster credential itself (local use)
CREDENTIAL_FILE_ENV = "NEOPLASMA_CREDENTIAL_FILE"  # the default of --credential-file
RECHECK_SECONDS = 1.0
Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")


class WatchedFile(Generic[T]):
    """A file's contents as `parse` makes them, re-read when the file changes (its inode, mtime or size;
    checked at most once a second): a rotated Kubernetes Secret takes effect without a restart.

    The first read must succeed (UsageError saying why); later a file that cannot be read or parsed
    is logged and the previous contents kept, so a half-written update never locks everyone out.
    `parse` raises ValueError saying what is wrong with the text."""

    def __init__(self, path: str, parse: Callable[[str], T], what: str) -> None:
        self.path, self._parse, self.what = path, parse, what
        self._stamp: tuple[int, int, int] | None = None
        self._checked = time.monotonic()
        self._value = self._read(strict=True)

    def _read(self, strict: bool = False) -> T:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return self._value
            with open(self.path, encoding="utf-8") as f:
                value = self._parse(f.read())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            if strict:
                raise UsageError(f"cannot read {self.what} from {self.path}: {exc}") from None
            log.warning("file_unreadable", path=self.path, what=self.what, error=str(exc), keeping="previous")
            return self._value
        if self._stamp is not None:
            log.info("file_reloaded", path=self.path, what=self.what)
        self._stamp = stamp
        return value

    def current(self) -> T:
        now = time.monotonic()
        if now - self._checked >= RECHECK_SECONDS:
            self._checked = now
            self._value = self._read()
        return self._value


def token_lines(text: str) -> tuple[bytes, ...]:
    """A tokens file: one token per line; blank lines and `#` comments ignored; at least one."""
    tokens = tuple(line.encode() for line in map(str.strip, text.splitlines()) if line and not line.startswith("#"))
    if not tokens:
        raise ValueError("the file holds no token (one per line)")
    return tokens


class Tokens:
    """Bearer tokens from `path` (re-read when it changes) or fixed ones (`given`)."""

    def __init__(self, path: str = "", given: Sequence[str] = ()) -> None:
        self.path = path
        self._given = tuple(t.encode() for t in given)
        self._file = WatchedFile(path, token_lines, "tokens") if path else None

    @classmethod
    def cluster(cls, path: str) -> Tokens | None:
        """The cluster credential: from `path`, else $NEOPLASMA_CREDENTIAL, else none (calls not checked)."""
        if path:
            return cls(path)
        value = os.environ.get(CREDENTIAL_ENV, "").strip()
        return cls(given=[value]) if value else None

    @classmethod
    def optional(cls, path: str) -> Tokens | None:
        return cls(path) if path else None

    def current(self) -> tuple[bytes, ...]:
        return self._file.current() if self._file is not None else self._given

    def allows(self, presented: str | None) -> bool:
        """True when `presented` (an `authorization` value) is `Bearer` and one of the tokens."""
        scheme, _, token = (presented or "").partition(" ")
        given = token.strip().encode()
        # Every token is compared (no early exit), each in constant time.
        return scheme.lower() == "bearer" and bool(given) and sum(
            hmac.compare_digest(given, t) for t in self.current()) > 0

    def metadata(self) -> Metadata:
        """What a client sends: the first token."""
        tokens = self.current()
        return bearer_metadata(tokens[0].decode()) if tokens else ()


def bearer_metadata(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


# -- servers ---------------------------------------------------------------------

# A gRPC control, relay or Stats call without the cluster credential is refused with this.
CREDENTIAL_REQUIRED = "the cluster credential is required (authorization: Bearer TOKEN)"


@dataclass(frozen=True)
class Rule:
    """Who may call a method: holders of `tokens` (None: anyone), refused with `refusal`."""

    tokens: Tokens | None
    refusal: str


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the bearer token of each call to a method in `rules` ('/pkg.Service/Method' or
    '/pkg.Service/'), and refuses undecodable unary requests with INVALID_ARGUMENT (gRPC would
    answer UNKNOWN). An unauthenticated request is not even parsed."""

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        self.rules = rules
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _rule(self, method: str) -> Rule | None:
        return self.rules.get(method) or self.rules.get(method.rpartition("/")[0] + "/")

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        rule = self._rule(method)
        if rule is None:
            return await continuation(details)
        handlers = self._handlers.get(method)
        if handlers is None:
            handler = await continuation(details)
            if handler is None:
                return None
            handlers = self._handlers[method] = (_decoding(handler, method), _refusing(handler, rule.refusal))
        if rule.tokens is None:
            return handlers[0]
        presented = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        return handlers[0] if rule.tokens.allows(presented) else handlers[1]


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    return handler._replace(**{kind: refuse}, request_deserializer=None)


class Undecodable:
    def __init__(self, message: str) -> None:
        self.message = message


def undecodable(method: str) -> str:
    return (f"{method}: the request cannot be decoded (not valid protobuf for this method, "
            "or a string field that is not valid UTF-8)")


def refusal_code(error: BaseException | None) -> grpc.StatusCode:
    """RESOURCE_EXHAUSTED for a limit, INVALID_ARGUMENT for any other bad input."""
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(error, LimitExceeded) else grpc.StatusCode.INVALID_ARGUMENT


def refusal(error: BaseException | None, method: str, what: str) -> tuple[grpc.StatusCode, str]:
    """The status ending a stream of `method` over bad input: undecodable, over a limit, or invalid."""
    if isinstance(error, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, undecodable(method)
    return refusal_code(error), f"{what} refused: {error}"


async def refuse(context: grpc.aio.ServicerContext, error: BaseException | None, method: str, what: str) -> None:
    """End a stream of `method` over bad input (see `refusal`)."""
    await context.abort(*refusal(error, method, what))


def _decoding(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler`, answering INVALID_ARGUMENT for a unary request that cannot be decoded."""
    if handler.unary_unary is None:
        return handler  # streams catch DecodeError at context.read() themselves
    parse, behaviour = handler.request_deserializer, handler.unary_unary

    def lenient(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError:
            return Undecodable(undecodable(method))

    async def checked(request: object, context: grpc.aio.ServicerContext) -> object:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return handler._replace(unary_unary=checked, request_deserializer=lenient)


def server_tls(cert: str, key: str) -> tuple[bytes, bytes] | None:
    """The (key, certificate chain) PEM pair a server serves TLS with, or None without both files."""
    if bool(cert) != bool(key):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    if not cert:
        return None
    try:
        with open(key, "rb") as k, open(cert, "rb") as c:
            return k.read(), c.read()
    except OSError as exc:
        raise UsageError(f"cannot read the TLS certificate or key: {exc}") from None


def grpc_server_credentials(pair: tuple[bytes, bytes] | None) -> grpc.ServerCredentials | None:
    return grpc.ssl_server_credentials([pair]) if pair else None


def http_ssl_context(cert: str, key: str) -> ssl.SSLContext | None:
    if not server_tls(cert, key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


# -- clients ---------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """How a client reaches a cluster's control, relay and Stats ports: the credential it presents
    and, with TLS, the CA it trusts (and the name it expects, when addresses are IPs)."""

    tokens: Tokens | None = None
    ca_file: str = ""
    server_name: str = ""
    ca: str = ""  # the CA as PEM text, instead of a file (the operator's, read from a Secret)

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.ca_file)

    def metadata(self) -> Metadata:
        return self.tokens.metadata() if self.tokens else ()

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=list(options))
        try:
            roots = self.ca.encode() if self.ca else Path(self.ca_file).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read the TLS CA file: {exc}") from None
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(roots), options=[*options, *extra])


@dataclass
class TrustSettings(Settings):
    """The settings both servers share: the cluster credential and their TLS certificate."""

    credential_file: str = setting("", env=CREDENTIAL_FILE_ENV,
                                   help="file holding the cluster credential (re-read when it changes); control, "
                                   "relay and Stats calls must present it. Unset: $NEOPLASMA_CREDENTIAL, else "
                                   "calls are not checked")
    tls_cert: str = setting("", help="PEM certificate (chain) file: serve publish, relay and control over TLS")
    tls_key: str = setting("", help="PEM private key file for --tls-cert")

    def cluster_tokens(self) -> Tokens | None:
        return Tokens.cluster(self.credential_file)


PLAIN = Access()  # no credential, no TLS: for clusters that do not check (until the operator mounts one)
