"""Hypothesis against one running edge: whatever a client sends, the answer is the spec's.

Each example opens a fresh connection (authenticated, or not yet for the
pre-auth test), sends one generated WebSocket message, then a ``ping`` with
a nonce, and reads until that nonce's ``pong`` or the close. The outcome is
compared with a small reference model of ``protocol-v1.md`` (and the
framing rules of docs/protocol.md) for the inputs it can judge exactly;
for random bytes it checks that the outcome is one the spec allows. Every
example is bounded in time (a hang fails it). The tests are sync: each
example runs its own ``trio.run``, so Hypothesis never meets an event loop.

After the runs, the edge process must be alive and a fresh client must
authenticate and exchange a message as usual.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest
import trio
from edge_helpers import (
    ERROR_CODES,
    Client,
    Closed,
    ClusterThread,
    connect,
    decode,
    login,
    running_cluster,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.cluster

MAX_FRAME = 65536
REFUSED_TAGS = frozenset({25, 28, 29, 256})
CLIENT_TYPES = frozenset({"send", "ack", "ping", "auth"})
#: Answers a `send` may get from a healthy cluster (the ids are fresh; the cluster is idle).
SEND_ERRORS = frozenset({"rate_limited", "inbox_full", "unavailable", "write_blocked", "internal"})
EXAMPLE_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterThread]:
    with running_cluster(
        tmp_path_factory.mktemp("fuzz"),
        nodes=3,
        edges=1,
        mode="hardened_ap",
        edge_options={"rate_limit_per_second": 100000, "rate_limit_burst": 100000},
    ) as c:
        yield c


def _user(prefix: str) -> str:
    return f"{prefix}-{os.urandom(6).hex()}"


# ------------------------------------------------------------ strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.just(cbor2.undefined)
)
tag_numbers = st.sampled_from(
    [0, 1, 2, 3, 4, 5, 24, 32, 55799, 25, 28, 29, 256, 1000]
) | st.integers(min_value=6, max_value=2**32)
cbor_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), children, max_size=5)
        | st.builds(cbor2.CBORTag, tag_numbers, children)
    ),
    max_leaves=20,
)
texts = (
    st.text(max_size=10) | st.text(min_size=60, max_size=70) | st.text(min_size=250, max_size=300)
)
#: Values for known keys: sometimes right, often of the wrong type or size.
key_values = (
    texts | cbor_values | st.lists(texts, max_size=4) | st.builds(cbor2.CBORTag, tag_numbers, texts)
)
known_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(CLIENT_TYPES)) | texts | cbor_values},
    optional={
        "id": key_values,
        "to": key_values,
        "body": cbor_values,
        "mids": key_values,
        "token": key_values,
        "user": key_values,
        "data": cbor_values,
        "extra": cbor_values,
    },
)

good_text = st.text(min_size=1, max_size=16)  # 1..64 UTF-8 bytes
#: Right half of the time (``.map`` keeps ``|`` from flattening the alternatives).
maybe_good = good_text | key_values.map(lambda value: value)
#: Frames of each client type whose keys are often right, sometimes wrong.
typed_frames = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("send"), "id": maybe_good, "to": maybe_good, "body": cbor_values},
        optional={"extra": cbor_values},
    ),
    st.fixed_dictionaries({"type": st.just("send"), "id": maybe_good, "to": maybe_good}),
    st.fixed_dictionaries(
        {
            "type": st.just("ack"),
            "mids": st.lists(good_text, max_size=5) | key_values.map(lambda v: v),
        },
        optional={"extra": cbor_values},
    ),
    st.fixed_dictionaries(
        {"type": st.just("ping")}, optional={"data": cbor_values, "extra": cbor_values}
    ),
    st.fixed_dictionaries(
        {"type": st.just("auth")}, optional={"token": maybe_good, "user": maybe_good}
    ),
)


def _nested(depth: int) -> bytes:
    inner = b"\x80"
    for _ in range(depth - 2):
        inner = b"\x81" + inner
    return b"\xa2" + cbor2.dumps("type") + cbor2.dumps("ping") + cbor2.dumps("data") + inner


@dataclass(frozen=True)
class Input:
    """One WebSocket message to send, and the value it encodes (when it came from one)."""

    data: bytes | str
    value: Any = None
    from_value: bool = False

    def __repr__(self) -> str:
        shown = self.data if len(self.data) <= 200 else f"{self.data[:200]!r}... ({len(self.data)})"
        return f"Input({shown!r})"


def _encoded(value: Any) -> Input:
    return Input(cbor2.dumps(value), value, True)


inputs = st.one_of(
    st.binary(max_size=300).map(Input),
    cbor_values.map(_encoded),
    known_frames.map(_encoded),
    typed_frames.map(_encoded),
    typed_frames.map(_encoded),
    st.integers(min_value=MAX_FRAME - 40, max_value=MAX_FRAME + 200).map(
        lambda n: _encoded({"type": "ping", "data": b"x" * n})
    ),
    st.integers(min_value=1, max_value=100).map(lambda d: Input(_nested(d), d, False)),
    st.text(max_size=50).map(Input),
)


# ------------------------------------------------------------------ model


@dataclass(frozen=True)
class Expect:
    """What the spec says about one message: a close code, or what is answered."""

    close: int | None = None
    error: str | None = None  # an error frame's code (connection stays open)
    error_id: str | None = None
    send_id: str | None = None  # a `send` was accepted: `sent` or a send error with this id
    pong: bool = False
    silent: bool = False  # no answer at all (ack)


def _has_refused_tag(value: Any) -> bool:
    if isinstance(value, cbor2.CBORTag):
        return value.tag in REFUSED_TAGS or _has_refused_tag(value.value)
    if isinstance(value, list):
        return any(_has_refused_tag(v) for v in value)
    if isinstance(value, dict):
        return any(_has_refused_tag(k) or _has_refused_tag(v) for k, v in value.items())
    return False


def _text(value: Any, low: int, high: int) -> bool:
    return isinstance(value, str) and low <= len(value.encode()) <= high


def expected_after_auth(item: Input) -> Expect | None:
    """The spec's outcome for ``item`` on an authenticated connection; None: judge loosely."""
    if isinstance(item.data, str):
        return Expect(close=1003)
    if len(item.data) > MAX_FRAME:
        return Expect(close=1009)
    if not item.from_value:
        if isinstance(item.value, int):  # nested arrays of this depth
            return Expect(close=1007) if item.value > 64 else Expect(pong=True)
        return None
    frame = item.value
    if not isinstance(frame, dict) or _has_refused_tag(frame):
        return Expect(close=1007)
    type_ = frame.get("type")
    if not isinstance(type_, str):
        return Expect(error="bad_frame")
    if type_ not in CLIENT_TYPES:
        return Expect(error="unknown_type")
    if type_ == "ping":
        return Expect(pong=True)
    if type_ == "ack":
        mids = frame.get("mids")
        ok = isinstance(mids, list) and len(mids) <= 1000 and all(_text(m, 1, 128) for m in mids)
        return Expect(silent=True) if ok else Expect(error="bad_request")
    if type_ == "send":
        if not _text(frame.get("id"), 1, 64):
            return Expect(error="bad_request")
        id_ = frame["id"]
        if not _text(frame.get("to"), 1, 256) or "body" not in frame:
            return Expect(error="bad_request", error_id=id_)
        return Expect(send_id=id_)
    # auth on an authenticated connection: a refresh.
    for key, high in (("token", 8192), ("user", 256)):
        if key in frame and not _text(frame[key], 1, high):
            return Expect(error="bad_request")
    if "token" not in frame and "user" not in frame:
        return Expect(error="bad_request")
    return Expect(close=4001)  # no generated token is a valid one for this user


