"""The RPC server and client over real sockets on 127.0.0.1 (port 0)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iris_raft._exceptions import (
    AuthFailed,
    BadRequest,
    InternalError,
    NotLeader,
    Unavailable,
    UnknownOutcome,
)
from iris_raft._rpc import (
    NONCE_SIZE,
    FrameBuffer,
    HandshakeDone,
    Request,
    Role,
    RpcCodec,
    RpcServerConnection,
    encode_frame,
    open_rpc_connection,
    serve_rpc,
)

SECRET = b"0123456789abcdef0123456789abcdef"
WRONG = b"fedcba9876543210fedcba9876543210"
Address = tuple[str, int]


class Handler:
    """The test server's methods; records what it saw."""

    def __init__(self) -> None:
        self.connections: list[RpcServerConnection] = []
        self.running = 0
        self.max_running = 0
        self.gate = trio.Event()
        self.two_running = trio.Event()
        self.flood_closed = trio.Event()
        self.subscribed = trio.Event()
        self.hanging = trio.Event()
        self.gated_started = trio.Event()

    async def __call__(self, conn: RpcServerConnection, method: str, params: dict[str, Any]) -> Any:
        if method == "echo":
            return params
        if method == "sleep":
            await trio.sleep(params["seconds"])
            return "slept"
        if method == "hang":
            self.hanging.set()
            await trio.sleep_forever()
        if method == "bad":
            raise BadRequest("no such inbox", inbox="bob")
        if method == "not_leader":
            raise NotLeader("ask n2", leader_hint="127.0.0.1:7002")
        if method == "bug":
            return 1 / 0
        if method == "unencodable":
            return object()
        if method == "push":
            for i in range(params["n"]):
                await conn.push(params["channel"], i)
            return params["n"]
        if method == "drop":
            await conn.aclose()
        if method == "subscribe":
            conn.state["subscribed"] = True
            self.connections.append(conn)
            self.subscribed.set()
            return "ok"
        if method == "gated":
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.gated_started.set()
            if self.running == 2:
                self.two_running.set()
            await self.gate.wait()
            self.running -= 1
            return "done"
        if method == "flood":
            conn.cleanup_callbacks.append(self.flood_closed.set)
            while True:
                await conn.push("flood", b"x" * 65536)
        raise BadRequest(f"unknown method {method!r}")


@asynccontextmanager
async def serving(
    handler: Any, *, secret: bytes | None = SECRET, **kwargs: Any
) -> AsyncIterator[Address]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(serve_rpc, handler, "127.0.0.1", 0, secret=secret, **kwargs)
        )
        yield ("127.0.0.1", listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


async def assert_serves(address: Address, secret: bytes | None = SECRET, **kwargs: Any) -> None:
    async with open_rpc_connection(address, secret=secret, **kwargs) as conn:
        assert await conn.call("echo", {"still": "serving"}, timeout=5) == {"still": "serving"}


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:  # reset: the server closed with our bytes unread
        pass
    return data


async def raw_handshake(stream: trio.SocketStream, secret: bytes | None) -> RpcCodec:
    """Run the client side of the handshake with the sans-I/O codec on a raw socket."""
    codec = RpcCodec(Role.CLIENT, secret=secret, nonce=bytes(NONCE_SIZE))
    while True:
        codec.receive_data(await stream.receive_some(65536))
        event = codec.next_event()
        await stream.send_all(codec.data_to_send())
        if isinstance(event, HandshakeDone):
            return codec


# -- calls -------------------------------------------------------------------


@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "dev"])
async def test_call_and_response(secret: bytes | None) -> None:
    with trio.fail_after(10):
        async with serving(Handler(), secret=secret) as address:
            async with open_rpc_connection(f"127.0.0.1:{address[1]}", secret=secret) as conn:
                params = {"text": "hé", "blob": b"\x00\xff", "n": [1, 2.5, None, True]}
                assert await conn.call("echo", params, timeout=5) == params
                assert await conn.call("sleep", {"seconds": 0}, timeout=5) == "slept"
                assert not conn.closed
            assert conn.closed


async def test_500_concurrent_pipelined_calls_on_one_connection() -> None:
    with trio.fail_after(10):
        async with (
            serving(Handler()) as address,
            open_rpc_connection(address, secret=SECRET) as conn,
        ):
            results: dict[int, Any] = {}

            async def one(i: int) -> None:
                results[i] = await conn.call("echo", {"i": i}, timeout=8)

            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(one, i)
            assert results == {i: {"i": i} for i in range(500)}


