"""The core server: a :class:`Node` served over the authenticated CBOR RPC port.

Theory of operation
-------------------
``serve_core(node, ...)`` listens on ``[core] rpc`` and maps RPC methods onto
the node's API one to one (see ``METHODS``). Parameters are validated here
(``BadRequest`` names the field); every node error crosses the wire with its
code, so the client raises the same class. ``send_batch`` carries many sends
in one call (the client coalesces concurrent sends into it) and answers each
item on its own: a result, or that item's error in the same wire form.

Subscriptions: ``subscribe`` registers a node :class:`Subscription` for the
connection and starts a forwarder that pushes events on the ``events``
channel in batches, in apply order. If the subscriber falls behind, the
subscription is dropped and a final ``{"lost": true}`` push tells the client
to resubscribe and refetch (nothing is silently skipped). The subscription
ends with the connection.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._exceptions import BadRequest, IrisError
from ._node import Node, SendResult, Subscription, SubscriptionLost
from ._rpc import RpcServerConnection, serve_rpc
from ._wire import event_to_wire, message_to_wire

logger = logging.getLogger("iris_raft.server")

Handler = Callable[[Node, RpcServerConnection, dict[str, Any]], Awaitable[Any]]

_MISSING = object()


def _get(
    params: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING
) -> Any:
    value = params.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise BadRequest(f"missing parameter {name!r}", field=name)
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"parameter {name!r} has the wrong type", field=name)
    return value


def _text_list(params: dict[str, Any], name: str) -> list[str]:
    value = _get(params, name, list)
    if not all(isinstance(v, str) for v in value):
        raise BadRequest(f"parameter {name!r} must be a list of text", field=name)
    return list(value)


def _send_result(res: SendResult) -> dict[str, Any]:
    return {"mid": res.mid, "ts": res.ts, "duplicate": res.duplicate}


async def _send(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    res = await node.send(
        _get(p, "sender", str),
        _get(p, "client_id", str),
        _get(p, "to", str),
        _get(p, "body", bytes),
    )
    return _send_result(res)


#: Most items one ``send_batch`` call may carry (the frame limit also applies).
MAX_SEND_BATCH = 1000


async def _send_batch(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    """Many sends in one call: ``{"items": [[sender, client_id, to, body], ...]}``.

    Answers ``{"r": [...]}``, one entry per item in order: what ``send``
    answers, or ``{"e": error}`` (the error's wire form) for that item alone.
    The accepted items are written together (:meth:`Node.send_many`).
    """
    raw = _get(p, "items", list)
    if len(raw) > MAX_SEND_BATCH:
        raise BadRequest(f"at most {MAX_SEND_BATCH} items per call", field="items")
    out: list[Any] = [None] * len(raw)
    slots: list[int] = []
    items: list[tuple[str, str, str, bytes]] = []
    for i, item in enumerate(raw):
        if isinstance(item, list) and len(item) == 4:
            slots.append(i)
            items.append((item[0], item[1], item[2], item[3]))  # types checked by send_many
        else:
            error = BadRequest(f"items[{i}] is not [sender, client_id, to, body]", field="items")
            out[i] = {"e": error.to_wire()}
    for i, res in zip(slots, await node.send_many(items), strict=True):
        out[i] = {"e": res.to_wire()} if isinstance(res, IrisError) else _send_result(res)
    return {"r": out}


async def _ack(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    await node.ack(_get(p, "user", str), _text_list(p, "mids"), op_id=_get(p, "op_id", str, None))
    return True


#: Most entries one ``ack_batch`` call may carry.
MAX_ACK_BATCH = 1000


async def _ack_batch(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    """Acks of many users in one call: ``{"acks": [[user, [mid, ...], op_id], ...]}``."""
    raw = _get(p, "acks", list)
    if len(raw) > MAX_ACK_BATCH:
        raise BadRequest(f"at most {MAX_ACK_BATCH} entries per call", field="acks")
    acks: list[tuple[str, list[str], str | None]] = []
    for i, entry in enumerate(raw):
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], list)
            and isinstance(entry[2], str)
        ):
            raise BadRequest(f"acks[{i}] is not [user, [mid, ...], op_id]", field="acks")
        acks.append((entry[0], entry[1], entry[2]))
    await node.ack_many(acks)
    return True


async def _fetch(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    msgs = await node.fetch_inbox(_get(p, "user", str), _get(p, "limit", int, None))
    return [message_to_wire(m) for m in msgs]


async def _revoke_token(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    await node.revoke_token(
        _get(p, "jti", str), _get(p, "exp_ms", int), op_id=_get(p, "op_id", str, None)
    )
    return True


async def _revoke_user(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    return await node.revoke_user(
        _get(p, "user", str),
        before_ms=_get(p, "before_ms", int, None),
        op_id=_get(p, "op_id", str, None),
    )


async def _is_revoked(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    return await node.is_revoked(
        _get(p, "user", str), _get(p, "jti", str), _get(p, "iat_ms", int, None)
    )


async def _open_session(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    await node.open_session(
        _get(p, "session", str),
        _get(p, "user", str),
        _get(p, "edge", str),
        _get(p, "jti", str),
        _get(p, "iat_ms", int),
        op_id=_get(p, "op_id", str, None),
    )
    return True


async def _close_session(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    await node.close_session(
        _get(p, "session", str),
        kick=_get(p, "kick", bool, False),
        op_id=_get(p, "op_id", str, None),
    )
    return True


async def _renew_lease(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    await node.renew_lease(
        _get(p, "edge", str), float(_get(p, "ttl", (int, float))), op_id=_get(p, "op_id", str, None)
    )
    return True


async def _put(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    if "value" not in p:
        raise BadRequest("missing parameter 'value'", field="value")
    await node.put(_get(p, "key", str), p["value"], op_id=_get(p, "op_id", str, None))
    return True


async def _cas(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    return await node.cas(
        _get(p, "key", str), p.get("expected"), p.get("new"), op_id=_get(p, "op_id", str, None)
    )


async def _get_register(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    return await node.get(_get(p, "key", str), linearizable=_get(p, "linearizable", bool, None))


async def _applied(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    op_ids = _text_list(p, "op_ids")
    if len(op_ids) > 10_000:
        raise BadRequest("at most 10000 op_ids per call", field="op_ids")
    return node.applied(op_ids)


async def _undrained_senders(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    return node.undrained_senders()


async def _status(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    return node.status()


async def _members(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    return node.core_members()


async def _ping(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    return {
        "node": node.node_id,
        "safe_for_writes": node.is_safe_for_writes(),
        "mode": node.mode.value,
    }


async def _add_node(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    await node.add_node(_get(p, "node", str))
    return True


async def _remove_node(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    await node.remove_node(_get(p, "node", str))
    return True


_BACKUP_CHUNK = 4 * 1024 * 1024


async def _backup_prepare(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    data = await node.backup()
    conn.state["backup"] = data
    return {"size": len(data)}


async def _backup_chunk(node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
    data: bytes | None = conn.state.get("backup")
    if data is None:
        raise BadRequest("call backup_prepare first")
    offset = _get(p, "offset", int)
    if offset < 0 or offset > len(data):
        raise BadRequest("offset out of range", field="offset")
    chunk = data[offset : offset + _BACKUP_CHUNK]
    if offset + len(chunk) >= len(data):
        conn.state.pop("backup", None)
    return chunk


async def _forward(conn: RpcServerConnection, sub: Subscription) -> None:
    try:
        while True:
            first = await sub.receive()
            batch = [event_to_wire(first)]
            while len(batch) < 1000:
                ev = sub.receive_nowait()
                if ev is None:
                    break
                batch.append(event_to_wire(ev))
            await conn.push("events", {"events": batch})
    except SubscriptionLost:
        with contextlib.suppress(Exception):
            await conn.push("events", {"lost": True})
    except Exception:
        logger.debug("subscription forwarder ended", exc_info=True)


class CoreServer:
    """Serves one node's API on the RPC port."""

    def __init__(self, node: Node, nursery: trio.Nursery) -> None:
        self.node = node
        self._nursery = nursery
        self.methods: dict[str, Handler] = dict(METHODS)
        self.methods["subscribe"] = self._subscribe
        self.methods["subscribe_add"] = self._subscribe_add
        self.methods["subscribe_remove"] = self._subscribe_remove

    async def handle(self, conn: RpcServerConnection, method: str, params: Any) -> Any:
        handler = self.methods.get(method)
        if handler is None:
            raise BadRequest(f"unknown method {method!r}")
        if not isinstance(params, dict):
            raise BadRequest("params must be a map")
        return await handler(self.node, conn, params)

    async def _subscribe(self, node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
        old: Subscription | None = conn.state.get("sub")
        if old is not None:
            old.close()
        sub = node.subscribe(_text_list(p, "users"))
        conn.state["sub"] = sub
        cancel = trio.CancelScope()
        conn.state["sub_cancel"] = cancel

        async def run() -> None:
            with cancel:
                await _forward(conn, sub)

        self._nursery.start_soon(run)

        def cleanup() -> None:
            sub.close()
            cancel.cancel()

        conn.cleanup_callbacks.append(cleanup)
        return {"node": node.node_id}

    async def _subscribe_add(self, node: Node, conn: RpcServerConnection, p: dict[str, Any]) -> Any:
        sub = conn.state.get("sub")
        if sub is None:
            raise BadRequest("no subscription on this connection")
        sub.add_users(_text_list(p, "users"))
        return True

    async def _subscribe_remove(
        self, node: Node, conn: RpcServerConnection, p: dict[str, Any]
    ) -> Any:
        sub = conn.state.get("sub")
        if sub is None:
            raise BadRequest("no subscription on this connection")
        sub.remove_users(_text_list(p, "users"))
        return True


METHODS: dict[str, Handler] = {
    "send": _send,
    "send_batch": _send_batch,
    "ack": _ack,
    "ack_batch": _ack_batch,
    "fetch": _fetch,
    "revoke_token": _revoke_token,
    "revoke_user": _revoke_user,
    "is_revoked": _is_revoked,
    "open_session": _open_session,
    "close_session": _close_session,
    "renew_lease": _renew_lease,
    "put": _put,
    "cas": _cas,
    "get": _get_register,
    "applied": _applied,
    "undrained_senders": _undrained_senders,
    "status": _status,
    "members": _members,
    "ping": _ping,
    "add_node": _add_node,
    "remove_node": _remove_node,
    "backup_prepare": _backup_prepare,
    "backup_chunk": _backup_chunk,
}


async def serve_core(
    node: Node,
    host: str,
    port: int,
    *,
    secret: bytes | None,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``node`` on ``host:port`` until cancelled; ``task_status`` gets the listeners."""
    async with trio.open_nursery() as nursery:
        server = CoreServer(node, nursery)
        listeners = await nursery.start(
            lambda task_status: serve_rpc(
                server.handle,
                host,
                port,
                secret=secret,
                ssl_context=ssl_context,
                task_status=task_status,
            )
        )
        task_status.started(listeners)


__all__ = ["CoreServer", "IrisError", "serve_core"]
