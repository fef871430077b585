"""Load a checkpoint over every CUDA GPU and the CPU; print the device map and the report.

    python -m examples.mixed_gpu_cpu                      # a small random Llama, written for you
    python -m examples.mixed_gpu_cpu path/to/checkpoint   # your own safetensors checkpoint

With CUDA, ``devices="auto"``: every visible GPU in order, then the CPU. Without CUDA, two
simulated GPUs (``streamload.testing.SimulatedGPU``) stand in, sized from the checkpoint so that
the first holds the embeddings, the head and 1.5 layers, the second 2.5 layers, and the rest goes
to the CPU: the same engine path a GPU takes, on any machine.

``write_tiny_llama``, ``simulated_gpus`` and ``devices_for`` are shared with the other examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import anyio
import structlog
import torch

import streamload
from streamload.testing import SimulatedGPU

MiB = 2**20
GiB = 2**30


def write_tiny_llama(directory: Path, *, layers: int = 5, seed: int = 0) -> Path:
    """Write a random Llama (hidden 64, vocab 256) with ``transformers.save_pretrained``,
    sharded into a few files with an index, as checkpoints on the Hub are; returns ``directory``.
    """
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="300KB")
    return directory


def simulated_gpus(
    path: Path, params: streamload.LoadParams, *, first: int = 0
) -> list[SimulatedGPU]:
    """Two simulated GPUs sized for the checkpoint at ``path`` under ``params``: ``sim:0`` holds
    the non-mapped parts and 1.5 layers, ``sim:1`` 2.5 layers (both after reserve and
    activations, as the planner counts them). ``first`` numbers them from ``sim:{first}``: like
    ``cuda:N``, a name stands for one device in the process (loads at once count each other's
    memory on it)."""
    probe = SimulatedGPU("probe", total_bytes=GiB)  # its row tells reserve and activations
    roomy = streamload.plan(path, dataclasses.replace(params, devices=[probe, "cpu"]))
    spec = streamload.inspect(path, params.dtype)
    row = roomy.devices[0]
    layer = max(layer.nbytes for layer in spec.layers) + max(roomy.layer_kv_bytes)
    fixed = row.reserve_bytes + row.activation_bytes
    return [
        SimulatedGPU(f"sim:{first}", total_bytes=fixed + spec.non_mapped_bytes + int(1.5 * layer)),
        SimulatedGPU(f"sim:{first + 1}", total_bytes=fixed + int(2.5 * layer)),
    ]


def devices_for(
    path: Path, params: streamload.LoadParams, *, first: int = 0
) -> Literal["auto"] | list[str | SimulatedGPU]:
    """``"auto"`` (every CUDA GPU, then the CPU); without CUDA, two simulated GPUs
    (``sim:{first}`` and the next) and the CPU."""
    if torch.cuda.is_available():
        return "auto"
    return [*simulated_gpus(path, params, first=first), "cpu"]


def print_device_map(model: streamload.LoadedModel) -> None:
    """One line per module: streamload's device and the torch device its tensors are on."""
    print(f"{'module':<24} {'device':<8} torch device")
    for module, device in model.placement.items():
        print(f"{module:<24} {device:<8} {model.device_map[module]}")


def print_report(report: streamload.LoadReport) -> None:
    """Per-device bytes, layers, seconds and throughput, then re-plans and fallbacks."""
    print(f"\n{'device':<8} {'MiB':>9} {'layers':>6} {'tensors':>7} {'seconds':>8} {'GB/s':>7}")
    for row in report.devices:
        print(
            f"{row.device:<8} {row.nbytes / MiB:>9.2f} {row.layers:>6} {row.tensors:>7} "
            f"{row.seconds:>8.3f} {row.gb_per_s:>7.2f}"
        )
    print(
        f"{'total':<8} {report.nbytes / MiB:>9.2f} {'':>6} {report.tensors:>7} "
        f"{report.seconds:>8.3f} {report.gb_per_s:>7.2f}"
    )
    print(f"re-plans: {len(report.replans)}")
    for replan in report.replans:
        print(f"  {replan.device} at layer {replan.at_layer}: {replan.reason}")
    for fallback in report.fallbacks:
        print(f"paged attention disabled: {fallback.reason}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.mixed_gpu_cpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", nargs="?", type=Path, help="checkpoint directory or file")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    args = parser.parse_args(argv)
    # The report below says what the load did; from the library's log keep warnings (re-plans).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="streamload-example-") as scratch:
        path = args.path or write_tiny_llama(Path(scratch))
        params = streamload.LoadParams(max_seq_len=args.max_seq_len)
        params = dataclasses.replace(params, devices=devices_for(path, params))
        model = anyio.run(streamload.load, path, params)
        try:
            print(f"loaded {path} ({len(model.tensors)} tensors)\n")
            print_device_map(model)
            print_report(model.report)
        finally:
            model.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
