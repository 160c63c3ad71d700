"""Send coalescing against real core processes, in both modes.

* ``send_batch`` answers each item on its own: valid items are stored, a bad
  recipient, a malformed item, a body that is not bytes and an inbox over its
  cap get their own error; checks run in item order, each item seeing the
  ones accepted before it (a batch that overfills an inbox stores exactly up
  to the cap). A repeated ``(sender, client_id)`` within one batch or across
  batches is a duplicate with the first mid, stored once.
* Many concurrent ``Client.send`` calls through one client travel as a few
  ``send_batch`` calls and are all stored exactly once under the mid each
  caller was given; a caller cancelled while its batch is in flight does not
  disturb the others.
* ``Client.ack_many`` acks many users' messages in one ``ack_batch`` call;
  a malformed entry refuses the whole call before anything is written.
* A core without ``send_batch``/``ack_batch`` (an older version, played by an
  in-process RPC server that forwards everything else to a real core) gets
  single ``send`` and ``ack`` calls from the client.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster_helpers import converged_inboxes, core_call, open_cluster, secret_of
from jepsen_like.cluster import LocalCluster

import iris_raft
from iris_raft import BadRequest, SendResult
from iris_raft._rpc import RpcServerConnection, open_rpc_connection, serve_rpc

pytestmark = pytest.mark.cluster

CAP = 50  # max_inbox_messages of these clusters


def _error(answer: Any) -> str:
    assert isinstance(answer, dict) and set(answer) == {"e"}, answer
    code: str = answer["e"]["code"]
    return code


def _ok(answer: Any) -> dict[str, Any]:
    assert isinstance(answer, dict) and set(answer) == {"mid", "ts", "duplicate"}, answer
    return answer


async def _raw_batches(cluster: LocalCluster, core: int) -> None:
    items: list[Any] = [
        ["s", "ok-1", "box-a", b"1"],
        ["s", "bad-to", "", b"x"],  # empty recipient
        "not an item",
        ["s", "str-body", "box-a", "text"],  # body must be bytes
        ["s", "ok-2", "box-a", b"2"],
        ["s", "ok-1", "box-a", b"1 again"],  # same (sender, client_id) as item 0
        ["s", "short"],  # wrong length
    ]
    items += [["s", f"fill-{i}", "box-full", b"f"] for i in range(CAP + 10)]
    (r,) = (await core_call(cluster, core, "send_batch", {"items": items})).values()
    assert len(r) == len(items)
    first = _ok(r[0])
    assert first["duplicate"] is False
    assert [_error(r[i]) for i in (1, 2, 3, 6)] == ["bad_request"] * 4
    assert r[3]["e"]["data"] == {"field": "body"}
    assert _ok(r[4])["duplicate"] is False
    assert _ok(r[5]) == {**first, "duplicate": True}
    fill = r[7:]
    assert all(_ok(a)["duplicate"] is False for a in fill[:CAP])
    assert [_error(a) for a in fill[CAP:]] == ["inbox_full"] * 10

    # Across batches: the same ids again are duplicates with the first mids.
    again = await core_call(
        cluster, core, "send_batch", {"items": [["s", "ok-2", "box-a", b"2"], items[0]]}
    )
    assert again["r"] == [{**r[4], "duplicate": True}, {**first, "duplicate": True}]

    # The call itself is refused only when ``items`` is unusable.
    for bad in ({"items": "x"}, {}, {"items": [items[0]] * 1001}):
        with pytest.raises(BadRequest):
            await core_call(cluster, core, "send_batch", bad)

    inboxes = await converged_inboxes(cluster, ["box-a", "box-full"])
    assert [(m.mid, bytes(m.body)) for m in inboxes["box-a"]] == [
        (first["mid"], b"1"),
        (r[4]["mid"], b"2"),
    ]
    assert [m.mid for m in inboxes["box-full"]] == [a["mid"] for a in fill[:CAP]]


async def _many_through_one_client(cluster: LocalCluster) -> None:
    users = [f"many-{u}" for u in range(10)]
    acked: dict[str, SendResult] = {}
    async with iris_raft.open_client(cluster.rpc_addresses, secret=cluster.secret) as client:
        await client.status()

        async def one(i: int) -> None:
            cid = f"m-{i}"
            acked[cid] = await client.send(f"sender-{i % 7}", cid, users[i % 10], cid.encode())

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, i)
        assert client.send_batches.items >= 300
        assert client.send_batches.calls < 30  # coalesced, not one call per send

        # A caller cancelled while its batch is in flight: the others carry on.
        calls_before = client.send_batches.calls
        cancel = trio.CancelScope()

        async def cancelled() -> None:
            with cancel:
                await client.send("sender-x", "gone", users[0], b"gone")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancelled)
            for i in range(300, 340):
                nursery.start_soon(one, i)
            while client.send_batches.calls == calls_before:
                await trio.sleep(0)
            cancel.cancel()
        assert len(acked) == 340
        # The client is still fine afterwards.
        acked["after"] = await client.send("sender-0", "after", users[1], b"after")

    inboxes = await converged_inboxes(cluster, users)
    stored = Counter(bytes(m.body).decode() for box in inboxes.values() for m in box)
    assert stored["gone"] <= 1  # its outcome is unknown to its caller
    del stored["gone"]
    assert stored == Counter(acked.keys()), "every acknowledged send stored exactly once"
    mids = {bytes(m.body).decode(): m.mid for box in inboxes.values() for m in box}
    assert {c: a.mid for c, a in acked.items()} == {c: mids[c] for c in acked}


async def _acks_in_one_call(cluster: LocalCluster, core: int) -> None:
    users = ["ack-a", "ack-b", "ack-c"]
    async with iris_raft.open_client(cluster.rpc_addresses, secret=cluster.secret) as client:
        sent = {
            (u, i): await client.send("acker", f"{u}-{i}", u, b"x") for u in users for i in range(3)
        }
        for bad in (
            {"acks": [["ack-a", [sent["ack-a", 0].mid], "op-1"], ["ack-b", "not a list", "op"]]},
            {"acks": [["ack-a", [sent["ack-a", 0].mid]]]},
            {"acks": "x"},
        ):
            with pytest.raises(BadRequest):
                await core_call(cluster, core, "ack_batch", bad)
        await client.ack_many(
            {
                "ack-a": [sent["ack-a", 0].mid, sent["ack-a", 1].mid],
                "ack-b": [sent["ack-b", 2].mid, "no-such-mid"],
                "ack-c": [],
            }
        )
    inboxes = await converged_inboxes(cluster, users)
    assert [m.mid for m in inboxes["ack-a"]] == [sent["ack-a", 2].mid]  # nothing from bad calls
    assert [m.mid for m in inboxes["ack-b"]] == [sent["ack-b", i].mid for i in (0, 1)]
    assert len(inboxes["ack-c"]) == 3


@pytest.mark.parametrize("mode", ["cp", "hardened_ap"])
async def test_send_batch_and_client_coalescing(tmp_path: Path, mode: str) -> None:
    with trio.fail_after(120):
        async with open_cluster(
            str(tmp_path), nodes=3, mode=mode, cluster_options={"max_inbox_messages": CAP}
        ) as cluster:
            leader = await cluster.wait_leader()
            await _raw_batches(cluster, leader)
            await _many_through_one_client(cluster)
            await _acks_in_one_call(cluster, leader)


async def test_a_core_without_batch_methods_gets_single_calls(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            leader = await cluster.wait_leader()
            seen: Counter[str] = Counter()
            async with (
                open_rpc_connection(cluster.cores[leader].rpc, secret=secret_of(cluster)) as up,
                trio.open_nursery() as nursery,
            ):

                async def old_core(
                    conn: RpcServerConnection, method: str, p: dict[str, Any]
                ) -> Any:
                    seen[method] += 1
                    if method in ("send_batch", "ack_batch"):  # what an older core answers
                        raise BadRequest(f"unknown method {method!r}")
                    return await up.call(method, p, timeout=5)

                listeners = await nursery.start(
                    partial(serve_rpc, old_core, "127.0.0.1", 0, secret=secret_of(cluster))
                )
                old = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
                async with iris_raft.open_client(
                    [old], secret=cluster.secret, prefer_leader=False
                ) as client:
                    await client.status()
                    results: dict[str, SendResult] = {}

                    async def one(i: int) -> None:
                        results[f"o-{i}"] = await client.send("old", f"o-{i}", "old-box", b"o")

                    async with trio.open_nursery() as senders:
                        for i in range(50):
                            senders.start_soon(one, i)
                    assert client.connected_to == old
                    mids = sorted(r.mid for r in results.values())
                    await client.ack_many({"old-box": mids[:10], "other": ["none"]})
                    await client.ack_many({"old-box": mids[10:20]})
                nursery.cancel_scope.cancel()
            assert 1 <= seen["send_batch"] <= 4
            assert seen["send"] == 50
            assert (seen["ack_batch"], seen["ack"]) == (1, 3)  # asked once, then single acks
            inbox = (await converged_inboxes(cluster, ["old-box"]))["old-box"]
            assert sorted(m.mid for m in inbox) == mids[20:]
