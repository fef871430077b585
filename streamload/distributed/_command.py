"""The command: ``torchrun --nproc-per-node N -m streamload.distributed load PATH ...``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import anyio
import torch
import torch.distributed as dist

from streamload._cmdline import (
    Parser,
    UsageError,
    arg_type,
    configured_logging,
    devices_from_args,
    parse_device,
    parse_size,
)
from streamload.distributed._channel import DEFAULT_TIMEOUT
from streamload.distributed._load import load_distributed
from streamload.distributed._results import DistributedModel, RankSummary, StageAssigned
from streamload.distributed._stages import _layers_text, _span
from streamload.errors import StreamloadError, format_bytes
from streamload.events import Event, ExpertsReplicated, LayerPlaced, Replanned
from streamload.params import LoadParams

__all__ = ["main", "report_table"]


class _Progress:
    """One line per placed layer or part on stdout, prefixed with the rank."""

    def __init__(self, rank: int, out: TextIO) -> None:
        self.rank = rank
        self.out = out
        self.start = 0

    def __call__(self, event: Event | StageAssigned) -> None:
        if isinstance(event, ExpertsReplicated):
            self.line(f"warning: {len(event.tensors)} expert tensors replicated: {event.reason}")
        elif isinstance(event, StageAssigned):
            self.start = event.stage.start
            stage = event.stage
            parts = ", ".join(stage.parts + stage.tied_sources) or "no parts"
            tp = f" (tensor-parallel {stage.tp_rank}/{stage.tp_size})" if stage.tp_size > 1 else ""
            self.line(f"stage: {_layers_text(stage.start, stage.stop)}{tp}; {parts}")
        elif isinstance(event, LayerPlaced):
            what = event.part if event.layer is None else f"layer {self.start + event.layer}"
            self.line(
                f"{what} -> {event.device}  {format_bytes(event.nbytes)} "
                f"in {event.seconds:.3f} s, {format_bytes(event.free_after)} free after"
            )
        elif isinstance(event, Replanned):
            at = "" if event.at_layer is None else f" at layer {self.start + event.at_layer}"
            self.line(f"re-planned{at}: {event.device} {event.reason}")

    def line(self, text: str) -> None:
        print(f"[rank {self.rank}] {text}", file=self.out, flush=True)


def report_table(summaries: Sequence[RankSummary]) -> str:
    """The per-rank report rank 0 prints: one row per rank (``placed``: bytes placed,
    ``read``: bytes read from storage; ``tp``: the rank's place in its stage, with tensor
    parallelism)."""
    tp = any(s.tp_size > 1 for s in summaries)
    header = ["rank", "host", "layers", "parts", "devices", "placed", "read", "tensors", "s"]
    header += ["replans", "tp"] if tp else ["replans"]
    rows = [header]
    for s in summaries:
        devices = ", ".join(f"{d.device}:{d.layers}" for d in s.devices)
        row = [
            str(s.rank),
            s.host,
            _span(s.start, s.stop),
            ", ".join([*s.parts, *(f"{t} (tied)" for t in s.tied_sources)]) or "-",
            devices or "-",
            format_bytes(s.nbytes),
            format_bytes(s.read_bytes),
            str(s.tensors),
            f"{s.seconds:.2f}",
            str(len(s.replans)),
        ]
        rows.append([*row, f"{s.tp_rank}/{s.tp_size}"] if tp else row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m streamload.distributed",
        description="Load one pipeline stage of a checkpoint per rank (run under torchrun).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="load PATH across the ranks and report per rank")
    load.add_argument("path", help="a checkpoint: local path, hub repo id or object-store URL")
    load.add_argument(
        "--device",
        action="append",
        type=arg_type(parse_device),
        help="a rank's device, in fill order: NAME=SIZE is a simulated GPU (sim:0=24GiB), a "
        "bare NAME a real one (cuda:1); default: cuda:LOCAL_RANK where CUDA is available",
    )
    load.add_argument("--all-local-gpus", action="store_true", help="one rank per node: every GPU")
    load.add_argument("--no-cpu", action="store_true", help="do not spill layers to the CPU")
    load.add_argument("--cpu-memory", type=arg_type(parse_size), help="host budget per rank")
    load.add_argument("--dtype", help="target dtype for floating tensors (bf16, fp16, ...)")
    load.add_argument("--max-seq-len", type=int, default=4096)
    load.add_argument("--max-batch-size", type=int, default=1)
    load.add_argument(
        "--peer-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the other ranks at each exchange (default: %(default)s)",
    )
    load.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="ranks per pipeline stage, each loading its slice of the split tensors "
        "(default: %(default)s)",
    )
    load.add_argument(
        "--tp-plan",
        type=arg_type(_parse_tp_plan),
        help='the tensor-parallel plan as JSON ({"layers.*.mlp.up_proj": "colwise", ...}); '
        "default: the model's",
    )
    load.add_argument("--backend", default="gloo", help="process-group backend (gloo, nccl)")
    load.add_argument("--json-logs", action="store_true", help="JSON log lines on stderr")
    return parser


def _parse_tp_plan(text: str) -> dict[str, str]:
    try:
        plan = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(plan, dict) or not all(isinstance(v, str) for v in plan.values()):
        raise ValueError("expected a JSON object of glob -> style")
    return plan


def _devices(args: argparse.Namespace, local_rank: int) -> tuple[list[Any], dict[str, int]]:
    devices, caps = devices_from_args(args.device or [], cpu=False)
    if not devices and torch.cuda.is_available():
        if args.all_local_gpus:
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            devices = [f"cuda:{local_rank}"]
    if not args.no_cpu:
        devices.append("cpu")
    return devices, caps


def main(argv: Sequence[str] | None = None) -> int:
    """``load PATH``: join the process group (from torchrun's environment), load this rank's
    stage, print a line per placed layer or part (prefixed with the rank) and, on rank 0, the
    per-rank report. ``--json-logs``: the events as JSON lines on stderr (each with its
    ``rank``) instead of the progress lines, and the report as one JSON object.

    Exit status: 0 on success; 2 for a bad argument or any ``StreamloadError``, the same one
    line on every rank's stderr when a rank failed; 130 when interrupted."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        return _fail(rank, str(exc))
    try:
        devices, caps = _devices(args, int(os.environ.get("LOCAL_RANK", "0")))
        params = LoadParams(
            devices=devices,
            max_memory=caps or None,
            dtype=args.dtype,
            max_seq_len=args.max_seq_len,
            max_batch_size=args.max_batch_size,
            cpu_memory_bytes=args.cpu_memory,
        )
        joined = _join(args.backend, args.peer_timeout)
    except (ValueError, StreamloadError) as exc:
        return _fail(rank, str(exc))
    try:
        return _load_and_report(args, params)
    finally:
        # On every way out, failures included: a process group left to the interpreter's exit
        # tears gloo's threads down from a destructor and aborts the process.
        if joined:
            dist.destroy_process_group()


def _load_and_report(args: argparse.Namespace, params: LoadParams) -> int:
    rank = dist.get_rank()
    progress = None if args.json_logs else _Progress(rank, sys.stdout)
    try:
        with configured_logging(args.json_logs):
            model = anyio.run(_cli_load, args, params, progress)
    except StreamloadError as exc:
        return _fail(rank, str(exc))
    except KeyboardInterrupt:
        return 130
    try:
        if rank == 0:
            if args.json_logs:
                data = {"plan": model.plan.to_dict(), "ranks": [s.to_dict() for s in model.ranks]}
                print(json.dumps(data), flush=True)
            else:
                print(report_table(model.ranks), flush=True)
    finally:
        model.release()
    return 0


async def _cli_load(
    args: argparse.Namespace, params: LoadParams, progress: _Progress | None
) -> DistributedModel:
    return await load_distributed(
        args.path,
        params,
        tensor_parallel_size=args.tensor_parallel_size,
        tp_plan=args.tp_plan,
        on_event=progress,
        peer_timeout=args.peer_timeout,
    )


def _join(backend: str, timeout: float) -> bool:
    """Initialise the default process group from the environment; ``True`` if this call did."""
    if dist.is_initialized():
        return False
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise ValueError(f"run under torchrun: {', '.join(missing)} not set")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def _fail(rank: int, message: str) -> int:
    print(f"streamload.distributed: error: [rank {rank}] {message}", file=sys.stderr, flush=True)
    return 2
