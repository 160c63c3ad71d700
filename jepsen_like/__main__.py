"""``python -m jepsen_like``: list, run and re-check fault-injection scenarios.

Exit code: 0 when every result matched its expectation (valid, or invalid for
a canary), 1 otherwise, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time

import trio

from .runner import SCENARIOS, SMOKE, RunResult, choose_mechanism, run_scenario


def _list(_: argparse.Namespace) -> int:
    for s in SCENARIOS.values():
        flag = " (canary: must be invalid)" if not s.expect_valid else ""
        print(
            f"{s.name:<30} {s.workload:<22} {s.fault:<16} modes={','.join(s.modes)} nodes={','.join(map(str, s.nodes))}{flag}"
        )
        print(f"{'':<30} {s.description}")
    return 0


def _summary(results: list[RunResult]) -> int:
    print("\nscenario                       mode         nodes  verdict   expected  result")
    ok = True
    for r in results:
        verdict = "skipped" if r.skipped else str(r.valid)
        result = "SKIP" if r.skipped else ("PASS" if r.passed else "FAIL")
        ok &= r.passed
        print(
            f"{r.scenario:<30} {r.mode:<12} {r.nodes:<6} {verdict:<9} {'valid' if r.expected_valid else 'invalid':<9} {result}"
        )
        if r.skipped:
            print(f"{'':<30} skipped: {r.skipped}")
    return 0 if ok else 1


def _run(args: argparse.Namespace) -> int:
    if args.scenario == "all":
        names = list(SCENARIOS)
    elif args.scenario == "smoke":
        names = list(SMOKE)
    else:
        names = args.scenario.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(
            f"unknown scenario(s): {', '.join(unknown)}; see `python -m jepsen_like list`",
            file=sys.stderr,
        )
        return 2
    base = args.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
    mechanism = choose_mechanism(args.mechanism)
    print(f"partitions via: {mechanism}", file=sys.stderr)
    results: list[RunResult] = []
    for name in names:
        scenario = SCENARIOS[name]
        nodes_list = [args.nodes] if args.nodes else list(scenario.nodes)
        modes = [args.mode] if args.mode else list(scenario.modes)
        for nodes in nodes_list:
            if nodes not in scenario.nodes:
                continue
            for mode in modes:
                if mode not in scenario.modes:
                    continue
                out = os.path.join(base, f"{name}-{mode}-{nodes}n")
                print(f"=== {name} ({mode}, {nodes} nodes) -> {out}", file=sys.stderr, flush=True)
                result = trio.run(
                    functools.partial(
                        run_scenario,
                        scenario,
                        nodes=nodes,
                        mode=mode,
                        duration=args.time,
                        seed=args.seed,
                        out=out,
                        mechanism=mechanism,
                    )
                )
                results.append(result)
                with open(os.path.join(out, "report.txt")) as report:
                    print(report.read(), flush=True)
    with open(os.path.join(base, "summary.json"), "w") as f:
        json.dump([r.__dict__ for r in results], f, indent=2, default=str)
    return _summary(results)


def _check(args: argparse.Namespace) -> int:
    from .history import History
    from .runner import _verdict
    from .workloads import WORKLOADS

    with open(os.path.join(args.dir, "results.json")) as f:
        meta = json.load(f)
    history = History.load(os.path.join(args.dir, "history.jsonl"))
    workload = WORKLOADS[meta["workload"]]()
    results = workload.check(history, meta.get("final", {}), meta["mode"])
    for r in results:
        print(f"{r.name}: {r.valid} {r.message}")
        for k, v in sorted(r.counts.items()):
            print(f"  {k:<28} {v}")
    valid = _verdict(results)
    expected = meta.get("expected_valid", True)
    matched = (valid is True) if expected else (valid is False)
    print(
        f"verdict: {valid} (expected {'valid' if expected else 'invalid'}) -> {'PASS' if matched else 'FAIL'}"
    )
    return 0 if matched else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jepsen_like", description="fault-injection harness for Iris"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the scenarios").set_defaults(func=_list)
    p = sub.add_parser("run", help="run scenarios")
    p.add_argument(
        "--scenario", required=True, help="a name, a comma-separated list, 'smoke' or 'all'"
    )
    p.add_argument("--nodes", type=int, choices=(3, 5))
    p.add_argument("--mode", choices=("cp", "hardened_ap"))
    p.add_argument("--time", type=float, default=30.0, help="seconds of workload (default 30)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="output folder (default results/<timestamp>)")
    p.add_argument(
        "--mechanism",
        choices=("auto", "netns", "proxy"),
        default="auto",
        help="how partitions are made: network namespaces + iptables (root) or per-link proxies",
    )
    p.set_defaults(func=_run)
    p = sub.add_parser("check", help="re-check a stored history")
    p.add_argument("dir")
    p.set_defaults(func=_check)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted: every process was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
