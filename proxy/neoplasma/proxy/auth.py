"""Subscriber authorization: signed tokens (JWT) naming the topic prefixes a subscriber may read.

Stateless: any proxy checks a token by itself, from keys it reads from files (a mounted Secret),
re-read when they change, so keys rotate without a restart. Nothing is shared between proxies.

- HS256 with shared secrets from `--subscriber-jwt-keys-file` (one per line; a token verifies
  against any of them, so a new key can be added before tokens signed with it appear and the old
  one dropped after its tokens expired);
- RS256, ES256 (P-256) and EdDSA (Ed25519) with public keys from `--subscriber-jwks-file` (a JWKS
  document): a token naming a `kid` is checked against that key only, and its `alg` must be the
  key's (no algorithm confusion); one without `kid` against every key of its algorithm.

Refused: `alg: none` and any algorithm not listed; an unknown `kid`; a bad signature; no `exp`, or
`exp` not in the future (no leeway: a stream ends at `exp`); `nbf` more than NBF_LEEWAY seconds
ahead of this proxy's clock; when an audience is configured, an `aud` that does not name it; a
`topics` claim that is not a list of at most MAX_TOKEN_TOPICS topics; a token longer than
MAX_TOKEN_BYTES.

A token's `topics` are prefixes under plasma's rule (neoplasma.core.topics): `user:42` allows
`user:42` and `user:42:inbox`, not `user:420`. `--public-topics` lists prefixes anyone may read.
With no keys configured every topic is public (no check at all); with keys, only the listed ones.

HS256 tokens in the plain compact form (the common case) are checked by `_hs256_claims` (HMAC, base64url
and JSON, constant-time signature compare) rather than by PyJWT, whose generality cost a third of an SSE
connect; anything unusual goes to PyJWT, so every token gets the answer it got from PyJWT alone (the tests
compare both on a corpus). Grants of recently verified tokens are remembered with their keys (`Keys.verified`).

`Policy` is the pure decision (token, topics, time -> admission or refusal); `SubscriberAuth`
adds the files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
import orjson
from jwt.algorithms import HMACAlgorithm

from neoplasma.core.bounded import put_newest
from neoplasma.core.errors import UsageError
from neoplasma.core.text import excerpt
from neoplasma.core.topics import InvalidTopic, check_topic, prefixes
from neoplasma.core.trust import WatchedFile, token_lines

MAX_TOKEN_BYTES = 8192
MAX_TOKEN_TOPICS = 1000
NBF_LEEWAY = 5.0  # seconds a token's `nbf` may be ahead of this proxy's clock (clock skew)
MAX_JWKS_BYTES = 1024 * 1024
MAX_KEYS = 32  # keys per file: a token without `kid` is tried against each key of its algorithm
VERIFIED_KEPT = 2048  # grants of recently verified tokens remembered (Keys.verified), each token at most...
VERIFIED_MAX_BYTES = 2048  # ... this long: at most 4 MiB
ASYMMETRIC = ("RS256", "ES256", "EdDSA")
ACCEPTED = ("HS256", *ASYMMETRIC)
COOKIE = "neoplasma_token"  # the cookie a browser may carry the token in
QUERY = "token"  # ?token=: for EventSource, which cannot set headers
BAD_SIGNATURE = "bad signature (signed with none of the configured keys)"
EXPIRED = "token expired"  # what a stream ended at its token's `exp` says (and what a late token is told)


class InvalidToken(ValueError):
    """A token that cannot be used: the reason, never the token."""


class Refused(Exception):
    """A subscription refused: `topic` is the first one it was refused for."""

    status = 0

    def __init__(self, topic: str, message: str) -> None:
        super().__init__(message)
        self.topic = topic

    def answer(self) -> dict[str, str]:
        """The JSON body of an HTTP refusal."""
        return {"error": type(self).__name__.lower(), "topic": self.topic, "message": str(self)}


class Unauthenticated(Refused):
    """No token, or one that is not valid: HTTP 401, gRPC UNAUTHENTICATED."""

    status = 401

    def __init__(self, topic: str, message: str, reason: str = "") -> None:
        super().__init__(topic, message)
        self.reason = reason  # why the token was refused ("": none was given)


class Forbidden(Refused):
    """A valid token whose topics do not cover the topic: HTTP 403, gRPC PERMISSION_DENIED."""

    status = 403


@dataclass(frozen=True)
class Keys:
    """The verification keys: HS256 secrets and JWKS public keys (by `kid`, and all of them).

    `verified` remembers the grants of the last VERIFIED_KEPT tokens verified with these keys (and an
    audience), so that a reconnect storm of the same tokens costs a lookup each; it goes with the keys
    when they change. A remembered grant is still checked against the time."""

    secrets: tuple[bytes, ...] = ()
    public: tuple[jwt.PyJWK, ...] = ()
    by_kid: Mapping[str, jwt.PyJWK] = field(default_factory=dict)
    verified: dict[tuple[str, str], Grant] = field(default_factory=dict, compare=False, repr=False)
    hs256: tuple[hmac.HMAC, ...] = field(init=False, compare=False, repr=False)  # of `secrets`, keyed once

    def __post_init__(self) -> None:
        object.__setattr__(self, "hs256", tuple(hmac.new(s, digestmod=hashlib.sha256) for s in self.secrets))

    @classmethod
    def of(cls, secrets: Sequence[bytes], public: Sequence[jwt.PyJWK]) -> Keys:
        return cls(tuple(secrets), tuple(public), {k.key_id: k for k in public if k.key_id})


@dataclass(frozen=True)
class Grant:
    """What a valid token allows: its topic prefixes, until `expires` (Unix time)."""

    prefixes: frozenset[str]
    expires: float

    def allows(self, topic: str) -> bool:
        return allowed(topic, self.prefixes)


def allowed(topic: str, grants: frozenset[str]) -> bool:
    """`topic` is one of `grants` or below one of them (plasma's prefix rule)."""
    return any(key in grants for key in prefixes(topic))


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidToken(f"its `{name}` claim is not a number of seconds since 1970")
    return float(value)


def _topics(claims: Mapping[str, Any]) -> frozenset[str]:
    given = claims.get("topics")
    if not isinstance(given, list) or not all(isinstance(t, str) for t in given):
        raise InvalidToken("its `topics` claim must be a list of topic prefixes (strings)")
    if len(given) > MAX_TOKEN_TOPICS:
        raise InvalidToken(f"its `topics` claim has {len(given)} entries; the limit is {MAX_TOKEN_TOPICS}")
    try:
        return frozenset(check_topic(t) for t in given)
    except InvalidTopic as exc:
        raise InvalidToken(f"its `topics` claim: {exc}") from None


def _candidates(header: Mapping[str, Any], keys: Keys) -> tuple[str, list[Any]]:
    """The token's algorithm and the keys that may have signed it."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise InvalidToken("unsigned tokens (alg none) are not accepted")
    if alg == "HS256":
        if not keys.secrets:
            raise InvalidToken("HS256 tokens are not accepted here (no shared keys are configured)")
        return alg, list(keys.secrets)
    if alg not in ASYMMETRIC:
        raise InvalidToken(f"algorithm {excerpt(alg)} is not accepted; accepted: {', '.join(ACCEPTED)}")
    kid = header.get("kid")
    if kid is not None:
        key = keys.by_kid.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken(f"unknown key id (kid) {excerpt(str(kid))}")
        if key.algorithm_name != alg:
            raise InvalidToken(f"key {excerpt(kid)} is an {key.algorithm_name} key; the token says {alg}")
        return alg, [key]
    found = [k for k in keys.public if k.algorithm_name == alg]
    if not found:
        raise InvalidToken(f"no {alg} key is configured")
    return alg, found


def _header(token: str) -> Mapping[str, Any]:
    """The token's header, read only to choose the keys to try (PyJWT reads and checks it again)."""
    head = token.partition(".")[0]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        header = None
    if token.count(".") != 2 or not isinstance(header, dict):
        raise InvalidToken("it is not a JWT (three base64url parts separated by '.')")
    return header


def verify(token: str, keys: Keys, audience: str, now: float) -> Grant:
    """The grant of a valid `token` at time `now`, else InvalidToken saying why."""
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken(f"the token is {len(token)} bytes long; the limit is {MAX_TOKEN_BYTES}")
    known = keys.verified.get((token, audience))
    if known is not None:
        if known.expires <= now:
            raise InvalidToken(f"{EXPIRED} at {_when(known.expires)}")
        return known
    grant = _verify(token, keys, audience, now)
    if len(token) <= VERIFIED_MAX_BYTES:
        put_newest(keys.verified, VERIFIED_KEPT, (token, audience), grant)
    return grant


def _verify(token: str, keys: Keys, audience: str, now: float) -> Grant:
    claims = _hs256_claims(token, keys, audience)
    return _grant(_claims(token, keys, audience) if claims is None else claims, now)


def _claims(token: str, keys: Keys, audience: str) -> dict[str, Any]:
    """The claims of a token PyJWT verifies (signature, `exp` present, `aud`), else InvalidToken."""
    alg, candidates = _candidates(_header(token), keys)
    options: Any = {"require": ["exp"], "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                    "verify_aud": bool(audience)}
    for key in candidates:
        try:
            claims: dict[str, Any] = jwt.decode(token, key, algorithms=[alg], audience=audience or None,
                                                options=options)
            return claims
        except jwt.InvalidSignatureError:
            continue
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"it has no `{exc.claim}` claim") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken(f"its `aud` claim does not name {excerpt(audience)}") from None
        except (jwt.InvalidTokenError, jwt.InvalidKeyError) as exc:
            raise InvalidToken(f"it cannot be read: {exc}") from None
    raise InvalidToken(BAD_SIGNATURE)


# The last character of a base64url segment whose length is 2 or 3 (mod 4) carries unused bits, which
# must be zero for the segment to be the one encoding of its bytes (PyJWT refuses the others).
_CANONICAL_LAST = {2: frozenset(b"AQgw"), 3: frozenset(b"AEIMQUYcgkosw048")}
_COMPACT_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."  # base64url, and the dots
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")  # base64url -> base64


def _compact(token: str) -> tuple[bytes, bytes, bytes, bytes] | None:
    """A token in the plain compact form (three canonical unpadded base64url parts, the first not empty):
    its signing input (the first two parts) and its three parts' bytes; None for anything else."""
    if not token.isascii():
        return None
    raw = token.encode("ascii")
    if raw.count(b".") != 2 or raw.translate(None, _COMPACT_BYTES):
        return None
    parts = raw.split(b".")
    for part in parts:
        rest = len(part) % 4
        if rest == 1 or (rest and part[-1] not in _CANONICAL_LAST[rest]):
            return None
    if not parts[0]:
        return None
    header, payload, signature = (binascii.a2b_base64(p + b"=" * (-len(p) % 4))
                                  for p in raw.translate(_TO_STANDARD).split(b"."))
    return raw[:len(parts[0]) + 1 + len(parts[1])], header, payload, signature


def _hs256_claims(token: str, keys: Keys, audience: str) -> dict[str, Any] | None:
    """The common case of `_claims`, without PyJWT's generality (most of an HS256 SSE connect's cost): an
    HS256 token in the plain compact form, its signature checked (constant-time) against each shared secret.
    Answers only where `_claims` would answer the same: its claims, or InvalidToken for a bad signature.
    Anything else (another algorithm, padding, a `crit` or `b64` header, JSON the fast reader does not take,
    claims PyJWT would refuse) is None: `_claims` decides, with its own words."""
    if not keys.secrets:
        return None
    compact = _compact(token)
    if compact is None:
        return None
    signing, header_bytes, payload, signature = compact
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError:
        return None
    if (not isinstance(header, dict) or header.get("alg") != "HS256" or "crit" in header or "b64" in header
            or not isinstance(header.get("kid", ""), str)):
        return None
    for mac in keys.hs256:
        signed = mac.copy()
        signed.update(signing)
        if hmac.compare_digest(signed.digest(), signature):
            break
    else:
        raise InvalidToken(BAD_SIGNATURE)
    try:
        claims = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(claims, dict) or claims.get("exp") is None:
        return None
    if audience:
        named = claims.get("aud")
        if isinstance(named, str):
            named = [named]
        if not isinstance(named, list) or audience not in named or not all(isinstance(a, str) for a in named):
            return None
    if not isinstance(claims.get("sub", ""), str) or not isinstance(claims.get("jti", ""), str):
        return None
    return claims


def _grant(claims: Mapping[str, Any], now: float) -> Grant:
    """The grant of a verified token's claims at time `now`, else InvalidToken saying why."""
    expires = _number(claims, "exp")
    assert expires is not None  # required by `_claims` and `_hs256_claims`
    if expires <= now:
        raise InvalidToken(f"{EXPIRED} at {_when(expires)}")
    not_before = _number(claims, "nbf")
    if not_before is not None and not_before > now + NBF_LEEWAY:
        raise InvalidToken(f"it is not valid before {_when(not_before)} (nbf)")
    return Grant(_topics(claims), expires)


@dataclass(frozen=True)
class Policy:
    """Who may read what: `keys` (None: no keys configured, every topic public), the audience a token
    must name ("": not checked) and the prefixes anyone may read."""

    keys: Keys | None
    audience: str = ""
    public: frozenset[str] = frozenset()

    def check(self, topics: Iterable[str], token: str | None, now: float) -> Grant | None:
        """None when `topics` need no token (all public); else the token's grant, which allows every
        one of them; Unauthenticated or Forbidden naming the first topic that is refused."""
        if self.keys is None:
            return None
        private = [t for t in topics if not allowed(t, self.public)]
        if not private:
            return None
        first = private[0]
        if not token:
            raise Unauthenticated(first, f"topic {excerpt(first)} is private: a token is required "
                                  "(Authorization: Bearer, ?token= or the cookie neoplasma_token)")
        try:
            grant = verify(token, self.keys, self.audience, now)
        except InvalidToken as exc:
            raise Unauthenticated(first, f"the token for topic {excerpt(first)} was refused: {exc}", str(exc)) from None
        for topic in private:
            if not grant.allows(topic):
                raise Forbidden(topic, f"the token does not allow topic {excerpt(topic)} "
                                "(its `topics` name neither it nor a prefix of it)")
        return grant


# -- the files ----------------------------------------------------------------------


def secret_lines(text: str) -> tuple[bytes, ...]:
    """An HS256 keys file: one shared secret per line (blank lines and `#` comments ignored); a PEM or
    SSH public key is refused (it would be an algorithm confusion waiting to happen)."""
    secrets = token_lines(text)
    if len(secrets) > MAX_KEYS:
        raise ValueError(f"the file holds {len(secrets)} keys; the limit is {MAX_KEYS} (each token is tried "
                         "against each: keep the current keys and those of tokens not yet expired)")
    hs256 = HMACAlgorithm(HMACAlgorithm.SHA256)
    for i, secret in enumerate(secrets, 1):
        try:
            hs256.prepare_key(secret)
        except jwt.InvalidKeyError:
            raise ValueError(f"key {i} is a public key, not a shared secret; put public keys in a JWKS file") from None
        if len(secret) < 32:
            raise ValueError(f"key {i} is {len(secret)} bytes long; HS256 keys must be at least 32 bytes")
    return secrets


def jwks_keys(text: str) -> tuple[jwt.PyJWK, ...]:
    """A JWKS document's public keys: RSA (RS256), EC P-256 (ES256), OKP Ed25519 (EdDSA)."""
    if len(text) > MAX_JWKS_BYTES:
        raise ValueError(f"the JWKS is {len(text)} bytes long; the limit is {MAX_JWKS_BYTES}")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError('a JWKS is a JSON object with a non-empty list "keys"')
    if len(entries) > MAX_KEYS:
        raise ValueError(f"the JWKS holds {len(entries)} keys; the limit is {MAX_KEYS}")
    keys = []
    for i, entry in enumerate(entries, 1):
        name = f"key {i}" + (f" ({entry.get('kid')})" if isinstance(entry, dict) and entry.get("kid") else "")
        if not isinstance(entry, dict):
            raise ValueError(f"{name} is not a JSON object")
        if "d" in entry:
            raise ValueError(f"{name} holds a private key; a JWKS file here holds public keys only")
        if entry.get("kty") == "oct":
            raise ValueError(f"{name} is a shared secret (kty oct); put shared secrets in the keys file")
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{name} cannot be used: {exc}") from None
        if key.algorithm_name not in ASYMMETRIC:
            raise ValueError(f"{name} is for {key.algorithm_name}; accepted: {', '.join(ASYMMETRIC)}")
        keys.append(key)
    return tuple(keys)


def topic_prefixes(given: Iterable[str]) -> frozenset[str]:
    """`--public-topics`: checked topic prefixes."""
    try:
        return frozenset(check_topic(t.strip()) for t in given if t.strip())
    except InvalidTopic as exc:
        raise UsageError(f"--public-topics: {exc}") from None


class SubscriberAuth:
    """The proxy's policy, its keys read from files and re-read when they change."""

    def __init__(self, keys_file: str = "", jwks_file: str = "", audience: str = "",
                 public: Iterable[str] = ()) -> None:
        self.audience, self.public = audience, topic_prefixes(public)
        self._secrets = WatchedFile(keys_file, secret_lines, "subscriber JWT keys") if keys_file else None
        self._jwks = WatchedFile(jwks_file, jwks_keys, "subscriber JWKS") if jwks_file else None
        self._policy: tuple[object, object, Policy] | None = None  # made again when a file or a setting changed

    @property
    def enabled(self) -> bool:
        return self._secrets is not None or self._jwks is not None

    def keys(self) -> Keys | None:
        return self.policy().keys

    def policy(self) -> Policy:
        """The policy of the current keys (and of `audience` and `public`), made once for each."""
        secrets = self._secrets.current() if self._secrets is not None else ()
        public = self._jwks.current() if self._jwks is not None else ()
        made = self._policy
        if (made is None or made[0] is not secrets or made[1] is not public or made[2].audience != self.audience
                or made[2].public is not self.public):
            keys = Keys.of(secrets, public) if self.enabled else None
            made = self._policy = (secrets, public, Policy(keys, self.audience, self.public))
        return made[2]

    def check(self, topics: Iterable[str], token: str | None) -> Grant | None:
        """Policy.check now, with the current keys."""
        return self.policy().check(topics, token, time.time())


def bearer(value: str | None) -> str | None:
    """The token of an `authorization: Bearer TOKEN` value (None: not a bearer value)."""
    scheme, _, token = (value or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def mint(secret: bytes, topics: Sequence[str], ttl: float, audience: str = "", now: float | None = None) -> str:
    """An HS256 token for `topics` valid `ttl` seconds (for trying private topics out)."""
    now = time.time() if now is None else now
    claims: dict[str, Any] = {"topics": list(topics), "iat": int(now), "exp": int(now + ttl)}
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


# -- where tokens come from, and the answers ---------------------------------------------


def http_token(authorization: str | None, query: Mapping[str, str], cookie_header: str | None) -> str | None:
    """An HTTP subscriber's token: `Authorization: Bearer` (the header's value), else `?token=` (EventSource
    cannot set headers), else the cookie `neoplasma_token` of the `Cookie` header's value."""
    return bearer(authorization) or query.get(QUERY) or cookie(cookie_header, COOKIE) or None


def cookie(header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a `Cookie` header's value (`a=1; b="2"`, RFC 6265 5.4: pairs split at
    `;`, around each `=` blanks stripped, a value's surrounding double quotes removed), the last one when it
    is there twice; None: not there. Pairs without `=` are skipped. The one cookie parser of both of the SSE
    port's paths (the fast path's and aiohttp's), so they agree; bounded by the header's own bound (the
    servers' limit on a header line)."""
    found = None
    for pair in (header or "").split(";"):
        key, eq, value = pair.partition("=")
        if eq and key.strip(" \t") == name:
            value = value.strip(" \t")
            found = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return found


def challenge(refusal: Refused) -> str:
    """The `WWW-Authenticate` value of a refusal (RFC 6750)."""
    if isinstance(refusal, Unauthenticated) and not refusal.reason:
        return 'Bearer realm="neoplasma"'
    error, text = (("invalid_token", refusal.reason) if isinstance(refusal, Unauthenticated)
                   else ("insufficient_scope", str(refusal)))
    quoted = "".join(ch if " " <= ch < "\x7f" and ch not in '"\\' else "'" for ch in text)
    return f'Bearer realm="neoplasma", error="{error}", error_description="{quoted}"'


def without_token(path_qs: str) -> str:
    """A request's path and query for logs: the value of `?token=` replaced (tokens are never logged)."""
    path, sep, query = path_qs.partition("?")
    if not sep:
        return path
    parts = [f"{QUERY}=REDACTED" if part.split("=", 1)[0] == QUERY else part for part in query.split("&")]
    return f"{path}?{'&'.join(parts)}"
