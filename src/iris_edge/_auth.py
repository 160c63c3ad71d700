"""Client authentication: HS256 JSON Web Tokens signed with the cluster's shared secret.

Theory of operation
-------------------
Pure: no I/O, and the clock is a parameter (``now``, seconds since the epoch;
``time.time()`` when omitted), so tests move time by hand.

:meth:`TokenVerifier.verify` accepts a token only when all of these hold, in
this order (the first that fails decides the error):

1. it is text of at most ``max_token_bytes`` ASCII characters: checked before
   anything is decoded, so a huge token costs nothing;
2. its header's ``alg`` is exactly ``HS256`` and its signature is the HMAC of
   the verifier's secret. The allowed algorithm is fixed here, never taken
   from the token: ``alg: none``, RS256/ES256, HS384/HS512, a token signed
   with some public key's text used as an HMAC secret, ``kid``/``jku``/``jwk``
   headers all fail this step (pyjwt, ``algorithms=["HS256"]``, with our key
   only). Unknown ``crit`` extensions are refused (RFC 7515 §4.1.11);
3. its claims hold ``sub`` and ``jti`` (text of 1..256 UTF-8 bytes) and
   ``exp`` (a number); ``nbf`` and ``iat``, when present, are numbers; a
   token carrying ``aud`` is refused (it was meant for someone else: Iris
   checks no audience);
4. time, with ``leeway`` seconds for clock skew: expired when
   ``now >= exp + leeway`` (:attr:`ErrorCode.TOKEN_EXPIRED`); refused when
   ``nbf > now + leeway`` or ``iat > now + leeway`` (issued in the future:
   such a token would dodge a per-user revocation cut-off).

The signature is verified before any claim is looked at, so an expired token
is only reported as expired when it is genuine. pyjwt takes no clock, so its
own time checks are turned off and step 4 is done here against ``now``, with
pyjwt's boundaries. Every failure is one :class:`TokenError`: ``code`` is
``token_expired`` for step 4's expiry and ``auth_failed`` for everything else;
the ``message`` is for logs, not for the client.

Revocation is not checked here (it lives in the replicated core); see
``Claims.jti`` and ``Claims.iat``.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt

from ._protocol import ErrorCode

#: The one signing algorithm accepted and issued.
ALGORITHM: Final = "HS256"
#: Shortest accepted shared secret, in bytes (RFC 7518 §3.2: at least the hash size).
MIN_SECRET_BYTES: Final = 32
#: Longest ``sub`` and ``jti``, in UTF-8 bytes.
MAX_CLAIM_BYTES: Final = 256
#: Default longest token, in bytes.
DEFAULT_MAX_TOKEN_BYTES: Final = 8192
#: Default clock-skew allowance on ``exp``, ``nbf`` and ``iat``, in seconds.
DEFAULT_LEEWAY: Final = 30.0

_REGISTERED: Final = frozenset({"sub", "jti", "exp", "iat", "nbf"})
# Beyond this a NumericDate is not a time (year ~ 33658): refuse, never overflow.
_MAX_NUMERIC_DATE: Final = 1e12


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims of a verified token.

    ``exp``, ``iat``, ``nbf`` are whole seconds since the epoch (a fractional
    ``exp`` or ``iat`` is rounded down, ``nbf`` up: never more validity than
    the token gave). ``iat`` is None when the token has none: a per-user
    revocation cut-off cannot place such a token, so treat it as issued
    before any cut-off.
    """

    sub: str
    jti: str
    exp: int
    iat: int | None
    nbf: int | None


