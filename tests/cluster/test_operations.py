"""Operator paths against real core processes: join, status, backup/restore, subscriptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio
from jepsen_like.cluster import CoreProcess, allocate_ports, open_cluster

import iris_raft
from iris_raft import MessageEvent, Resync

pytestmark = pytest.mark.cluster


def _iris(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iris_raft", *args], capture_output=True, text=True, timeout=60
    )


async def _wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(interval)


async def test_join_a_fourth_core_and_status_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(90):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            async with iris_raft.open_client(
                cluster.rpc_addresses, secret=cluster.secret
            ) as client:
                await client.send("alice", "before-join", "bob", b"1")
                raft, rpc = allocate_ports(2)
                new = CoreProcess(
                    3,
                    f"127.0.0.1:{raft}",
                    f"127.0.0.1:{rpc}",
                    str(tmp_path / "core-3"),
                    str(tmp_path / "core-3.toml"),
                    str(tmp_path / "core-3.log"),
                )
                os.makedirs(new.data_dir)
                cluster.cores.append(new)
                cluster.write_configs()
                result = await trio.to_thread.run_sync(
                    _iris, "join", "--config", cluster.cores[0].config_path, "--node", new.node
                )
                assert result.returncode == 0, result.stderr
                await cluster.start(3)

                async def caught_up():  # type: ignore[no-untyped-def]
                    st = (await cluster.statuses())[3]
                    return st if st and st["state"]["messages"] == 1 and st["leader"] else None

                status = await _wait_for(caught_up)
                assert len(status["nodes"]) == 4
                await client.send("alice", "after-join", "bob", b"2")
                assert [m.body for m in await client.fetch_inbox("bob")] == [b"1", b"2"]

                # The JSON status names the leader, mode, safety and every node.
                result = await trio.to_thread.run_sync(
                    _iris, "status", "--config", cluster.cores[3].config_path, "--json"
                )
                assert result.returncode == 0, result.stderr
                doc = json.loads(result.stdout)
                assert doc["mode"] == "cp"
                assert doc["leader"] in cluster.raft_nodes
                assert doc["safe_for_writes"] is True
                assert {n["node"] for n in doc["nodes"]} == set(cluster.raft_nodes)
                for n in doc["nodes"]:
                    assert set(n) >= {"node", "rpc", "reachable", "state"}


async def test_backup_then_restore_whole_cluster(tmp_path) -> None:  # type: ignore[no-untyped-def]
    backup = str(tmp_path / "cluster.iris-backup")
    with trio.fail_after(120):
        async with open_cluster(str(tmp_path / "run"), nodes=3, mode="cp") as cluster:
            async with iris_raft.open_client(
                cluster.rpc_addresses, secret=cluster.secret
            ) as client:
                for i in range(20):
                    await client.send("alice", f"m{i}", "bob", f"body {i}".encode())
                await client.revoke_user("mallory")
                await client.put("k", "v")
            result = await trio.to_thread.run_sync(
                _iris, "backup", "--config", cluster.cores[0].config_path, "--out", backup
            )
            assert result.returncode == 0, result.stderr
            assert "20 messages" in result.stdout

            # Writes after the backup are gone after the restore.
            async with iris_raft.open_client(
                cluster.rpc_addresses, secret=cluster.secret
            ) as client:
                await client.send("alice", "late", "bob", b"late")
            for i in range(3):
                await cluster.stop(i)
            for core in cluster.cores:
                result = await trio.to_thread.run_sync(
                    _iris, "restore", "--config", core.config_path, "--from", backup
                )
                assert result.returncode == 0, result.stderr
                assert "moved aside" in result.stdout
            for i in range(3):
                await cluster.start(i)
            await cluster.wait_leader()
            async with iris_raft.open_client(
                cluster.rpc_addresses, secret=cluster.secret
            ) as client:
                inbox = await client.fetch_inbox("bob")
                assert [m.body for m in inbox] == [f"body {i}".encode() for i in range(20)]
                assert await client.is_revoked("mallory", "any-jti", 0)
                assert await client.get("k") == "v"
                # Dedup survived the restore: a retry of m0 is a duplicate.
                again = await client.send("alice", "m0", "bob", b"body 0")
                assert again.duplicate
                await client.send("alice", "new", "bob", b"new")
            for index in range(3):
                sts = await cluster.statuses()
                assert sts[index] is not None

            async def converged():  # type: ignore[no-untyped-def]
                sts = await cluster.statuses()
                counts = {s["state"]["messages"] for s in sts if s}
                return counts == {21}

            await _wait_for(converged)


async def test_corrupt_backup_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.backup"
    path.write_bytes(b"IRISBAK1" + os.urandom(200))
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[cluster]\nsecret = "0123456789abcdef0123456789abcdef!!"\n'
        'expected_cluster_nodes = ["127.0.0.1:27001"]\nreplication_factor = 1\n'
        f'[core]\nnode = "127.0.0.1:27001"\ndata_dir = "{tmp_path / "d"}"\n'
    )
    cfg.chmod(0o600)
    result = _iris("restore", "--config", str(cfg), "--from", str(path))
    assert result.returncode == 3
    assert str(path) in result.stderr
    assert not (tmp_path / "d").exists()


async def test_subscription_survives_a_core_kill(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """At-least-once across a core failover: refetch after Resync closes the gap."""
    with trio.fail_after(90):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            async with iris_raft.open_client(
                cluster.rpc_addresses, secret=cluster.secret
            ) as client:
                sub = client.subscribe(["bob"])
                seen: set[str] = set()
                resyncs = 0

                async def consume() -> None:
                    nonlocal resyncs
                    async for ev in sub:
                        if isinstance(ev, Resync):
                            resyncs += 1
                            for m in await client.fetch_inbox("bob"):
                                seen.add(m.mid)
                        elif isinstance(ev, MessageEvent):
                            seen.add(ev.message.mid)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consume)
                    await _wait_for(_async_const(lambda: resyncs >= 1 and sub.connected_to))
                    sent = [await client.send("alice", f"a{i}", "bob", b"x") for i in range(10)]
                    victim = cluster.rpc_addresses.index(sub.connected_to)
                    await cluster.kill(victim)
                    for i in range(10, 30):
                        while True:
                            try:
                                sent.append(await client.send("alice", f"a{i}", "bob", b"x"))
                                break
                            except (iris_raft.UnknownOutcome, iris_raft.Unavailable):
                                continue
                    await _wait_for(_async_const(lambda: resyncs >= 2))
                    await _wait_for(_async_const(lambda: {s.mid for s in sent} <= seen))
                    nursery.cancel_scope.cancel()
                assert sub.connected_to != cluster.rpc_addresses[victim]


def _async_const(fn):  # type: ignore[no-untyped-def]
    async def check():  # type: ignore[no-untyped-def]
        return fn()

    return check