async def test_answers_may_come_out_of_order() -> None:
    with trio.fail_after(10):
        handler = Handler()
        async with (
            serving(handler) as address,
            open_rpc_connection(address, secret=SECRET) as conn,
        ):
            finished: list[str] = []

            async def call(method: str, params: dict[str, Any]) -> None:
                await conn.call(method, params, timeout=5)
                finished.append(method)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "gated", {})
                await handler.gated_started.wait()
                await call("echo", {})
                handler.gate.set()
            assert finished == ["echo", "gated"]


async def test_error_responses_raise_the_same_error() -> None:
    with trio.fail_after(10):
        async with (
            serving(Handler()) as address,
            open_rpc_connection(address, secret=SECRET) as conn,
        ):
            with pytest.raises(BadRequest) as bad:
                await conn.call("bad", {}, timeout=5)
            assert bad.value.message == "no such inbox"
            assert bad.value.data == {"inbox": "bob"}
            with pytest.raises(NotLeader) as not_leader:
                await conn.call("not_leader", {}, timeout=5)
            assert not_leader.value.leader_hint == "127.0.0.1:7002"


async def test_handler_bug_is_internal_error_and_the_connection_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(10):
        async with (
            serving(Handler()) as address,
            open_rpc_connection(address, secret=SECRET) as conn,
        ):
            with pytest.raises(InternalError, match="ZeroDivisionError"):
                await conn.call("bug", {}, timeout=5)
            with pytest.raises(InternalError, match="unencodable"):
                await conn.call("unencodable", {}, timeout=5)
            assert await conn.call("echo", {"after": "bug"}, timeout=5) == {"after": "bug"}
    assert any(
        r.levelno == logging.ERROR and r.exc_info and r.exc_info[0] is ZeroDivisionError
        for r in caplog.records
    )


async def test_call_timeout_is_unknown_outcome_and_the_connection_survives() -> None:
    with trio.fail_after(10):
        async with (
            serving(Handler()) as address,
            open_rpc_connection(address, secret=SECRET) as conn,
        ):
            with pytest.raises(UnknownOutcome, match=r"within 0\.2s"):
                await conn.call("hang", {}, timeout=0.2)
            assert await conn.call("echo", {}, timeout=5) == {}


async def test_connection_closed_by_the_server_mid_call_is_unknown_outcome() -> None:
    with trio.fail_after(10):
        async with serving(Handler()) as address:
            async with open_rpc_connection(address, secret=SECRET) as conn:
                with pytest.raises(UnknownOutcome, match="may have been applied"):
                    await conn.call("drop", {}, timeout=5)
                await conn.wait_closed()
                assert conn.closed
                with pytest.raises(Unavailable, match="not sent"):
                    await conn.call("echo", {}, timeout=5)
            await assert_serves(address)


async def test_server_shutdown_mid_call_is_unknown_outcome() -> None:
    with trio.fail_after(10):
        outcome: list[BaseException] = []
        server_scope = trio.CancelScope()
        handler = Handler()

        async def run_server(task_status: trio.TaskStatus[Any]) -> None:
            with server_scope:
                await serve_rpc(handler, "127.0.0.1", 0, secret=SECRET, task_status=task_status)

        async with trio.open_nursery() as outer:
            listeners = await outer.start(run_server)
            port = listeners[0].socket.getsockname()[1]
            async with open_rpc_connection(("127.0.0.1", port), secret=SECRET) as conn:

                async def pending_call() -> None:
                    try:
                        await conn.call("hang", {}, timeout=8)
                    except UnknownOutcome as exc:
                        outcome.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pending_call)
                    await handler.hanging.wait()
                    server_scope.cancel()
        assert len(outcome) == 1


async def test_client_aclose_fails_pending_calls_with_unknown_outcome() -> None:
    with trio.fail_after(10):
        handler = Handler()
        async with (
            serving(handler) as address,
            open_rpc_connection(address, secret=SECRET) as conn,
        ):
            caught: list[BaseException] = []

            async def pending_call() -> None:
                with pytest.raises(UnknownOutcome) as info:
                    await conn.call("hang", {}, timeout=8)
                caught.append(info.value)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pending_call)
                await handler.hanging.wait()
                await conn.aclose()
            assert len(caught) == 1


