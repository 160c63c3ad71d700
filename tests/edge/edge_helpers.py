"""Shared machinery for the edge conformance tests (``protocol-v1.md`` against real processes).

Theory of operation
-------------------
``jepsen_like.cluster.open_cluster`` is a trio async context manager, but
pytest-trio only has function-scoped async fixtures and a module should
start its cluster once. So :class:`ClusterThread` runs ``open_cluster`` in
its own ``trio.run`` on a background thread; a SYNC module-scoped fixture
starts it (waiting on the cores' and edges' ready lines, never on a sleep)
and stops it in its finalizer, which kills every process. Tests reach the
cluster's async operations (``kill``, ``restart``, ``stop_edge``) through
:meth:`ClusterThread.acall` (from a test's trio loop) or
:meth:`ClusterThread.call` (from sync code, e.g. Hypothesis tests).

The WebSocket client side is :class:`Client`: a thin layer over
trio-websocket that encodes and decodes CBOR frames, keeps frames it was
not waiting for (``msg`` frames arriving while a test waits for ``sent``),
and turns the end of a connection into its close code.

Every test uses its own user names (:func:`unique`), so tests sharing a
cluster do not see each other's messages.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from jepsen_like.cluster import LocalCluster, open_cluster  # noqa: E402

SUBPROTOCOL = "iris.v1"
IRIS = [sys.executable, "-m", "iris_edge"]
#: Every error code of ``protocol-v1.md``.
ERROR_CODES = frozenset(
    {
        "bad_frame",
        "unknown_type",
        "not_authenticated",
        "auth_failed",
        "token_expired",
        "token_revoked",
        "too_large",
        "bad_request",
        "rate_limited",
        "inbox_full",
        "write_blocked",
        "unavailable",
        "internal",
    }
)

T = TypeVar("T")
_counter = itertools.count()


def unique(prefix: str) -> str:
    """A user name (or id) no other test uses."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{time.monotonic_ns() % 10**9}"


# --------------------------------------------------------------- clusters


