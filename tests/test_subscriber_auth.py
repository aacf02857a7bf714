"""Subscriber tokens (neoplasma.proxy.auth): every refusal, the prefix rule, the files and their rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from neoplasma.core import trust
from neoplasma.core.errors import UsageError
from neoplasma.operator import conditions as c
from neoplasma.operator.spec import parse_spec
from neoplasma.operator.status import Observed, build_status
from neoplasma.proxy.auth import (
    MAX_TOKEN_TOPICS,
    NBF_LEEWAY,
    Forbidden,
    InvalidToken,
    Keys,
    Policy,
    SubscriberAuth,
    Unauthenticated,
    bearer,
    cookie,
    http_token,
    jwks_keys,
    mint,
    secret_lines,
    verify,
)

NOW = 1_900_000_000.0
SECRET = b"s" * 40
OTHER = b"o" * 40
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def jwk(key: Any, kid: str | None) -> dict[str, Any]:
    public = key.public_key()
    algorithm = {rsa.RSAPublicKey: RSAAlgorithm, ec.EllipticCurvePublicKey: ECAlgorithm}
    make = next((a for kind, a in algorithm.items() if isinstance(public, kind)), OKPAlgorithm)
    out: dict[str, Any] = json.loads(make.to_jwk(public))
    if kid:
        out["kid"] = kid
    return out


JWKS = {"keys": [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1"), jwk(ED_KEY, "ed-1")]}
KEYS = Keys.of([SECRET], jwks_keys(json.dumps(JWKS)))


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"topics": ["user:42"], "exp": NOW + 600}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs(secret: bytes = SECRET, **changes: Any) -> str:
    return jwt.encode(claims(**changes), secret, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], body: dict[str, Any], secret: bytes | None) -> str:
    """A token PyJWT would refuse to make (alg none, a public key as an HMAC secret)."""
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    signature = b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest()) if secret else ""
    return f"{signing}.{signature}"


def refused(token: str, match: str, keys: Keys = KEYS, audience: str = "") -> None:
    with pytest.raises(InvalidToken, match=match):
        verify(token, keys, audience, NOW)


# -- valid tokens ----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "alg", "kid"), [(RSA_KEY, "RS256", "rsa-1"), (EC_KEY, "ES256", "ec-1"),
                                                 (ED_KEY, "EdDSA", "ed-1"), (EC_KEY, "ES256", None)])
def test_public_key_tokens_verify(key: Any, alg: str, kid: str | None) -> None:
    token = jwt.encode(claims(), key, algorithm=alg, headers={"kid": kid} if kid else None)
    grant = verify(token, KEYS, "", NOW)
    assert grant.prefixes == {"user:42"} and grant.expires == NOW + 600


def test_any_shared_secret_of_the_file_verifies() -> None:
    keys = Keys.of([OTHER, SECRET], ())
    assert verify(hs(), keys, "", NOW).prefixes == {"user:42"}


def test_prefix_rule_is_plasmas() -> None:
    policy = Policy(KEYS)
    token = hs()
    assert policy.check(["user:42", "user:42:inbox"], token, NOW) is not None
    with pytest.raises(Forbidden) as refusal:
        policy.check(["user:42:inbox", "user:420"], token, NOW)
    assert refusal.value.topic == "user:420" and "user:420" in str(refusal.value)
    with pytest.raises(Forbidden):
        policy.check(["user"], token, NOW)


# -- refusals ----------------------------------------------------------------------------


def test_alg_none_is_refused() -> None:
    refused(handmade({"alg": "none", "typ": "JWT"}, claims(), None), "alg none")
    refused(handmade({"alg": "None"}, claims(), None), "alg none")
    refused(handmade({"typ": "JWT"}, claims(), None), "alg none")


def test_algorithms_not_listed_are_refused() -> None:
    refused(jwt.encode(claims(), SECRET * 2, algorithm="HS512"), "'HS512' is not accepted")
    refused(jwt.encode(claims(), RSA_KEY, algorithm="PS256"), "'PS256' is not accepted")


def test_algorithm_confusion_is_refused() -> None:
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    # The classic attack: an HS256 token whose secret is the RS256 public key.
    forged = handmade({"alg": "HS256", "kid": "rsa-1"}, claims(), pem)
    refused(forged, "bad signature")
    refused(forged, "HS256 tokens are not accepted", Keys.of([], jwks_keys(json.dumps(JWKS))))
    # A token claiming another algorithm than its key's.
    refused(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "rsa-1"}), "is an RS256 key")
    refused(jwt.encode(claims(), ED_KEY, algorithm="EdDSA", headers={"kid": "ec-1"}), "is an ES256 key")


def test_unknown_kid_is_refused() -> None:
    refused(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-2"}), "unknown key id")


def test_bad_signature_is_refused() -> None:
    refused(hs(OTHER), "bad signature")
    head, _, signature = hs().split(".")
    widened = b64(json.dumps(claims(topics=["user"])).encode())
    refused(f"{head}.{widened}.{signature}", "bad signature")
    other_ec = ec.generate_private_key(ec.SECP256R1())
    refused(jwt.encode(claims(), other_ec, algorithm="ES256", headers={"kid": "ec-1"}), "bad signature")


def test_expiry_is_required_and_enforced() -> None:
    refused(hs(exp=None), "no `exp` claim")
    refused(hs(exp=NOW - 1), "token expired at")
    refused(hs(exp=NOW), "token expired")  # no leeway: a stream ends at `exp`
    refused(hs(exp="tomorrow"), "`exp` claim is not a number")
    assert verify(hs(exp=NOW + 1), KEYS, "", NOW).expires == NOW + 1


def test_not_before_has_a_small_leeway() -> None:
    refused(hs(nbf=NOW + NBF_LEEWAY + 1), "not valid before")
    assert verify(hs(nbf=NOW + NBF_LEEWAY - 1), KEYS, "", NOW)


def test_audience_is_checked_when_configured() -> None:
    refused(hs(), "no `aud` claim", audience="prod")
    refused(hs(aud="staging"), "does not name 'prod'", audience="prod")
    assert verify(hs(aud="prod"), KEYS, "prod", NOW)
    assert verify(hs(aud=["staging", "prod"]), KEYS, "prod", NOW)
    assert verify(hs(aud="anything"), KEYS, "", NOW)  # not configured: not checked


def test_topics_claim_is_bounded_and_checked() -> None:
    refused(hs(topics=None), "`topics` claim must be a list")
    refused(hs(topics="user:42"), "`topics` claim must be a list")
    refused(hs(topics=[42]), "`topics` claim must be a list")
    refused(hs(topics=["a,b"]), "contains ','")
    refused(hs(topics=["a"] * (MAX_TOKEN_TOPICS + 1)), "1001 entries; the limit is 1000")
    assert verify(hs(topics=["a"] * MAX_TOKEN_TOPICS), KEYS, "", NOW).prefixes == {"a"}


def test_oversized_and_garbled_tokens_are_refused() -> None:
    refused(hs(pad="x" * 8192), "bytes long; the limit is 8192")
    refused("not-a-jwt", "not a JWT")
    refused("a.b.c", "not a JWT")


def test_remembered_grants_still_expire_and_are_per_keys_and_audience() -> None:
    keys = Keys.of([SECRET], ())
    token = hs(exp=NOW + 10)
    assert verify(token, keys, "", NOW).expires == NOW + 10
    assert (token, "") in keys.verified
    assert verify(token, keys, "", NOW + 9).expires == NOW + 10  # remembered ...
    with pytest.raises(InvalidToken, match="token expired"):
        verify(token, keys, "", NOW + 10)  # ... and refused at its `exp`
    with pytest.raises(InvalidToken, match="no `aud` claim"):
        verify(token, keys, "prod", NOW)  # another audience is checked anew
    with pytest.raises(InvalidToken, match="bad signature"):
        verify(token, Keys.of([OTHER], ()), "", NOW)  # other keys remember nothing


def test_policy_answers() -> None:
    assert Policy(None).check(["user:42"], None, NOW) is None  # no keys: everything public
    policy = Policy(KEYS, public=frozenset({"news"}))
    assert policy.check(["news", "news:sport"], None, NOW) is None
    assert policy.check(["news"], "garbage", NOW) is None  # public topics never look at a token
    with pytest.raises(Unauthenticated) as missing:
        policy.check(["news", "user:42"], None, NOW)
    assert missing.value.topic == "user:42" and missing.value.reason == ""
    assert missing.value.answer()["topic"] == "user:42" and missing.value.answer()["error"] == "unauthenticated"
    with pytest.raises(Unauthenticated) as late:
        policy.check(["user:42"], hs(exp=NOW - 5), NOW)
    assert late.value.reason.startswith("token expired")
    assert policy.check(["news", "user:42"], hs(), NOW) is not None


def test_bearer_values() -> None:
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer ") is None


# -- files -----------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "value"), [
    (None, None), ("", None), ("a=1", None), ("neoplasma_token=t", "t"), ("a=1; neoplasma_token=t.u.v; b=2", "t.u.v"),
    ("a=1;neoplasma_token = t ;b", "t"), ('neoplasma_token="t.u"', "t.u"), ('neoplasma_token="', '"'),
    ("neoplasma_token=", ""), ("neoplasma_token", None), ("neoplasma_token=1; neoplasma_token=2", "2"),
    ("neoplasma_tokens=t; xneoplasma_token=u", None), ("Neoplasma_Token=t", None), ("neoplasma_token=a=b", "a=b"),
    ("\tneoplasma_token=t\t", "t"), (";;;", None), ("; " * 2000 + "neoplasma_token=t", "t"),
])
def test_cookie_values(header: str | None, value: str | None) -> None:
    assert cookie(header, "neoplasma_token") == value


def test_http_token_order() -> None:
    assert http_token("Bearer h", {"token": "q"}, "neoplasma_token=c") == "h"
    assert http_token("Basic h", {"token": "q"}, "neoplasma_token=c") == "q"
    assert http_token(None, {"token": ""}, "neoplasma_token=c") == "c"
    assert http_token(None, {}, "neoplasma_token=") is None and http_token(None, {}, None) is None


def test_keys_file_refuses_public_keys_and_short_secrets() -> None:
    ssh = RSA_KEY.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert secret_lines(f"# comment\n\n{SECRET.decode()}\n{OTHER.decode()}\n") == (SECRET, OTHER)
    with pytest.raises(ValueError, match="public key"):
        secret_lines(ssh.decode() + "\n")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        secret_lines("short\n")
    with pytest.raises(ValueError, match="no token"):
        secret_lines("# nothing\n")
    with pytest.raises(ValueError, match="33 keys; the limit is 32"):
        secret_lines("".join(f"{i:040d}\n" for i in range(33)))


def test_jwks_file_refuses_what_it_cannot_use() -> None:
    private = jwk(EC_KEY, "p") | {"d": "AAAA"}
    p384 = jwk(ec.generate_private_key(ec.SECP384R1()), "p384")
    for document, match in [("{", "not JSON"), ("{}", "non-empty list"), ('{"keys": []}', "non-empty list"),
                            (json.dumps({"keys": [private]}), "private key"),
                            (json.dumps({"keys": [{"kty": "oct", "k": "AAAA"}]}), "kty oct"),
                            (json.dumps({"keys": [p384]}), "ES384; accepted"),
                            (json.dumps({"keys": [{"kty": "RSA"}]}), "cannot be used"),
                            (json.dumps({"keys": [jwk(EC_KEY, str(i)) for i in range(33)]}), "the limit is 32")]:
        with pytest.raises(ValueError, match=match):
            jwks_keys(document)


def test_key_rotation_through_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust, "RECHECK_SECONDS", 0.0)
    keys = tmp_path / "keys"
    keys.write_text(SECRET.decode() + "\n")
    auth = SubscriberAuth(keys_file=str(keys))
    old, new = mint(SECRET, ["user:42"], 600), mint(OTHER, ["user:42"], 600)
    assert auth.check(["user:42"], old) is not None
    with pytest.raises(Unauthenticated, match="bad signature"):
        auth.check(["user:42"], new)
    keys.write_text(f"{SECRET.decode()}\n{OTHER.decode()}\n")  # add the new key: both accepted
    assert auth.check(["user:42"], old) and auth.check(["user:42"], new)
    keys.write_text(OTHER.decode() + "\n")  # drop the old one
    with pytest.raises(Unauthenticated, match="bad signature"):
        auth.check(["user:42"], old)
    keys.write_text("short\n")  # a broken update is logged and the previous keys kept
    assert auth.check(["user:42"], new)


def test_jwks_rotation_through_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust, "RECHECK_SECONDS", 0.0)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(EC_KEY, "ec-1")]}))
    auth = SubscriberAuth(jwks_file=str(path), audience="prod")
    token = jwt.encode(claims(aud="prod", exp=time.time() + 60), ED_KEY, algorithm="EdDSA", headers={"kid": "ed-1"})
    with pytest.raises(Unauthenticated, match="unknown key id"):
        auth.check(["user:42"], token)
    path.write_text(json.dumps({"keys": [jwk(EC_KEY, "ec-1"), jwk(ED_KEY, "ed-1")]}))
    assert auth.check(["user:42"], token)


def test_unusable_files_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read subscriber JWT keys"):
        SubscriberAuth(keys_file=str(tmp_path / "missing"))
    (tmp_path / "jwks").write_text("[]")
    with pytest.raises(UsageError, match="subscriber JWKS"):
        SubscriberAuth(jwks_file=str(tmp_path / "jwks"))
    with pytest.raises(UsageError, match="--public-topics"):
        SubscriberAuth(public=["a,b"])


def test_mint_makes_what_verify_takes() -> None:
    token = mint(SECRET, ["user:42", "news"], 60, audience="prod", now=NOW)
    grant = verify(token, KEYS, "prod", NOW)
    assert grant.prefixes == {"user:42", "news"} and grant.expires == NOW + 60


# -- the operator: spec.subscribers.auth's Secrets, checked with the proxies' own parsers ----------


def test_operator_names_what_is_wrong_with_the_subscriber_key_secrets() -> None:
    auth = parse_spec({"subscribers": {"auth": {"jwt": {"keysSecretRef": {"name": "sub-keys"},
                                                        "jwksSecretRef": {"name": "idp", "key": "jwks"}}}}})
    assert auth.subscriber_auth is not None
    spec = auth.subscriber_auth
    good = {"sub-keys": {"keys": SECRET.decode()}, "idp": {"jwks": json.dumps(JWKS)}}
    assert c.subscriber_keys_problem(spec, good) is None
    for secrets, problem in [
        ({**good, "sub-keys": None}, "Secret sub-keys (spec.subscribers.auth.jwt.keysSecretRef) does not exist"),
        ({**good, "sub-keys": {"other": "x"}}, "Secret sub-keys has no key 'keys'"),
        ({**good, "sub-keys": {"keys": "short"}}, "HS256 keys must be at least 32 bytes"),
        ({**good, "idp": {"jwks": "{}"}}, "Secret idp key 'jwks' (spec.subscribers.auth.jwt.jwksSecretRef) cannot be"),
    ]:
        found = c.subscriber_keys_problem(spec, secrets)
        assert found is not None and problem in found, found
    ready, broken = c.subscriber_keys_ready(None), c.subscriber_keys_ready("Secret x does not exist")
    assert (ready.type, ready.status, broken.status, broken.reason) == (
        "SubscriberKeysReady", True, False, "SubscriberKeysInvalid")


def test_the_condition_is_in_status_only_while_auth_is_set() -> None:
    base: dict[str, Any] = dict(generation=1, spec_error=None, brokers=(1, 1), proxies=(1, 1), deployments=[],
                                membership=c.MembershipProgress(1, 1, 1, 1, {}))
    with_auth = build_status(Observed(**base, subscriber_keys=("Secret k does not exist",)), {}, now="T")
    [condition] = [x for x in with_auth["conditions"] if x["type"] == "SubscriberKeysReady"]
    assert (condition["status"], condition["message"]) == ("False", "Secret k does not exist")
    without = build_status(Observed(**base), with_auth, now="T2")
    assert "SubscriberKeysReady" not in [x["type"] for x in without["conditions"]]


# -- the HS256 fast path answers as PyJWT's path does -------------------------------------------------


def _answer(decide: Any, *args: Any) -> tuple[str, Any]:
    try:
        grant = decide(*args)
    except InvalidToken as exc:
        return ("refused", str(exc))
    return ("granted", (grant.prefixes, grant.expires))


def _raw(header: bytes, body: bytes, secret: bytes | None = SECRET, signature: str | None = None) -> str:
    """A token of exactly these header and payload bytes, signed with `secret` (or with `signature`)."""
    signing = f"{b64(header)}.{b64(body)}"
    if signature is None:
        signature = b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest()) if secret else ""
    return f"{signing}.{signature}"


def _resigned(token: str, secret: bytes = SECRET) -> str:
    """`token`'s first two parts (changed or not) with a valid HS256 signature over them."""
    signing = token.rsplit(".", 1)[0]
    return f"{signing}.{b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())}"