async def test_caller_exception_leaves_the_connection_block_unwrapped() -> None:
    with trio.fail_after(10):
        async with serving(Handler()) as address:
            with pytest.raises(KeyError):
                async with open_rpc_connection(address, secret=SECRET):
                    raise KeyError("mine")


async def test_connect_refused_is_unavailable() -> None:
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()
        with pytest.raises(Unavailable, match=f"127.0.0.1:{port}"):
            async with open_rpc_connection(("127.0.0.1", port), secret=SECRET):
                pass  # pragma: no cover


async def test_bind_failure_raises_oserror_naming_the_address() -> None:
    with trio.fail_after(10):
        async with serving(Handler()) as (host, port):
            with pytest.raises(OSError, match=f"{host}:{port}"):
                await serve_rpc(Handler(), host, port, secret=SECRET)


async def test_backpressure_bounds_concurrent_requests_per_connection() -> None:
    with trio.fail_after(10):
        handler = Handler()
        async with (
            serving(handler, max_concurrent_requests=2) as address,
            open_rpc_connection(address, secret=SECRET) as conn,
        ):
            results: list[Any] = []

            async def one() -> None:
                results.append(await conn.call("gated", {}, timeout=8))

            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(one)
                await handler.two_running.wait()
                await trio.sleep(0.2)  # give a broken limit the chance to start more
                assert handler.running == 2
                handler.gate.set()
            assert results == ["done"] * 6
            assert handler.max_running == 2


# -- authentication ----------------------------------------------------------


async def test_wrong_client_secret_is_refused_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(10):
        async with serving(Handler()) as address:
            with pytest.raises(AuthFailed, match="wrong secret"):
                async with open_rpc_connection(address, secret=WRONG):
                    pass  # pragma: no cover
            await assert_serves(address)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("authentication failed for 127.0.0.1:" in r.getMessage() for r in warnings)


async def test_server_that_cannot_prove_the_secret_is_refused() -> None:
    """A fake server that accepts any client proof but does not know the secret."""
    with trio.fail_after(10):
        client_hellos: list[dict[str, Any]] = []

        async def impostor(stream: trio.SocketStream) -> None:
            hello = {"v": 1, "auth": True, "nonce": b"n" * NONCE_SIZE}
            await stream.send_all(encode_frame(cbor2.dumps(hello)))
            frames = FrameBuffer(4096)
            while (frame := frames.next_frame()) is None:
                frames.receive_data(await stream.receive_some(4096))
            client_hellos.append(cbor2.loads(frame))
            verdict = {"ok": True, "proof": b"\x00" * 32}
            await stream.send_all(encode_frame(cbor2.dumps(verdict)))
            await read_until_closed(stream)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, impostor, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(AuthFailed, match="server failed to prove"):
                async with open_rpc_connection(("127.0.0.1", port), secret=SECRET):
                    pass  # pragma: no cover
            nursery.cancel_scope.cancel()
        assert len(client_hellos) == 1
        assert SECRET not in cbor2.dumps(client_hellos[0])


@pytest.mark.parametrize(
    ("server_secret", "client_secret", "reason"),
    [(None, SECRET, "without a cluster secret"), (SECRET, None, "requires the cluster secret")],
    ids=["dev-server", "dev-client"],
)
async def test_dev_mode_and_secret_refuse_each_other(
    server_secret: bytes | None,
    client_secret: bytes | None,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(10):
        async with serving(Handler(), secret=server_secret) as address:
            with pytest.raises(AuthFailed, match=reason):
                async with open_rpc_connection(address, secret=client_secret):
                    pass  # pragma: no cover
            await assert_serves(address, secret=server_secret)
    assert any(
        r.levelno == logging.WARNING and "authentication failed" in r.getMessage()
        for r in caplog.records
    )


# -- hostile or broken peers ---------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: core\r\n\r\n",
        encode_frame(b"\xff\xfe not cbor"),
        encode_frame(cbor2.dumps({"v": 1, "auth": True, "nonce": b"short"})),
        b"\x00\x00",  # then silence: the handshake times out
    ],
    ids=["http", "not-cbor", "bad-hello", "silence"],
)
async def test_garbage_before_the_handshake_closes_only_that_connection(garbage: bytes) -> None:
    with trio.fail_after(10):
        async with serving(Handler(), handshake_timeout=0.5) as address:
            async with open_rpc_connection(address, secret=SECRET) as bystander:
                async with await trio.open_tcp_stream(*address) as raw:
                    await raw.send_all(garbage)
                    received = await read_until_closed(raw)
                frames = FrameBuffer(4096)
                frames.receive_data(received)
                hello = frames.next_frame()
                assert hello is not None and cbor2.loads(hello)["v"] == 1
                assert await bystander.call("echo", {"ok": 1}, timeout=5) == {"ok": 1}
            await assert_serves(address)


