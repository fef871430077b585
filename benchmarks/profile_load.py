"""Where a streamload load spends its time, stage by stage, in this process.

    python -m benchmarks.profile_load [streamload-cpu|streamload-sim] [--rounds 3] [--json FILE]

Wraps the engine's stage functions (header inspection, allocation, the ``preadv`` reads, the
simulated GPU's host copy, conversion and fence waits, live-memory probes, prefetch advice,
event logging) with timers that record, per call, wall seconds, the calling thread's CPU
seconds and its minor page faults, then runs the load ``--rounds`` times on the warm benchmark
checkpoint and prints the medians. Stages run concurrently on reader threads, so their wall
seconds add up to more than the load's; CPU seconds and page faults are what the two cores
were busy with. ``loop`` is the event-loop thread's own CPU time over the load.

The wrapped names are private to the engine: a name that is gone is reported as missing, not
an error. For a sampling profile of every thread, run a child under py-spy instead:

    py-spy record --threads --native -o profile.svg -- \\
        python -m benchmarks.load_throughput --child streamload-sim --dir .bench/llama-3gb
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import load_throughput
from benchmarks.methods import METHODS

# (module, attribute path, stage name)
STAGES = (
    ("streamload.engine._load", "inspect", "inspect headers"),
    ("streamload.engine._load", "_Load._allocate_sync", "allocate"),
    ("streamload.engine._destinations", "cut_chunks", "cut chunks"),
    ("streamload.engine._reader", "host_view", "memoryview"),
    ("streamload.engine._reader", "read_into", "preadv"),
    ("streamload.testing._simulated", "SimulatedGPU.copy_from_host", "copy to device"),
    ("streamload.engine._destinations", "Destinations.complete", "fences + convert"),
    ("streamload.engine._budget", "Budget.live_free", "live free probe"),
    ("streamload.engine._reader", "Reader.prefetch", "prefetch advice"),
    ("streamload.events", "log_event", "log event"),
)


@dataclass(slots=True)
class Tally:
    calls: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    faults: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, wall: float, cpu: float, faults: int) -> None:
        with self.lock:
            self.calls += 1
            self.wall += wall
            self.cpu += cpu
            self.faults += faults


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def _timed(function: Callable[..., Any], tally: Tally) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, cpu, faults = time.perf_counter(), time.thread_time(), _faults()
        try:
            return function(*args, **kwargs)
        finally:
            tally.add(time.perf_counter() - wall, time.thread_time() - cpu, _faults() - faults)

    return wrapper


@contextlib.contextmanager
def instrumented() -> Iterator[dict[str, Tally | None]]:
    """Wrap every stage for the duration; yields stage -> tally (``None``: name not found)."""
    import importlib

    tallies: dict[str, Tally | None] = {}
    undo: list[tuple[Any, str, Any]] = []
    for module_name, path, stage in STAGES:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        original = owner.__dict__.get(name) if owner is not None else None
        if original is None:
            tallies[stage] = None
            continue
        tally = tallies[stage] = Tally()
        if isinstance(original, staticmethod):
            replacement: Any = staticmethod(_timed(original.__func__, tally))
        else:
            replacement = _timed(original, tally)
        setattr(owner, name, replacement)
        undo.append((owner, name, original))
    try:
        yield tallies
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def profile_once(method: str, directory: Path) -> dict[str, Any]:
    """One instrumented load; seconds, loop CPU and every stage's figures."""
    load_throughput.warm(directory)
    with instrumented() as tallies:
        loop_cpu = time.thread_time()
        faults = _faults()
        loaded = METHODS[method].run(directory)
        loop_cpu = time.thread_time() - loop_cpu
        faults = _faults() - faults
    stages: dict[str, Any] = {}
    for stage, tally in tallies.items():
        stages[stage] = (
            None
            if tally is None
            else {
                "calls": tally.calls,
                "wall": tally.wall,
                "cpu": tally.cpu,
                "faults": tally.faults,
            }
        )
    stages["loop"] = {"calls": 1, "wall": loaded.seconds, "cpu": loop_cpu, "faults": faults}
    return {
        "seconds": loaded.seconds,
        "gb_per_s": loaded.bytes_read / loaded.seconds / 1e9,
        **loaded.extras,
        "stages": stages,
    }


def median_profile(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: statistics.median(r[key] for r in runs)
        for key in runs[0]
        if isinstance(runs[0][key], (int, float))
    }
    out["stages"] = {}
    for stage, first in runs[0]["stages"].items():
        if first is None:
            out["stages"][stage] = None
            continue
        out["stages"][stage] = {
            key: statistics.median(r["stages"][stage][key] for r in runs) for key in first
        }
    return out


def render(method: str, result: dict[str, Any]) -> str:
    lines = [
        f"{method}: {result['seconds']:.3f} s, {result['gb_per_s']:.2f} GB/s "
        f"(median of the rounds)",
        f"{'stage':<18} {'calls':>6} {'wall s':>8} {'cpu s':>8} {'faults':>9}",
    ]
    for stage, row in result["stages"].items():
        if row is None:
            lines.append(f"{stage:<18} {'(missing)':>6}")
            continue
        lines.append(
            f"{stage:<18} {row['calls']:>6.0f} {row['wall']:>8.3f} {row['cpu']:>8.3f} "
            f"{row['faults']:>9.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "method",
        nargs="?",
        default="streamload-sim",
        choices=["streamload-cpu", "streamload-sim", "streamload-mmap"],
    )
    parser.add_argument("--dir", type=Path, default=Path(".bench/llama-3gb"))
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    load_throughput.write_checkpoint(args.dir, args.size_gb)
    import structlog

    with open(os.devnull, "w") as sink:
        # Events are still built and rendered; only the terminal is spared the lines.
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink))
        runs = [profile_once(args.method, args.dir) for _ in range(args.rounds)]
        structlog.reset_defaults()
    result = median_profile(runs)
    print(render(args.method, result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"median": result, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
