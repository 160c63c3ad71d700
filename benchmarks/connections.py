"""Memory per idle authenticated connection on one edge, 1k -> 10k, vs a bare trio-websocket server.

What is measured
----------------
Two servers in turn, each holding the same growing number of idle
connections opened by ``benchmarks.wsload`` processes (picows):

* the **edge** (``iris edge`` in front of 3 cores, ``hardened_ap``, default
  settings): every connection is authenticated (a JWT in the handshake, one
  user per connection), so each has its session in the core, its
  subscription entry and its tasks, exactly as in production;
* the **bare** trio-websocket echo server (``benchmarks.echo_server``, the
  edge's ``serve_websocket`` settings): what the WebSocket stack alone costs.

Both processes raise their open-files limit to the hard limit (the edge does
it in auto-tune, the echo server at start; the load processes too).

At each step the idle connections are topped up to the step's count, the
server settles for a moment, and its RSS (``VmRSS`` of ``/proc/PID/status``)
is read. *KiB per connection* = (RSS now - RSS before any idle connection) /
idle connections. A few active connections (``PROBE_PAIRS`` sender ->
recipient pairs on the edge, ``PROBE_ECHO`` echo connections on the bare
server) are opened first and measure throughput at every step (closed loop):
the growth curve must have no cliff (the best of ``PROBES`` short probes per
step counts, since other processes on the machine only ever slow one down). The connection rate (handshake +
authentication + session registered in the core) is recorded too.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import trio

from benchmarks._common import Options, figure, rss_kib, series, summarize
from benchmarks._wsdriver import LoadGroup, open_echo_server, open_load

STEPS = (1000, 2000, 4000, 6000, 8000, 10000)
SMOKE_STEPS = (50, 100, 200)
#: Load processes holding the idle connections (each holds up to 5k at 10k).
PROCS = 2
PROBE_PAIRS = 16
PROBE_ECHO = 32
PROBE_WINDOW = 2
#: Throughput probes per step (the best counts).
PROBES = 2
TARGET_KIB = 24.0
TARGET_AT = 10000
#: Median throughput of the upper half of the steps over the lower half: below this, a cliff.
NO_CLIFF = 0.7
SETTLE = 1.0
#: Handshakes in progress at once (all load processes together).
CONNECT_CONCURRENCY = 128


async def _grow(
    opts: Options,
    load: LoadGroup,
    *,
    url: str,
    pid: int,
    prefix: str,
    jwt_secret: str | None,
    probe_kind: str,
) -> list[dict[str, Any]]:
    """Top up idle connections step by step; RSS, connect rate and probe throughput per step."""
    steps = SMOKE_STEPS if opts.smoke else STEPS
    probe_s = opts.scaled(2.0, 0.7)
    probes_per_step = 1 if opts.smoke else PROBES
    await load.load(probe_kind, duration=probe_s, warmup=0.3, window=PROBE_WINDOW)
    await trio.sleep(SETTLE)
    rss0 = rss_kib(pid)
    points: list[dict[str, Any]] = []
    have = 0
    for step in steps:
        users = [f"{prefix}-idle-{i}" for i in range(have, step)]
        t0 = trio.current_time()
        opened = await load.connect(
            url, users, role="idle", jwt_secret=jwt_secret, concurrency=CONNECT_CONCURRENCY
        )
        connect_s = trio.current_time() - t0
        have = step
        await trio.sleep(SETTLE)
        rss = rss_kib(pid)
        # Best of a few short probes: other processes on the machine only ever slow one down.
        probes = [
            await load.load(probe_kind, duration=probe_s, warmup=0.3, window=PROBE_WINDOW)
            for _ in range(probes_per_step)
        ]
        probe = max(probes, key=lambda r: _probe_rate(r, probe_kind))
        open_now = await load.open_count()
        points.append(
            {
                "step": step,
                "opened": opened["opened"],
                "failed": opened["failed"],
                "errors": opened["errors"],
                "open": open_now,
                "connect_per_s": len(users) / connect_s if connect_s > 0 else None,
                "rss_kib": rss,
                "rss0_kib": rss0,
                "kib_per_conn": (rss - rss0) / step,
                "probe_per_s": _probe_rate(probe, probe_kind),
                "probe_p99_ms": probe["lat_ms"]["p99"],
            }
        )
    return points


async def _edge(opts: Options) -> list[dict[str, Any]]:
    from jepsen_like.cluster import open_cluster

    base = os.path.join(opts.work_dir, "cluster")
    os.makedirs(base, exist_ok=True)
    async with open_cluster(base, nodes=3, mode="hardened_ap", edges=1) as cluster:
        await cluster.wait_leader()
        edge = cluster.edges[0]
        assert edge.process is not None
        tag = os.urandom(3).hex()
        async with open_load(opts.work_dir, PROCS, name="wsload-edge") as load:
            recipients = [f"r-{tag}-{i}" for i in range(PROBE_PAIRS)]
            senders = [f"s-{tag}-{i}" for i in range(PROBE_PAIRS)]
            await load.connect(
                edge.url, recipients, role="recipient", jwt_secret=cluster.jwt_secret
            )
            await load.connect(
                edge.url, senders, role="sender", peers=recipients, jwt_secret=cluster.jwt_secret
            )
            return await _grow(
                opts,
                load,
                url=edge.url,
                pid=edge.process.pid,
                prefix=tag,
                jwt_secret=cluster.jwt_secret,
                probe_kind="iris",
            )


async def _bare(opts: Options) -> list[dict[str, Any]]:
    async with (
        open_echo_server(opts.work_dir, "trio") as echo,
        open_load(opts.work_dir, PROCS, name="wsload-bare") as load,
    ):
        await load.connect(echo.url, [f"echo-{i}" for i in range(PROBE_ECHO)], role="echo")
        return await _grow(
            opts,
            load,
            url=echo.url,
            pid=echo.pid,
            prefix="bare",
            jwt_secret=None,
            probe_kind="echo",
        )


def _halves(points: list[dict[str, Any]]) -> float:
    """Median probe throughput of the upper half of the steps over that of the lower half.

    One noisy step cannot make or hide a cliff; a drop that stays shows.
    """
    n = len(points)
    lower = [p["probe_per_s"] for p in points[: max(1, n // 2)]]
    upper = [p["probe_per_s"] for p in points[(n + 1) // 2 :]] or [points[-1]["probe_per_s"]]
    low = statistics.median(lower)
    return statistics.median(upper) / low if low else float("nan")


def _probe_rate(result: dict[str, Any], kind: str) -> float:
    if kind == "iris":
        return float(min(result["per_s"], result["delivered_per_s"]))
    return float(result["per_s"])


def _at(points: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    for p in points:
        if p["step"] == step:
            return p
    return None


async def run(opts: Options) -> dict[str, Any]:
    bare = await _bare(opts)
    edge = await _edge(opts)
    figures: list[dict[str, Any]] = []
    steps = [p["step"] for p in edge]
    first, last = steps[0], steps[-1]
    for step in (first, last):
        e, b = _at(edge, step), _at(bare, step)
        assert e is not None and b is not None
        complete = e["failed"] == 0 and e["open"] >= step
        is_target = step == TARGET_AT
        figures.append(
            figure(
                f"edge RSS per idle authenticated connection at {step:,}",
                e["kib_per_conn"],
                unit="KiB",
                target=f"{TARGET_AT:,} connections at <= {TARGET_KIB:.0f} KiB each"
                if is_target
                else None,
                met=bool(complete and e["kib_per_conn"] <= TARGET_KIB) if is_target else None,
                baseline={"bare trio-websocket": summarize([b["kib_per_conn"]])},
                note=(
                    f"edge RSS {e['rss0_kib'] / 1024:.0f} -> {e['rss_kib'] / 1024:.0f} MiB; "
                    f"{e['open']:,} open, {e['failed']} failed"
                    + (f" ({e['errors']})" if e["failed"] else "")
                    + f"; bare {b['rss0_kib'] / 1024:.0f} -> {b['rss_kib'] / 1024:.0f} MiB"
                ),
            )
        )
    e_first, e_last = edge[0], edge[-1]
    ratio = _halves(edge)
    figures.append(
        figure(
            f"edge throughput, {first:,}-{last:,} idle connections: upper half / lower half of the steps",
            ratio,
            unit="ratio",
            target=f"no cliff (>= {NO_CLIFF})",
            met=bool(ratio >= NO_CLIFF),
            note=(
                f"{PROBE_PAIRS} active pairs, closed loop, at each step: "
                + ", ".join(f"{p['probe_per_s']:,.0f}" for p in edge)
                + f" msgs/s (p99 {e_first['probe_p99_ms']:.0f} -> {e_last['probe_p99_ms']:.0f} ms); "
                f"bare echo {bare[0]['probe_per_s']:,.0f} -> {bare[-1]['probe_per_s']:,.0f}/s "
                f"(ratio {_halves(bare):.2f})"
            ),
        )
    )
    rates = [p["connect_per_s"] for p in edge if p["connect_per_s"]]
    figures.append(
        figure(
            "edge connection rate (handshake + JWT + session in the core)",
            summarize(rates),
            unit="conns/s",
            baseline={"bare trio-websocket": summarize([p["connect_per_s"] for p in bare])},
            note="one value per growth step",
        )
    )
    return {
        "figures": figures,
        "series": {
            "rss": series(
                "Server RSS vs idle connections",
                "idle connections",
                "RSS, MiB",
                {
                    "edge (authenticated)": [(p["step"], p["rss_kib"] / 1024) for p in edge],
                    "bare trio-websocket": [(p["step"], p["rss_kib"] / 1024) for p in bare],
                },
            ),
            "kib_per_connection": series(
                "RSS per idle connection",
                "idle connections",
                "KiB per connection",
                {
                    "edge (authenticated)": [(p["step"], p["kib_per_conn"]) for p in edge],
                    "bare trio-websocket": [(p["step"], p["kib_per_conn"]) for p in bare],
                },
            ),
            "throughput": series(
                "Throughput of a few active connections vs idle connections held",
                "idle connections",
                "msgs/s (edge) or echoes/s (bare)",
                {
                    f"edge, {PROBE_PAIRS} pairs, msgs/s": [
                        (p["step"], p["probe_per_s"]) for p in edge
                    ],
                    f"bare, {PROBE_ECHO} conns, echoes/s": [
                        (p["step"], p["probe_per_s"]) for p in bare
                    ],
                },
            ),
        },
        "notes": [
            "KiB per connection = (server RSS with N idle connections - RSS with only the "
            "probe connections) / N; the edge's include its per-connection tasks, session "
            "records, user subscription entries and token state.",
            "Runs once (connecting 10k authenticated connections registers 10k sessions in "
            "the core): n=1.",
        ],
        "raw": {"edge": edge, "bare": bare},
    }
