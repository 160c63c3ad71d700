"""Sans-I/O tests of the RPC framing, handshake and encryption (no sockets)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_raft._exceptions import AuthFailed, BadRequest, NotLeader, ProtocolError
from iris_raft._rpc import (
    HANDSHAKE_MAX_FRAME,
    CodecState,
    ErrorResponse,
    Event,
    FrameBuffer,
    HandshakeDone,
    Message,
    Push,
    Request,
    Response,
    Role,
    RpcCodec,
    encode_frame,
    parse_address,
)

SECRET = b"correct horse battery staple 32b"
OTHER_SECRET = b"another secret of thirty-two b!!"
SERVER_NONCE = bytes(range(32))
CLIENT_NONCE = bytes(range(100, 132))


def make_pair(
    client_secret: bytes | None = SECRET,
    server_secret: bytes | None = SECRET,
    max_frame: int = 1 << 20,
) -> tuple[RpcCodec, RpcCodec]:
    client = RpcCodec(Role.CLIENT, secret=client_secret, nonce=CLIENT_NONCE, max_frame=max_frame)
    server = RpcCodec(Role.SERVER, secret=server_secret, nonce=SERVER_NONCE, max_frame=max_frame)
    return client, server


def drain(codec: RpcCodec) -> list[Event]:
    events: list[Event] = []
    while (event := codec.next_event()) is not None:
        events.append(event)
    return events


def handshake(client: RpcCodec, server: RpcCodec) -> None:
    client.receive_data(server.data_to_send())
    assert drain(client) == []
    assert client.state is CodecState.AWAIT_VERDICT
    server.receive_data(client.data_to_send())
    authenticated = client.authenticated
    assert drain(server) == [HandshakeDone(authenticated)]
    client.receive_data(server.data_to_send())
    assert drain(client) == [HandshakeDone(authenticated)]
    assert (client.state, server.state) == (CodecState.OPEN, CodecState.OPEN)


def open_pair(secret: bytes | None = SECRET, max_frame: int = 1 << 20) -> tuple[RpcCodec, RpcCodec]:
    client, server = make_pair(secret, secret, max_frame)
    handshake(client, server)
    return client, server


def frames_of(data: bytes) -> list[bytes]:
    buffer = FrameBuffer(1 << 30)
    buffer.receive_data(data)
    frames = []
    while (frame := buffer.next_frame()) is not None:
        frames.append(frame)
    assert buffer.buffered == 0
    return frames


# -- framing -----------------------------------------------------------------

FRAMES = [b"", b"a", b"hello world", bytes(range(256)) * 2, b"\x00\x00\x00\x05"]
STREAM = b"".join(encode_frame(f) for f in FRAMES)


def test_frame_is_length_prefixed() -> None:
    assert encode_frame(b"abc") == struct.pack(">I", 3) + b"abc"


def test_frames_survive_a_split_at_every_byte_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        buffer = FrameBuffer(4096)
        out = []
        for chunk in (STREAM[:cut], STREAM[cut:]):
            buffer.receive_data(chunk)
            while (frame := buffer.next_frame()) is not None:
                out.append(frame)
        assert out == FRAMES, cut


def test_frames_survive_byte_at_a_time() -> None:
    buffer = FrameBuffer(4096)
    out = []
    for i in range(len(STREAM)):
        buffer.receive_data(STREAM[i : i + 1])
        while (frame := buffer.next_frame()) is not None:
            out.append(frame)
    assert out == FRAMES
    assert buffer.buffered == 0


@settings(deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=20))
def test_frames_survive_any_chunking(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    buffer = FrameBuffer(4096)
    out = []
    for start, end in itertools.pairwise(points):
        buffer.receive_data(STREAM[start:end])
        while (frame := buffer.next_frame()) is not None:
            out.append(frame)
    assert out == FRAMES


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    buffer = FrameBuffer(100)
    buffer.receive_data(struct.pack(">I", 100) + b"x" * 100)
    assert buffer.next_frame() == b"x" * 100
    buffer.receive_data(struct.pack(">I", 101))  # no body needed to refuse it
    with pytest.raises(ProtocolError, match="101 bytes"):
        buffer.next_frame()


def test_handshake_frames_are_limited_to_4_kib() -> None:
    server = RpcCodec(Role.SERVER, secret=SECRET, nonce=SERVER_NONCE)
    server.receive_data(struct.pack(">I", HANDSHAKE_MAX_FRAME + 1))
    with pytest.raises(ProtocolError):
        server.next_event()
    assert server.state is CodecState.FAILED


def test_open_codec_refuses_frames_above_max_frame() -> None:
    _, server = open_pair(max_frame=1000)
    server.receive_data(struct.pack(">I", 1001))
    with pytest.raises(ProtocolError):
        server.next_event()


# -- handshake ---------------------------------------------------------------


def test_server_speaks_first_with_version_auth_and_nonce() -> None:
    server = RpcCodec(Role.SERVER, secret=SECRET, nonce=SERVER_NONCE)
    (hello,) = frames_of(server.data_to_send())
    assert cbor2.loads(hello) == {"v": 1, "auth": True, "nonce": SERVER_NONCE}
    assert server.data_to_send() == b""


def _reference_proof(label: bytes) -> bytes:
    return hmac.new(SECRET, label + SERVER_NONCE + CLIENT_NONCE, hashlib.sha256).digest()


def _reference_key(info: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=SERVER_NONCE + CLIENT_NONCE, info=info)
    return hkdf.derive(SECRET)


def test_wire_format_matches_the_specification() -> None:
    """Proofs, keys and nonces computed independently of the codec."""
    client, server = make_pair()
    client.receive_data(server.data_to_send())
    drain(client)
    (client_hello,) = frames_of(client.data_to_send())
    assert cbor2.loads(client_hello) == {
        "v": 1,
        "auth": True,
        "nonce": CLIENT_NONCE,
        "proof": _reference_proof(b"iris-rpc-client"),
    }
    server.receive_data(encode_frame(client_hello))
    drain(server)
    (verdict,) = frames_of(server.data_to_send())
    assert cbor2.loads(verdict) == {"ok": True, "proof": _reference_proof(b"iris-rpc-server")}
    client.receive_data(encode_frame(verdict))
    drain(client)

    c2s = AESGCM(_reference_key(b"iris-rpc c2s"))
    s2c = AESGCM(_reference_key(b"iris-rpc s2c"))
    for counter in range(3):
        (body,) = frames_of(client.send(Request(counter, "m", {"n": counter})))
        plain = c2s.decrypt(counter.to_bytes(12, "big"), body, None)
        assert cbor2.loads(plain) == {"id": counter, "m": "m", "p": {"n": counter}}
    (body,) = frames_of(server.send(Push("ch", [1, 2])))
    assert cbor2.loads(s2c.decrypt(bytes(12), body, None)) == {"push": "ch", "d": [1, 2]}
    (body,) = frames_of(server.send(Response(7, "ok")))
    assert cbor2.loads(s2c.decrypt((1).to_bytes(12, "big"), body, None)) == {"id": 7, "r": "ok"}


def test_client_with_wrong_secret_is_refused_by_the_server() -> None:
    client, server = make_pair(client_secret=OTHER_SECRET)
    client.receive_data(server.data_to_send())
    drain(client)
    server.receive_data(client.data_to_send())
    with pytest.raises(AuthFailed):
        server.next_event()
    assert server.state is CodecState.FAILED
    (rejection,) = frames_of(server.data_to_send())
    assert cbor2.loads(rejection) == {"ok": False, "error": "auth_failed"}
    client.receive_data(encode_frame(rejection))
    with pytest.raises(AuthFailed):
        client.next_event()
    assert client.state is CodecState.FAILED


def test_client_refuses_a_server_that_cannot_prove_the_secret() -> None:
    """A server that accepts any client but does not know the secret."""
    client, server = make_pair(server_secret=OTHER_SECRET)
    client.receive_data(server.data_to_send())
    drain(client)
    client.data_to_send()
    forged = {"ok": True, "proof": _reference_proof(b"iris-rpc-client")}  # the client's own proof
    client.receive_data(encode_frame(cbor2.dumps(forged)))
    with pytest.raises(AuthFailed, match="server failed to prove"):
        client.next_event()
    client, server = make_pair()
    client.receive_data(server.data_to_send())
    drain(client)
    client.receive_data(encode_frame(cbor2.dumps({"ok": True})))  # no proof at all
    with pytest.raises(ProtocolError):
        client.next_event()


def test_client_with_secret_refuses_a_dev_mode_server() -> None:
    client, server = make_pair(client_secret=SECRET, server_secret=None)
    client.receive_data(server.data_to_send())
    with pytest.raises(AuthFailed, match="without a cluster secret"):
        client.next_event()
    # The client still says who it is, so that the server logs the mismatch.
    server.receive_data(client.data_to_send())
    with pytest.raises(AuthFailed):
        server.next_event()
    (rejection,) = frames_of(server.data_to_send())
    assert cbor2.loads(rejection) == {"ok": False, "error": "auth_failed"}


def test_server_with_secret_refuses_a_dev_mode_client() -> None:
    client, server = make_pair(client_secret=None, server_secret=SECRET)
    client.receive_data(server.data_to_send())
    with pytest.raises(AuthFailed, match="requires the cluster secret"):
        client.next_event()
    server.receive_data(client.data_to_send())
    with pytest.raises(AuthFailed, match="no cluster secret"):
        server.next_event()


def test_unsupported_version_is_a_protocol_error_with_a_reason_sent() -> None:
    server = RpcCodec(Role.SERVER, secret=SECRET, nonce=SERVER_NONCE)
    server.data_to_send()
    hello = {"v": 2, "auth": True, "nonce": CLIENT_NONCE, "proof": b"x" * 32}
    server.receive_data(encode_frame(cbor2.dumps(hello)))
    with pytest.raises(ProtocolError, match="version"):
        server.next_event()
    (rejection,) = frames_of(server.data_to_send())
    assert cbor2.loads(rejection) == {"ok": False, "error": "protocol_error"}


@pytest.mark.parametrize(
    "hello",
    [
        {"v": True, "auth": True, "nonce": CLIENT_NONCE, "proof": b"x" * 32},
        {"v": 1, "auth": True, "nonce": CLIENT_NONCE[:31], "proof": b"x" * 32},
        {"v": 1, "auth": 1, "nonce": CLIENT_NONCE, "proof": b"x" * 32},
        {"v": 1, "auth": True, "nonce": CLIENT_NONCE, "proof": "text"},
        {"v": 1, "nonce": CLIENT_NONCE},
        [1, 2, 3],
    ],
)
def test_malformed_hello_is_a_protocol_error(hello: Any) -> None:
    server = RpcCodec(Role.SERVER, secret=SECRET, nonce=SERVER_NONCE)
    server.receive_data(encode_frame(cbor2.dumps(hello)))
    with pytest.raises(ProtocolError):
        server.next_event()


def test_dev_mode_handshake_and_plaintext_frames() -> None:
    client, _server = open_pair(secret=None)
    (body,) = frames_of(client.send(Request(1, "echo", {"a": 1})))
    assert cbor2.loads(body) == {"id": 1, "m": "echo", "p": {"a": 1}}


def test_failed_codec_stays_failed() -> None:
    _, server = open_pair()
    server.receive_data(encode_frame(b"not ciphertext at all"))
    with pytest.raises(ProtocolError):
        server.next_event()
    server.receive_data(b"more")
    with pytest.raises(ProtocolError, match="already failed"):
        server.next_event()
    with pytest.raises(RuntimeError):
        server.send(Response(1, None))


def test_empty_secret_and_bad_nonce_are_refused() -> None:
    with pytest.raises(ValueError):
        RpcCodec(Role.CLIENT, secret=b"", nonce=CLIENT_NONCE)
    with pytest.raises(ValueError):
        RpcCodec(Role.CLIENT, secret=SECRET, nonce=b"short")


# -- conversations split anywhere -------------------------------------------


def _client_stream(secret: bytes | None) -> tuple[bytes, list[Event]]:
    """Everything a client sends in a short conversation, and what the server must see."""
    client, server = make_pair(secret, secret)
    client.receive_data(server.data_to_send())
    drain(client)
    hello = client.data_to_send()
    server.receive_data(hello)
    drain(server)
    client.receive_data(server.data_to_send())
    drain(client)
    requests = [
        Request(1, "send", {"to": "bob", "body": b"\x00" * 70}),
        Request(2, "ack", {}),
        Request(3, "x" * 300, {"nested": {"list": [1, 2.5, None, True]}}),
    ]
    data = hello + b"".join(client.send(r) for r in requests)
    return data, [HandshakeDone(secret is not None), *requests]


@pytest.mark.parametrize("secret", [SECRET, None])
def test_conversation_survives_a_split_at_every_byte_boundary(secret: bytes | None) -> None:
    data, expected = _client_stream(secret)
    for cut in range(len(data) + 1):
        server = RpcCodec(Role.SERVER, secret=secret, nonce=SERVER_NONCE)
        events: list[Event] = []
        for chunk in (data[:cut], data[cut:]):
            server.receive_data(chunk)
            events += drain(server)
        assert events == expected, cut


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_conversation_survives_any_chunking(data: st.DataObject) -> None:
    stream, expected = _client_stream(SECRET)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    points = [0, *cuts, len(stream)]
    server = RpcCodec(Role.SERVER, secret=SECRET, nonce=SERVER_NONCE)
    events: list[Event] = []
    for start, end in itertools.pairwise(points):
        server.receive_data(stream[start:end])
        events += drain(server)
    assert events == expected


# -- garbage, tampering, replay ---------------------------------------------


def _codec_in_each_state() -> list[RpcCodec]:
    server_hello = RpcCodec(Role.SERVER, secret=SECRET, nonce=SERVER_NONCE)
    dev_server_hello = RpcCodec(Role.SERVER, secret=None, nonce=SERVER_NONCE)
    client_hello = RpcCodec(Role.CLIENT, secret=SECRET, nonce=CLIENT_NONCE)
    client_verdict, server = make_pair()
    client_verdict.receive_data(server.data_to_send())
    drain(client_verdict)
    open_client, open_server = open_pair()
    dev_client, dev_server = open_pair(secret=None)
    return [
        server_hello,
        dev_server_hello,
        client_hello,
        client_verdict,
        open_client,
        open_server,
        dev_client,
        dev_server,
    ]


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=600), framed=st.booleans())
def test_garbage_only_ever_raises_protocol_error(garbage: bytes, framed: bool) -> None:
    for codec in _codec_in_each_state():
        codec.receive_data(encode_frame(garbage) if framed else garbage)
        try:
            drain(codec)
        except ProtocolError:
            assert codec.state is CodecState.FAILED


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_altered_byte_fails_authentication(data: st.DataObject) -> None:
    client, server = open_pair()
    frame = bytearray(client.send(Request(1, "send", {"body": b"secret message"})))
    index = data.draw(st.integers(4, len(frame) - 1), label="index")
    frame[index] ^= data.draw(st.integers(1, 255), label="xor")
    server.receive_data(bytes(frame))
    with pytest.raises(ProtocolError, match="failed authentication"):
        server.next_event()


def test_replayed_frame_is_refused() -> None:
    client, server = open_pair()
    frame = client.send(Request(1, "pay", {"amount": 10}))
    server.receive_data(frame)
    assert drain(server) == [Request(1, "pay", {"amount": 10})]
    server.receive_data(frame)
    with pytest.raises(ProtocolError, match="replayed"):
        server.next_event()


def test_reordered_frames_are_refused() -> None:
    client, server = open_pair()
    first = client.send(Request(1, "a", {}))
    second = client.send(Request(2, "b", {}))
    server.receive_data(second + first)
    with pytest.raises(ProtocolError):
        server.next_event()


def test_reflected_frame_is_refused() -> None:
    """A frame sent back to its sender: the other direction has another key."""
    client, _ = open_pair()
    client.receive_data(client.send(Request(1, "a", {})))
    with pytest.raises(ProtocolError):
        client.next_event()


def test_frame_from_another_connection_is_refused() -> None:
    client, _ = open_pair()
    other_client = RpcCodec(Role.CLIENT, secret=SECRET, nonce=bytes(32))
    other_server = RpcCodec(Role.SERVER, secret=SECRET, nonce=SERVER_NONCE)
    handshake(other_client, other_server)
    other_server.receive_data(client.send(Request(1, "a", {})))
    with pytest.raises(ProtocolError):
        other_server.next_event()


def test_same_plaintext_never_gives_the_same_ciphertext() -> None:
    client, _ = open_pair()
    frames = {client.send(Request(1, "same", {})) for _ in range(50)}
    assert len(frames) == 50


def test_shared_references_are_refused() -> None:
    _, server = open_pair(secret=None)
    cyclic = bytes.fromhex("d81c81d81d00")  # a list that contains itself
    body = cbor2.dumps({"id": 1, "m": "x", "p": {"k": 0}})[:-1] + cyclic
    loop = cbor2.loads(body)["p"]["k"]  # plain cbor2 accepts it
    assert loop[0] is loop
    server.receive_data(encode_frame(body))
    with pytest.raises(ProtocolError, match="shared references"):
        server.next_event()


@pytest.mark.parametrize(
    "message",
    [
        {"id": True, "m": "x", "p": {}},
        {"id": 1, "m": "x", "p": []},
        {"id": 1, "m": 5, "p": {}},
        {"id": 1, "m": "x", "p": {1: "int key"}},
        {"push": "c", "d": 1},
        {"id": 1, "r": 1},
        "not a map",
    ],
)
def test_server_refuses_anything_but_well_formed_requests(message: Any) -> None:
    _, server = open_pair(secret=None)
    server.receive_data(encode_frame(cbor2.dumps(message)))
    with pytest.raises(ProtocolError):
        server.next_event()


@pytest.mark.parametrize(
    "message",
    [
        {"id": 1, "m": "x", "p": {}},
        {"push": "c"},
        {"push": 3, "d": 1},
        {"id": 1},
        {"id": "1", "r": 1},
        {"id": 1, "e": {"code": "bad_request"}},
        {"id": 1, "e": "boom"},
    ],
)
def test_client_refuses_anything_but_answers_and_pushes(message: Any) -> None:
    client, _ = open_pair(secret=None)
    client.receive_data(encode_frame(cbor2.dumps(message)))
    with pytest.raises(ProtocolError):
        client.next_event()


# -- messages ----------------------------------------------------------------

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
cbor_maps = st.dictionaries(st.text(max_size=8), cbor_values, max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    secret=st.sampled_from([SECRET, None]),
    request_id=st.integers(0, 2**63),
    method=st.text(max_size=30),
    params=cbor_maps,
    result=cbor_values,
    push=cbor_values,
    error_data=cbor_maps,
)
def test_random_messages_round_trip(
    secret: bytes | None,
    request_id: int,
    method: str,
    params: dict[str, Any],
    result: Any,
    push: Any,
    error_data: dict[str, Any],
) -> None:
    client, server = open_pair(secret)
    sent_by_client = [Request(request_id, method, params), Request(request_id + 1, "x", {})]
    server.receive_data(b"".join(client.send(m) for m in sent_by_client))
    assert drain(server) == sent_by_client
    sent_by_server: list[Message] = [
        Push(method, push),
        Response(request_id, result),
        ErrorResponse(request_id + 1, "bad_request", "no", error_data),
    ]
    client.receive_data(b"".join(server.send(m) for m in sent_by_server))
    assert drain(client) == sent_by_server


def test_error_response_rebuilds_the_error() -> None:
    error = ErrorResponse.from_error(3, BadRequest("missing field", field="to")).to_error()
    assert type(error) is BadRequest
    assert error.message == "missing field" and error.data == {"field": "to"}
    hint = ErrorResponse.from_error(4, NotLeader("not me", leader_hint="n2")).to_error()
    assert isinstance(hint, NotLeader) and hint.leader_hint == "n2"


def test_send_is_refused_before_the_handshake() -> None:
    client, _ = make_pair()
    with pytest.raises(RuntimeError):
        client.send(Request(1, "x", {}))


def test_oversized_or_unencodable_message_leaves_the_codec_usable() -> None:
    client, server = open_pair(max_frame=1000)
    with pytest.raises(ValueError, match="exceeds max_frame"):
        client.send(Request(1, "big", {"blob": b"x" * 1000}))
    with pytest.raises(ValueError, match="encode"):
        client.send(Request(2, "odd", {"thing": object()}))
    with pytest.raises(ValueError):
        client.send(Response(3, None))  # a client cannot answer
    with pytest.raises(ValueError):
        server.send(Request(3, "x", {}))  # a server cannot call
    server.receive_data(client.send(Request(4, "fine", {})))
    assert drain(server) == [Request(4, "fine", {})]


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:7101") == ("127.0.0.1", 7101)
    assert parse_address("[::1]:7101") == ("::1", 7101)
    assert parse_address(("core-1", 80)) == ("core-1", 80)
    for bad in ("7101", "host:", ":80", "host:port", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)