def expected_before_auth(item: Input) -> int | None:
    """The close code for ``item`` as the first message of a connection; None: 1007 or 4001."""
    if isinstance(item.data, str):
        return 1003
    if len(item.data) > MAX_FRAME:
        return 1009
    if item.from_value:
        frame = item.value
        if not isinstance(frame, dict) or _has_refused_tag(frame):
            return 1007
        return 4001
    if isinstance(item.value, int):
        return 1007 if item.value > 64 else 4001
    return None


# ----------------------------------------------------------------- runner


async def _exchange(
    client: Client, item: Input, nonce: str
) -> tuple[list[dict[str, Any]], int | None]:
    """Send ``item`` then a ping; the frames until the nonce's pong (or the close code)."""
    frames: list[dict[str, Any]] = []
    try:
        await client.send(item.data)
        await client.send({"type": "ping", "data": nonce})
    except Exception:  # the server may close before the second message
        pass
    try:
        while True:
            frame = await client.recv()
            assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
            frames.append(frame)
            if frame["type"] == "pong" and frame.get("data") == nonce:
                return frames, None
    except Closed as closed:
        return frames, closed.code


def _check_server_frames(frames: list[dict[str, Any]]) -> None:
    for frame in frames:
        kind = frame["type"]
        assert kind in ("error", "sent", "pong", "msg"), frame
        if kind == "error":
            assert frame["code"] in ERROR_CODES, frame


