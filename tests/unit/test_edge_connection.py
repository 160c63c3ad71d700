"""The edge's per-connection delivery bookkeeping (no sockets)."""

from __future__ import annotations

from typing import Any

from iris_edge._server import Connection
from iris_raft import StoredMessage


def _msg(mid: str) -> StoredMessage:
    return StoredMessage(mid, "alice", b"hi", 1, 2)


def _conn() -> Connection:
    ws: Any = None  # never touched by the bookkeeping
    return Connection(session="s1", user="bob", claims=None, ws=ws)


def test_a_delivered_message_is_not_delivered_again_until_the_core_applied_its_ack() -> None:
    conn = _conn()
    conn.mark_delivered("m1")
    assert conn.was_delivered("m1")
    # A live copy buffered during a sync, then the core's ack event: the copy
    # is dropped with the mid, so it cannot go out a second time.
    conn.buffered = [_msg("m1"), _msg("m2")]
    conn.forget_delivered(["m1"])
    assert not conn.was_delivered("m1")
    assert [m.mid for m in conn.buffered] == ["m2"]


def test_forgetting_unknown_mids_is_harmless() -> None:
    conn = _conn()
    conn.forget_delivered(["nope"])
    assert conn.delivered is None and conn.buffered == []