class ClusterThread:
    """A :class:`LocalCluster` served by its own trio loop on a background thread."""

    def __init__(self, base_dir: Path, **options: Any) -> None:
        self.base_dir = base_dir
        self.options = options
        self._cluster: LocalCluster | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="iris-cluster", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start() / close(), never lost in the thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with open_cluster(str(self.base_dir), **self.options) as cluster:
            self._cluster = cluster
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

    def start(self, timeout: float = 60.0) -> ClusterThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the cluster did not start within {timeout} s")
        if self._error is not None:
            error, self._error = self._error, None  # reported here, not again by close()
            raise RuntimeError(f"the cluster did not start: {error!r}") from error
        return self

    def close(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(60)
        if self._error is not None and not isinstance(self._error, KeyboardInterrupt):
            raise RuntimeError(f"the cluster thread failed: {self._error!r}") from self._error

    @property
    def cluster(self) -> LocalCluster:
        assert self._cluster is not None, "the cluster is not running"
        return self._cluster

    def call(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await afn(*args)`` in the cluster's loop (from a thread without a trio loop)."""
        assert self._token is not None
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    async def acall(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await afn(*args)`` in the cluster's loop, from a test's own trio loop."""
        return await trio.to_thread.run_sync(self.call, afn, *args)

    def url(self, edge: int = 0) -> str:
        return self.cluster.edges[edge].url

    def token(self, user: str, *, ttl: float = 3600, jti: str | None = None) -> str:
        return self.cluster.token(user, ttl=ttl, jti=jti)

    @property
    def jwt_secret(self) -> str:
        return self.cluster.jwt_secret

    def edge_alive(self, edge: int = 0) -> bool:
        return self.cluster.edges[edge].running

    def log(self, edge: int = 0) -> str:
        with open(self.cluster.edges[edge].log_path, errors="replace") as f:
            return f.read()

    async def revoke(self, *, jti: str | None = None, user: str | None = None) -> None:
        """``iris revoke`` (the CLI, as an operator runs it) by ``jti`` or by ``user``."""
        args = ["--jti", jti] if jti is not None else ["--user", str(user)]
        result = await trio.run_process(
            [*IRIS, "revoke", "--config", self.cluster.cores[0].config_path, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")


@contextlib.contextmanager
def running_cluster(base_dir: Path, **options: Any) -> Iterator[ClusterThread]:
    """Start a cluster (``open_cluster`` options) on a thread; stop it, whatever happens."""
    handle = ClusterThread(base_dir, **options)
    try:
        yield handle.start()
    finally:
        handle.close()


# ----------------------------------------------------------------- client


class _OpaqueTags(Mapping[int, Callable[[Any, bool], Any]]):
    """cbor2 ``semantic_decoders`` keeping every tag as ``CBORTag``: a client that interprets none.

    (cbor2 would turn tag 1 into a datetime, and refuses a tag 2 around text.)
    """

    _KNOWN = (0, 1, 2, 3, 4, 5, 24, 25, 28, 29, 30, 35, 36, 37, 52, 54, 256, 258, 260, 261)

    def __getitem__(self, tag: int) -> Callable[[Any, bool], Any]:
        if not isinstance(tag, int):
            raise KeyError(tag)
        return lambda value, immutable: cbor2.CBORTag(tag, value)

    def __iter__(self) -> Iterator[int]:
        return iter(self._KNOWN)

    def __len__(self) -> int:
        return len(self._KNOWN)


_OPAQUE = _OpaqueTags()


def decode(data: bytes) -> Any:
    """One CBOR item as a client that interprets no tags sees it."""
    return cbor2.loads(data, semantic_decoders=_OPAQUE)


class Closed(Exception):
    """The connection ended while a frame was awaited."""

    def __init__(self, code: int | None, frames: list[dict[str, Any]]) -> None:
        super().__init__(f"connection closed with {code} after {frames!r}")
        self.code = code
        self.frames = frames


class Client:
    """One WebSocket connection speaking CBOR frames."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        #: Frames received but not yet consumed by a test (oldest first).
        self.stash: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] | None = None

    async def send(self, frame: dict[str, Any] | bytes | str) -> None:
        data = cbor2.dumps(frame) if isinstance(frame, dict) else frame
        await self.ws.send_message(data)

    async def recv_raw(self) -> bytes:
        """The next WebSocket message as it came (raises :class:`Closed`)."""
        try:
            data = await self.ws.get_message()
        except ConnectionClosed as exc:
            raise Closed(exc.reason.code if exc.reason else None, []) from None
        assert isinstance(data, bytes), f"the server sent a text message: {data!r}"
        return data

    async def recv(self) -> dict[str, Any]:
        """The next frame (stashed ones first); every server frame is one CBOR map with a type."""
        if self.stash:
            return self.stash.pop(0)
        frame = decode(await self.recv_raw())
        assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
        return frame

    async def expect(self, type_: str, **fields: Any) -> dict[str, Any]:
        """The very next frame, which must be of ``type_`` with these fields."""
        frame = await self.recv()
        assert frame["type"] == type_, f"expected {type_} {fields}, got {frame}"
        for key, value in fields.items():
            assert frame.get(key) == value, f"expected {key}={value!r} in {frame}"
        return frame

    async def wait_for(self, type_: str, **fields: Any) -> dict[str, Any]:
        """The first frame of ``type_`` with these fields; frames passed over stay stashed."""
        return await self.wait_for_any((type_,), **fields)

    async def wait_for_any(self, types: tuple[str, ...], **fields: Any) -> dict[str, Any]:
        """The first frame of one of ``types`` with these fields; others stay stashed."""
        for i, frame in enumerate(self.stash):
            if _matches(frame, types, fields):
                return self.stash.pop(i)
        while True:
            try:
                frame = decode(await self.recv_raw())
            except Closed as exc:
                raise Closed(exc.code, list(self.stash)) from None
            assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
            if _matches(frame, types, fields):
                return frame
            self.stash.append(frame)

    async def messages(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` ``msg`` frames (other frames stay stashed)."""
        return [await self.wait_for("msg") for _ in range(count)]

    async def send_message(self, to: str, body: Any, id: str | None = None) -> dict[str, Any]:
        """Send and wait for its ``sent`` (an ``error`` for this id fails the test)."""
        id = id or unique("id")
        await self.send({"type": "send", "id": id, "to": to, "body": body})
        return await self.answer(id, "sent")

    async def answer(self, id: str, type_: str | None = None) -> dict[str, Any]:
        """The ``sent`` or ``error`` frame answering the send ``id`` (of ``type_`` if given)."""
        frame = await self.wait_for_any(("sent", "error"), id=id)
        if type_ is not None:
            assert frame["type"] == type_, f"send {id}: expected {type_}, got {frame}"
        return frame

    async def ping(self, data: Any = None) -> dict[str, Any]:
        await self.send({"type": "ping", "data": data})
        return await self.wait_for("pong")

    async def ack(self, mids: list[str]) -> None:
        await self.send({"type": "ack", "mids": mids})

    async def closed(self) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the connection ends: its close code and every frame received first."""
        frames, self.stash = list(self.stash), []
        while True:
            try:
                frames.append(decode(await self.recv_raw()))
            except Closed as exc:
                return exc.code, frames

    async def expect_close(self, code: int, error: str | None = None) -> list[dict[str, Any]]:
        """The connection closes with ``code``; with ``error``, that error frame came first."""
        got, frames = await self.closed()
        errors = [f["code"] for f in frames if f.get("type") == "error"]
        assert got == code, f"expected close {code}, got {got} after {frames}"
        if error is not None:
            assert error in errors, f"expected error {error!r} before close {code}, got {frames}"
        return frames


def _matches(frame: dict[str, Any], types: tuple[str, ...], fields: dict[str, Any]) -> bool:
    return frame.get("type") in types and all(frame.get(k) == v for k, v in fields.items())


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Bearer " + token.encode())]


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = None,
    via: str = "header",
    subprotocols: tuple[str, ...] | None = (SUBPROTOCOL,),
    headers: list[tuple[bytes, bytes]] | None = None,
    **kwargs: Any,
) -> AsyncIterator[Client]:
    """A WebSocket connection; with ``token``, presented in the header or the first frame."""
    extra = list(headers or [])
    if token is not None and via == "header":
        extra += bearer(token)
    kwargs.setdefault("connect_timeout", 10)
    kwargs.setdefault("disconnect_timeout", 3)
    async with contextlib.AsyncExitStack() as stack:
        ws = await stack.enter_async_context(
            open_websocket_url(
                url,
                subprotocols=list(subprotocols) if subprotocols else None,
                extra_headers=extra,
                **kwargs,
            )
        )
        # trio-websocket 0.12 never closes a client's socket when the *server*
        # closed the WebSocket (its reader stops at EOF; aclose() returns early),
        # which leaks a ResourceWarning: close the stream ourselves, last.
        stack.push_async_callback(_close_stream, ws)
        client = Client(ws)
        if token is not None and via == "frame":
            await client.send({"type": "auth", "token": token})
        yield client


async def _close_stream(ws: WebSocketConnection) -> None:
    with trio.CancelScope(shield=True), contextlib.suppress(Exception):
        await ws._stream.aclose()


@contextlib.asynccontextmanager
async def login(
    url: str, token: str, *, via: str = "header", **kwargs: Any
) -> AsyncIterator[Client]:
    """An authenticated connection: ``welcome`` has been received (kept in ``client.welcome``)."""
    async with connect(url, token=token, via=via, **kwargs) as client:
        client.welcome = await client.expect("welcome")
        yield client


class RawWebSocket:
    """A WebSocket client written by hand over TCP: a client that really never reads.

    (trio-websocket's client always reads in the background, and cannot exit
    while a message it read waits for the application.) After the handshake
    nothing is read until :meth:`read_all`, which returns the raw bytes.
    """

    def __init__(self, stream: trio.SocketStream, pending: bytes) -> None:
        self.stream = stream
        self.pending = pending

    @classmethod
    async def connect(cls, url: str, token: str) -> RawWebSocket:
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        await stream.send_all(request.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed during the handshake: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(stream, rest)

    async def read_all(self, timeout: float) -> bytes:
        """What the server sent, until a whole close frame, TCP EOF or ``timeout``."""
        data = bytearray(self.pending)
        with trio.move_on_after(timeout):
            while True:
                chunk = await self.stream.receive_some(1 << 20)
                if not chunk:
                    break
                data += chunk
                frames, _ = parse_server_frames(bytes(data))
                if any(opcode == 0x8 for opcode, _ in frames):
                    break
        return bytes(data)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.stream.aclose()


def parse_server_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Unmasked WebSocket frames (opcode, payload) in ``data``, and the bytes of a cut last frame."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            return frames, data[pos:]
        opcode, length, start = data[pos] & 0x0F, data[pos + 1] & 0x7F, pos + 2
        if length >= 126:
            size = 2 if length == 126 else 8
            length = int.from_bytes(data[start : start + size], "big")
            start += size
        if start + length > len(data):
            return frames, data[pos:]
        frames.append((opcode, data[start : start + length]))
        pos = start + length
    return frames, b""


# ------------------------------------------------------------- processes


def start_dev(
    data_dir: Path, port: int, log: Path, timeout: float = 30.0
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start ``iris dev`` and wait for its ``connect to`` and token lines: (process, url, token)."""
    out = open(log, "ab")  # noqa: SIM115 -- handed to the child, closed below
    proc = subprocess.Popen(
        [*IRIS, "dev", "--data-dir", str(data_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=out,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    out.close()
    assert proc.stdout is not None
    url = token = None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    # A reader thread: readline() on the pipe would block past the deadline.
    got: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # the pipe closed by stop_process()
            for raw in proc.stdout:
                got.append(raw)
                if b"a token for user" in raw:
                    done.set()
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    done.wait(max(0.0, deadline - time.monotonic()))
    for raw in got:
        line = raw.decode(errors="replace").strip()
        lines.append(line)
        if line.startswith("iris dev: connect to "):
            url = line.removeprefix("iris dev: connect to ").strip()
        elif line.startswith("iris dev: a token for user"):
            token = line.rsplit(" ", 1)[1]
    if url is None or token is None:
        stop_process(proc)
        raise RuntimeError(
            f"iris dev did not get ready: {lines!r}\n{log.read_text(errors='replace')}"
        )
    return proc, url, token


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0
) -> int:
    """Send ``sig``, wait (SIGKILL after ``timeout``); the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode
