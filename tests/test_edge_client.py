"""The edge client (``iris_edge._client``) against real ``iris dev`` processes, plus its pure parts.

The first tests need no sockets: frame decoding, backoff, the dedup memory.
The others start ``python -m iris_edge dev`` (a core and an edge in one
process) on 127.0.0.1 and talk to it through :func:`open_iris`; the last one
runs ``examples/local_cluster.py`` (3 cores, 2 edges). Every process output is
kept in ``tmp_path``; every process is stopped when its test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import pytest
import trio

from iris_edge._auth import issue_token
from iris_edge._client import (
    AuthError,
    Backoff,
    ConnectFailed,
    FrameError,
    IrisClient,
    Message,
    RecentIds,
    SendTimeout,
    Sent,
    ServerError,
    Welcome,
    auth_error_for_close,
    decode_frame,
    open_iris,
)

ROOT = Path(__file__).resolve().parents[1]
IRIS = [sys.executable, "-m", "iris_edge"]
CLUSTER = ["--mode", "cp", "--users", "alice,bob"]

# ------------------------------------------------------------- no sockets


def test_decode_server_frames() -> None:
    msg = cbor2.dumps(
        {"type": "msg", "mid": "m1", "from": "alice", "body": {"k": [1, b"x"]}, "ts": 5}
    )
    assert decode_frame(msg) == Message("m1", "alice", {"k": [1, b"x"]}, 5)
    sent = cbor2.dumps({"type": "sent", "id": "i", "mid": "m", "ts": 7, "later": True})
    assert decode_frame(sent) == Sent("i", "m", 7)  # unknown keys are ignored
    welcome = cbor2.dumps({"type": "welcome", "user": "u", "session": "s", "edge": "e"})
    assert decode_frame(welcome) == Welcome("u", "s", "e")
    assert decode_frame(cbor2.dumps({"type": "error", "code": "inbox_full", "id": "i"})) == (
        ServerError("inbox_full", "i", None)
    )


@pytest.mark.parametrize(
    "data",
    [
        "text",  # a text WebSocket message
        b"\xff",  # not CBOR
        cbor2.dumps([1, 2]),  # not a map
        cbor2.dumps({"no": "type"}),
        cbor2.dumps({"type": "msg", "mid": "m", "from": "a", "body": 1}),  # no ts
        cbor2.dumps({"type": "sent", "id": "i", "mid": "m", "ts": "5"}),  # ts not an integer
        cbor2.dumps({"type": "pong"}) + b"\x00",  # trailing bytes
    ],
)
def test_decode_refuses_malformed_frames(data: bytes | str) -> None:
    with pytest.raises(FrameError):
        decode_frame(data)


def test_backoff_doubles_to_the_cap_with_jitter_and_resets() -> None:
    low = Backoff(0.1, 1.0, rng=lambda: 0.0)
    assert [round(low.next(), 3) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    high = Backoff(0.1, 1.0, rng=lambda: 1.0)
    assert [round(high.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    high.reset()
    assert high.next() == pytest.approx(0.1)


def test_recent_ids_forget_the_oldest() -> None:
    seen = RecentIds(3)
    for mid in ["a", "b", "c", "a", "d"]:  # "a" seen again: it becomes the newest
        seen.add(mid)
    assert "b" not in seen
    assert all(mid in seen for mid in "acd")
    assert len(seen) == 3


def test_auth_close_codes_end_the_client_others_reconnect() -> None:
    revoked = auth_error_for_close(4003, "token_revoked", "token revoked")
    assert revoked is not None
    assert (revoked.close_code, revoked.code) == (4003, "token_revoked")
    expired = auth_error_for_close(4002, None, None)
    assert expired is not None
    assert expired.code == "token_expired"
    for code in (1000, 1001, 1006, 1009, 4008):
        assert auth_error_for_close(code, "unavailable", None) is None


# ---------------------------------------------------------- real processes


@dataclass(eq=False)
class Output:
    """A process's merged stdout/stderr: copied to a log file, searchable while it runs."""

    process: trio.Process
    log_path: Path
    text: str = ""
    changed: trio.Event = field(default_factory=trio.Event)
    done: bool = False

    async def pump(self) -> None:
        assert self.process.stdout is not None
        with open(self.log_path, "a") as log:
            while True:
                try:
                    data = await self.process.stdout.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    data = b""
                chunk = data.decode(errors="replace")
                log.write(chunk)
                log.flush()
                self.text += chunk
                if not data:
                    self.done = True
                self.changed.set()
                self.changed = trio.Event()
                if not data:
                    return

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails if the process ends without one."""
        while True:
            match = re.search(pattern, self.text)
            if match is not None:
                return match
            if self.done:
                raise AssertionError(f"process ended without {pattern!r}:\n{self.text[-3000:]}")
            await self.changed.wait()


async def start_process(
    args: list[str], log_path: Path, nursery: trio.Nursery, cwd: Path = ROOT
) -> Output:
    process = await trio.lowlevel.open_process(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(cwd),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    output = Output(process, log_path)
    nursery.start_soon(output.pump)
    return output


async def stop_process(
    process: trio.Process, signum: int = signal.SIGTERM, grace: float = 10
) -> int:
    """Send ``signum``; SIGKILL after ``grace`` s; the exit code."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)
    with trio.move_on_after(grace):
        return await process.wait()
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    return await process.wait()