@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "dev"])
async def test_garbage_after_the_handshake_closes_only_that_connection(
    secret: bytes | None,
) -> None:
    with trio.fail_after(10):
        async with serving(Handler(), secret=secret) as address:
            async with await trio.open_tcp_stream(*address) as raw:
                await raw_handshake(raw, secret)
                await raw.send_all(encode_frame(b"\x9f" * 40))
                await read_until_closed(raw)
            await assert_serves(address, secret=secret)


async def test_oversized_frame_closes_the_connection() -> None:
    with trio.fail_after(10):
        async with serving(Handler(), max_frame=4096) as address:
            async with await trio.open_tcp_stream(*address) as raw:
                await raw_handshake(raw, SECRET)
                await raw.send_all(struct.pack(">I", 1 << 30))  # announced, never sent
                assert await read_until_closed(raw) == b""
            # A real client that sends a frame above the server's limit loses
            # its connection; whether the request ran is unknown to it.
            async with open_rpc_connection(address, secret=SECRET) as conn:
                with pytest.raises(UnknownOutcome):
                    await conn.call("echo", {"blob": b"x" * 8000}, timeout=5)
            await assert_serves(address)


async def test_request_above_the_client_limit_is_refused_before_sending() -> None:
    with trio.fail_after(10):
        async with (
            serving(Handler()) as address,
            open_rpc_connection(address, secret=SECRET, max_frame=4096) as conn,
        ):
            with pytest.raises(BadRequest, match="max_frame"):
                await conn.call("echo", {"blob": b"x" * 8000}, timeout=5)
            with pytest.raises(BadRequest, match="encode"):
                await conn.call("echo", {"odd": object()}, timeout=5)
            assert await conn.call("echo", {}, timeout=5) == {}


async def test_handshake_timeout_on_the_client() -> None:
    with trio.fail_after(10):

        async def mute(stream: trio.SocketStream) -> None:
            await read_until_closed(stream)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, mute, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(Unavailable, match="timed out"):
                async with open_rpc_connection(
                    ("127.0.0.1", port), secret=SECRET, handshake_timeout=0.3
                ):
                    pass  # pragma: no cover
            nursery.cancel_scope.cancel()


# -- pushes ------------------------------------------------------------------


async def test_pushes_arrive_in_order_to_every_subscriber() -> None:
    with trio.fail_after(10):
        async with (
            serving(Handler()) as address,
            open_rpc_connection(address, secret=SECRET) as conn,
        ):
            first = conn.pushes("inbox")
            second = conn.pushes("inbox")
            other = conn.pushes("other")
            assert await conn.call("push", {"channel": "inbox", "n": 2000}, timeout=5) == 2000
            assert [first.receive_nowait() for _ in range(2000)] == list(range(2000))
            assert [await second.receive() for _ in range(2000)] == list(range(2000))
            with pytest.raises(trio.WouldBlock):
                other.receive_nowait()
            await first.aclose()  # unsubscribes; the others still get data
            assert await conn.call("push", {"channel": "inbox", "n": 3}, timeout=5) == 3
            assert [await second.receive() for _ in range(3)] == [0, 1, 2]
        with pytest.raises(trio.EndOfChannel):
            await second.receive()


