"""A WebSocket load generator: picows (Cython) on asyncio (uvloop when installed).

    python -m benchmarks.wsload        # driven over stdin/stdout, see below

Theory of operation
-------------------
One process holds many WebSocket connections and is driven by its parent
(``benchmarks._wsdriver.LoadProcess``) with one JSON command per line on
stdin; it answers each command with one line ``wsload {json}`` on stdout.
Several processes may share a load: the parent splits connections and
offered rates between them and merges their answers (raw latency samples
are returned for that).

Connections have a *role*:

* ``echo``: to a bare echo server; the load sends a frame and times its echo
  (echoes come back in order, so a FIFO of send times per connection).
* ``sender``: an authenticated Iris connection sending ``send`` frames to
  its ``peer`` user; ``send`` -> ``sent`` is timed by the frame ``id``.
* ``recipient``: an authenticated Iris connection receiving ``msg`` frames;
  the body of each message is the sender's send time (``time.monotonic()``,
  one clock for every process of the machine), so send -> delivered is timed
  on arrival. Every ``mid`` is acked (one ``ack`` frame per connection every
  100 ms, as docs/protocol.md suggests), so inboxes do not grow.
* ``idle``: an authenticated connection that only waits; its close (time and
  close code) is recorded, which is how revocation is timed.

Authentication is the ``Authorization: Bearer`` header of the handshake
(tokens are made here from the JWT secret, one per user and ``jti``); a
connection counts as open once ``welcome`` arrived.

Load: *closed loop* (``rate`` null: every sender/echo connection keeps
``window`` frames in flight, a new one leaves when an answer comes: the
maximum throughput) or *open loop* (``rate`` frames per second in total,
spread round-robin over the connections, from a 1 ms ticker that sends what
is due, whatever the answers: latency at a given offered load without
coordinated omission). The first ``warmup`` seconds are not counted; then
for ``duration`` seconds answers are counted and every answered frame sent
in the window gives a latency sample. Then sending stops and the process
waits (at most ``drain`` s) for the outstanding answers and deliveries.

Commands (``cmd``):

``connect``  url, role, users (list), peers (list, senders), jwt_secret
             (null: no auth), jtis (list, optional), concurrency, timeout
``load``     kind (echo|iris), duration, warmup, window, rate, drain
``closes``   the closes recorded since the last call: [user, t, code]
``status``   open connections by role
``close``    close every connection (1000) and wait for them
``exit``     close everything and exit
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import sys
import time
from typing import Any

import cbor2
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from benchmarks._common import raise_nofile

SUBPROTOCOL = "iris.v1"
#: How often recipients ack what they got (docs/protocol.md suggests batching every 100 ms).
ACK_INTERVAL = 0.1
#: Latency samples returned per load (uniformly subsampled beyond this).
MAX_SAMPLES = 50_000
BINARY = WSMsgType.BINARY
CLOSE = WSMsgType.CLOSE
monotonic = time.monotonic
dumps = cbor2.dumps
loads = cbor2.loads


class Stats:
    """Counters and samples of one load."""

    def __init__(self) -> None:
        self.measuring = False
        self.t_begin = 0.0
        self.t_end = 0.0
        self.sent = 0  # frames sent (all)
        self.answered = 0  # answers (echo / sent) received inside the window
        self.lat: list[float] = []
        self.delivered = 0  # msg frames inside the window
        self.dlat: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.outstanding = 0  # sends without an answer
        self.ok_total = 0  # sent frames answered ok (whole load)
        self.delivered_total = 0  # deliveries (whole load)


class Conn(WSListener):  # type: ignore[misc]
    """One connection; frames are handled in :meth:`on_ws_frame` (no task per connection)."""

    def __init__(self, gen: Generator, role: str, user: str, peer: str, authenticate: bool) -> None:
        self.gen = gen
        self.role = role
        self.user = user
        self.peer = peer
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.authenticate = authenticate
        self.fifo: collections.deque[float] = collections.deque()
        self.pending: dict[str, float] = {}
        self.prefix = f"{gen.run}.{user}."
        self.seq = 0
        self.acks: list[str] = []
        self.close_code: int | None = None
        self.open = False

    # ------------------------------------------------------------ callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.open = True
        if not self.authenticate and not self.ready.done():
            self.ready.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == BINARY:
            if self.role == "echo":
                self.gen.on_echo(self)
            else:
                self.gen.on_iris(self, loads(frame.get_payload_as_bytes()))
        elif kind == CLOSE:
            payload = frame.get_payload_as_bytes()
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._closed(code)
            with contextlib.suppress(Exception):
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._closed(1006)

    def _closed(self, code: int) -> None:
        if self.close_code is not None:
            return
        self.close_code = code
        self.open = False
        self.gen.on_close(self, code)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed with {code} before ready"))

    # -------------------------------------------------------------- sending

    def send_echo(self, now: float) -> None:
        self.fifo.append(now)
        self.transport.send(BINARY, self.gen.echo_frame)  # type: ignore[union-attr]

    def send_iris(self, now: float) -> None:
        self.seq += 1
        fid = self.prefix + str(self.seq)
        self.pending[fid] = now
        self.transport.send(  # type: ignore[union-attr]
            BINARY, dumps({"type": "send", "id": fid, "to": self.peer, "body": now})
        )


class Generator:
    def __init__(self) -> None:
        self.run = os.urandom(4).hex()
        self.conns: list[Conn] = []
        self.tokens: dict[tuple[str, str | None], str] = {}
        self.closes: list[list[Any]] = []
        self.stats = Stats()
        self.closed_loop = False
        self.sending = False
        self.ack_dirty: set[Conn] = set()
        # An Iris ``send`` frame's size (about 70 bytes): the echo payload.
        self.echo_frame = dumps(
            {"type": "send", "id": "0123abcd.user-000001.1", "to": "user-000002", "body": 0.0}
        )

    # ------------------------------------------------------------ answers

    def on_close(self, conn: Conn, code: int) -> None:
        self.closes.append([conn.user, monotonic(), code])
        self.ack_dirty.discard(conn)

    def on_echo(self, conn: Conn) -> None:
        now = monotonic()
        t0 = conn.fifo.popleft()
        st = self.stats
        st.outstanding -= 1
        st.ok_total += 1
        if st.measuring and now >= st.t_begin:
            st.answered += 1
            if t0 >= st.t_begin:
                st.lat.append(now - t0)
        if self.closed_loop and self.sending:
            conn.send_echo(now)
            st.sent += 1
            st.outstanding += 1

    def on_iris(self, conn: Conn, frame: Any) -> None:
        kind = frame.get("type")
        st = self.stats
        if kind == "sent" or kind == "error":
            fid = frame.get("id")
            t0 = conn.pending.pop(fid, None) if fid is not None else None
            if t0 is None:
                if kind == "error":
                    self.stats.errors[str(frame.get("code"))] += 1
                return
            now = monotonic()
            st.outstanding -= 1
            if kind == "sent":
                st.ok_total += 1
                if st.measuring and now >= st.t_begin:
                    st.answered += 1
                    if t0 >= st.t_begin:
                        st.lat.append(now - t0)
            else:
                st.errors[str(frame.get("code"))] += 1
            if self.closed_loop and self.sending:
                conn.send_iris(now)
                st.sent += 1
                st.outstanding += 1
        elif kind == "msg":
            now = monotonic()
            body = frame.get("body")
            st.delivered_total += 1
            if st.measuring and now >= st.t_begin:
                st.delivered += 1
                if isinstance(body, float) and body >= st.t_begin:
                    st.dlat.append(now - body)
            conn.acks.append(frame["mid"])
            self.ack_dirty.add(conn)
        elif kind == "welcome":
            if not conn.ready.done():
                conn.ready.set_result(None)
        elif kind == "error":
            st.errors[str(frame.get("code"))] += 1

    async def ack_loop(self) -> None:
        while True:
            await asyncio.sleep(ACK_INTERVAL)
            if not self.ack_dirty:
                continue
            dirty, self.ack_dirty = self.ack_dirty, set()
            for conn in dirty:
                mids, conn.acks = conn.acks, []
                if conn.transport is None or not conn.open:
                    continue
                for i in range(0, len(mids), 1000):
                    conn.transport.send(BINARY, dumps({"type": "ack", "mids": mids[i : i + 1000]}))

    # ----------------------------------------------------------- commands

    def token(self, secret: str, user: str, jti: str | None) -> str:
        key = (user, jti)
        tok = self.tokens.get(key)
        if tok is None:
            from iris_edge._auth import issue_token

            tok = self.tokens[key] = issue_token(secret, user, ttl=6 * 3600, jti=jti)
        return tok

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        url = cmd["url"]
        role = cmd.get("role", "idle")
        users: list[str] = cmd["users"]
        peers: list[str] = cmd.get("peers") or [""] * len(users)
        jtis: list[str | None] = cmd.get("jtis") or [None] * len(users)
        secret: str | None = cmd.get("jwt_secret")
        timeout = float(cmd.get("timeout", 30.0))
        sem = asyncio.Semaphore(int(cmd.get("concurrency", 64)))
        errors: collections.Counter[str] = collections.Counter()
        opened = 0
        started = monotonic()

        async def one(user: str, peer: str, jti: str | None) -> None:
            nonlocal opened
            headers = {"Sec-WebSocket-Protocol": SUBPROTOCOL}
            if secret is not None:
                headers["Authorization"] = "Bearer " + self.token(secret, user, jti)
            async with sem:
                try:
                    _transport, conn = await ws_connect(
                        lambda: Conn(self, role, user, peer, secret is not None),
                        url,
                        extra_headers=headers,
                        websocket_handshake_timeout=timeout,
                        max_frame_size=1 << 20,
                    )
                    await asyncio.wait_for(conn.ready, timeout)
                except Exception as exc:
                    errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
                    return
            self.conns.append(conn)
            opened += 1

        await asyncio.gather(*(one(u, p, j) for u, p, j in zip(users, peers, jtis, strict=True)))
        return {
            "opened": opened,
            "failed": len(users) - opened,
            "errors": dict(errors.most_common(5)),
            "seconds": monotonic() - started,
            "open": sum(1 for c in self.conns if c.open),
        }

    async def load(self, cmd: dict[str, Any]) -> dict[str, Any]:
        kind = cmd.get("kind", "iris")
        duration = float(cmd["duration"])
        warmup = float(cmd.get("warmup", 0.5))
        window = int(cmd.get("window", 1))
        rate = cmd.get("rate")
        drain = float(cmd.get("drain", 3.0))
        role = "echo" if kind == "echo" else "sender"
        senders = [c for c in self.conns if c.role == role and c.open]
        if not senders:
            return {"error": f"no open {role} connections"}
        self.stats = st = Stats()
        send = Conn.send_echo if kind == "echo" else Conn.send_iris
        cpu0 = time.process_time()
        start = monotonic()
        st.t_begin = start + warmup
        st.t_end = st.t_begin + duration
        self.sending = True
        self.closed_loop = rate is None
        st.measuring = True
        if rate is None:
            for conn in senders:
                for _ in range(window):
                    send(conn, start)
                    st.sent += 1
                    st.outstanding += 1
            await asyncio.sleep(st.t_end - monotonic())
        else:
            rate = float(rate)
            random.shuffle(senders)
            n = len(senders)
            i = 0
            while True:
                now = monotonic()
                if now >= st.t_end:
                    break
                due = int((now - start) * rate) - st.sent
                for _ in range(due):
                    conn = senders[i]
                    i = i + 1 if i + 1 < n else 0
                    if conn.open:
                        send(conn, now)
                        st.outstanding += 1
                    st.sent += 1
                await asyncio.sleep(0.001)
        self.sending = False
        end = monotonic()
        st.measuring = False
        window_s = end - st.t_begin
        cpu = time.process_time() - cpu0
        # Drain: outstanding answers, and (iris) the deliveries of every ok send.
        deadline = monotonic() + drain
        while monotonic() < deadline:
            if st.outstanding <= 0 and (kind == "echo" or st.delivered_total >= st.ok_total):
                break
            await asyncio.sleep(0.01)
        return {
            "kind": kind,
            "connections": len(senders),
            "window_s": window_s,
            "offered_per_s": (rate if rate is not None else None),
            "sent": st.sent,
            "answered": st.answered,
            "per_s": st.answered / window_s,
            "delivered": st.delivered,
            "delivered_per_s": st.delivered / window_s,
            "errors": dict(st.errors),
            "outstanding_after_drain": st.outstanding,
            "undelivered_after_drain": max(0, st.ok_total - st.delivered_total)
            if kind == "iris"
            else 0,
            "cpu_s": cpu,
            "cpu_share": cpu / (end - start),
            "lat": _subsample(st.lat),
            "dlat": _subsample(st.dlat),
        }

    def take_closes(self) -> dict[str, Any]:
        closes, self.closes = self.closes, []
        return {"closes": closes, **self.status()}

    def status(self) -> dict[str, Any]:
        by_role: collections.Counter[str] = collections.Counter(
            c.role for c in self.conns if c.open
        )
        return {"open": sum(by_role.values()), "by_role": dict(by_role)}

    async def close_all(self, timeout: float = 10.0) -> dict[str, Any]:
        for conn in self.conns:
            if conn.open and conn.transport is not None:
                with contextlib.suppress(Exception):
                    conn.transport.send_close(WSCloseCode.OK)
        deadline = monotonic() + timeout
        while monotonic() < deadline and any(c.open for c in self.conns):
            await asyncio.sleep(0.05)
        for conn in self.conns:
            if conn.open and conn.transport is not None:
                conn.transport.disconnect(graceful=False)
        self.conns = [c for c in self.conns if c.open]
        return self.status()


def _subsample(values: list[float]) -> list[float]:
    if len(values) > MAX_SAMPLES:
        values = random.sample(values, MAX_SAMPLES)
    return [round(v * 1000, 3) for v in values]  # milliseconds


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write("wsload " + json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main_async() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    gen = Generator()
    acker = asyncio.create_task(gen.ack_loop())
    _answer({"ready": True, "pid": os.getpid(), "nofile": raise_nofile()})
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            name = cmd.get("cmd")
            try:
                if name == "connect":
                    _answer(await gen.connect(cmd))
                elif name == "load":
                    _answer(await gen.load(cmd))
                elif name == "closes":
                    _answer(gen.take_closes())
                elif name == "status":
                    _answer(gen.status())
                elif name == "close":
                    _answer(await gen.close_all(float(cmd.get("timeout", 10.0))))
                elif name == "exit":
                    await gen.close_all(float(cmd.get("timeout", 2.0)))
                    _answer({"bye": True})
                    break
                else:
                    _answer({"error": f"unknown command {name!r}"})
            except Exception as exc:  # answer, so the parent never hangs
                _answer({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        acker.cancel()


def main() -> int:
    raise_nofile()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async())
    else:
        uvloop.run(main_async())
    return 0


if __name__ == "__main__":
    sys.exit(main())
