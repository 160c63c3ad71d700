"""Errors raised by iris_raft.

Every error has a stable ``code`` (a short text) so that it can cross the RPC
boundary and the WebSocket protocol unchanged: the server sends the code, the
client rebuilds the same class with :func:`error_from_code`.

The one rule callers must know: :class:`UnknownOutcome` is *not* a failure.
The operation may or may not have been applied; retry it with the same
operation id (retries never apply twice) or treat it as indeterminate.
"""

from __future__ import annotations

from typing import Any, ClassVar


class IrisError(Exception):
    """Root of every error iris_raft raises on purpose."""

    #: Stable machine-readable code, shared with the client protocol.
    code: ClassVar[str] = "internal"

    def __init__(self, message: str = "", **data: Any) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        """The error as a CBOR-able map: ``{"code", "message", "data"}``."""
        return {"code": self.code, "message": self.message, "data": dict(self.data)}


class UnknownOutcome(IrisError):
    """The operation may or may not have been applied; retry with the same operation id."""

    code = "unknown_outcome"


class Unavailable(IrisError):
    """The cluster did not answer in time (no quorum, no leader, overload); retry later."""

    code = "unavailable"


class NotLeader(Unavailable):
    """This node cannot serve the request; ``leader_hint`` names the node that may."""

    code = "not_leader"

    def __init__(self, message: str = "", leader_hint: str | None = None, **data: Any) -> None:
        super().__init__(message, leader_hint=leader_hint, **data)
        self.leader_hint = leader_hint


class WriteBlocked(IrisError):
    """This side of a network partition cannot write safely (the partition guard sees no quorum)."""

    code = "write_blocked"


class InboxFull(IrisError):
    """The recipient's inbox is at its message or byte limit; nothing was stored."""

    code = "inbox_full"


class StateFull(IrisError):
    """The replicated state is above ``max_state_bytes``; new writes are refused."""

    code = "state_full"


class BadRequest(IrisError):
    """A request was malformed (missing or mistyped field, value out of range)."""

    code = "bad_request"


class Overloaded(Unavailable):
    """Too many operations in flight on this node; back off and retry."""

    code = "overloaded"


class AuthFailed(IrisError):
    """Authentication failed (wrong cluster secret, bad token)."""

    code = "auth_failed"


class TokenRevoked(IrisError):
    """The token is revoked (by its ``jti`` or a per-user cut-off)."""

    code = "token_revoked"


class ConfigError(IrisError):
    """A configuration value is missing or invalid; the message names the key."""

    code = "config_error"

    def __init__(self, message: str, key: str | None = None, **data: Any) -> None:
        super().__init__(message, key=key, **data)
        self.key = key


class CorruptFile(IrisError):
    """A journal, WAL, snapshot or meta file failed its checksum or could not be parsed."""

    code = "corrupt_file"

    def __init__(self, message: str, path: str, offset: int | None = None, **data: Any) -> None:
        super().__init__(message, path=path, offset=offset, **data)
        self.path = path
        self.offset = offset


class ProtocolError(IrisError):
    """The peer broke the RPC framing or handshake."""

    code = "protocol_error"


class InternalError(IrisError):
    """An unexpected error inside the server; the request was not applied."""

    code = "internal"


_BY_CODE: dict[str, type[IrisError]] = {
    cls.code: cls
    for cls in (
        IrisError,
        UnknownOutcome,
        Unavailable,
        NotLeader,
        WriteBlocked,
        InboxFull,
        StateFull,
        BadRequest,
        Overloaded,
        AuthFailed,
        TokenRevoked,
        ConfigError,
        ProtocolError,
        InternalError,
    )
}


def error_from_code(code: str, message: str = "", data: dict[str, Any] | None = None) -> IrisError:
    """Rebuild an error sent over the wire; unknown codes become :class:`InternalError`."""
    cls = _BY_CODE.get(code, InternalError)
    data = dict(data or {})
    if cls is NotLeader:
        return NotLeader(message, leader_hint=data.pop("leader_hint", None), **data)
    if cls is ConfigError:
        return ConfigError(message, key=data.pop("key", None), **data)
    err = cls(message, **data)
    return err