async def test_push_overflow_closes_the_connection_instead_of_dropping(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(10):
        async with (
            serving(Handler()) as address,
            open_rpc_connection(address, secret=SECRET, push_buffer=10) as conn,
        ):
            receiver = conn.pushes("inbox")
            with pytest.raises(UnknownOutcome):
                await conn.call("push", {"channel": "inbox", "n": 100}, timeout=5)
            assert conn.closed
            got = [item async for item in receiver]
            assert got == list(range(10))  # all it kept, then the end: never a silent gap
    assert any("fell 10 items behind" in r.getMessage() for r in caplog.records)


async def test_push_to_a_closed_connection_raises_and_cleanup_runs() -> None:
    with trio.fail_after(10):
        handler = Handler()
        async with serving(handler) as address:
            cleaned = trio.Event()
            async with open_rpc_connection(address, secret=SECRET) as conn:
                received = conn.pushes("news")
                assert await conn.call("subscribe", {}, timeout=5) == "ok"
                (server_side,) = handler.connections
                assert server_side.state == {"subscribed": True}
                assert server_side.peer.startswith("127.0.0.1:")
                server_side.cleanup_callbacks.append(cleaned.set)
                await server_side.push("news", {"n": 1})  # from outside any request
                assert await received.receive() == {"n": 1}
            await server_side.wait_closed()
            assert cleaned.is_set()
            with pytest.raises(trio.ClosedResourceError):
                await server_side.push("news", {"n": 2})


async def test_client_that_stops_reading_is_disconnected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(10):
        handler = Handler()
        async with serving(handler, send_timeout=0.5) as address:
            async with await trio.open_tcp_stream(*address) as raw:
                codec = await raw_handshake(raw, SECRET)
                await raw.send_all(codec.send(Request(1, "flood", {})))
                # Never read again: the server must give up on us, and only us.
                await assert_serves(address)
                await handler.flood_closed.wait()
            await assert_serves(address)
    assert any("did not read" in r.getMessage() for r in caplog.records)


async def test_pusher_waiting_for_room_is_released_when_the_client_goes_away() -> None:
    with trio.fail_after(10):
        handler = Handler()
        async with serving(handler, send_timeout=60) as address:
            async with await trio.open_tcp_stream(*address) as raw:
                codec = await raw_handshake(raw, SECRET)
                await raw.send_all(codec.send(Request(1, "subscribe", {})))
                await handler.subscribed.wait()
                (server_side,) = handler.connections
                pushed = 0
                outcome: list[BaseException] = []

                async def pusher() -> None:
                    nonlocal pushed
                    try:
                        while True:
                            await server_side.push("big", b"x" * 65536)
                            pushed += 1
                    except trio.ClosedResourceError as exc:
                        outcome.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pusher)
                    last = -1
                    while pushed != last:  # until the buffers are full and the pusher waits
                        last = pushed
                        await trio.sleep(0.2)
                    await raw.send_eof()  # the client leaves without ever reading
                assert len(outcome) == 1
            await server_side.wait_closed()


# -- TLS ---------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1 / localhost: (server, client) contexts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iris test core")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = tmp_path / "core.pem"
    key_path = tmp_path / "core.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_tls_with_a_self_signed_certificate(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls
    with trio.fail_after(10):
        async with serving(Handler(), ssl_context=server_context) as address:
            for hostname in (None, "localhost"):
                async with open_rpc_connection(
                    address, secret=SECRET, ssl_context=client_context, server_hostname=hostname
                ) as conn:
                    received = conn.pushes("c")
                    assert await conn.call("echo", {"over": "tls"}, timeout=5) == {"over": "tls"}
                    assert await conn.call("push", {"channel": "c", "n": 5}, timeout=5) == 5
                    assert [await received.receive() for _ in range(5)] == list(range(5))
            with pytest.raises(AuthFailed):  # TLS is under, not instead of, the handshake
                async with open_rpc_connection(address, secret=WRONG, ssl_context=client_context):
                    pass  # pragma: no cover


async def test_plaintext_client_to_tls_server_fails_cleanly(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls
    with trio.fail_after(10):
        async with serving(Handler(), ssl_context=server_context, handshake_timeout=0.5) as address:
            with pytest.raises(Unavailable):
                async with open_rpc_connection(address, secret=SECRET, handshake_timeout=0.5):
                    pass  # pragma: no cover
            await assert_serves(address, ssl_context=client_context)


async def test_tls_client_to_plaintext_server_fails_cleanly(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    _, client_context = tls
    with trio.fail_after(10):
        async with serving(Handler()) as address:
            with pytest.raises(Unavailable):
                async with open_rpc_connection(address, secret=SECRET, ssl_context=client_context):
                    pass  # pragma: no cover
            await assert_serves(address)


async def test_untrusted_tls_certificate_is_auth_failed(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, _ = tls
    with trio.fail_after(10):
        async with serving(Handler(), ssl_context=server_context) as address:
            stranger = ssl.create_default_context()  # does not trust the test certificate
            with pytest.raises(AuthFailed, match="certificate"):
                async with open_rpc_connection(address, secret=SECRET, ssl_context=stranger):
                    pass  # pragma: no cover