def _corpus() -> list[str]:
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    good = hs(aud="prod")
    head, body, sig = good.split(".")
    hs_head = b'{"alg":"HS256","typ":"JWT"}'
    body_json = json.dumps(claims(aud="prod")).encode()
    tokens = [
        good, hs(), hs(OTHER), hs(OTHER, aud="prod"), hs(exp=NOW - 1), hs(exp=NOW), hs(exp=None), hs(exp="tomorrow"),
        hs(exp=True), hs(exp=NOW + 0.5), hs(nbf=NOW + NBF_LEEWAY + 1), hs(nbf=NOW + 1), hs(nbf="soon"),
        hs(aud="staging"), hs(aud=["staging", "prod"]), hs(aud=["prod", 7]), hs(aud=""), hs(aud=[]), hs(aud=7),
        hs(aud={"prod": 1}), hs(sub=7), hs(sub="alice"), hs(jti=7), hs(jti="j-1"), hs(iat="yesterday"),
        handmade({"alg": "HS256"}, claims(iss=7), SECRET), hs(topics=None), hs(topics="user:42"),
        hs(topics=["a,b"]), hs(topics=["a"] * 1001),
        jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "k1"}),
        handmade({"alg": "HS256", "kid": 7}, claims(), SECRET),
        handmade({"alg": "HS256", "crit": ["exp"], "exp": 1}, claims(), SECRET),
        handmade({"alg": "HS256", "b64": False, "crit": ["b64"]}, claims(), SECRET),
        handmade({"alg": "HS256", "b64": True}, claims(), SECRET),
        handmade({"alg": "none"}, claims(), None), handmade({"alg": "None"}, claims(), None),
        handmade({"typ": "JWT"}, claims(), SECRET), handmade({"alg": None}, claims(), SECRET),
        handmade({"alg": "hs256"}, claims(), SECRET), handmade({"alg": "HS512"}, claims(), SECRET),
        handmade({"alg": "RS256"}, claims(), pem), handmade({"alg": "RS256", "kid": "rsa-1"}, claims(), pem),
        handmade({"alg": "HS256", "kid": "rsa-1"}, claims(), pem), handmade({"alg": "ES256"}, claims(), SECRET),
        jwt.encode(claims(), SECRET * 2, algorithm="HS512"), jwt.encode(claims(), RSA_KEY, algorithm="RS256"),
        jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"}),
        _raw(b'{"alg":"none","alg":"HS256"}', body_json), _raw(b'{"alg":"HS256","alg":"none"}', body_json),
        _raw(hs_head, b'{"exp":1,"exp":' + str(int(NOW + 60)).encode() + b',"topics":["a"]}'),
        _raw(hs_head, b'{"exp":1e400,"topics":["a"]}'), _raw(hs_head, b'{"exp":NaN,"topics":["a"]}'),
        _raw(hs_head, b'{"exp":99999999999999999999999,"topics":["a"]}'), _raw(hs_head, b'{"exp":1E10,"topics":["a"]}'),
        _raw(hs_head, b'{"exp":2e9,"topics":["a\\ud800"]}'), _raw(hs_head, b'{"exp":2e9,"topics":["a\\u0000"]}'),
        _raw(hs_head, b"\xef\xbb\xbf" + body_json), _raw(hs_head, b"[1,2]"), _raw(hs_head, b""), _raw(hs_head, b"nope"),
        _raw(hs_head, b" " + body_json + b" "), _raw(hs_head, "{\"exp\":2e9,\"topics\":[\"caf\u00e9\"]}".encode()),
        _raw(b"[]", body_json), _raw(b"", body_json), _raw(b"{", body_json), _raw(b'{"alg":"HS256"', body_json),
        _raw(hs_head, body_json, signature=""), _raw(hs_head, body_json, signature=sig[:-1]),
        _raw(hs_head, body_json, signature=sig + "A"), _raw(hs_head, body_json, signature=sig + "="),
        f"{head}=.{body}.{sig}", f"{head}.{body}=.{sig}", f"{head}.{body}.{sig}=", f"{head}.{body}.{sig}==",
        f"{head}..{sig}", f"..{sig}", "..", f"{head}.{body}", f"{head}.{body}.{sig}.{sig}", f" {good}", f"{good} ",
        f"{head}.{body}.{sig[:-1]}\u00e9", good.replace("-", "+"), good.replace("_", "/"), "not-a-jwt", "a.b.c", "",
    ]
    # Every base64url segment ending in each last character: the non-canonical encodings PyJWT refuses.
    for part in range(3):
        for last in "AQgwBRhxEFJcd":
            pieces = good.split(".")
            pieces[part] = pieces[part][:-1] + last
            tokens.append(".".join(pieces))
            tokens.append(_resigned(".".join(pieces)))
    # Mutations of a valid token (each character changed, dropped, doubled), as they come and re-signed.
    for i in range(0, len(good), 3):
        for changed in (good[:i] + ("A" if good[i] != "A" else "B") + good[i + 1:], good[:i] + good[i + 1:],
                        good[:i] + good[i] + good[i:]):
            tokens += [changed, _resigned(changed)]
    return tokens


