"""Load throughput and host memory: streamload vs the loaders people use today, in one run.

    python -m benchmarks.load_throughput [--size-gb 3] [--rounds 3] [--cold] [--methods a,b]
                                         [--json FILE]

Writes a Llama-shaped bf16 checkpoint (4 shards, random data, a llama ``config.json``) once,
then measures each method (``benchmarks.methods``) in its own process, alternating the order
round by round, and reports medians and ratios to the baselines of the same run
(``safetensors`` and ``disk``; each ratio is the median of the per-round ratios).

Warm runs read every file just before each run so the page cache holds it; ``--cold`` evicts
the files (``posix_fadvise(DONTNEED)``) before each run instead. Nothing else is prepared: each
load meets memory as the machine leaves it, as a user's does (DESIGN §10), and that is the
headline. ``--prime`` adds the preparation older figures used, labelled as such wherever it is
shown: each child faults in twice the checkpoint + 1 GiB of fresh memory after its imports and
gives it back, just before the load (``procfs.prime``). Why it matters: on a virtual machine whose
guest reports free pages to the host, a page untouched for a while costs a host fault on first
touch, several times the cost of zeroing it, and first touch of fresh pages is most of a warm
load's cost, so unprimed runs move with what ran before them and how long ago (2x apart on the
shared 2-core machine these figures come from) and need several alternating rounds. Each
throughput run therefore waits ``--settle`` seconds (default ``SETTLE``) after its imports and
before the timed call: a guest reports pages freed for 2 s or so, so without the wait a method
met memory the previous run had just freed and the host still backed, more of it the sooner
its imports were done (a method with fewer imports was timed on cheaper memory); after the
wait every method meets memory the machine has reclaimed, as a server starting on a machine
that has been up a while does.

Per run: ``seconds`` of the load call (after the libraries are imported; for streamload from
the call of ``anyio.run``, the event loop's start included), ``gb_per_s``
(checkpoint tensor bytes / seconds), ``mapped_bytes`` (tensor bytes left memory-mapped from the
checkpoint file rather than held in process memory: such a load is labelled ``mapped``, and
``gb_per_s_touched`` adds the time to fault every page in once), ``extra_host_bytes`` (peak RSS,
``VmHWM``, beyond the RSS once imports are done, the bytes placed and the mapped pages still
resident) and ``extra_anon_bytes`` (the same from sampled anonymous memory, which leaves out
file pages a loader maps transiently), and ``user_s``, ``sys_s``, ``minor_faults`` over the
load call, every thread included (CPU seconds move less than wall seconds on a shared machine),
and ``vm_*``: the system-wide ``/proc/vmstat`` counts over the call of huge pages faulted in
(``thp_fault_alloc``), huge-page faults that fell back to 4 KiB pages (``thp_fault_fallback``)
and direct compactions (``compact_stall``, ``compact_fail``).
A simulated GPU's memory is host memory, so it counts as placed. A method that fails reports
``{"error": reason}`` instead of figures.

streamload's loads also run a second time each round, with a 1 ms heartbeat task on their
event loop, for ``worst_loop_gap_ms`` (the worst gap between its wake-ups): a heartbeat's
wake-ups cost CPU and hand the GIL back and forth with the reader threads, so the throughput
runs of every method go without one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import procfs
from benchmarks.methods import CHUNK, METHODS, shard_files

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("safetensors", "disk", "materialise", "runai-buffered")
DEFAULT_TIMEOUT = 900.0
SETTLE = 3.0  # seconds each throughput run waits after its imports (see above)
PRIME_EXTRA = 2**30

# (hidden, intermediate, heads, kv heads, vocab): the 3 GB default keeps Llama-3.2-1B-like
# widths; small checkpoints (tests) shrink them so a few layers fit.
_WIDE = (2048, 8192, 16, 8, 32000)
_NARROW = (256, 1024, 4, 2, 4096)


def llama_shaped(size_gb: float) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Tensor shapes (bf16) and config of a Llama-style model of about ``size_gb`` GB."""
    hidden, inter, heads, kv_heads, vocab = _WIDE if size_gb >= 0.5 else _NARROW
    head_dim = hidden // heads
    per_layer = 2 * (
        hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter + 2 * hidden
    )
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    return shapes, config


def ensure_checkpoint(directory: Path, size_gb: float) -> Path:
    """Write the benchmark checkpoint (4 shards of random bf16) unless it is already there."""
    import torch

    from streamload.testing import write_sharded

    marker = directory / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == {"size_gb": size_gb}:
        return directory
    shapes, config = llama_shaped(size_gb)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=gen, dtype=torch.bfloat16)
        for name, shape in shapes.items()
    }
    write_sharded(directory, tensors, num_shards=4, sparse=False, config=config)
    del tensors
    for path in shard_files(directory):
        with path.open("rb+") as f:
            os.fsync(f.fileno())
    marker.write_text(json.dumps({"size_gb": size_gb}))
    return directory


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in shard_files(directory))


def evict(directory: Path) -> None:
    """Drop the checkpoint's pages from the page cache."""
    for path in shard_files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(directory: Path) -> None:
    """Read every file once so the page cache holds it."""
    buf = bytearray(CHUNK)
    for path in shard_files(directory):
        with path.open("rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --- one run, in the child process -------------------------------------------------------


def run_one(
    name: str, directory: Path, prime_bytes: int = 0, stall: bool = False, settle: float = 0.0
) -> dict[str, Any]:
    """Run method ``name`` once in this process and measure it (see the module docstring);
    with ``stall``, its heartbeat run (``Method.stall``) instead; ``settle``: seconds to wait
    after the imports."""
    method = METHODS[name]
    run = method.stall if stall and method.stall is not None else method.run
    # Import what the method needs first, so the baseline includes the libraries.
    for module in ("torch", *method.imports):
        importlib.import_module(module)
    time.sleep(settle)
    procfs.prime(prime_bytes)
    procfs.reset_peak_rss()
    base_rss = procfs.rss_bytes()
    base_file = procfs.status_bytes("RssFile")
    with procfs.AnonPeak() as anon:
        base_anon = anon.peak
        counters = procfs.vmstat()
        before = resource.getrusage(resource.RUSAGE_SELF)
        loaded = run(directory)
        after = resource.getrusage(resource.RUSAGE_SELF)
        counters = {k: v - counters[k] for k, v in procfs.vmstat().items() if k in counters}
    peak = procfs.peak_rss_bytes()
    file_growth = procfs.status_bytes("RssFile") - base_file
    tensors = procfs.unique_tensors(loaded.tensors)
    held = sum(t.nbytes for t in tensors)
    mapped = procfs.mapped_bytes(tensors)
    placed = held - mapped
    result: dict[str, Any] = {
        "seconds": loaded.seconds,
        "bytes": loaded.bytes_read,
        "gb_per_s": loaded.bytes_read / loaded.seconds / 1e9,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "tensors": len(tensors),
        "placed_bytes": placed,
        "mapped_bytes": mapped,
        "extra_host_bytes": peak - base_rss - placed - min(mapped, max(file_growth, 0)),
        "extra_anon_bytes": max(anon.peak - base_anon - placed, 0),
        **{f"vm_{key}": value for key, value in counters.items()},
        **loaded.extras,
    }
    if mapped:
        start = time.perf_counter()
        procfs.touch_pages(tensors)
        touch = time.perf_counter() - start
        result["touch_seconds"] = touch
        result["gb_per_s_touched"] = loaded.bytes_read / (loaded.seconds + touch) / 1e9
    return result


def child(
    name: str, directory: Path, prime_bytes: int = 0, stall: bool = False, settle: float = 0.0
) -> dict[str, Any]:
    """``run_one``, with a failure reported as ``{"error": reason}`` (paths left out)."""
    try:
        return run_one(name, directory, prime_bytes, stall, settle)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        for path in {str(directory.resolve()), str(directory)}:
            reason = reason.replace(path, "<checkpoint>")
        traceback.print_exc()
        return {"error": reason}


# --- the driver ----------------------------------------------------------------------------


def spawn(
    name: str,
    directory: Path,
    timeout: float,
    prime_bytes: int = 0,
    stall: bool = False,
    settle: float = 0.0,
) -> dict[str, Any]:
    """Run one method in a fresh process; a crash or a timeout is an error, not an exception."""
    env = dict(os.environ, **dict(METHODS[name].env)) if name in METHODS else dict(os.environ)
    command = [sys.executable, "-m", "benchmarks.load_throughput", "--child", name]
    command += ["--dir", str(directory.resolve())]
    command += ["--prime-bytes", str(prime_bytes), "--settle", str(settle)]
    command += ["--stall"] if stall else []
    try:
        out = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        try:
            result: dict[str, Any] = json.loads(lines[-1])
            return result
        except json.JSONDecodeError:
            pass
    if out.returncode < 0:
        status = f"killed by {signal.Signals(-out.returncode).name}"
    else:
        status = f"exit status {out.returncode}"
    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"{status}: {last}"}


def measure(
    directory: Path,
    methods: list[str],
    rounds: int,
    cold: bool,
    timeout: float = DEFAULT_TIMEOUT,
    prime: bool = False,
    settle: float = SETTLE,
) -> dict[str, list[dict[str, Any]]]:
    """Every method once per round, in alternating order; the raw per-run results, each
    throughput run after ``settle`` seconds idle. A method with a heartbeat run
    (``Method.stall``) has it right after its load, under the same conditions but the wait;
    its worst loop gap joins that round's result (``stall_error`` if it failed)."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    prime_bytes = 2 * checkpoint_bytes(directory) + PRIME_EXTRA if prime else 0

    def one(name: str, stall: bool = False) -> dict[str, Any]:
        if cold:
            evict(directory)
        else:
            warm(directory)
        return spawn(name, directory, timeout, prime_bytes, stall, 0.0 if stall else settle)

    for r in range(rounds):
        order = methods if r % 2 == 0 else list(reversed(methods))
        for name in order:
            result = one(name)
            if "error" not in result and name in METHODS and METHODS[name].stall is not None:
                stall = one(name, stall=True)
                if "error" in stall:
                    result["stall_error"] = stall["error"]
                else:
                    for key in ("worst_loop_gap_ms", "worst_loop_gap_at_s"):
                        result[key] = stall[key]
            runs[name].append(result)
    return runs


def _paired_ratio(
    a: list[dict[str, Any]], b: list[dict[str, Any]], key: str = "gb_per_s", base_key: str = ""
) -> float | None:
    """Median over rounds of ``a[r][key] / b[r][base_key or key]`` (rounds where both ran)."""
    base_key = base_key or key
    pairs = [x[key] / y[base_key] for x, y in zip(a, b, strict=True) if key in x and base_key in y]
    return statistics.median(pairs) if pairs else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method: medians of every figure over the rounds it ran, ratios to the baselines
    (``x_safetensors``, ``x_disk``, ``x_materialise``), or ``error`` when no round ran."""
    summary: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        ok = [r for r in results if "error" not in r]
        errors = sorted({r["error"] for r in results if "error" in r})
        row: dict[str, Any] = {"note": METHODS[name].note if name in METHODS else ""}
        if not ok:
            row["error"] = errors[0] if errors else "not run"
            summary[name] = row
            continue
        keys = [k for k in ok[0] if isinstance(ok[0][k], (int, float))]
        row.update({k: statistics.median(r[k] for r in ok if k in r) for k in keys})
        row["rounds"] = len(ok)
        row["mapped"] = row["mapped_bytes"] > 0
        if errors:
            row["failed_rounds"] = len(results) - len(ok)
            row["errors"] = errors
        for base in BASELINES:
            if base in runs and base != name:
                for key, suffix in (("gb_per_s", ""), ("gb_per_s_touched", "_touched")):
                    ratio = _paired_ratio(results, runs[base], key, "gb_per_s")
                    if ratio is not None:
                        row[f"x_{base}{suffix}"] = ratio
        summary[name] = row
    if "streamload-cpu" in runs and "streamload-sim" in runs:
        ratio = _paired_ratio(runs["streamload-cpu"], runs["streamload-sim"])
        if ratio is not None:
            summary["streamload-sim"]["cpu_over_sim"] = ratio
    return summary


def benchmark(
    directory: Path,
    methods: list[str],
    rounds: int,
    cold: bool,
    timeout: float = DEFAULT_TIMEOUT,
    prime: bool = False,
    settle: float = SETTLE,
) -> dict[str, Any]:
    """Measure and summarise; the result as written to JSON."""
    runs = measure(directory, methods, rounds, cold, timeout, prime, settle)
    return {
        "cold": cold,
        "rounds": rounds,
        "primed": prime,
        "settle_s": settle,
        "checkpoint_bytes": checkpoint_bytes(directory),
        "methods": summarise(runs),
        "runs": runs,
    }


def write_checkpoint(directory: Path, size_gb: float) -> None:
    """Write the checkpoint in a child process, so the driver never holds the tensors."""
    marker = directory / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == {"size_gb": size_gb}:
        return
    command = [sys.executable, "-m", "benchmarks.load_throughput", "--write-only"]
    command += ["--dir", str(directory.resolve()), "--size-gb", str(size_gb)]
    subprocess.run(command, cwd=ROOT, check=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path(".bench/llama-3gb"))
    p.add_argument("--size-gb", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per run")
    p.add_argument(
        "--prime",
        action="store_true",
        help="prime memory before each load: a labelled extra, never the headline (see above)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=SETTLE,
        help="seconds each run waits after its imports, before the timed call (see above)",
    )
    p.add_argument("--prime-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--stall", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.prime_bytes, args.stall, args.settle)))
        return 0
    if args.write_only:
        ensure_checkpoint(args.dir, args.size_gb)
        return 0
    write_checkpoint(args.dir, args.size_gb)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)}; known: {', '.join(METHODS)}")
    result = benchmark(
        args.dir, methods, args.rounds, args.cold, args.timeout, args.prime, args.settle
    )
    print(json.dumps(result["methods"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
