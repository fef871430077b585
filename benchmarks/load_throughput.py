"""Load throughput and host memory: streamload vs safetensors vs the disk, in one run.

    python -m benchmarks.load_throughput [--size-gb 3] [--rounds 3] [--cold] [--json FILE]

Writes a Llama-shaped bf16 checkpoint (4 shards, random data) once, then measures each method in
its own process, alternating methods round by round, and reports medians and ratios to the
baselines measured in the same run:

- ``safetensors``: ``safetensors.torch.load_file`` per shard + ``clone()`` of every tensor
  (every byte materialised in process memory);
- ``streamload-cpu``: ``streamload.load`` to the CPU, ``cpu_policy="copy"``;
- ``streamload-mmap``: to the CPU, ``cpu_policy="mmap"`` (zero copy: pages stay in the page
  cache, reported as such, not as a faster load);
- ``streamload-sim``: to a staged ``SimulatedGPU`` (the CUDA path's staging ring and copies, with
  a host ``copy_`` as the copy primitive);
- ``disk``: 8 threads ``pread``-ing 16 MiB chunks into reused buffers (the read limit).

``--cold`` evicts the files from the page cache (``posix_fadvise(DONTNEED)``) before every run.
Peak host memory is the process's peak RSS (``VmHWM``) minus its RSS once the libraries are
imported, minus the bytes placed (a simulated GPU's memory is host memory too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

METHODS = ("disk", "safetensors", "streamload-cpu", "streamload-mmap", "streamload-sim")
CHUNK = 16 * 2**20


def llama_shaped(size_gb: float) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Tensor shapes (bf16) and config of a Llama-style model of about ``size_gb`` GB."""
    hidden, inter, heads, kv_heads, vocab = 2048, 8192, 16, 8, 32000
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
    for path in directory.glob("*.safetensors"):
        with path.open("rb+") as f:
            os.fsync(f.fileno())
    marker.write_text(json.dumps({"size_gb": size_gb}))
    return directory


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


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


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``; unlike ``ru_maxrss`` it is not inherited from the
    parent across ``exec``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# --- the methods (each runs in a fresh process) --------------------------------------------


def run_disk(directory: Path) -> dict[str, Any]:
    files = shard_files(directory)
    jobs = [(p, off) for p in files for off in range(0, p.stat().st_size, CHUNK)]
    lock = threading.Lock()
    total = 0

    def worker() -> None:
        nonlocal total
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        fds: dict[Path, int] = {}
        got = 0
        while True:
            with lock:
                if not jobs:
                    break
                path, off = jobs.pop()
            fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
            got += os.preadv(fd, [view], off)
        for fd in fds.values():
            os.close(fd)
        with lock:
            total += got

    threads = [threading.Thread(target=worker) for _ in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - start, "bytes": total, "placed": 0}


def run_safetensors(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    start = time.perf_counter()
    kept = {}
    for path in shard_files(directory):
        loaded = load_file(path)
        kept.update({name: tensor.clone() for name, tensor in loaded.items()})
        del loaded
    seconds = time.perf_counter() - start
    placed = sum(t.nbytes for t in kept.values())
    return {"seconds": seconds, "bytes": placed, "placed": placed}


def run_streamload(directory: Path, method: str) -> dict[str, Any]:
    import anyio

    import streamload
    from streamload.testing import SimulatedGPU

    policy: Literal["copy", "mmap"] = "mmap" if method == "streamload-mmap" else "copy"
    if method == "streamload-sim":
        devices: list[Any] = [SimulatedGPU("sim:0", total_bytes=64 * 2**30)]
    else:
        devices = ["cpu"]
    params = streamload.LoadParams(
        devices=devices, cpu_policy=policy, reserve_min_bytes=0, max_seq_len=256
    )
    worst = 0.0

    async def main() -> Any:
        nonlocal worst
        done = anyio.Event()

        async def heartbeat() -> None:
            nonlocal worst
            last = time.perf_counter()
            while not done.is_set():
                await anyio.sleep(0.001)
                now = time.perf_counter()
                worst = max(worst, now - last)
                last = now

        async with anyio.create_task_group() as group:
            group.start_soon(heartbeat)
            model = await streamload.load(directory, params)
            done.set()
        return model

    start = time.perf_counter()
    model = anyio.run(main)
    seconds = time.perf_counter() - start
    placed = model.report.nbytes
    return {
        "seconds": seconds,
        "bytes": model.report.stored_bytes,
        "placed": 0 if method == "streamload-mmap" else placed,
        "worst_loop_gap_ms": worst * 1000,
        "staging_bytes": model.report.staging_bytes,
    }


RUNNERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "disk": run_disk,
    "safetensors": run_safetensors,
    "streamload-cpu": lambda d: run_streamload(d, "streamload-cpu"),
    "streamload-mmap": lambda d: run_streamload(d, "streamload-mmap"),
    "streamload-sim": lambda d: run_streamload(d, "streamload-sim"),
}


def run_one(method: str, directory: Path) -> dict[str, Any]:
    # Import everything any method needs first, so the baseline includes the libraries.
    import anyio  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import streamload
    import streamload.testing  # noqa: F401

    base = rss_bytes()
    result = RUNNERS[method](directory)
    result["extra_host_bytes"] = peak_rss_bytes() - base - result["placed"]
    result["gb_per_s"] = result["bytes"] / result["seconds"] / 1e9
    return result


# --- the driver ----------------------------------------------------------------------------


def measure(directory: Path, methods: list[str], rounds: int, cold: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    if not cold:
        warm(directory)
    for r in range(rounds):
        order = methods if r % 2 == 0 else list(reversed(methods))
        for method in order:
            if cold:
                evict(directory)
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.load_throughput",
                    "--child",
                    method,
                    "--dir",
                    str(directory),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary: dict[str, Any] = {}
    for method, results in runs.items():
        summary[method] = {
            key: statistics.median(r[key] for r in results)
            for key in results[0]
            if isinstance(results[0][key], (int, float))
        }
    return {"cold": cold, "rounds": rounds, "methods": summary, "runs": runs}


def ratios(summary: dict[str, Any]) -> dict[str, float]:
    methods = summary["methods"]
    out: dict[str, float] = {}

    def rate(m: str) -> float:
        return float(methods[m]["gb_per_s"])

    if "safetensors" in methods:
        for m in ("streamload-cpu", "streamload-sim", "streamload-mmap"):
            if m in methods:
                out[f"{m}/safetensors"] = rate(m) / rate("safetensors")
    if "disk" in methods:
        for m in ("streamload-cpu", "streamload-sim"):
            if m in methods:
                out[f"{m}/disk"] = rate(m) / rate("disk")
    if "streamload-sim" in methods and "streamload-cpu" in methods:
        out["streamload-cpu/streamload-sim"] = rate("streamload-cpu") / rate("streamload-sim")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(".bench/llama-3gb"))
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.dir)))
        return 0
    if args.write_only:
        ensure_checkpoint(args.dir, args.size_gb)
        return 0
    # Written in a child process, so this driver never holds the tensors.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.load_throughput",
            "--write-only",
            "--dir",
            str(args.dir),
            "--size-gb",
            str(args.size_gb),
        ],
        check=True,
    )
    directory = args.dir
    result = measure(directory, args.methods.split(","), args.rounds, args.cold)
    result["ratios"] = ratios(result)
    result["checkpoint_bytes"] = sum(p.stat().st_size for p in shard_files(directory))
    text = json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
