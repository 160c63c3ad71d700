"""A bare PySyncObj node storing messages: the baseline of the core throughput figure.

    python -m benchmarks.raw_pysyncobj --self 127.0.0.1:A --partners 127.0.0.1:B,127.0.0.1:C \\
        --port P --data-dir D [--password S] [--pysyncobj-defaults]

Theory of operation
-------------------
One ``SyncObj`` with one ``@replicated`` method that appends a message to a
list: no batching of our own, no state machine, no checksummed journal.
By default it uses the PySyncObj settings Iris uses (``_raft.RaftHost._build``:
``appendEntriesUseBatch=False``, the same timeouts, tick period, compaction,
journal and dump files, Fernet ``password``), so the difference to Iris is
what Iris adds on top. PySyncObj's own journal never fsyncs (Iris's does), so
this baseline is *less* durable than Iris. ``--pysyncobj-defaults`` runs it
with PySyncObj's defaults instead (batched appends every 0.1 s).

Clients reach it on ``--port``: a request is a 4-byte big-endian length and
the message; each request is one replicated call, made with a callback, and
the answer is a 4-byte length and one status byte (0 = committed and
applied, else PySyncObj's ``FAIL_REASON``). A request whose body is ``?`` gets a JSON
status (``{"self", "leader", "is_leader", "log_len", "commit_idx"}``)
instead. Each connection has a reading thread; callbacks run on the tick
thread and write the answer under the connection's lock.

Prints ``ready {json}`` once the Raft port is bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import sys
import threading
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, replicated

_LEN = struct.Struct(">I")


class MessageStore(SyncObj):  # type: ignore[misc]
    def __init__(self, self_node: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_node, partners, conf)
        self.__messages: list[bytes] = []

    @replicated  # type: ignore[untyped-decorator]
    def store(self, message: bytes) -> int:
        self.__messages.append(message)
        return len(self.__messages)

    def stored(self) -> int:
        return len(self.__messages)


def iris_conf(data_dir: str, password: str | None) -> SyncObjConf:
    """PySyncObj settings of an Iris core (``_raft.RaftHost._build``, default RaftSettings)."""
    return SyncObjConf(
        password=password,
        appendEntriesUseBatch=False,
        autoTickPeriod=0.005,
        raftMinTimeout=0.15,
        raftMaxTimeout=0.3,
        appendEntriesPeriod=0.03,
        connectionTimeout=0.6,
        connectionRetryTime=0.1,
        leaderFallbackTimeout=1.0,
        commandsWaitLeader=False,
        journalFile=os.path.join(data_dir, "raft.journal"),
        fullDumpFile=os.path.join(data_dir, "raft.snapshot"),
        logCompactionMinEntries=2000,
        logCompactionMinTime=120.0,
        logCompactionSplit=True,
        dynamicMembershipChange=True,
    )


def default_conf(data_dir: str, password: str | None) -> SyncObjConf:
    """PySyncObj's defaults, with a journal and a dump so restarts keep data."""
    return SyncObjConf(
        password=password,
        journalFile=os.path.join(data_dir, "raft.journal"),
        fullDumpFile=os.path.join(data_dir, "raft.snapshot"),
    )


def _status(obj: MessageStore, self_node: str) -> dict[str, Any]:
    st = obj.getStatus()
    leader = st.get("leader")
    return {
        "self": self_node,
        "leader": None if leader is None else str(getattr(leader, "id", leader)),
        "is_leader": st.get("state") == 2,
        "log_len": st.get("log_len"),
        "commit_idx": st.get("commit_idx"),
        "stored": obj.stored(),
    }


def _serve_connection(obj: MessageStore, sock: socket.socket, self_node: str) -> None:
    lock = threading.Lock()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def answer(payload: bytes) -> None:
        with lock, contextlib.suppress(OSError):
            sock.sendall(_LEN.pack(len(payload)) + payload)

    def callback(res: Any, err: int) -> None:  # tick thread
        answer(bytes([err & 0xFF]))

    buf = bytearray()
    try:
        while True:
            data = sock.recv(262144)
            if not data:
                return
            buf += data
            pos = 0
            while len(buf) - pos >= 4:
                (length,) = _LEN.unpack_from(buf, pos)
                if len(buf) - pos - 4 < length:
                    break
                body = bytes(buf[pos + 4 : pos + 4 + length])
                pos += 4 + length
                if body == b"?":
                    answer(json.dumps(_status(obj, self_node)).encode())
                else:
                    obj.store(body, callback=callback)
            del buf[:pos]
    except OSError:
        return
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.raw_pysyncobj")
    p.add_argument("--self", dest="self_node", required=True)
    p.add_argument("--partners", required=True, help="other Raft addresses, comma-separated")
    p.add_argument("--port", type=int, required=True, help="client port on 127.0.0.1")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--password", default="")
    p.add_argument("--pysyncobj-defaults", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.data_dir, exist_ok=True)
    password = args.password or None
    make = default_conf if args.pysyncobj_defaults else iris_conf
    conf = make(args.data_dir, password)
    partners = [x for x in args.partners.split(",") if x]
    obj = MessageStore(args.self_node, partners, conf)
    obj.waitBinded()
    listener = socket.create_server(("127.0.0.1", args.port))
    print("ready " + json.dumps({"self": args.self_node, "port": args.port}), flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(
            target=_serve_connection, args=(obj, conn, args.self_node), daemon=True
        ).start()


if __name__ == "__main__":
    sys.exit(main())
