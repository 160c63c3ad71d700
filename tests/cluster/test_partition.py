"""Network partitions through the per-link proxies (``proxies=True``).

``cp``: the isolated core (a follower, or the leader) must notice within ~3 s
(``safe_for_writes`` false), never acknowledge a write, and never answer a
linearizable read (neither the old value nor the new one the majority
committed meanwhile); after the heal it catches up. A write it refused with
``unavailable`` must never appear later.

``hardened_ap``: the isolated core blocks writes with ``write_blocked`` and
keeps serving stale local reads while the majority accepts writes; after the
heal every core converges, and a write the isolated core acknowledged from its
WAL before its guard noticed the partition is not lost.

And a frozen (SIGSTOP) ``cp`` leader, deposed meanwhile, must not answer a
stale read the instant it resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cluster_helpers import (
    converged_inboxes,
    core_call,
    core_status,
    open_cluster,
    secret_of,
    wait_identical_state,
    wait_safe,
    wait_until,
)

from iris_raft import IrisError, Unavailable, UnknownOutcome, WriteBlocked
from iris_raft._rpc import open_rpc_connection

pytestmark = pytest.mark.cluster

#: The guard's detect_after is 1 s; the brief allows ~3 s to report the partition.
DETECT_WITHIN = 3.0
INBOX = "part-inbox"


def _send_params(client_id: str) -> dict[str, Any]:
    return {"sender": "part", "client_id": client_id, "to": INBOX, "body": client_id.encode()}


async def _outcome(
    cluster: Any, index: int, method: str, params: dict[str, Any], timeout: float
) -> Any:
    """``("ok", result)`` or ``("error", exception)`` of one raw call to core ``index``."""
    try:
        return ("ok", await core_call(cluster, index, method, params, timeout=timeout))
    except IrisError as exc:
        return ("error", exc)


def _assert_failed(
    outcome: Any, allowed: tuple[type[BaseException], ...], what: str
) -> BaseException:
    kind, value = outcome
    assert kind == "error", f"{what} succeeded on the isolated core: {value!r}"
    assert isinstance(value, allowed), f"{what} failed with {value!r}, expected one of {allowed}"
    return value  # type: ignore[no-any-return]


async def _local_get(cluster: Any, index: int, key: str) -> Any:
    return await core_call(cluster, index, "get", {"key": key, "linearizable": False})


async def _wait_all_local(cluster: Any, indexes: list[int], key: str, value: Any) -> None:
    async def probe() -> bool:
        return all([await _local_get(cluster, i, key) == value for i in indexes])

    await wait_until(probe, timeout=10, what=f"{key} == {value!r} locally on cores {indexes}")


@pytest.mark.parametrize("victim", ["follower", "leader"])
async def test_cp_isolated_core_refuses_writes_and_linearizable_reads(
    tmp_path: Path, victim: str
) -> None:
    with trio.fail_after(90):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp", proxies=True) as cluster:
            assert cluster.links is not None
            leader = await cluster.wait_leader()
            x = leader if victim == "leader" else (leader + 1) % 3
            majority = [i for i in range(3) if i != x]
            await core_call(
                cluster, leader, "put", {"key": "k", "value": "old", "op_id": "put-old"}
            )
            for i in range(3):
                assert (
                    await core_call(cluster, i, "get", {"key": "k", "linearizable": True}) == "old"
                )

            cluster.links.isolate(cluster.cores[x].node)
            isolated_at = trio.current_time()
            early: dict[str, Any] = {}

            async def early_call(name: str, method: str, params: dict[str, Any]) -> None:
                early[name] = await _outcome(cluster, x, method, params, timeout=2.5)

            # Sent at once, before the guard notices: still no majority, so no success.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(early_call, "send", "send", _send_params("early"))
                nursery.start_soon(early_call, "get", "get", {"key": "k", "linearizable": True})
                nursery.start_soon(early_call, "fetch", "fetch", {"user": INBOX})
                await wait_safe(cluster, x, False, DETECT_WITHIN)
                assert trio.current_time() - isolated_at <= DETECT_WITHIN + 0.5
            _assert_failed(early["send"], (UnknownOutcome, Unavailable), "an early send")
            _assert_failed(early["get"], (UnknownOutcome, Unavailable), "an early linearizable get")
            _assert_failed(early["fetch"], (UnknownOutcome, Unavailable), "an early fetch")

            # The majority elects (or keeps) a leader and commits a new value.
            new_leader = await cluster.wait_leader(exclude=[x], timeout=10)
            assert new_leader in majority
            await core_call(
                cluster, new_leader, "put", {"key": "k", "value": "new", "op_id": "put-new"}
            )
            for i in majority:
                assert (
                    await core_call(cluster, i, "get", {"key": "k", "linearizable": True}) == "new"
                )

            # Canary: the isolated core does hold the stale value (an explicit local
            # read shows it), so only the read barrier keeps it from being served.
            assert await _local_get(cluster, x, "k") == "old"
            # The isolated core: writes and linearizable reads fail fast, never stale.
            refused = []
            for n in range(3):
                err = _assert_failed(
                    await _outcome(cluster, x, "send", _send_params(f"refused-{n}"), timeout=2.5),
                    (Unavailable, UnknownOutcome),
                    "a send",
                )
                if isinstance(err, Unavailable):
                    refused.append(f"refused-{n}")
            _assert_failed(
                await _outcome(
                    cluster, x, "put", {"key": "k", "value": "minority", "op_id": "put-min"}, 2.5
                ),
                (Unavailable, UnknownOutcome),
                "a put",
            )
            for params in ({"key": "k", "linearizable": True}, {"key": "k"}):
                _assert_failed(
                    await _outcome(cluster, x, "get", params, timeout=2.5),
                    (Unavailable, UnknownOutcome),
                    f"get {params}",
                )
            _assert_failed(
                await _outcome(cluster, x, "fetch", {"user": INBOX}, timeout=2.5),
                (Unavailable, UnknownOutcome),
                "a fetch (linearizable in cp)",
            )
            status = await core_status(cluster, x)
            assert status["safe_for_writes"] is False
            assert status["partition_state"] != "safe"

            cluster.links.heal()

            async def caught_up() -> bool:
                try:
                    value = await core_call(
                        cluster, x, "get", {"key": "k", "linearizable": True}, timeout=2
                    )
                except (Unavailable, UnknownOutcome):
                    return False
                # After "new" was committed, a successful linearizable read must see it.
                assert value == "new", f"isolated core returned {value!r} after the heal"
                return True

            await wait_until(caught_up, timeout=15, what="the healed core to read the new value")
            await wait_safe(cluster, x, True, 5)

            inboxes = await converged_inboxes(cluster, [INBOX])
            bodies = [bytes(m.body).decode() for m in inboxes[INBOX]]
            assert len(bodies) == len(set(bodies)), bodies
            assert not set(refused) & set(bodies), (
                f"sends answered 'unavailable' (definitely not applied) were applied later: "
                f"{sorted(set(refused) & set(bodies))}"
            )
            assert set(bodies) <= {"early", "refused-0", "refused-1", "refused-2"}
            await wait_identical_state(cluster)


@pytest.mark.parametrize("victim", ["follower", "leader"])
async def test_hardened_ap_isolated_core_blocks_writes_and_serves_stale_reads(
    tmp_path: Path, victim: str
) -> None:
    with trio.fail_after(90):
        async with open_cluster(
            str(tmp_path), nodes=3, mode="hardened_ap", proxies=True
        ) as cluster:
            assert cluster.links is not None
            leader = await cluster.wait_leader()
            x = leader if victim == "leader" else (leader + 1) % 3
            majority = [i for i in range(3) if i != x]
            await core_call(
                cluster, leader, "put", {"key": "k", "value": "old", "op_id": "put-old"}
            )
            await _wait_all_local(cluster, [0, 1, 2], "k", "old")

            cluster.links.isolate(cluster.cores[x].node)
            isolated_at = trio.current_time()
            # Before its guard notices, the isolated core may still acknowledge from
            # its WAL (or already block); an acknowledged send must survive the heal.
            early = await _outcome(cluster, x, "send", _send_params("early"), timeout=2.5)
            if early[0] == "error":
                assert isinstance(early[1], WriteBlocked | UnknownOutcome), early
            await wait_safe(
                cluster, x, False, max(0.1, DETECT_WITHIN - (trio.current_time() - isolated_at))
            )

            blocked = _assert_failed(
                await _outcome(cluster, x, "send", _send_params("blocked"), timeout=2.5),
                (WriteBlocked,),
                "a send",
            )
            assert blocked.code == "write_blocked"
            _assert_failed(
                await _outcome(
                    cluster, x, "put", {"key": "k", "value": "minority", "op_id": "put-min"}, 2.5
                ),
                (WriteBlocked,),
                "a put",
            )

            # The majority keeps accepting writes (acknowledged from its WALs, drained
            # once it has a leader).
            await core_call(
                cluster, majority[0], "put", {"key": "k", "value": "new", "op_id": "put-new"}
            )
            majority_sends = []
            for n, i in enumerate(majority * 3):
                result = await core_call(cluster, i, "send", _send_params(f"majority-{n}"))
                assert result["duplicate"] is False
                majority_sends.append((f"majority-{n}", result["mid"]))
            await _wait_all_local(cluster, majority, "k", "new")

            # The isolated core serves its stale local value.
            assert await _local_get(cluster, x, "k") == "old"
            assert await core_call(cluster, x, "get", {"key": "k"}) == "old"
            stale_inbox = await core_call(cluster, x, "fetch", {"user": INBOX})
            assert not {m[0] for m in stale_inbox} & {mid for _, mid in majority_sends}
            assert (await core_status(cluster, x))["safe_for_writes"] is False

            cluster.links.heal()
            await wait_safe(cluster, x, True, 10)
            inboxes = await converged_inboxes(cluster, [INBOX])
            stored = {bytes(m.body).decode(): m.mid for m in inboxes[INBOX]}
            assert len(stored) == len(inboxes[INBOX]), "a client id stored twice"
            for client_id, mid in majority_sends:
                assert stored.get(client_id) == mid, (client_id, mid, stored)
            if early[0] == "ok":
                assert stored.get("early") == early[1]["mid"], (early, stored)
            assert "blocked" not in stored
            await _wait_all_local(cluster, [0, 1, 2], "k", "new")
            await wait_identical_state(cluster)


async def test_cp_paused_old_leader_serves_no_stale_read_on_resume(tmp_path: Path) -> None:
    """A leader frozen (SIGSTOP) while the others elect a new one and commit "new".

    Requests queued on its RPC connection are handled the instant it resumes,
    while it still believes it leads and its guard still says "safe" (both were
    last updated before the pause): a linearizable read must then fail or
    return "new", never "old" (the classic stale read of a deposed leader).
    """
    with trio.fail_after(60):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            old = await cluster.wait_leader()
            await core_call(cluster, old, "put", {"key": "k", "value": "old", "op_id": "put-old"})
            async with open_rpc_connection(
                cluster.cores[old].rpc, secret=secret_of(cluster), connect_timeout=2
            ) as conn:
                cluster.pause(old)
                try:
                    new = await cluster.wait_leader(exclude=[old], timeout=10)
                    await core_call(
                        cluster, new, "put", {"key": "k", "value": "new", "op_id": "put-new"}
                    )
                    outcomes: dict[str, Any] = {}

                    async def queued(name: str, method: str, params: dict[str, Any]) -> None:
                        try:
                            outcomes[name] = ("ok", await conn.call(method, params, timeout=6))
                        except IrisError as exc:
                            outcomes[name] = ("error", exc)

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(queued, "lin", "get", {"key": "k", "linearizable": True})
                        nursery.start_soon(queued, "default", "get", {"key": "k"})
                        nursery.start_soon(queued, "send", "send", _send_params("paused"))
                        # Every task blocked = the three requests are written and awaited.
                        await trio.testing.wait_all_tasks_blocked()
                        cluster.resume(old)
                finally:
                    cluster.resume(old)
            for name in ("lin", "default"):
                kind, value = outcomes[name]
                if kind == "ok":
                    assert value == "new", f"{name} read on the deposed leader returned {value!r}"
                else:
                    assert isinstance(value, Unavailable | UnknownOutcome), (name, value)
            kind, value = outcomes["send"]
            if kind == "error":
                assert isinstance(value, Unavailable | UnknownOutcome), value
            inboxes = await converged_inboxes(cluster, [INBOX])
            stored = {bytes(m.body).decode(): m.mid for m in inboxes[INBOX]}
            if kind == "ok":
                assert stored == {"paused": value["mid"]}, (value, stored)
            else:
                assert set(stored) <= {"paused"}
            await wait_identical_state(cluster)
