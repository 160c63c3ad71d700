"""Revocation ends live connections on every edge (``protocol-v1.md``: close 4003 within 1 s).

``iris revoke`` (the CLI an operator runs, against a core) revokes by
``--jti`` or by ``--user``; the user is connected on both edges. The time
from the command's return to each close is measured and must be < 1 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import trio
from edge_helpers import Client, Closed, ClusterThread, connect, login, running_cluster, unique

from iris_edge._auth import issue_token

pytestmark = pytest.mark.cluster

BOUND = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterThread]:
    with running_cluster(tmp_path_factory.mktemp("revoke"), nodes=3, edges=2, mode="cp") as c:
        yield c


async def revoke_and_time_the_closes(
    cluster: ClusterThread, victims: list[Client], **revoke: str
) -> list[tuple[int | None, float]]:
    """Run the revoke CLI; each victim's close code and its delay after the CLI returned."""
    closed_at: list[tuple[int | None, float]] = [(None, 0.0)] * len(victims)

    async def watch(i: int) -> None:
        code = None
        try:
            while True:
                await victims[i].recv()
        except Closed as exc:
            code = exc.code
        closed_at[i] = (code, trio.current_time())

    async with trio.open_nursery() as nursery:
        for i in range(len(victims)):
            nursery.start_soon(watch, i)
        await cluster.revoke(**revoke)
        returned = trio.current_time()
    return [(code, at - returned) for code, at in closed_at]


async def test_revoke_by_jti_closes_the_token_on_every_edge(cluster: ClusterThread) -> None:
    user = unique("victim")
    jti = unique("jti")
    token = cluster.token(user, jti=jti)
    with trio.fail_after(30):
        async with (
            login(cluster.url(0), token) as on_edge_0,
            login(cluster.url(1), token) as on_edge_1,
            login(cluster.url(1), cluster.token(user)) as other_token,
            login(cluster.url(0), cluster.token(unique("bystander"))) as bystander,
        ):
            closes = await revoke_and_time_the_closes(cluster, [on_edge_0, on_edge_1], jti=jti)
            # Another token of the same user, and other users, are not affected.
            assert (await other_token.ping("ok"))["data"] == "ok"
            assert (await bystander.ping("ok"))["data"] == "ok"
        for edge in (0, 1):
            async with connect(cluster.url(edge), token=token) as client:
                await client.expect_close(4001, "token_revoked")
    for code, delay in closes:
        assert code == 4003, closes
        assert delay < BOUND, f"closed {delay:.3f} s after the revocation was acknowledged"


async def test_revoke_by_user_closes_every_token_issued_before(cluster: ClusterThread) -> None:
    user = unique("victim")
    first, second = cluster.token(user), cluster.token(user)
    with trio.fail_after(30):
        async with (
            login(cluster.url(0), first) as on_edge_0,
            login(cluster.url(1), second) as on_edge_1,
            login(cluster.url(1), first) as again_on_edge_1,
            login(cluster.url(0), cluster.token(unique("bystander"))) as bystander,
        ):
            victims = [on_edge_0, on_edge_1, again_on_edge_1]
            closes = await revoke_and_time_the_closes(cluster, victims, user=user)
            assert (await bystander.ping("ok"))["data"] == "ok"
        for token in (first, second):
            for edge in (0, 1):
                async with connect(cluster.url(edge), token=token, via="frame") as client:
                    await client.expect_close(4001, "token_revoked")
        # A token issued after the cut-off works (iat in whole seconds: make it the next one).
        fresh = issue_token(cluster.jwt_secret, user, ttl=600, now=time.time() + 2)
        async with login(cluster.url(1), fresh) as client:
            assert client.welcome is not None and client.welcome["user"] == user
    for code, delay in closes:
        assert code == 4003, closes
        assert delay < BOUND, f"closed {delay:.3f} s after the revocation was acknowledged"


async def test_refresh_with_a_revoked_token_is_refused(cluster: ClusterThread) -> None:
    user = unique("victim")
    jti = unique("jti")
    revoked = cluster.token(user, jti=jti)
    with trio.fail_after(30):
        await cluster.revoke(jti=jti)
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send({"type": "auth", "token": revoked})
            code, frames = await client.closed()
    assert code in (4001, 4003), (code, frames)
    assert [f["code"] for f in frames if f["type"] == "error"] == ["token_revoked"], frames
