"""How node results and events look on the RPC wire (CBOR-able lists and maps).

Shared by the core server and the client so both sides agree in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._exceptions import BadRequest
from ._state import AckEvent, Event, KickEvent, MessageEvent, RevokeEvent, StoredMessage


@dataclass(frozen=True, slots=True)
class Resync:
    """Client-side event: the subscription was re-established; refetch inboxes."""

    reason: str


def message_to_wire(msg: StoredMessage) -> list[Any]:
    return [msg.mid, msg.sender, msg.body, msg.ts]


def message_from_wire(raw: Any) -> StoredMessage:
    if not (isinstance(raw, list) and len(raw) == 4):
        raise BadRequest("malformed message on the wire")
    mid, sender, body, ts = raw
    return StoredMessage(mid, sender, body, ts, 0)


def event_to_wire(ev: Event) -> list[Any]:
    if isinstance(ev, MessageEvent):
        return ["msg", ev.user, *message_to_wire(ev.message)]
    if isinstance(ev, AckEvent):
        return ["ack", ev.user, list(ev.mids)]
    if isinstance(ev, RevokeEvent):
        return ["revoke", ev.jti, ev.user, ev.before_ms]
    return ["kick", ev.session, ev.user, ev.edge, ev.reason]


def event_from_wire(raw: Any) -> Event:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("malformed event on the wire")
    kind = raw[0]
    if kind == "msg" and len(raw) == 6:
        return MessageEvent(raw[1], message_from_wire(raw[2:]))
    if kind == "ack" and len(raw) == 3:
        return AckEvent(raw[1], tuple(raw[2]))
    if kind == "revoke" and len(raw) == 4:
        return RevokeEvent(raw[1], raw[2], raw[3])
    if kind == "kick" and len(raw) == 5:
        return KickEvent(raw[1], raw[2], raw[3], raw[4])
    raise BadRequest(f"unknown event {kind!r}")
