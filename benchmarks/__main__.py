"""Run the benchmarks and write ``results.json``, ``report.md`` and plots.

python -m benchmarks                 # every benchmark, full length
python -m benchmarks --smoke         # a few seconds each (CI)
python -m benchmarks --only core_throughput failover
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
import traceback
from typing import Any

import trio

from benchmarks._common import Options, machine, write_json

#: Module name -> one line describing it, in run order.
BENCHMARKS: dict[str, str] = {
    "core_throughput": "core commit throughput, 3 cores, cp: Iris vs raw PySyncObj vs etcd",
    "edge_throughput": "end-to-end messages/s and latency through one edge vs a bare echo server",
    "connections": "RSS per idle authenticated connection at 1k and 10k vs bare trio-websocket",
    "revocation": "revocation acknowledged -> every affected connection closed, 2 edges",
    "failover": "leader kill -9 -> first successful write: Iris vs PySyncObj defaults vs etcd",
    "restart": "core restart with stored messages -> serving, and memory per stored message",
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument(
        "--smoke", action="store_true", help="short runs that only prove the scripts work"
    )
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME")
    p.add_argument(
        "--runs", type=int, default=None, help="repetitions per figure (default 5; smoke 1)"
    )
    p.add_argument("--duration", type=float, default=None, help="seconds of load per run")
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--no-baselines", action="store_true", help="skip baselines that need etcd")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.list:
        for name, text in BENCHMARKS.items():
            print(f"{name:18} {text}")
        return 0
    names = args.only or list(BENCHMARKS)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "benchmarks": {}}
    failed = []
    for name in names:
        work = os.path.join(out, "work", name)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work, exist_ok=True)
        opts = Options(
            smoke=args.smoke,
            runs=args.runs or (1 if args.smoke else 5),
            duration=args.duration or (1.5 if args.smoke else 5.0),
            work_dir=work,
            baselines=not args.no_baselines,
        )
        print(f"== {name}: {BENCHMARKS[name]}", flush=True)
        start = time.monotonic()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            result = trio.run(module.run, opts)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            result = {"error": traceback.format_exc(), "figures": []}
        result["seconds"] = round(time.monotonic() - start, 1)
        results["benchmarks"][name] = result
        write_json(os.path.join(out, "results.json"), results)
        for fig in result.get("figures", []):
            print("   " + format_figure(fig), flush=True)
    if not args.no_plots:
        from benchmarks import plots

        plots.render(results, out)
    from benchmarks import report

    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report.markdown(results))
    print(f"results: {os.path.join(out, 'results.json')}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def format_figure(fig: dict[str, Any]) -> str:
    v = fig["value"]
    med = v.get("median")
    text = f"{fig['name']}: {med:,.3g} {fig['unit']}" if med is not None else f"{fig['name']}: n/a"
    if v.get("n", 0) > 1:
        text += f" (min {v['min']:,.3g}, max {v['max']:,.3g}, n={v['n']})"
    for base, summary in fig.get("baseline", {}).items():
        bm = summary.get("median") if isinstance(summary, dict) else summary
        if bm:
            text += f"; {base} {bm:,.3g}"
    if fig.get("target"):
        text += (
            f"; target {fig['target']}: "
            + {True: "met", False: "MISSED", None: "-"}[fig.get("met")]
        )
    if fig.get("note"):
        text += f" [{fig['note']}]"
    return text


if __name__ == "__main__":
    sys.exit(main())
