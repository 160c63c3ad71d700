"""Tests of client-token verification (``iris_edge._auth``): every known JWT attack is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import warnings
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.warnings import InsecureKeyLengthWarning

from iris_edge._auth import Claims, TokenError, TokenVerifier, issue_token
from iris_edge._protocol import ErrorCode

SECRET = "correct horse battery staple, 32+ bytes"
OTHER = "another secret of at least thirty-two b"
NOW = 1_700_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(
    header: dict[str, Any] | str,
    payload: dict[str, Any] | str,
    key: bytes | None = SECRET.encode(),
    digest: Any = hashlib.sha256,
) -> str:
    """A JWS compact token built by hand (no library checks in the way)."""
    head = header if isinstance(header, str) else json.dumps(header)
    body = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = f"{b64url(head.encode())}.{b64url(body.encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"sub": "alice", "jti": "j-1", "iat": int(NOW), "exp": int(NOW) + 600}
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not ...}


HS256 = {"alg": "HS256", "typ": "JWT"}


@pytest.fixture(scope="module")
def verifier() -> TokenVerifier:
    return TokenVerifier(SECRET)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def refused(verifier: TokenVerifier, token: Any, code: ErrorCode = ErrorCode.AUTH_FAILED) -> str:
    with pytest.raises(TokenError) as info:
        verifier.verify(token, now=NOW)
    assert info.value.code is code, info.value.message
    assert info.value.message
    return info.value.message


# ---------------------------------------------------------------------------
# The good path
# ---------------------------------------------------------------------------


def test_issue_then_verify(verifier: TokenVerifier) -> None:
    token = issue_token(SECRET, "alice", ttl=600, now=NOW, jti="j-1")
    assert verifier.verify(token, now=NOW) == Claims(
        sub="alice", jti="j-1", exp=int(NOW) + 600, iat=int(NOW), nbf=None
    )


def test_issued_tokens_have_random_jti_and_extra_claims(verifier: TokenVerifier) -> None:
    first = issue_token(SECRET, "bob", ttl=60, now=NOW, extra={"role": "admin"})
    second = issue_token(SECRET, "bob", ttl=60, now=NOW)
    one = verifier.verify(first, now=NOW)
    assert one.jti != verifier.verify(second, now=NOW).jti
    assert len(one.jti) >= 16
    assert jwt.decode(first, SECRET, algorithms=["HS256"], options={"verify_exp": False})[
        "role"
    ] == ("admin")
    assert jwt.get_unverified_header(first)["alg"] == "HS256"


def test_issue_token_with_real_clock() -> None:
    token = issue_token(SECRET.encode(), "carol", ttl=60)
    got = TokenVerifier(SECRET, leeway=0).verify(token)
    assert got.sub == "carol"
    assert got.iat is not None and got.exp == got.iat + 60


def test_text_and_bytes_secrets_are_the_same() -> None:
    token = issue_token(SECRET.encode(), "alice", ttl=60, now=NOW)
    assert TokenVerifier(SECRET).verify(token, now=NOW).sub == "alice"


def test_fractional_times_round_towards_less_validity(verifier: TokenVerifier) -> None:
    token = craft(HS256, claims(exp=NOW + 100.9, iat=NOW - 0.5, nbf=NOW - 10.2))
    got = verifier.verify(token, now=NOW)
    assert (got.exp, got.iat, got.nbf) == (int(NOW) + 100, int(NOW) - 1, int(NOW) - 10)


def test_header_hints_do_not_change_the_key(verifier: TokenVerifier) -> None:
    # kid/jku/x5u are ignored: a token signed with our secret is fine whatever they say ...
    header = {**HS256, "kid": "../../etc/passwd", "jku": "https://evil.example/keys.json"}
    assert verifier.verify(craft(header, claims()), now=NOW).sub == "alice"
    # ... and one signed with the attacker's key is refused whatever they say.
    jwk = {"kty": "oct", "k": b64url(OTHER.encode())}
    for extra in ({"jku": "https://evil.example/keys.json"}, {"kid": "other"}, {"jwk": jwk}):
        refused(verifier, craft({**HS256, **extra}, claims(), key=OTHER.encode()))


def test_expires_at(verifier: TokenVerifier) -> None:
    got = verifier.verify(craft(HS256, claims()), now=NOW)
    assert verifier.expires_at(got) == got.exp + 30


# ---------------------------------------------------------------------------
# Attacks on the signature and the algorithm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", ""])
def test_alg_none_is_refused(verifier: TokenVerifier, alg: str) -> None:
    unsigned = craft({"alg": alg, "typ": "JWT"}, claims(), key=None)
    refused(verifier, unsigned)
    refused(verifier, unsigned[:-1] if unsigned.endswith(".") else unsigned + ".")
    # Even with a valid HS256 signature appended, the header says none: refused.
    refused(verifier, craft({"alg": alg}, claims()))


def test_missing_alg_is_refused(verifier: TokenVerifier) -> None:
    refused(verifier, craft({"typ": "JWT"}, claims()))
    refused(verifier, craft({"alg": ["HS256"]}, claims()))


def test_rs256_and_es256_tokens_are_refused(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    refused(verifier, jwt.encode(claims(), rsa_key, algorithm="RS256"))
    refused(verifier, jwt.encode(claims(), rsa_key, algorithm="PS256"))
    ec_key = ec.generate_private_key(ec.SECP256R1())
    refused(verifier, jwt.encode(claims(), ec_key, algorithm="ES256"))


def test_hs256_signed_with_a_public_key_is_refused(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    # The RS/HS confusion attack: the attacker knows the public key and signs
    # an HS256 token with its PEM text as the HMAC secret. pyjwt would refuse
    # to sign with a PEM, so the token is made by hand.
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    refused(verifier, craft(HS256, claims(), key=pem))
    refused(verifier, craft({"alg": "RS256"}, claims(), key=pem))


@pytest.mark.parametrize(("alg", "digest"), [("HS384", hashlib.sha384), ("HS512", hashlib.sha512)])
def test_other_hmac_algorithms_are_refused(verifier: TokenVerifier, alg: str, digest: Any) -> None:
    # Correctly signed with the right secret, but not HS256.
    token = craft({"alg": alg, "typ": "JWT"}, claims(), digest=digest)
    with warnings.catch_warnings():  # our 39-byte test secret is short for HS384/HS512
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        decoded = jwt.decode(token, SECRET, algorithms=[alg], options={"verify_exp": False})
        assert decoded["sub"] == "alice"
    refused(verifier, token)


def test_hs256_header_with_another_digest_is_refused(verifier: TokenVerifier) -> None:
    refused(verifier, craft(HS256, claims(), digest=hashlib.sha512))


def test_wrong_secret_and_tampering_are_refused(verifier: TokenVerifier) -> None:
    refused(verifier, issue_token(OTHER, "alice", ttl=60, now=NOW))
    good = issue_token(SECRET, "alice", ttl=60, now=NOW)
    head, body, signature = good.split(".")
    forged_body = b64url(json.dumps(claims(sub="mallory")).encode())
    refused(verifier, f"{head}.{forged_body}.{signature}")
    refused(verifier, f"{head}.{body}.{signature[:-2]}")
    refused(verifier, f"{head}.{body}.")
    refused(verifier, f"{head}.{body}")


def test_critical_extensions_are_refused(verifier: TokenVerifier) -> None:
    refused(verifier, craft({**HS256, "crit": ["exp"], "exp": 1}, claims()))
    refused(verifier, craft({**HS256, "crit": ["b64"], "b64": False}, claims()))


# ---------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------


def test_expired_token(verifier: TokenVerifier) -> None:
    token = craft(HS256, claims(exp=int(NOW) - 31))
    refused(verifier, token, ErrorCode.TOKEN_EXPIRED)
    boundary = craft(HS256, claims(exp=int(NOW) - 30))  # now == exp + leeway: expired
    refused(verifier, boundary, ErrorCode.TOKEN_EXPIRED)


def test_expired_within_leeway_is_accepted(verifier: TokenVerifier) -> None:
    token = craft(HS256, claims(exp=int(NOW) - 29))
    assert verifier.verify(token, now=NOW).exp == int(NOW) - 29
    with pytest.raises(TokenError) as info:
        TokenVerifier(SECRET, leeway=0).verify(token, now=NOW)
    assert info.value.code is ErrorCode.TOKEN_EXPIRED


def test_expired_token_with_a_bad_signature_is_not_called_expired(verifier: TokenVerifier) -> None:
    refused(verifier, craft(HS256, claims(exp=int(NOW) - 1000), key=OTHER.encode()))


def test_not_before(verifier: TokenVerifier) -> None:
    refused(verifier, craft(HS256, claims(nbf=int(NOW) + 31)))
    assert verifier.verify(craft(HS256, claims(nbf=int(NOW) + 30)), now=NOW).nbf == int(NOW) + 30
    assert verifier.verify(craft(HS256, claims(nbf=int(NOW) - 5)), now=NOW).nbf == int(NOW) - 5


def test_issued_in_the_future(verifier: TokenVerifier) -> None:
    refused(verifier, craft(HS256, claims(iat=int(NOW) + 31)))
    assert verifier.verify(craft(HS256, claims(iat=int(NOW) + 30)), now=NOW).iat == int(NOW) + 30
    assert verifier.verify(craft(HS256, claims(iat=...)), now=NOW).iat is None


@pytest.mark.parametrize("name", ["sub", "exp", "jti"])
def test_required_claims(verifier: TokenVerifier, name: str) -> None:
    refused(verifier, craft(HS256, claims(**{name: ...})))
    refused(verifier, craft(HS256, claims(**{name: None})))


@pytest.mark.parametrize("name", ["sub", "jti"])
@pytest.mark.parametrize("value", ["", "x" * 257, "é" * 129, 5, 1.5, True, ["alice"], {"a": 1}])
def test_text_claims(verifier: TokenVerifier, name: str, value: Any) -> None:
    refused(verifier, craft(HS256, claims(**{name: value})))


@pytest.mark.parametrize("name", ["sub", "jti"])
def test_unpaired_surrogates_are_refused(verifier: TokenVerifier, name: str) -> None:
    body = json.dumps(claims(**{name: "X"})).replace('"X"', '"a\\ud800"')
    assert "\\ud800" in body
    assert "UTF-8" in refused(verifier, craft(HS256, body))


def test_text_claim_limits_are_inclusive(verifier: TokenVerifier) -> None:
    got = verifier.verify(craft(HS256, claims(sub="é" * 128, jti="j" * 256)), now=NOW)
    assert (got.sub, got.jti) == ("é" * 128, "j" * 256)


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["1700000600", True, [1], {"t": 1}, 1e300, -1e300])
def test_time_claims_must_be_numbers(verifier: TokenVerifier, name: str, value: Any) -> None:
    refused(verifier, craft(HS256, claims(**{name: value})))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1" + "0" * 400, "1e400"])
def test_non_finite_times_are_refused(verifier: TokenVerifier, literal: str) -> None:
    # Python's json accepts these literals, so a hand-made payload can carry them.
    body = json.dumps(claims(exp="X")).replace('"X"', literal)
    refused(verifier, craft(HS256, body))


def test_audience_is_refused(verifier: TokenVerifier) -> None:
    refused(verifier, craft(HS256, claims(aud="another-service")))


# ---------------------------------------------------------------------------
# Malformed tokens
# ---------------------------------------------------------------------------


def test_oversized_token_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(SECRET, max_token_bytes=200)
    token = craft(HS256, claims(pad="x" * 200))
    assert len(token) > 200

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded an oversized token")

    monkeypatch.setattr(jwt, "get_unverified_header", must_not_run)
    monkeypatch.setattr(jwt, "decode", must_not_run)
    assert "longer" in refused(verifier, token)


def test_default_size_limit() -> None:
    verifier = TokenVerifier(SECRET)
    big = issue_token(SECRET, "alice", ttl=60, now=NOW, extra={"pad": "x" * 9000})
    refused(verifier, big)
    fits = issue_token(SECRET, "alice", ttl=60, now=NOW, extra={"pad": "x" * 5500})
    assert verifier.verify(fits, now=NOW).sub == "alice"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "...",
        "a.b.c.d.e",
        "ééé.ééé.ééé",
        "eyJhbGciOiJIUzI1NiJ9.!!!.???",
        craft("not json", claims()),
        craft(HS256, "not json"),
        craft(HS256, "[1, 2]"),
        craft(HS256, '"text"'),
        craft("[]", claims()),
        craft(HS256, "[" * 5000 + "]" * 5000),
    ],
)
def test_garbage_is_refused(verifier: TokenVerifier, token: str) -> None:
    refused(verifier, token)


@pytest.mark.parametrize("token", [None, 42, ["a.b.c"], b"a.b.c"])
def test_non_text_tokens_are_refused(verifier: TokenVerifier, token: Any) -> None:
    refused(verifier, token)


def test_bytes_of_a_good_token_are_refused(verifier: TokenVerifier) -> None:
    good = issue_token(SECRET, "alice", ttl=60, now=NOW)
    assert verifier.verify(good, now=NOW).sub == "alice"
    refused(verifier, good.encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_\-]{0,40}(\.[A-Za-z0-9_\-]{0,40}){2}"))
def test_random_text_is_refused(token: str) -> None:
    with pytest.raises(TokenError) as info:
        TokenVerifier(SECRET).verify(token, now=NOW)
    assert info.value.code is ErrorCode.AUTH_FAILED


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["sub", "jti", "exp", "nbf", "iat", "aud", "other"]),
        json_values,
        max_size=7,
    ),
    st.dictionaries(st.sampled_from(["kid", "typ", "cty", "jku", "x5u"]), json_values, max_size=3),
)
def test_signed_random_claims_give_claims_or_token_error(
    payload: dict[str, Any], header: dict[str, Any]
) -> None:
    token = craft({"alg": "HS256", **header}, payload)
    try:
        got = TokenVerifier(SECRET).verify(token, now=NOW)
    except TokenError as exc:
        assert exc.code in (ErrorCode.AUTH_FAILED, ErrorCode.TOKEN_EXPIRED)
        return
    assert got.sub == payload["sub"] and got.jti == payload["jti"]
    assert got.exp + 30 > NOW
    assert "aud" not in payload


# ---------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "short", "x" * 31, b"y" * 31, "é" * 15])
def test_short_secrets_are_refused(secret: str | bytes) -> None:
    with pytest.raises(ValueError):
        TokenVerifier(secret)
    with pytest.raises(ValueError):
        issue_token(secret, "alice", ttl=60)


def test_secret_length_counts_bytes() -> None:
    TokenVerifier("é" * 16)  # 32 UTF-8 bytes
    TokenVerifier(b"z" * 32)


def test_verifier_settings() -> None:
    with pytest.raises(ValueError):
        TokenVerifier(SECRET, leeway=-1)
    with pytest.raises(ValueError):
        TokenVerifier(SECRET, leeway=float("nan"))
    with pytest.raises(ValueError):
        TokenVerifier(SECRET, max_token_bytes=0)
    assert SECRET not in repr(TokenVerifier(SECRET))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"user": ""},
        {"user": "u" * 257},
        {"ttl": 0},
        {"ttl": -5},
        {"ttl": float("inf")},
        {"jti": ""},
        {"extra": {"sub": "mallory"}},
        {"extra": {"exp": 1}},
    ],
)
def test_issue_token_checks_its_arguments(kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"user": "alice", "ttl": 60, "now": NOW}
    arguments.update(kwargs)
    with pytest.raises(ValueError):
        issue_token(SECRET, **arguments)


def test_issue_token_rounds_ttl_up(verifier: TokenVerifier) -> None:
    got = verifier.verify(issue_token(SECRET, "a", ttl=0.2, now=NOW + 0.7), now=NOW)
    assert got.iat == int(NOW) and got.exp == int(NOW) + 1
