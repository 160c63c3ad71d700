"""End-to-end messages/s and latency through ONE edge, 3 cores, ``cp`` and ``hardened_ap``.

What is measured
----------------
Real processes: 3 ``iris core`` processes and one ``iris edge``
(``jepsen_like.cluster``), driven by ``benchmarks.wsload`` (picows, a
separate process). ``PAIRS`` sender connections each send to their own
recipient, connected to the same edge; a message counts once its ``sent``
(durable: the core acknowledged it) came back *and* the recipient got its
``msg`` (recipients ack every 100 ms, so inboxes stay empty).

1. *Baselines, same run, same client*: a bare trio-websocket echo server
   with the edge's settings (``benchmarks.echo_server``), 100 connections,
   closed loop: the most a trio-websocket process serves; and a picows echo
   server: the load generator's own ceiling (it must drive that far faster
   than the edge, or the client would be what is measured).
2. *Maximum*: closed loop, every sender keeping ``WINDOW`` sends in flight;
   ``opts.runs`` runs of ``opts.duration`` s (after a warm-up).
3. *Latency at half load*: open loop at half the maximum (sends leave on a
   schedule, whatever the answers: no coordinated omission); send -> sent
   and send -> delivered p50/p99 per run.
4. *Sweep*: open loop at fractions of the maximum: throughput and latency
   against offered load (the plots).

Edge settings are the defaults (per-user send rate limit 100/s: ``PAIRS`` is
large enough that no sender reaches it at the rates measured here).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import trio

from benchmarks._common import Options, cpu_seconds, figure, series, summarize
from benchmarks._wsdriver import cpu_wait_seconds, open_echo_server, open_load

#: Sender->recipient pairs (each a connection) in the edge runs.
PAIRS = 128
SMOKE_PAIRS = 32
#: Sends in flight per sender connection in the closed-loop (maximum) runs.
WINDOW = 4
#: Echo connections and frames in flight per connection for the echo baselines.
ECHO_CONNS = 100
ECHO_WINDOW = 1
#: Load-generator processes.
PROCS = 1
#: Offered load of the sweep, as fractions of the measured maximum.
SWEEP = (0.25, 0.5, 0.75, 1.0, 1.25)
SMOKE_SWEEP = (0.5,)
TARGET_RATE = 8000.0
TARGET_RATIO = 0.5
TARGET_P99_MS = 25.0
MODES = ("cp", "hardened_ap")


async def _echo_baseline(opts: Options, impl: str, runs: int, duration: float) -> dict[str, Any]:
    async with (
        open_echo_server(opts.work_dir, impl) as echo,
        open_load(opts.work_dir, PROCS, name=f"wsload-echo-{impl}") as load,
    ):
        users = [f"echo-{i}" for i in range(ECHO_CONNS)]
        opened = await load.connect(echo.url, users, role="echo")
        if opened["failed"]:
            raise RuntimeError(f"echo connections failed: {opened}")
        await load.load("echo", duration=0.5, warmup=0.2, window=ECHO_WINDOW)
        results = []
        for _ in range(runs):
            cpu0 = cpu_seconds(echo.pid)
            res = await load.load("echo", duration=duration, warmup=0.5, window=ECHO_WINDOW)
            res["server_cpu_share"] = (cpu_seconds(echo.pid) - cpu0) / (duration + 0.5)
            results.append(res)
        return {
            "per_s": summarize([r["per_s"] for r in results]),
            "p99_ms": statistics.median(r["lat_ms"]["p99"] for r in results),
            "client_cpu_share": max(max(r["client_cpu_share"]) for r in results),
            "server_cpu_share": statistics.median(r["server_cpu_share"] for r in results),
        }


async def _edge_mode(opts: Options, mode: str, duration: float) -> dict[str, Any]:
    from jepsen_like.cluster import open_cluster

    pairs = SMOKE_PAIRS if opts.smoke else PAIRS
    base = os.path.join(opts.work_dir, mode)
    os.makedirs(base, exist_ok=True)
    async with open_cluster(base, nodes=3, mode=mode, edges=1) as cluster:
        leader = await cluster.wait_leader()
        edge = cluster.edges[0]
        assert edge.process is not None
        pids = {"edge": edge.process.pid}
        for core in sorted(cluster.cores, key=lambda c: c.index != leader):
            assert core.process is not None
            role = "leader" if core.index == leader else f"follower {core.index}"
            pids[role] = core.process.pid
        tag = os.urandom(3).hex()
        recipients = [f"r-{tag}-{i}" for i in range(pairs)]
        senders = [f"s-{tag}-{i}" for i in range(pairs)]
        async with open_load(opts.work_dir, PROCS, name=f"wsload-{mode}") as load:
            for role, users, peers in (
                ("recipient", recipients, None),
                ("sender", senders, recipients),
            ):
                opened = await load.connect(
                    edge.url, users, role=role, peers=peers, jwt_secret=cluster.jwt_secret
                )
                if opened["failed"]:
                    raise RuntimeError(f"{role} connections failed: {opened}")
            # Warm-up: connections, core clients, the first Raft entries.
            await load.load("iris", duration=opts.scaled(1.5, 0.5), warmup=0.3, window=WINDOW)

            all_pids = {**pids, "client": load.pids[0]}

            async def measure(rate: float | None, window: int = WINDOW) -> dict[str, Any]:
                cpu0 = {k: cpu_seconds(p) for k, p in all_pids.items()}
                wait0 = {k: cpu_wait_seconds(p) for k, p in all_pids.items()}
                t0 = trio.current_time()
                res = await load.load(
                    "iris", duration=duration, warmup=0.5, window=window, rate=rate
                )
                elapsed = max(1e-9, trio.current_time() - t0)
                cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in all_pids.items()}
                res["cpu_share"] = {k: v / elapsed for k, v in cpu.items()}
                res["wait_share"] = {
                    k: (cpu_wait_seconds(p) - wait0[k]) / elapsed for k, p in all_pids.items()
                }
                res["edge_cpu_share"] = res["cpu_share"]["edge"]
                res["throughput"] = min(res["per_s"], res["delivered_per_s"])
                # CPU per message over the whole load (warm-up and drain included).
                messages = max(1.0, res["throughput"] * elapsed)
                res["cpu_us_per_msg"] = {k: v / messages * 1e6 for k, v in cpu.items()}
                return res

            maxima = [await measure(None) for _ in range(opts.runs)]
            peak = statistics.median(r["throughput"] for r in maxima)
            if peak <= 0:
                raise RuntimeError(f"{mode}: no message went through the edge: {maxima}")
            half = [await measure(peak / 2, 1) for _ in range(opts.runs)]
            sweep = []
            for frac in SMOKE_SWEEP if opts.smoke else SWEEP:
                if frac == 0.5:
                    sweep.append((frac, half[0]))
                else:
                    sweep.append((frac, await measure(peak * frac, 1)))
    return {"pairs": pairs, "maxima": maxima, "peak": peak, "half": half, "sweep": sweep}


def _lat(results: list[dict[str, Any]], key: str, q: str) -> dict[str, Any]:
    return summarize([r[key][q] for r in results])


async def run(opts: Options) -> dict[str, Any]:
    duration = opts.duration
    runs = opts.runs
    echo = await _echo_baseline(opts, "trio", runs, duration)
    ceiling = await _echo_baseline(opts, "picows", min(runs, 3), duration)
    figures: list[dict[str, Any]] = []
    notes: list[str] = []
    throughput_lines: dict[str, list[tuple[float, float]]] = {}
    latency_lines: dict[str, list[tuple[float, float]]] = {}
    echo_med = echo["per_s"]["median"]
    figures.append(
        figure(
            "bare trio-websocket echo server, 100 conns",
            echo["per_s"],
            unit="echoes/s",
            baseline={"picows echo server (load generator ceiling)": ceiling["per_s"]},
            note=(
                f"p99 {echo['p99_ms']:.1f} ms; echo server CPU {echo['server_cpu_share']:.0%}, "
                f"client CPU {echo['client_cpu_share']:.0%} of a core"
            ),
        )
    )
    figures.append(
        figure(
            "load generator ceiling (picows echo server, 100 conns)",
            ceiling["per_s"],
            unit="echoes/s",
            note=f"client CPU {ceiling['client_cpu_share']:.0%} of a core",
        )
    )
    for mode in MODES:
        r = await _edge_mode(opts, mode, duration)
        maxima, half = r["maxima"], r["half"]
        thr = summarize([m["throughput"] for m in maxima])
        med = thr["median"] or 0.0
        ratio = med / echo_med if echo_med else float("nan")
        errors: dict[str, int] = {}
        for res in [*maxima, *half]:
            for k, v in res["errors"].items():
                errors[k] = errors.get(k, 0) + v
        edge_cpu = statistics.median(m["edge_cpu_share"] for m in maxima)
        client_cpu = max(max(m["client_cpu_share"]) for m in maxima)
        us_per_msg = {
            k: statistics.median(m["cpu_us_per_msg"][k] for m in maxima)
            for k in maxima[0]["cpu_us_per_msg"]
        }
        waits = {
            k: statistics.median(m["wait_share"][k] for m in maxima)
            for k in maxima[0]["wait_share"]
        }
        total_us = sum(us_per_msg.values())
        figures.append(
            figure(
                f"edge throughput, {mode} (send -> sent and delivered)",
                thr,
                unit="msgs/s",
                target=f">= {TARGET_RATE:,.0f}/s and >= {TARGET_RATIO} x echo",
                met=bool(med >= TARGET_RATE and ratio >= TARGET_RATIO),
                baseline={"bare trio-websocket echo": echo["per_s"]},
                note=(
                    f"{ratio:.2f} x echo; {r['pairs']} sender->recipient pairs, {WINDOW} "
                    f"in flight each; sent/s {statistics.median(m['per_s'] for m in maxima):,.0f}, "
                    f"delivered/s {statistics.median(m['delivered_per_s'] for m in maxima):,.0f}; "
                    f"edge CPU {edge_cpu:.0%}, client CPU {client_cpu:.0%}"
                    + (f"; errors {errors}" if errors else "")
                ),
            )
        )
        offered = half[0]["offered_per_s"] or 0.0
        for key, label in (("lat_ms", "send -> sent"), ("dlat_ms", "send -> delivered")):
            p50 = _lat(half, key, "p50")
            p99 = _lat(half, key, "p99")
            figures.append(
                figure(
                    f"{label} p50 at half load, {mode}",
                    p50,
                    unit="ms",
                    note=f"open loop at {offered:,.0f} msgs/s",
                )
            )
            figures.append(
                figure(
                    f"{label} p99 at half load, {mode}",
                    p99,
                    unit="ms",
                    target=f"<= {TARGET_P99_MS:.0f} ms",
                    met=bool(p99["median"] is not None and p99["median"] <= TARGET_P99_MS),
                    note=f"open loop at {offered:,.0f} msgs/s; {sum(h['lat_ms']['n'] for h in half)} samples",
                )
            )
        points = sorted(
            ((res["offered_per_s"], res) for _frac, res in r["sweep"]), key=lambda p: p[0]
        )
        throughput_lines[f"{mode}: sent/s"] = [(o, res["per_s"]) for o, res in points]
        throughput_lines[f"{mode}: delivered/s"] = [
            (o, res["delivered_per_s"]) for o, res in points
        ]
        for key, label in (("lat_ms", "sent"), ("dlat_ms", "delivered")):
            for q in ("p50", "p99"):
                latency_lines[f"{mode}: send->{label} {q}"] = [
                    (o, res[key][q]) for o, res in points
                ]
        notes.append(
            f"{mode}, at the maximum: CPU per message "
            + ", ".join(f"{k} {v:,.0f} µs" for k, v in us_per_msg.items())
            + f" (all processes {total_us:,.0f} µs: at most {(os.cpu_count() or 1) * 1e6 / total_us:,.0f} msgs/s on "
            f"{os.cpu_count()} cores); the edge ran {edge_cpu:.0%} of the time and waited for a "
            f"CPU {waits['edge']:.0%} (leader: {waits['leader']:.0%}), the load generator ran "
            f"{client_cpu:.0%}."
        )
    ceil_med = ceiling["per_s"]["median"] or 0.0
    notes.append(
        f"Load generator: one picows process drove a picows echo server at {ceil_med:,.0f} echoes/s "
        f"and the bare trio-websocket echo server at {echo_med:,.0f}/s, both far above the edge "
        "figures, so the client is not what bounds them."
    )
    notes.append(
        "All processes share this machine's cores (3 cores + edge + client, plus the echo "
        "servers in their turn): figures are for that whole stack on this machine."
    )
    return {
        "figures": figures,
        "series": {
            "throughput_vs_offered": series(
                "Edge throughput vs offered load (open loop, 1 edge, 3 cores)",
                "offered msgs/s",
                "msgs/s",
                throughput_lines,
            ),
            "latency_vs_offered": series(
                "Edge latency vs offered load (open loop)",
                "offered msgs/s",
                "latency, ms",
                latency_lines,
            ),
        },
        "notes": notes,
    }