class TokenError(Exception):
    """A token was refused.

    ``code`` is :attr:`ErrorCode.TOKEN_EXPIRED` for a genuine but expired
    token and :attr:`ErrorCode.AUTH_FAILED` for anything else. The server
    sends ``{"type": "error", "code": code}`` and closes with 4001 (at
    authentication or on a refresh). ``message`` says why, for logs only.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _secret_bytes(secret: str | bytes) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TypeError("the JWT secret must be str or bytes")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def _failed(message: str) -> TokenError:
    return TokenError(ErrorCode.AUTH_FAILED, message)


def _text_claim(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if isinstance(value, str):
        try:  # JSON can carry unpaired surrogates ("\ud800"), which are not UTF-8 text
            if 1 <= len(value.encode()) <= MAX_CLAIM_BYTES:
                return value
        except UnicodeEncodeError:
            pass
    raise _failed(f"claim {name!r} must be text of 1..{MAX_CLAIM_BYTES} UTF-8 bytes")


def _date_claim(payload: Mapping[str, Any], name: str, *, round_up: bool = False) -> int | None:
    value = payload.get(name)
    if value is None and name not in payload:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not abs(value) <= _MAX_NUMERIC_DATE  # also NaN; before any float() of a huge int
    ):
        raise _failed(f"claim {name!r} must be a number of seconds since the epoch")
    return math.ceil(value) if round_up else math.floor(value)


class TokenVerifier:
    """Verifies client tokens against the cluster's shared secret.

    ``secret`` must be at least 32 bytes (``ValueError`` otherwise); a text
    secret is used as its UTF-8 bytes. ``leeway`` (seconds, >= 0) is the
    allowed clock skew; ``max_token_bytes`` bounds what is decoded at all.
    """

    __slots__ = ("_secret", "leeway", "max_token_bytes")

    def __init__(
        self,
        secret: str | bytes,
        *,
        leeway: float = DEFAULT_LEEWAY,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
    ) -> None:
        self._secret = _secret_bytes(secret)
        if not math.isfinite(leeway) or leeway < 0:
            raise ValueError("leeway must be a finite number of seconds >= 0")
        if max_token_bytes < 1:
            raise ValueError("max_token_bytes must be positive")
        self.leeway = float(leeway)
        self.max_token_bytes = max_token_bytes

    def __repr__(self) -> str:  # never show the secret
        return f"TokenVerifier(leeway={self.leeway}, max_token_bytes={self.max_token_bytes})"

    def expires_at(self, claims: Claims) -> float:
        """When a connection using ``claims`` must close with 4002 (epoch seconds).

        That is ``exp + leeway``: :meth:`verify` accepts the token until then.
        """
        return claims.exp + self.leeway

    def verify(self, token: str, *, now: float | None = None) -> Claims:
        """The claims of ``token`` if it is valid at ``now`` (default: ``time.time()``).

        Raises :class:`TokenError` (see its ``code``) for any token that is
        not accepted; raises nothing else.
        """
        if not isinstance(token, str):
            raise _failed("the token must be text")
        if len(token) > self.max_token_bytes:
            raise _failed(f"the token is longer than {self.max_token_bytes} bytes")
        if not token.isascii():
            raise _failed("the token is not ASCII")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != ALGORITHM:
                raise _failed(f"algorithm {str(header.get('alg'))[:32]!r} is not accepted")
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={
                    "verify_signature": True,
                    "require": ["sub", "exp", "jti"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": True,
                    "verify_iss": False,
                    "verify_sub": True,
                    "verify_jti": True,
                },
            )
            return self._check_claims(payload, time.time() if now is None else now)
        except TokenError:
            raise
        except jwt.PyJWTError as exc:
            raise _failed(f"invalid token: {exc}") from None
        except Exception as exc:  # anything else from a hostile token is still a refusal
            raise _failed(f"invalid token ({type(exc).__name__})") from None

    def _check_claims(self, payload: Mapping[str, Any], now: float) -> Claims:
        sub = _text_claim(payload, "sub")
        jti = _text_claim(payload, "jti")
        exp = _date_claim(payload, "exp")
        if exp is None:
            raise _failed("claim 'exp' is missing")
        iat = _date_claim(payload, "iat")
        nbf = _date_claim(payload, "nbf", round_up=True)
        if now >= exp + self.leeway:
            raise TokenError(ErrorCode.TOKEN_EXPIRED, f"the token expired at {exp}")
        if nbf is not None and nbf > now + self.leeway:
            raise _failed(f"the token is not valid before {nbf}")
        if iat is not None and iat > now + self.leeway:
            raise _failed(f"the token was issued in the future ({iat})")
        return Claims(sub=sub, jti=jti, exp=exp, iat=iat, nbf=nbf)


def issue_token(
    secret: str | bytes,
    user: str,
    *,
    ttl: float,
    now: float | None = None,
    jti: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A fresh HS256 token for ``user``, valid for ``ttl`` seconds from ``now``.

    The claims are ``sub`` = ``user``, ``iat`` (whole seconds), ``exp`` =
    ``iat + ceil(ttl)`` and ``jti`` (random, 128 bits, unless given), plus
    ``extra`` (which may not replace those). Raises ``ValueError`` for a short
    secret, a ``user`` or ``jti`` that is not 1..256 UTF-8 bytes, a ``ttl``
    that is not positive, or ``extra`` naming a registered claim.
    """
    key = _secret_bytes(secret)
    if not isinstance(user, str) or not 1 <= len(user.encode()) <= MAX_CLAIM_BYTES:
        raise ValueError(f"user must be text of 1..{MAX_CLAIM_BYTES} bytes")
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds")
    if jti is None:
        jti = secrets.token_urlsafe(16)
    elif not isinstance(jti, str) or not 1 <= len(jti.encode()) <= MAX_CLAIM_BYTES:
        raise ValueError(f"jti must be text of 1..{MAX_CLAIM_BYTES} bytes")
    issued = math.floor(time.time() if now is None else now)
    payload: dict[str, Any] = dict(extra or {})
    clash = _REGISTERED & payload.keys()
    if clash:
        raise ValueError(f"extra may not set {sorted(clash)}")
    payload.update(sub=user, iat=issued, exp=issued + math.ceil(ttl), jti=jti)
    return jwt.encode(payload, key, algorithm=ALGORITHM)
