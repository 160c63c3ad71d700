"""Bad input against real core processes.

* A bad configuration: ``iris core`` exits with code 2 and names the key.
* A wrong cluster secret on the RPC port: ``AuthFailed``; the core keeps
  serving clients that have the right one.
* A corrupt Raft journal (cp) or WAL segment (hardened_ap) of a stopped core:
  the restart exits with code 3 naming the file; with ``allow_table_nuke``
  the file is moved aside (``*.corrupt-*``) and the core catches up from its
  peers.
* The Raft port already in use: the core exits non-zero with a clear message.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster_helpers import (
    converged_inboxes,
    core_status,
    flip_byte,
    open_cluster,
    secret_of,
    set_core_option,
    wait_identical_state,
    wait_until,
)
from jepsen_like.cluster import SECRET, LocalCluster, allocate_ports, write_toml

import iris_raft
from iris_raft import AuthFailed
from iris_raft._rpc import open_rpc_connection

pytestmark = pytest.mark.cluster

EXIT_CONFIG = 2
EXIT_CORRUPT = 3
INBOX = "bad-inbox"


# ------------------------------------------------------------ configuration


def _config(tmp_path: Path, cluster: dict[str, Any], core: dict[str, Any]) -> Path:
    *rafts, rpc = (f"127.0.0.1:{p}" for p in allocate_ports(4))
    tables = {
        "cluster": {
            "secret": SECRET,
            "expected_cluster_nodes": rafts,
            "consistency_mode": "cp",
            **cluster,
        },
        "core": {"node": rafts[0], "rpc": rpc, "data_dir": str(tmp_path / "data"), **core},
    }
    for table in tables.values():
        for key in [k for k, v in table.items() if v is _DROP]:
            del table[key]
    path = tmp_path / "core.toml"
    write_toml(str(path), tables)
    return path


_DROP = object()


@pytest.mark.parametrize(
    ("cluster", "core", "key"),
    [
        ({"consistency_mode": "bogus"}, {}, "cluster.consistency_mode"),
        ({"secret": _DROP}, {}, "cluster.secret"),
        ({"secret": "too-short"}, {}, "cluster.secret"),
        (
            {},
            {"election_timeout_min": 0.5, "election_timeout_max": 0.2},
            "core.election_timeout_max",
        ),
    ],
    ids=["bogus-mode", "missing-secret", "short-secret", "election-timeouts"],
)
async def test_bad_config_exits_2_naming_the_key(
    tmp_path: Path, cluster: dict[str, Any], core: dict[str, Any], key: str
) -> None:
    config = _config(tmp_path, cluster, core)
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "iris_raft", "core", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = result.stderr.decode(errors="replace")
    assert result.returncode == EXIT_CONFIG, (result.returncode, err[-2000:])
    assert key in err, err[-2000:]
    assert "iris core ready" not in result.stdout.decode(errors="replace")
    if "secret" in cluster and cluster["secret"] is not _DROP:
        assert cluster["secret"] not in err, "the secret value was echoed"


# ------------------------------------------------------------------- auth


async def test_wrong_secret_is_refused_and_good_clients_keep_working(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            await cluster.wait_leader()
            address = cluster.cores[0].rpc
            for wrong in (b"x" * 40, None):
                with pytest.raises(AuthFailed):
                    async with open_rpc_connection(
                        address, secret=wrong, connect_timeout=2
                    ) as conn:
                        await conn.call("status", {}, timeout=2)
            # Garbage instead of a handshake: the server drops it and keeps serving.
            with trio.socket.socket() as sock:
                host, _, port = address.rpartition(":")
                await sock.connect((host, int(port)))
                await sock.send(b"\xff" * 4096)
            status = await core_status(cluster, 0)
            assert status["node"] == cluster.cores[0].node
            async with iris_raft.open_client([address], secret=cluster.secret, timeout=5) as client:
                sent = await client.send("auth", "c-1", INBOX, b"still serving")
                assert [m.mid for m in await client.fetch_inbox(INBOX)] == [sent.mid]
            assert cluster.cores[0].running


# ------------------------------------------------------------- corruption


async def _acked_sends(
    cluster: LocalCluster, index: int, prefix: str, count: int
) -> dict[str, str]:
    """``count`` sends through core ``index`` only; client id -> acknowledged mid."""
    acked: dict[str, str] = {}
    async with open_rpc_connection(cluster.cores[index].rpc, secret=secret_of(cluster)) as conn:
        for n in range(count):
            cid = f"{prefix}-{n}"
            params = {"sender": "bad", "client_id": cid, "to": INBOX, "body": cid.encode()}
            acked[cid] = (await conn.call("send", params, timeout=5))["mid"]
    return acked


async def _start_fails(cluster: LocalCluster, index: int) -> tuple[int, str]:
    with pytest.raises(RuntimeError, match="before it was ready"):
        await cluster.start(index, timeout=30)
    proc = cluster.cores[index].process
    assert proc is not None
    code = await proc.wait()
    return code, cluster.tail(index, 60)


def _assert_all_present(inboxes: dict[str, list[Any]], acked: dict[str, str]) -> None:
    stored = {bytes(m.body).decode(): m.mid for m in inboxes[INBOX]}
    assert len(stored) == len(inboxes[INBOX]), "a client id stored twice"
    missing = {c: mid for c, mid in acked.items() if stored.get(c) != mid}
    assert not missing, (
        f"acknowledged sends missing or under another mid: {sorted(missing.items())[:10]}"
    )


async def test_corrupt_journal_stops_the_core_unless_nuke_allowed(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            leader = await cluster.wait_leader()
            victim = (leader + 1) % 3
            acked = await _acked_sends(cluster, leader, "before", 150)
            await cluster.kill(victim)
            journal = Path(cluster.cores[victim].data_dir) / "raft" / "raft.journal"
            flip_byte(journal)

            code, log = await _start_fails(cluster, victim)
            assert code == EXIT_CORRUPT, log
            assert str(journal) in log, log

            # The survivors go on; the victim must catch up with these too.
            acked |= await _acked_sends(cluster, leader, "while-down", 50)
            set_core_option(cluster, victim, "allow_table_nuke", "true")
            await cluster.start(victim)
            aside = list(journal.parent.glob("raft.journal.corrupt-*"))
            assert aside, sorted(p.name for p in journal.parent.iterdir())
            inboxes = await converged_inboxes(cluster, [INBOX])
            _assert_all_present(inboxes, acked)
            assert len(inboxes[INBOX]) == len(acked)
            await wait_identical_state(cluster)


async def test_corrupt_wal_segment_stops_the_core_unless_nuke_allowed(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_cluster(str(tmp_path), nodes=3, mode="hardened_ap") as cluster:
            leader = await cluster.wait_leader()
            victim = (leader + 1) % 3
            acked = await _acked_sends(cluster, victim, "through-victim", 150)

            async def drained() -> bool:
                return (await core_status(cluster, victim))["wal_backlog"] == 0

            await wait_until(drained, timeout=10, what="the victim's WAL to drain")
            await cluster.kill(victim)
            wal = Path(cluster.cores[victim].data_dir) / "wal"
            segments = sorted(wal.glob("wal-*.log"), key=lambda p: p.stat().st_size)
            assert segments, sorted(p.name for p in wal.iterdir())
            segment = segments[-1]
            flip_byte(segment)

            code, log = await _start_fails(cluster, victim)
            assert code == EXIT_CORRUPT, log
            assert str(segment) in log, log

            acked |= await _acked_sends(cluster, leader, "while-down", 50)
            set_core_option(cluster, victim, "allow_table_nuke", "true")
            await cluster.start(victim)
            assert list(wal.glob(segment.name + ".corrupt-*")), sorted(
                p.name for p in wal.iterdir()
            )
            inboxes = await converged_inboxes(cluster, [INBOX])
            _assert_all_present(inboxes, acked)
            assert len(inboxes[INBOX]) == len(acked)
            await wait_identical_state(cluster)


# ------------------------------------------------------------------ ports


async def test_raft_port_in_use_exits_with_a_clear_message(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            await cluster.wait_leader()
            victim = 2
            await cluster.kill(victim)
            host, _, port = cluster.cores[victim].node.rpartition(":")
            with socket.socket() as squatter:
                # The dead core's connections linger in TIME_WAIT on that port; a
                # listener with SO_REUSEADDR still excludes every other bind on Linux.
                squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                squatter.bind((host, int(port)))
                squatter.listen()
                code, log = await _start_fails(cluster, victim)
            assert code != 0
            assert code == 4, log
            assert "cannot bind the Raft port" in log and cluster.cores[victim].node in log, log
            # Once the port is free again the core starts and rejoins.
            await cluster.start(victim)

            async def rejoined() -> bool:
                st = await core_status(cluster, victim)
                return bool(st["safe_for_writes"] and st["leader"])

            await wait_until(rejoined, timeout=10, what="the core to rejoin")
