"""Token expiry on a live connection (``protocol-v1.md``: close 4002; refresh).

The edges run with ``jwt_leeway = 0`` so a token can expire within seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import jwt
import pytest
import trio
from edge_helpers import ClusterThread, connect, login, running_cluster, unique

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterThread]:
    with running_cluster(
        tmp_path_factory.mktemp("expiry"),
        nodes=3,
        edges=1,
        mode="cp",
        edge_options={"jwt_leeway": 0},
    ) as c:
        yield c


def short_token(cluster: ClusterThread, user: str, seconds: float) -> tuple[str, int]:
    """A token whose ``exp`` is ``seconds`` (at least) from now; the token and its ``exp``."""
    exp = int(time.time() + seconds) + 1
    claims = {"sub": user, "iat": int(time.time()), "exp": exp, "jti": unique("jti")}
    return jwt.encode(claims, cluster.jwt_secret, algorithm="HS256"), exp


async def test_connection_closes_4002_when_the_token_expires(cluster: ClusterThread) -> None:
    user = unique("expiring")
    token, exp = short_token(cluster, user, 1.5)
    with trio.fail_after(15):
        async with login(cluster.url(0), token) as client:
            frames = await client.expect_close(4002)
            closed_at = time.time()
    assert exp <= closed_at < exp + 2.0, f"closed {closed_at - exp:+.2f} s after exp"
    assert all(f.get("type") == "error" and f["code"] == "token_expired" for f in frames), frames


async def test_refresh_extends_the_connection_past_the_old_expiry(cluster: ClusterThread) -> None:
    user = unique("refreshing")
    token, exp = short_token(cluster, user, 1.5)
    with trio.fail_after(15):
        async with login(cluster.url(0), token) as client:
            await client.send({"type": "auth", "token": cluster.token(user, ttl=3600)})
            assert (await client.ping(1))["data"] == 1
            # Let the old token's expiry pass (a moment in time, not an event to wait for).
            await trio.sleep(max(0.0, exp - time.time()) + 1.0)
            assert (await client.ping(2))["data"] == 2
            assert client.stash == []


async def test_refresh_with_another_short_token_moves_the_deadline(cluster: ClusterThread) -> None:
    user = unique("refreshing")
    first, first_exp = short_token(cluster, user, 1.0)
    second, second_exp = short_token(cluster, user, 3.0)
    assert second_exp >= first_exp + 2
    with trio.fail_after(15):
        async with login(cluster.url(0), first) as client:
            await client.send({"type": "auth", "token": second})
            await client.expect_close(4002)
            closed_at = time.time()
    assert second_exp <= closed_at < second_exp + 2.0, (
        f"closed {closed_at - second_exp:+.2f} s after exp"
    )


async def test_without_leeway_a_just_expired_token_is_refused(cluster: ClusterThread) -> None:
    user = unique("late")
    now = int(time.time())
    token = jwt.encode(
        {"sub": user, "iat": now - 60, "exp": now - 1, "jti": unique("jti")},
        cluster.jwt_secret,
        algorithm="HS256",
    )
    with trio.fail_after(10):
        async with connect(cluster.url(0), token=token) as client:
            await client.expect_close(4001, "token_expired")
