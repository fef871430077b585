"""Run every benchmark: ``python -m benchmarks`` (what ``make bench`` runs).

Plan time (``benchmarks.plan_time``), then load throughput and host memory warm and cold, the
headline: unprimed, each load in a fresh process, timed from the call
(``benchmarks.load_throughput``: streamload and the peer loaders, alternating), then warm with
memory primed for a few methods, a labelled extra column. Writes to ``benchmarks/results/``:

- ``summary.json``: machine facts, the command, medians and ratios, plan time, loop stalls;
- ``README_TABLE.md``: the same as markdown tables, for the README;
- ``throughput.png``: throughput per method, warm and cold;
- ``load_warm.json``, ``load_cold.json``, ``plan_time.json``: everything, every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import load_throughput, machine, plan_time, report
from benchmarks.methods import METHODS, shard_files

ROOT = load_throughput.ROOT
# The primed extra column: the default and its huge-page variants beside the baselines.
PRIMED_METHODS = (
    "disk",
    "safetensors",
    "streamload-cpu",
    "streamload-cpu-huge",
    "streamload-cpu-auto",
)
RESULTS = ROOT / "benchmarks" / "results"


def checkpoint_facts(directory: Path) -> dict[str, Any]:
    config = json.loads((directory / "config.json").read_text())
    return {
        "bytes": sum(p.stat().st_size for p in shard_files(directory)),
        "shards": len(shard_files(directory)),
        "layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "dtype": "bf16",
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--dir", type=Path, default=ROOT / ".bench" / "llama-3gb")
    p.add_argument("--size-gb", type=float, default=3.0)
    # Five rounds: on a shared machine three medians still move by tens of percent.
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--modes",
        default="warm,cold,warm-primed",
        help="warm and cold (the headline) and warm-primed (a labelled extra: memory primed "
        "before each load, for --primed-methods only)",
    )
    p.add_argument("--primed-methods", default=",".join(PRIMED_METHODS))
    p.add_argument("--no-plan-time", action="store_true", help="skip the plan-time benchmark")
    p.add_argument("--timeout", type=float, default=load_throughput.DEFAULT_TIMEOUT)
    p.add_argument(
        "--settle",
        type=float,
        default=load_throughput.SETTLE,
        help="seconds each load waits after its imports, before the timed call",
    )
    p.add_argument("--results", type=Path, default=RESULTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)}; known: {', '.join(METHODS)}")
    results: Path = args.results
    results.mkdir(parents=True, exist_ok=True)
    before = machine.load_average()
    plan: dict[str, Any] = {}
    if not args.no_plan_time:
        plan_time.main(["--json", str(results / "plan_time.json")])
        plan = json.loads((results / "plan_time.json").read_text())
    load_throughput.write_checkpoint(args.dir, args.size_gb)
    load: dict[str, Any] = {}
    for mode in args.modes.split(","):
        primed = mode == "warm-primed"
        chosen = [m for m in methods if m in args.primed_methods.split(",")] if primed else methods
        result = load_throughput.benchmark(
            args.dir,
            chosen,
            args.rounds,
            cold=mode == "cold",
            timeout=args.timeout,
            prime=primed,
            settle=args.settle,
        )
        (results / f"load_{mode}.json").write_text(json.dumps(result, indent=2))
        load[mode] = result["methods"]
    command = "python -m benchmarks" + ("" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        command += " " + " ".join(sys.argv[1:])
    summary = {
        "command": command,
        "machine": machine.facts(args.dir, ROOT),
        "load_average": {"before": before, "after": machine.load_average()},
        "checkpoint": checkpoint_facts(args.dir),
        "rounds": args.rounds,
        "settle_s": args.settle,
        "load": load,
        "plan_time": plan,
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = report.markdown(summary)
    (results / "README_TABLE.md").write_text(table)
    report.plot(summary, results / "throughput.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
