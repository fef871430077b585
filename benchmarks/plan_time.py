"""Plan time for big checkpoints vs a plain read of their headers, in one run.

    python -m benchmarks.plan_time [--repeat 15] [--json FILE]

Writes sparse Llama-3.1-70B- and 405B-shaped checkpoints (real names and shapes, data regions
that are file holes; ~170 shards for 405B), then alternates two measurements and reports medians:

- ``headers``: open every shard, read its 8-byte length and header, ``json.loads`` it (the floor
  for anything that must know every tensor);
- ``plan``: ``streamload.plan(path, params)`` end to end: index, headers with full validation,
  ``config.json``, model spec, device probe (simulated GPUs, the CPU's budget given) and planner.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import streamload
from streamload.testing import SimulatedGPU, TensorShape, write_sharded
from streamload.testing._shapes import LLAMA_3_1_70B, LLAMA_3_1_405B, llama_shapes

SHAPES: dict[str, tuple[Mapping[str, Any], int, int]] = {
    # name: (config, shard size, simulated GPUs of 80 GiB)
    "llama-3.1-70b": (LLAMA_3_1_70B, 5 * 10**9, 2),
    "llama-3.1-405b": (LLAMA_3_1_405B, 53 * 10**8, 8),
}


def write(directory: Path, config: Mapping[str, Any], shard_bytes: int) -> Path:
    shapes = {
        name: TensorShape(dtype, shape) for name, (dtype, shape) in llama_shapes(config).items()
    }
    return write_sharded(
        directory, shapes, max_shard_bytes=shard_bytes, sparse=True, config=dict(config)
    )


def read_headers(directory: Path) -> int:
    """Read and parse every shard's header; returns the number of tensors seen."""
    count = 0
    for path in sorted(directory.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            count += len(json.loads(os.pread(fd, n, 8)))
        finally:
            os.close(fd)
    return count


def plan_once(directory: Path, gpus: int) -> streamload.Plan:
    devices: list[Any] = [SimulatedGPU(f"sim:{i}", total_bytes=80 * 2**30) for i in range(gpus)]
    params = streamload.LoadParams(devices=[*devices, "cpu"], cpu_memory_bytes=2**40)
    return streamload.plan(directory, params)


def measure(directory: Path, gpus: int, repeat: int) -> dict[str, Any]:
    read_headers(directory)
    plan_once(directory, gpus)  # warm the page cache and imports
    headers, plans = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        read_headers(directory)
        headers.append(time.perf_counter() - start)
        start = time.perf_counter()
        plan = plan_once(directory, gpus)
        plans.append(time.perf_counter() - start)
    h, p = statistics.median(headers), statistics.median(plans)
    return {
        "shards": len(list(directory.glob("*.safetensors"))),
        "layers": len(plan.layer_devices),
        "headers_ms": h * 1000,
        "plan_ms": p * 1000,
        "plan_over_headers": p / h,
        "devices": sorted(set(plan.layer_devices), key=plan.layer_devices.index),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, shard_bytes, gpus) in SHAPES.items():
            directory = write(Path(tmp) / name, config, shard_bytes)
            results[name] = measure(directory, gpus, args.repeat)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