async def _one_after_auth(cluster: ClusterThread, item: Input) -> None:
    expect = expected_after_auth(item)
    user = _user("fuzz")
    nonce = os.urandom(8).hex()
    with trio.fail_after(EXAMPLE_TIMEOUT):
        async with login(cluster.url(0), cluster.token(user)) as client:
            frames, code = await _exchange(client, item, nonce)
            _check_server_frames(frames)
            errors = [f for f in frames if f["type"] == "error"]
            if expect is None:  # random bytes: closed 1007, or answered like a valid frame
                assert code in (None, 1007, 4001), (code, frames)
                return
            if expect.close is not None:
                assert code == expect.close, (expect, code, frames)
                if expect.close == 4001:
                    assert [e["code"] for e in errors] == ["auth_failed"], frames
                return
            assert code is None, (expect, code, frames)
            if expect.error is not None:
                assert [(e["code"], e.get("id")) for e in errors] == [
                    (expect.error, expect.error_id)
                ], (expect, frames)
            elif expect.send_id is not None:
                answers = [f for f in frames if f["type"] in ("sent", "error")]
                answer = answers[0] if answers else await client.answer(expect.send_id)
                assert answer.get("id") == expect.send_id, (answer, frames)
                assert answer["type"] == "sent" or answer["code"] in SEND_ERRORS, answer
                assert len(answers) <= 1, frames
            else:
                assert errors == [], (expect, frames)
            pongs = [f for f in frames if f["type"] == "pong"]
            assert len(pongs) == (2 if expect.pong else 1), (expect, frames)
            if expect.pong and isinstance(item.value, dict) and "data" in item.value:
                data = item.value["data"]
                echoed = cbor2.dumps(pongs[0]["data"])  # compared encoded: NaN != NaN
                assert echoed == cbor2.dumps(decode(cbor2.dumps(data))), (data, pongs[0])


async def _one_before_auth(cluster: ClusterThread, item: Input) -> None:
    expect = expected_before_auth(item)
    with trio.fail_after(EXAMPLE_TIMEOUT):
        async with connect(cluster.url(0)) as client:
            frames, code = await _exchange(client, item, os.urandom(8).hex())
    assert all(f["type"] == "error" and f["code"] in ERROR_CODES for f in frames), frames
    if expect is None:
        assert code in (1007, 4001), (code, frames)
    else:
        assert code == expect, (expect, code, frames)


FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ_SETTINGS
@given(item=inputs)
def test_fuzz_authenticated_connection(cluster: ClusterThread, item: Input) -> None:
    expect = expected_after_auth(item)
    event("random bytes" if expect is None else _describe(expect))
    trio.run(_one_after_auth, cluster, item)


@settings(FUZZ_SETTINGS, max_examples=60)
@given(item=inputs)
def test_fuzz_first_message_before_auth(cluster: ClusterThread, item: Input) -> None:
    event(f"close {expected_before_auth(item)}")
    trio.run(_one_before_auth, cluster, item)


def _describe(expect: Expect) -> str:
    if expect.close is not None:
        return f"close {expect.close}"
    if expect.error is not None:
        return f"error {expect.error}" + (" with id" if expect.error_id else "")
    return "send" if expect.send_id else "pong" if expect.pong else "silent"


async def test_the_edge_survives_the_fuzzing(cluster: ClusterThread) -> None:
    """Runs after the fuzz tests (file order): the edge lives, and a normal exchange works."""
    assert cluster.edge_alive(0), f"the edge died:\n{cluster.log(0)[-3000:]}"
    with trio.fail_after(20):
        alice, bob = _user("after-alice"), _user("after-bob")
        async with (
            login(cluster.url(0), cluster.token(alice)) as sender,
            login(cluster.url(0), cluster.token(bob), via="frame") as receiver,
        ):
            sent = await sender.send_message(bob, {"after": "fuzzing"})
            (msg,) = await receiver.messages(1)
            assert msg["mid"] == sent["mid"] and msg["body"] == {"after": "fuzzing"}
    assert cluster.edge_alive(0)
    assert "Traceback" not in cluster.log(0), cluster.log(0)[-5000:]