@dataclass(eq=False)
class Dev:
    """One ``iris dev`` process."""

    data_dir: Path
    url: str
    token: str
    output: Output

    def token_for(self, user: str) -> str:
        result = subprocess.run(
            [*IRIS, "token", "--data-dir", str(self.data_dir), "--user", user],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()

    def jwt_secret(self) -> str:
        return (self.data_dir / "jwt-secret").read_text().strip()

    async def stop(self) -> int:
        return await stop_process(self.output.process)


async def start_dev(tmp_path: Path, nursery: trio.Nursery, port: int = 0) -> Dev:
    """Start ``iris dev --data-dir tmp_path/data --port port`` (output read in ``nursery``)."""
    data_dir = tmp_path / "data"
    args = [*IRIS, "dev", "--data-dir", str(data_dir), "--port", str(port)]
    output = await start_process(args, tmp_path / "dev.log", nursery)
    try:
        url = (await output.wait_for(r"iris dev: connect to (\S+)")).group(1)
        token = (await output.wait_for(r"token for user 'dev-user' \(24 h\): (\S+)")).group(1)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stop_process(output.process)
        raise
    return Dev(data_dir, url, token, output)


@contextlib.asynccontextmanager
async def open_dev(tmp_path: Path, port: int = 0) -> AsyncIterator[Dev]:
    """An ``iris dev`` process for the duration of the block."""
    async with trio.open_nursery() as nursery:
        dev = await start_dev(tmp_path, nursery, port)
        try:
            yield dev
        finally:
            with trio.CancelScope(shield=True):
                await dev.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def next_message(client: IrisClient, timeout: float = 5.0) -> Message:
    with trio.fail_after(timeout):
        return await client.receive()


@pytest.mark.cluster
async def test_send_and_receive_between_two_users(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_dev(tmp_path) as dev:
            bob_token = dev.token_for("bob")
            async with open_iris(dev.url, dev.token) as alice, open_iris(dev.url, bob_token) as bob:
                assert (alice.user, bob.user) == ("dev-user", "bob")
                assert alice.session and alice.session != bob.session
                assert alice.edge == "dev-edge"
                body = {"text": "hello", "n": [1, -2, 3.5], "raw": b"\x00\xff", "none": None}
                sent = await alice.send("bob", body)
                assert isinstance(sent.ts, int)
                assert abs(sent.ts / 1000 - time.time()) < 60
                msg = await next_message(bob)
                assert msg == Message(sent.mid, "dev-user", body, sent.ts)
                await bob.ack(msg.mid)

                reply = await bob.send("dev-user", "hi back")
                got = await next_message(alice)
                assert (got.mid, got.sender, got.body) == (reply.mid, "bob", "hi back")

                # Many concurrent sends: answers are matched by id.
                results: dict[int, Sent] = {}

                async def send_one(i: int) -> None:
                    results[i] = await alice.send("bob", i)

                async with trio.open_nursery() as nursery:
                    for i in range(40):
                        nursery.start_soon(send_one, i)
                assert len({s.mid for s in results.values()}) == 40
                received: dict[int, str] = {}
                while len(received) < 40:
                    m = await next_message(bob)
                    received[m.body] = m.mid
                assert received == {i: s.mid for i, s in results.items()}
                assert await alice.ping() < 5


@pytest.mark.cluster
async def test_a_burst_over_the_rate_limit_is_retried_with_the_same_ids(tmp_path: Path) -> None:
    # The edge allows a burst of 200 sends, then 100/s: the rest get rate_limited (and,
    # after 50 in a row, close 4008); the client retries each with its id until sent.
    count = 300
    with trio.fail_after(40):
        async with (
            open_dev(tmp_path) as dev,
            open_iris(dev.url, dev.token, send_timeout=30, max_backoff=1) as alice,
            open_iris(dev.url, dev.token_for("bob")) as bob,
        ):
            results: dict[int, Sent] = {}

            async def send_one(i: int) -> None:
                results[i] = await alice.send("bob", i, id=f"burst-{i}")

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(send_one, i)
            assert alice.statistics().send_retries > 0
            assert len({sent.mid for sent in results.values()}) == count
            received: dict[int, str] = {}
            while len(received) < count:
                msg = await next_message(bob)
                assert msg.body not in received
                received[msg.body] = msg.mid
            assert received == {i: sent.mid for i, sent in results.items()}


@pytest.mark.cluster
async def test_same_id_twice_is_stored_and_delivered_once(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            open_dev(tmp_path) as dev,
            open_iris(dev.url, dev.token) as alice,
            open_iris(dev.url, dev.token_for("bob")) as bob,
        ):
            first = await alice.send("bob", "once", id="order-17")
            again = await alice.send("bob", "once", id="order-17")
            assert (again.mid, again.ts) == (first.mid, first.ts)
            later = await alice.send("bob", "later")
            assert (await next_message(bob)).mid == first.mid
            assert (await next_message(bob)).mid == later.mid  # "once" came once
            assert bob.statistics().duplicates_dropped == 0  # ... also on the wire


@pytest.mark.cluster
async def test_unacked_message_is_redelivered_and_dropped_as_a_repeat(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            open_dev(tmp_path) as dev,
            open_iris(dev.url, dev.token) as alice,
            open_iris(dev.url, dev.token_for("bob")) as bob,
        ):
            m1 = await alice.send("bob", "not acked")
            assert (await next_message(bob)).mid == m1.mid
            session = bob.session
            await bob.reconnect()
            assert bob.session != session
            m2 = await alice.send("bob", "after reconnect")
            # Same sender, same recipient: m1's redelivery comes before m2.
            assert (await next_message(bob)).mid == m2.mid
            stats = bob.statistics()
            assert (stats.connections, stats.duplicates_dropped) == (2, 1)
            assert stats.messages_received == 2


@pytest.mark.cluster
async def test_acked_message_is_not_redelivered(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_dev(tmp_path) as dev:
            bob_token = dev.token_for("bob")
            async with open_iris(dev.url, dev.token) as alice:
                async with open_iris(dev.url, bob_token) as bob:
                    m1 = await alice.send("bob", "acked")
                    assert (await next_message(bob)).mid == m1.mid
                    await bob.ack(m1.mid)
                # The connection closed right after the ack; the spec gives it 1 s to count.
                await trio.sleep(1.0)
                async with open_iris(dev.url, bob_token) as fresh_bob:  # no dedup memory
                    m2 = await alice.send("bob", "next")
                    assert (await next_message(fresh_bob)).mid == m2.mid


@pytest.mark.cluster
async def test_refused_tokens_end_the_client(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_dev(tmp_path) as dev:
            with pytest.raises(AuthError) as bad:
                async with open_iris(dev.url, "not-a-token"):
                    pass
            assert (bad.value.close_code, bad.value.code) == (4001, "auth_failed")

            expired = issue_token(dev.jwt_secret(), "bob", ttl=60, now=time.time() - 3600)
            with pytest.raises(AuthError) as late:
                async with open_iris(dev.url, expired):
                    pass
            assert (late.value.close_code, late.value.code) == (4001, "token_expired")

            wrong_path = dev.url.rsplit("/", 1)[0] + "/nope"
            with pytest.raises(ConnectFailed):
                async with open_iris(wrong_path, dev.token):
                    pass

            # A refresh for the same user keeps the connection; for another user it ends it.
            async with open_iris(dev.url, dev.token_for("bob")) as bob:
                await bob.refresh(dev.token_for("bob"))
                await bob.ping()
                assert bob.statistics().connections == 1
                await bob.refresh(dev.token_for("mallory"))
                with pytest.raises(AuthError) as other:
                    await bob.receive()
                assert (other.value.close_code, other.value.code) == (4001, "auth_failed")
                with pytest.raises(AuthError):
                    await bob.send("dev-user", "after the end")
                assert bob.statistics().connections == 1  # no reconnect loop


@pytest.mark.cluster
async def test_client_survives_a_server_restart(tmp_path: Path) -> None:
    port = free_port()
    started: list[Dev] = []
    with trio.fail_after(50):
        async with trio.open_nursery() as nursery:
            try:
                started.append(dev := await start_dev(tmp_path, nursery, port))
                carol_token = dev.token_for("carol")
                async with (
                    open_iris(dev.url, dev.token, max_backoff=0.5, send_timeout=30) as alice,
                    open_iris(dev.url, dev.token_for("bob"), max_backoff=0.5) as bob,
                    open_iris(dev.url, dev.token_for("bob"), send_timeout=1) as quick_bob,
                ):
                    stored = await alice.send("carol", "stored before the restart")
                    assert await dev.stop() == 0  # SIGTERM: the edge drains, closes with 1001
                    with pytest.raises(SendTimeout) as down:
                        await quick_bob.send("carol", "never sent")
                    assert not down.value.may_be_stored  # no attempt reached a server
                    during: list[Sent] = []
                    done = trio.Event()

                    async def send_while_down() -> None:
                        during.append(await alice.send("bob", "sent while down"))
                        done.set()

                    nursery.start_soon(send_while_down)
                    started.append(dev := await start_dev(tmp_path, nursery, port))  # same data
                    msg = await next_message(bob, timeout=30)
                    await done.wait()
                    assert (msg.mid, msg.body) == (during[0].mid, "sent while down")
                    stats = (alice.statistics().connections, bob.statistics().connections)
                    assert stats == (2, 2)
                    async with open_iris(dev.url, carol_token) as carol:
                        got = await next_message(carol)
                        assert (got.mid, got.body) == (stored.mid, "stored before the restart")
            finally:
                with trio.CancelScope(shield=True):
                    for server in started:
                        await server.stop()


@pytest.mark.cluster
async def test_local_cluster_example(tmp_path: Path) -> None:
    base = tmp_path / "cluster"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            output = await start_process(
                [sys.executable, "examples/local_cluster.py", *("--base-dir", str(base)), *CLUSTER],
                tmp_path / "local_cluster.log",
                nursery,
            )
            try:
                ready = json.loads(
                    (await output.wait_for(r"local_cluster ready (\{.*\})")).group(1)
                )
                edge0, edge1 = ready["edges"]
                tokens = ready["tokens"]
                async with (
                    open_iris(edge0, tokens["alice"]) as alice,
                    open_iris(edge1, tokens["bob"]) as bob,
                ):
                    assert alice.edge != bob.edge
                    sent = await alice.send("bob", {"across": "edges"})
                    msg = await next_message(bob)
                    assert (msg.mid, msg.sender, msg.body) == (
                        sent.mid,
                        "alice",
                        {"across": "edges"},
                    )
                    await bob.ack(msg.mid)
                    back = await bob.send("alice", "back")
                    assert (await next_message(alice)).mid == back.mid

                    # Revoking bob's tokens closes his connection with 4003: the client ends.
                    revoke = await trio.run_process(
                        [*IRIS, "revoke", "--config", str(base / "core-0.toml"), "--user", "bob"],
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                    )
                    assert revoke.returncode == 0, revoke.stderr.decode()
                    # The CLI exits after the revocation is acknowledged; the spec then gives
                    # the edges 1 s (+0.5 s for this test's own scheduling).
                    with trio.fail_after(1.5), pytest.raises(AuthError) as revoked:
                        await bob.receive()
                    assert (revoked.value.close_code, revoked.value.code) == (4003, "token_revoked")
                    assert bob.statistics().connections == 1
                pids = ready["pids"]
                assert len(pids) == 5
                assert await stop_process(output.process, signal.SIGINT, grace=30) == 0
                await output.wait_for("local_cluster: stopped")
            finally:
                with trio.CancelScope(shield=True):
                    await stop_process(output.process)
    assert not [pid for pid in pids if _alive(pid)]
    assert not _processes_mentioning(str(base))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in cmdline:
                    found.append(cmdline)
    return found
