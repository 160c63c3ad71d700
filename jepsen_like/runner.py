"""Scenarios and the run loop: cluster up, workload + nemesis, heal, final reads, check, report.

Theory of operation
-------------------
A :class:`Scenario` names a workload, a fault and the mode it is meant for.
:func:`run_scenario` starts a fresh cluster (real ``iris core`` processes,
plus ``iris edge`` processes for workloads that need them) under ``out``,
runs the workload and the nemesis side by side for ``time`` seconds while a
progress line is printed, heals everything, lets the cluster settle, runs the
workload's final reads, checks the history and writes ``history.jsonl``,
``results.json``, ``report.txt`` and the plots. Every process is killed on
exit, also on Ctrl-C or an error in the harness.

A scenario whose ``expect_valid`` is False is a *canary*: it must be found
invalid, or the harness itself is broken. The exit code reflects whether
every result matched its expectation.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from . import checkers
from .cluster import LocalCluster, open_cluster
from .history import History
from .nemesis import FAULTS, FaultUnavailable, Nemesis
from .netns import netns_available
from .workloads import WORKLOADS, Workload

logger = logging.getLogger("jepsen_like")

# Edges in the harness must not rate-limit the workload.
EDGE_OPTIONS = {"rate_limit_per_second": 100000.0, "rate_limit_burst": 100000, "jwt_leeway": 30.0}


@dataclass(frozen=True)
class Scenario:
    """A named combination of workload, fault and mode."""

    name: str
    workload: str
    fault: str
    modes: tuple[str, ...] = ("cp", "hardened_ap")
    nodes: tuple[int, ...] = (3, 5)
    description: str = ""
    expect_valid: bool = True
    env: dict[str, str] = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "register-partition",
            "register",
            "random-halves",
            ("cp",),
            description="CAS registers, random halves partitioned and healed",
        ),
        Scenario(
            "register-isolate-leader",
            "register",
            "isolate-leader",
            ("cp",),
            description="CAS registers, the leader cut off (it believes it leads for a while)",
        ),
        Scenario(
            "register-kill-leader",
            "register",
            "kill-leader",
            ("cp",),
            description="CAS registers, kill -9 of the leader, restarted at heal",
        ),
        Scenario(
            "register-pause",
            "register",
            "pause-leader",
            ("cp",),
            description="CAS registers, the leader paused (SIGSTOP) longer than an election",
        ),
        Scenario(
            "register-clock-skew",
            "register",
            "clock-skew",
            ("cp",),
            description="CAS registers, a minority restarted under libfaketime (offset and rate)",
        ),
        Scenario(
            "register-bridge",
            "register",
            "bridge",
            ("cp",),
            (5,),
            description="5 nodes: two halves joined only through one bridge node",
        ),
        Scenario(
            "register-majorities-ring",
            "register",
            "majorities-ring",
            ("cp",),
            (5,),
            description="5 nodes: every node sees a different majority",
        ),
        Scenario(
            "register-canary-local-reads",
            "register-local-reads",
            "isolate-leader",
            ("cp",),
            description="CANARY: reads of local state without the barrier; MUST be found not linearizable",
            expect_valid=False,
        ),
        Scenario(
            "messages-partition",
            "messages",
            "random-halves",
            description="messages through 2 edges, random halves partitioned",
        ),
        Scenario(
            "messages-isolate-one",
            "messages",
            "isolate-one",
            description="messages through 2 edges, one core cut off",
        ),
        Scenario(
            "messages-kill-leader",
            "messages",
            "kill-leader",
            description="messages, kill -9 of the leader core",
        ),
        Scenario(
            "messages-kill-minority",
            "messages",
            "kill-minority",
            description="messages, kill -9 of a minority of cores",
        ),
        Scenario(
            "messages-kill-all",
            "messages",
            "kill-all",
            description="messages, kill -9 of every core at once, then restart",
        ),
        Scenario(
            "messages-pause",
            "messages",
            "pause-one",
            description="messages, one core paused (SIGSTOP) then resumed",
        ),
        Scenario(
            "messages-delay",
            "messages",
            "delay",
            description="messages, 50-200 ms delay with jitter on every Raft link",
        ),
        Scenario(
            "messages-canary-unsafe-ack",
            "messages",
            "kill-all",
            ("hardened_ap",),
            description="CANARY: a test-only build that acknowledges before the WAL fsync; "
            "MUST lose acknowledged messages",
            expect_valid=False,
            env={"IRIS_TEST_UNSAFE_ACK": "1"},
        ),
        Scenario(
            "revocation-partition",
            "revocation",
            "random-halves",
            description="tokens revoked while partitions come and go; none gets in afterwards",
        ),
        Scenario(
            "revocation-kill-leader",
            "revocation",
            "kill-leader",
            description="tokens revoked while the leader core is killed",
        ),
    ]
}

SMOKE = (
    "register-isolate-leader",
    "register-canary-local-reads",
    "messages-kill-leader",
    "messages-canary-unsafe-ack",
    "revocation-partition",
)


@dataclass
class RunResult:
    """What one run found."""

    scenario: str
    mode: str
    nodes: int
    seed: int
    out: str
    mechanism: str
    valid: bool | str
    expected_valid: bool
    passed: bool
    checks: list[dict[str, Any]]
    ops: int
    skipped: str | None = None
    duration_s: float = 0.0
    #: Seconds from the heal until every core was writable with an empty WAL
    #: backlog and the same applied index; None if it did not happen in time.
    settled_after_s: float | None = None


def _check_dicts(results: list[checkers.CheckResult]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        d = {
            "name": r.name,
            "valid": r.valid,
            "counts": r.counts,
            "message": r.message,
            "details": r.details,
            "failing": [op.to_json() if hasattr(op, "to_json") else repr(op) for op in r.failing],
        }
        out.append(d)
    return out


def _verdict(results: list[checkers.CheckResult]) -> bool | str:
    values = [r.valid for r in results]
    if any(v is False for v in values):
        return False
    if any(v == "unknown" for v in values):
        return "unknown"
    return True


async def _progress(
    workload: Workload, nemesis: Nemesis, started: float, until: float, phase: list[str]
) -> None:
    while True:
        c = workload.counters
        elapsed = trio.current_time() - started
        print(
            f"[{elapsed:6.1f}s] {phase[0]:<8} ok={c.ok} fail={c.fail} info={c.info} "
            f"fault={nemesis.active or '-'}",
            file=sys.stderr,
            flush=True,
        )
        await trio.sleep(2.0)


#: Longest wait after the heal for every core to be writable with an empty WAL backlog.
SETTLE_TIMEOUT = 60.0


async def settle(cluster: LocalCluster, timeout: float) -> float | None:
    """Wait until every core sees a quorum, has drained its WAL and applied the same index.

    Jepsen's "final reads after recovery": in ``hardened_ap`` a write taken
    by the minority side just before its guard noticed the cut sits in that
    core's WAL until the heal, and the final drain must not run before it
    had its chance to replicate. Returns the seconds it took, or None when
    the cluster did not settle in ``timeout`` (the final reads then run
    anyway, and whatever did not reach the log counts as lost).
    """
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while True:
            statuses = await cluster.statuses()
            if all(s is not None for s in statuses):
                ok = [s for s in statuses if s is not None]
                applied = {s["raft"].get("last_applied") for s in ok}
                if (
                    all(s["safe_for_writes"] for s in ok)
                    and sum(s["wal_backlog"] for s in ok) == 0
                    and len(applied) == 1
                ):
                    return round(trio.current_time() - start, 2)
            await trio.sleep(0.25)
    return None


def choose_mechanism(requested: str) -> str:
    """``netns`` when asked or (``auto``) when root with iproute2 + iptables, else ``proxy``."""
    if requested == "proxy":
        return "proxy"
    problem = netns_available()
    if requested == "netns" and problem is not None:
        raise SystemExit(f"--mechanism netns is not possible here: {problem}")
    return "netns" if problem is None else "proxy"


async def run_scenario(
    scenario: Scenario,
    *,
    nodes: int,
    mode: str,
    duration: float,
    seed: int,
    out: str,
    mechanism: str = "proxy",
) -> RunResult:
    """Run one scenario on a fresh cluster and write its results under ``out``."""
    os.makedirs(out, exist_ok=True)
    # A fresh cluster every run: data left by an earlier run in the same folder
    # would start the registers and inboxes from old values.
    shutil.rmtree(os.path.join(out, "cluster"), ignore_errors=True)
    rng = random.Random(seed)
    workload = WORKLOADS[scenario.workload]()
    history = History()
    t0 = time.monotonic()
    skipped: str | None = None
    setup_failed: str | None = None
    final: dict[str, Any] = {}
    env = dict(scenario.env)
    async with open_cluster(
        os.path.join(out, "cluster"),
        nodes=nodes,
        mode=mode,
        proxies=mechanism == "proxy",
        netns=mechanism == "netns",
        edges=workload.needs_edges,
        edge_options=EDGE_OPTIONS,
        env=env,
        rng=random.Random(seed),
    ) as cluster:
        mechanism_used = cluster.mechanism
        nemesis = Nemesis(scenario.fault, cluster, history, random.Random(rng.random()))
        try:
            nemesis.check_supported()
        except FaultUnavailable as exc:
            skipped = str(exc)
        if skipped is None:
            try:
                await cluster.wait_leader(timeout=60)
            except trio.TooSlowError:
                setup_failed = "the cluster did not elect a leader within 60 s of starting"
        if skipped is None and setup_failed is None:
            history = History()
            nemesis.history = history
            phase = ["running"]
            started = trio.current_time()
            until = started + duration
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_progress, workload, nemesis, started, until, phase)
                async with trio.open_nursery() as inner:
                    inner.start_soon(workload.run, cluster, history, rng, until)
                    inner.start_soon(nemesis.run, until)
                phase[0] = "healing"
                await nemesis.heal()
                with trio.move_on_after(30):
                    await cluster.wait_leader(timeout=30)
                phase[0] = "settling"
                settled = await settle(cluster, timeout=SETTLE_TIMEOUT)
                phase[0] = "final"
                final = await workload.final(cluster, history)
                final["settled_after_s"] = settled
                nursery.cancel_scope.cancel()
    results: list[checkers.CheckResult] = []
    if skipped is None and setup_failed is None:
        results = workload.check(history, final, mode)
        history.dump(os.path.join(out, "history.jsonl"))
    valid: bool | str = _verdict(results) if skipped is None else "skipped"
    if setup_failed is not None:
        valid = "setup_failed"
        passed = False
        skipped = None
    elif skipped is not None:
        passed = True
    elif scenario.expect_valid:
        passed = valid is True
    else:
        passed = valid is False
    result = RunResult(
        scenario=scenario.name,
        mode=mode,
        nodes=nodes,
        seed=seed,
        out=out,
        mechanism=mechanism_used,
        valid=valid,
        expected_valid=scenario.expect_valid,
        passed=passed,
        checks=_check_dicts(results),
        ops=len(history.ops),
        skipped=skipped,
        duration_s=round(time.monotonic() - t0, 1),
        settled_after_s=final.get("settled_after_s"),
    )
    write_outputs(result, scenario, history, results, final)
    return result


def write_outputs(
    result: RunResult,
    scenario: Scenario,
    history: History,
    results: list[checkers.CheckResult],
    final: dict[str, Any],
) -> None:
    out = result.out
    meta = {
        **asdict(result),
        "workload": scenario.workload,
        "fault": scenario.fault,
        "description": scenario.description,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "final": {k: v for k, v in final.items() if k != "convergence"},
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)
    with open(os.path.join(out, "report.txt"), "w") as f:
        f.write(render_report(result, scenario, results))
    if results:
        from .plots import write_plots

        try:
            write_plots(
                history, out, title=f"{scenario.name} ({result.mode}, {result.nodes} nodes)"
            )
        except Exception:  # plots are a convenience; never fail a run on them
            logger.exception("could not write plots")


def render_report(
    result: RunResult, scenario: Scenario, results: list[checkers.CheckResult]
) -> str:
    lines = [
        f"scenario   {scenario.name}: {scenario.description}",
        f"mode       {result.mode}, {result.nodes} nodes, seed {result.seed}",
        f"faults     {scenario.fault} via {result.mechanism}",
        f"ops        {result.ops}",
    ]
    if result.skipped:
        lines.append(f"SKIPPED    {result.skipped}")
        return "\n".join(lines) + "\n"
    if result.valid == "setup_failed":
        lines.append("FAIL       the cluster did not elect a leader in time (see cluster/*.log)")
        return "\n".join(lines) + "\n"
    expectation = "valid" if scenario.expect_valid else "INVALID (canary)"
    lines.append(
        f"verdict    {result.valid} (expected {expectation}) -> {'PASS' if result.passed else 'FAIL'}"
    )
    lines.append(
        f"settled    {result.settled_after_s} s after the heal"
        if result.settled_after_s is not None
        else f"settled    NOT within {SETTLE_TIMEOUT:.0f} s of the heal (final reads ran anyway)"
    )
    lines.append("")
    for r in results:
        lines.append(f"== {r.name}: {r.valid}")
        if r.message:
            lines.append(f"   {r.message}")
        for k, v in sorted(r.counts.items()):
            lines.append(f"   {k:<28} {v}")
        if r.name == "availability":
            for row in r.details.get("windows", []):
                lines.append(f"   {row}")
        if r.failing:
            lines.append("   smallest failing window:")
            for op in r.failing[:40]:
                lines.append(f"     {op}")
        lines.append("")
    return "\n".join(lines) + "\n"


__all__ = ["FAULTS", "SCENARIOS", "SMOKE", "RunResult", "Scenario", "run_scenario"]
