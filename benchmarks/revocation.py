"""Revocation acknowledged -> every affected connection closed (4003), across 2 edges.

What is measured
----------------
3 cores (``hardened_ap``) and 2 edges, real processes. Before the clock
starts, ``benchmarks.wsload`` opens, on *each* edge, ``PER_EDGE``
connections for every user that will be revoked (all connections of a user
share one token, so one ``jti``), plus ``BYSTANDERS`` connections per edge of
users nobody revokes.

Then, one user per round, this process revokes through the in-process core
client (``iris_raft.open_client``): on even rounds every token of the user
(``revoke_user``, the cut-off is "now"), on odd rounds the user's token by
its ``jti`` (``revoke_token``). The revocation is acknowledged when the call
returns (the core committed it); the load processes record, with the same
``time.monotonic()`` clock, when each connection received its close frame
and with which code. A sample is *close time - acknowledgement time* for one
affected connection (it can be slightly negative: an edge may close before
the acknowledgement reaches this process). Every affected connection must
close with 4003 and no bystander may close.
"""

from __future__ import annotations

import os
import time
from typing import Any

import trio

from benchmarks._common import Options, figure, percentile, series, summarize
from benchmarks._wsdriver import open_load

#: Connections per revoked user on each edge.
PER_EDGE = 10
SMOKE_PER_EDGE = 4
#: Revocations (one user each); split into ``opts.runs`` groups for the spread.
ROUNDS = 60
SMOKE_ROUNDS = 6
#: Connections per edge of users that are never revoked.
BYSTANDERS = 200
SMOKE_BYSTANDERS = 20
#: Longest wait for the affected connections of one round to close.
ROUND_TIMEOUT = 5.0
PAUSE = 0.1
TARGET_P99_MS = 200.0
EDGES = 2