@pytest.mark.parametrize("audience", ["", "prod"])
def test_hs256_fast_path_answers_as_pyjwt_does(audience: str) -> None:
    """Every token of the corpus gets the same answer (grant, or refusal and its words) from `verify` as from
    the general PyJWT path it had before the fast path; and the fast path does decide the common cases."""
    from neoplasma.proxy import auth

    keys = Keys.of([OTHER, SECRET], jwks_keys(json.dumps(JWKS)))
    corpus = _corpus()
    assert len(corpus) > 300
    for token in corpus:
        before = _answer(lambda t: auth._grant(auth._claims(t, keys, audience), NOW), token)
        fresh = Keys.of(keys.secrets, keys.public)  # nothing remembered
        assert _answer(verify, token, fresh, audience, NOW) == before, token
    # The fast path is the one answering valid tokens, forged ones and expired ones (not PyJWT's).
    assert auth._hs256_claims(hs(aud="prod"), keys, audience) is not None
    assert auth._hs256_claims(hs(exp=NOW - 1, aud="prod"), keys, audience) is not None  # expiry: `_grant`'s
    with pytest.raises(InvalidToken, match="bad signature"):
        auth._hs256_claims(hs(b"f" * 40, aud="prod"), keys, audience)
    assert auth._hs256_claims(handmade({"alg": "RS256"}, claims(), SECRET), keys, audience) is None