async def run(opts: Options) -> dict[str, Any]:
    from jepsen_like.cluster import open_cluster

    from iris_raft import open_client

    per_edge = SMOKE_PER_EDGE if opts.smoke else PER_EDGE
    rounds = SMOKE_ROUNDS if opts.smoke else ROUNDS
    bystanders = SMOKE_BYSTANDERS if opts.smoke else BYSTANDERS
    base = os.path.join(opts.work_dir, "cluster")
    os.makedirs(base, exist_ok=True)
    tag = os.urandom(3).hex()
    victims = [f"v-{tag}-{r}" for r in range(rounds)]
    jti = {u: f"jti-{u}" for u in victims}
    samples: list[float] = []  # ms, ack -> close
    ack_ms: list[float] = []  # ms, request -> ack
    per_round: list[dict[str, Any]] = []
    wrong_codes: dict[int, int] = {}
    missing = 0
    async with open_cluster(base, nodes=3, mode="hardened_ap", edges=EDGES) as cluster:
        await cluster.wait_leader()
        urls = [e.url for e in cluster.edges]
        async with open_load(opts.work_dir, EDGES, name="wsload-revoke") as load:
            # Process i holds the connections to edge i.
            users: list[str] = []
            conn_urls: list[str] = []
            jtis: list[str | None] = []
            split: list[int] = []
            for e, url in enumerate(urls):
                count = 0
                for u in victims:
                    for _ in range(per_edge):
                        users.append(u)
                        conn_urls.append(url)
                        jtis.append(jti[u])
                        count += 1
                for b in range(bystanders):
                    users.append(f"b-{tag}-{e}-{b}")
                    conn_urls.append(url)
                    jtis.append(None)
                    count += 1
                split.append(count)
            opened = await load.connect(
                conn_urls,
                users,
                role="idle",
                jtis=jtis,
                jwt_secret=cluster.jwt_secret,
                split=split,
            )
            if opened["failed"]:
                raise RuntimeError(f"connections failed: {opened}")
            total_open = opened["open"]
            async with open_client(cluster.rpc_addresses, secret=cluster.secret) as client:
                await client.status()
                for r, user in enumerate(victims):
                    expected = per_edge * EDGES
                    t_req = time.monotonic()
                    if r % 2 == 0:
                        await client.revoke_user(user)
                        how = "user"
                    else:
                        exp_ms = int((time.time() + 7 * 3600) * 1000)
                        await client.revoke_token(jti[user], exp_ms)
                        how = "jti"
                    t_ack = time.monotonic()
                    ack_ms.append((t_ack - t_req) * 1000)
                    got: list[list[Any]] = []
                    deadline = trio.current_time() + ROUND_TIMEOUT
                    while trio.current_time() < deadline:
                        got.extend(await load.closes())
                        if sum(1 for c in got if c[0] == user) >= expected:
                            break
                        await trio.sleep(0.02)
                    mine = [c for c in got if c[0] == user]
                    others = [c for c in got if c[0] != user]
                    delays = [(t - t_ack) * 1000 for _u, t, _code in mine]
                    for _u, _t, code in mine:
                        if code != 4003:
                            wrong_codes[code] = wrong_codes.get(code, 0) + 1
                    if others:
                        for _u, _t, code in others:
                            wrong_codes[code] = wrong_codes.get(code, 0) + 1
                    missing += max(0, expected - len(mine))
                    samples.extend(delays)
                    per_round.append(
                        {
                            "user": user,
                            "how": how,
                            "ack_ms": ack_ms[-1],
                            "closed": len(mine),
                            "expected": expected,
                            "max_ms": max(delays) if delays else None,
                            "delays_ms": delays,
                            "unexpected": len(others),
                        }
                    )
                    await trio.sleep(PAUSE)
            still_open = await load.open_count()
    expected_open = total_open - rounds * per_edge * EDGES
    groups = max(1, min(opts.runs, rounds))
    group_p99 = []
    for g in range(groups):
        chunk = [d for pr in per_round[g::groups] for d in pr["delays_ms"]]
        if chunk:
            group_p99.append(percentile(chunk, 99))
    p99_all = percentile(samples, 99)
    ok = not missing and not wrong_codes and still_open == expected_open
    figures = [
        figure(
            "revocation acknowledged -> connection closed, p99 (2 edges)",
            summarize(group_p99),
            unit="ms",
            target=f"<= {TARGET_P99_MS:.0f} ms, every affected connection closed with 4003",
            met=bool(ok and p99_all <= TARGET_P99_MS),
            note=(
                f"pooled p99 {p99_all:.1f} ms over {len(samples)} connections in {rounds} "
                f"revocations ({per_edge} connections per edge per user, half by user, half "
                f"by jti); {len(group_p99)} groups"
                + (f"; {missing} never closed" if missing else "")
                + (f"; wrong/unexpected close codes {wrong_codes}" if wrong_codes else "")
                + (
                    f"; {still_open} open at the end, expected {expected_open}"
                    if still_open != expected_open
                    else ""
                )
            ),
        ),
        figure(
            "revocation acknowledged -> connection closed, p50",
            percentile(samples, 50),
            unit="ms",
        ),
        figure(
            "revocation acknowledged -> last affected connection closed, max",
            max(samples) if samples else None,
            unit="ms",
        ),
        figure(
            "revocation request -> acknowledged, p50",
            summarize(ack_ms)["median"],
            unit="ms",
            note=f"p99 {percentile(ack_ms, 99):.1f} ms (a replicated write)",
        ),
    ]
    by_how: dict[str, list[float]] = {"by user": [], "by jti": []}
    for pr in per_round:
        by_how["by user" if pr["how"] == "user" else "by jti"].extend(pr["delays_ms"])
    return {
        "figures": figures,
        "series": {
            "close_delay": series(
                "Revocation acknowledged -> connection closed (4003)",
                "ms after the acknowledgement",
                "connections",
                kind="hist",
                values=by_how,
            ),
            "per_revocation": series(
                "Slowest affected connection per revocation",
                "revocation",
                "ms after the acknowledgement",
                {"max close delay": [(i, pr["max_ms"] or 0.0) for i, pr in enumerate(per_round)]},
            ),
        },
        "notes": [
            "Closes are timed in the load processes and the acknowledgement in this process "
            "with one clock (CLOCK_MONOTONIC); the edges learn revocations from their core "
            "event subscription, and close the connection at once.",
            f"Bystanders: {bystanders} connections per edge of other users stayed open: "
            + ("yes" if still_open == expected_open else f"no ({still_open}/{expected_open})"),
        ],
    }
