"""The ``streamload`` command line, over the public API only.

    streamload inspect PATH [--json] [--dtype bf16]
    streamload plan PATH [--device NAME=SIZE ...] [--cpu-memory SIZE] [--no-cpu] [--json] ...
    streamload load PATH [plan options] [--json-logs]
    streamload demo [--dir DIR] [--keep]

``--device sim:0=24GiB`` (repeatable) stands for a hypothetical GPU of that size
(``streamload.testing.SimulatedGPU``); a bare ``--device cuda:1`` names a real one. Without
``--device`` the live devices are used (``LoadParams(devices="auto")``).

Exit status: 0 on success; 2 for a bad argument or any ``StreamloadError`` (one line on stderr,
``streamload: error: ...``, never a traceback); 130 when interrupted (Ctrl-C cancels a load
cleanly: everything it placed is released); 1 when the reader of stdout went away.

This is the one place in streamload that configures logging: ``--json-logs`` sends every load
event to stderr as a JSON line; otherwise the library's log lines are dropped and the events are
shown as tables, a progress bar and re-plan notices. ``rich`` (the ``cli`` extra) is used when it
is installed, plain text otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import anyio
import torch

import streamload
from streamload import events
from streamload._cmdline import (
    DeviceArg,
    Parser,
    UsageError,
    arg_type,
    configured_logging,
    parse_device,
    parse_size,
)
from streamload.errors import format_bytes

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from streamload.testing import SimulatedGPU

__all__ = [
    "DeviceArg",
    "LoadView",
    "Output",
    "Table",
    "build_parser",
    "main",
    "parse_device",
    "parse_paged_attention",
    "parse_size",
    "plain_table",
    "replan_line",
]

MiB = 2**20
GiB = 2**30

# --------------------------------------------------------------------------------------------
# Parsing at the edge: strings -> typed values


_PAGED_FORMS = "off, context, context:TOKENS, mb:MIB, util:FRACTION"


def parse_paged_attention(text: str) -> streamload.PagedAttention | None:
    """``--paged-attention`` MODE -> ``PagedAttention`` (default block size) or ``None``.

    ``off`` -> ``None``; ``context`` -> a pool for ``max_seq_len x max_batch_size`` tokens;
    ``context:8192`` -> ``ContextSize(8192)``; ``mb:4096`` -> ``MbAmount(4096)``;
    ``util:0.9`` -> ``Utilization(0.9)``. Anything else raises ``ValueError``.
    """
    mode, sep, value = text.strip().lower().partition(":")
    if not sep and mode in ("off", "context"):
        return None if mode == "off" else streamload.PagedAttention()
    if not sep or mode not in ("context", "mb", "util"):
        raise ValueError(f"bad paged-attention mode {text!r}: expected one of {_PAGED_FORMS}")
    try:
        number = float(value) if mode == "util" else int(value)
    except ValueError:
        raise ValueError(
            f"bad paged-attention mode {text!r}: {value!r} is not a number ({_PAGED_FORMS})"
        ) from None
    memory: streamload.ContextSize | streamload.MbAmount | streamload.Utilization
    try:
        if mode == "util":
            memory = streamload.Utilization(number)
        elif mode == "mb":
            memory = streamload.MbAmount(int(number))
        else:
            memory = streamload.ContextSize(int(number))
    except ValueError as exc:
        raise ValueError(f"bad paged-attention mode {text!r}: {exc}") from None
    return streamload.PagedAttention(memory=memory)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise ValueError(f"{text!r} is not positive")
    return value


def _dtype(text: str) -> torch.dtype:
    dtype = streamload.LoadParams(dtype=text).target_dtype
    assert dtype is not None
    return dtype


# --------------------------------------------------------------------------------------------
# Output: tables and lines, through rich when it is installed


@dataclass(frozen=True, slots=True)
class Table:
    """A table to print; ``right`` holds the indexes of right-aligned (numeric) columns."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: frozenset[int] = frozenset()


def plain_table(table: Table) -> str:
    """``table`` as aligned plain text: title, header, dashes, rows."""
    widths = [len(c) for c in table.columns]
    for row in table.rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if i in table.right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [table.title] if table.title else []
    out += [line(table.columns), line(["-" * w for w in widths])]
    out += [line(row) for row in table.rows]
    return "\n".join(out)


class Output:
    """Where human output goes: a rich ``Console`` on stdout if rich is installed, else print."""

    def __init__(self, console: Console | None) -> None:
        self.console = console

    @classmethod
    def create(cls) -> Output:
        try:
            from rich.console import Console
        except ImportError:  # the cli extra is not installed
            return cls(None)
        console = Console(highlight=False, soft_wrap=False)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = max(console.width, 160)  # files and pipes: no wrapped cells
        return cls(console)

    def line(self, text: str = "") -> None:
        if self.console is None:
            print(text, flush=True)
        else:
            self.console.print(text, markup=False, soft_wrap=True)

    def table(self, table: Table) -> None:
        if self.console is None:
            print(plain_table(table), flush=True)
            return
        from rich import box
        from rich.table import Table as RichTable

        rich_table = RichTable(
            title=table.title or None,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
            show_edge=False,
        )
        last = len(table.columns) - 1
        for i, name in enumerate(table.columns):
            # In a narrow terminal sizes wrap between value and unit and the last column
            # (notes) gives way; headers and names are never cut.
            rich_table.add_column(
                name,
                justify="right" if i in table.right else "left",
                min_width=None if i == last else len(name),
                no_wrap=i == 0,
            )
        for row in table.rows:
            rich_table.add_row(*row)
        self.console.print(rich_table)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2), flush=True)


def _ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 6] -> "0-2, 5-6"``; ``[] -> "-"``."""
    runs: list[list[int]] = []
    for index in layers:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


def _assignment(layer_devices: Sequence[str]) -> str:
    """``("a", "a", "b") -> "a 0-1 | b 2"``: which layers each device holds, in order."""
    held: dict[str, list[int]] = {}
    for index, device in enumerate(layer_devices):
        held.setdefault(device, []).append(index)
    return " | ".join(f"{device} {_ranges(layers)}" for device, layers in held.items()) or "-"


# --------------------------------------------------------------------------------------------
# inspect


def spec_summary(spec: streamload.ModelSpec) -> dict[str, Any]:
    """The JSON-ready inventory ``inspect`` prints (its human form is drawn from this too)."""
    facts = spec.facts
    layer_bytes = [layer.nbytes for layer in spec.layers]
    dtypes: dict[str, dict[str, int]] = {}
    for entry in spec.checkpoint.tensors.values():
        row = dtypes.setdefault(entry.dtype, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += entry.nbytes
    return {
        "path": str(spec.checkpoint.root),
        "files": [str(shard.path) for shard in spec.checkpoint.shards],
        "tensors": len(spec.checkpoint.tensors),
        "target_dtype": spec.target_dtype,
        "activation_dtype": spec.activation_dtype,
        "total_bytes": spec.total_bytes,
        "stored_bytes": spec.checkpoint.total_bytes,
        "layers": {
            "count": len(spec.layers),
            "bytes": sum(layer_bytes),
            "min_bytes": min(layer_bytes, default=0),
            "max_bytes": max(layer_bytes, default=0),
            "items": [
                {
                    "index": layer.index,
                    "prefix": layer.prefix,
                    "tensors": len(layer.tensors),
                    "bytes": layer.nbytes,
                    "stored_bytes": layer.stored_bytes,
                    "sliding_window": layer.sliding_window,
                }
                for layer in spec.layers
            ],
        },
        "non_mapped": [
            {
                "name": part.name,
                "tensors": len(part.tensors),
                "bytes": part.nbytes,
                "stored_bytes": part.stored_bytes,
                "sub_model": part.sub_model,
            }
            for part in spec.non_mapped
        ],
        "dtypes": dict(sorted(dtypes.items())),
        "tied": dict(spec.tied),
        "config": {
            "model_type": facts.model_type,
            "num_hidden_layers": facts.num_hidden_layers,
            "hidden_size": facts.hidden_size,
            "intermediate_size": facts.intermediate_size,
            "num_attention_heads": facts.num_attention_heads,
            "num_key_value_heads": facts.num_key_value_heads,
            "head_dim": facts.head_dim,
            "vocab_size": facts.vocab_size,
            "sliding_window": facts.sliding_window,
            "kv_kind": facts.kv_kind,
            "kv_lora_rank": facts.kv_lora_rank,
            "tie_word_embeddings": facts.tie_word_embeddings,
            "vision": None if facts.vision is None else dataclasses.asdict(facts.vision),
        },
    }


def _show_spec(summary: Mapping[str, Any], out: Output) -> None:
    layers = summary["layers"]
    config = summary["config"]
    low, high = layers["min_bytes"], layers["max_bytes"]
    per_layer = format_bytes(low) if low == high else f"{format_bytes(low)} to {format_bytes(high)}"
    loads_as = summary["target_dtype"] or "as stored"
    facts = [
        ("checkpoint", f"{summary['path']} ({_plural(len(summary['files']), 'file')})"),
        ("tensors", str(summary["tensors"])),
        ("total", f"{format_bytes(summary['total_bytes'])} loaded ({loads_as})"),
        ("on disk", format_bytes(summary["stored_bytes"])),
        ("layers", f"{layers['count']} x {per_layer} = {format_bytes(layers['bytes'])}"),
        ("dtypes", ", ".join(f"{k} x {v['tensors']}" for k, v in summary["dtypes"].items())),
        ("model_type", str(config["model_type"])),
        ("hidden size", str(config["hidden_size"])),
        ("heads", f"{config['num_attention_heads']} (kv heads {config['num_key_value_heads']})"),
        ("head dim", str(config["head_dim"])),
        ("vocab", str(config["vocab_size"])),
        ("sliding window", str(config["sliding_window"] or "-")),
        ("kv cache", str(config["kv_kind"])),
    ]
    if summary["tied"]:
        facts.append(("tied", ", ".join(f"{a} = {b}" for a, b in summary["tied"].items())))
    if config["vision"] is not None:
        vision = config["vision"]
        facts.append(("vision", f"{vision['kind']}, image {vision['image_size']}"))
    out.table(Table("model", ("fact", "value"), tuple(facts)))
    dtype_rows = tuple(
        (code, str(row["tensors"]), format_bytes(row["bytes"]))
        for code, row in summary["dtypes"].items()
    )
    out.table(
        Table("dtypes (stored)", ("dtype", "tensors", "bytes"), dtype_rows, frozenset({1, 2}))
    )
    part_rows = tuple(
        (part["name"], str(part["tensors"]), format_bytes(part["bytes"]), part["sub_model"] or "-")
        for part in summary["non_mapped"]
    )
    out.table(
        Table(
            "non-mapped parts (on the primary device)",
            ("name", "tensors", "bytes", "sub-model"),
            part_rows,
            frozenset({1, 2}),
        )
    )


def _cmd_inspect(args: argparse.Namespace, out: Output) -> int:
    spec = streamload.inspect(args.path, args.dtype)
    summary = spec_summary(spec)
    if args.json:
        _json(summary)
    else:
        _show_spec(summary, out)
    return 0


# --------------------------------------------------------------------------------------------
# plan


@dataclass(frozen=True, slots=True)
class Setup:
    """What ``plan`` and ``load`` run with: the parameters, and the inputs as JSON (``--json``)."""

    params: streamload.LoadParams
    inputs: dict[str, Any]


def _devices(args: argparse.Namespace) -> list[str | SimulatedGPU]:
    """``--device`` in order (``NAME=SIZE``: a simulated GPU), then ``"cpu"`` unless
    ``--no-cpu``; empty for ``"auto"``."""
    given: list[DeviceArg] = args.device or []
    names = [d.name for d in given]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ValueError(f"--device {duplicate} is given twice")
    devices: list[str | SimulatedGPU] = []
    if given:
        from streamload.testing import SimulatedGPU

        for arg in given:
            if arg.total_bytes is None:
                devices.append(arg.name)
            else:
                devices.append(SimulatedGPU(arg.name, total_bytes=arg.total_bytes))
    elif args.no_cpu:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not devices:
            raise ValueError("--no-cpu without --device: no CUDA GPU is visible")
    if devices and not args.no_cpu:
        devices.append("cpu")
    return devices


def _setup(args: argparse.Namespace) -> Setup:
    if args.block_size is not None and args.paged_attention is None:
        raise ValueError("--block-size needs --paged-attention")
    paged = args.paged_attention
    if paged is not None and args.block_size is not None:
        paged = dataclasses.replace(paged, block_size=args.block_size)
    overrides: dict[str, Any] = {}
    if args.gpu_reserve is not None:
        overrides["reserve_min_bytes"] = args.gpu_reserve
    if args.host_reserve is not None:
        overrides["host_reserve_bytes"] = args.host_reserve
    params = streamload.LoadParams(
        devices=_devices(args) or "auto",
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        paged_attention=paged,
        cpu_policy=args.cpu_policy,
        cpu_memory_bytes=args.cpu_memory,
        **overrides,
    )
    given: list[DeviceArg] = args.device or []
    inputs = {
        "path": str(args.path),
        "devices": [
            {"name": d.name, "simulated": d.total_bytes is not None, "total_bytes": d.total_bytes}
            for d in given
        ]
        or "auto",
        "cpu": not args.no_cpu,
        "cpu_memory_bytes": params.cpu_memory_bytes,
        "cpu_policy": params.cpu_policy,
        "dtype": params.target_code,
        "max_seq_len": params.max_seq_len,
        "max_batch_size": params.max_batch_size,
        "paged_attention": paged_summary(paged),
        "reserve_fraction": params.reserve_fraction,
        "reserve_min_bytes": params.reserve_min_bytes,
        "host_reserve_bytes": params.host_reserve_bytes,
    }
    return Setup(params, inputs)


def paged_summary(paged: streamload.PagedAttention | None) -> dict[str, Any] | None:
    """``PagedAttention`` as JSON: ``{"memory": {"kind": "context", "tokens": 8192}, ...}``."""
    if paged is None:
        return None
    memory = paged.memory
    kind = {
        streamload.ContextSize: "context",
        streamload.MbAmount: "mb",
        streamload.Utilization: "util",
    }.get(type(memory), "context")
    fields = {} if memory is None else dataclasses.asdict(memory)
    cache = paged.cache_dtype
    return {
        "memory": {"kind": kind, **fields},
        "block_size": paged.block_size,
        "cache_dtype": None if cache is None else str(cache).removeprefix("torch."),
    }


def plan_table(plan: streamload.Plan, title: str = "plan") -> tuple[Table, list[str]]:
    """One row per device of ``plan`` (what it holds and what that costs), and the planner's
    notes, numbered: the note column holds short tags and ``[n]`` pointing to a note."""
    rows = []
    notes: list[str] = []
    for row in plan.devices:
        tags = ["non-mapped parts"] if row.holds_non_mapped else []
        if row.mmap_bytes:
            tags.append(f"mmap {format_bytes(row.mmap_bytes)}")
        if row.note:
            notes.append(f"[{len(notes) + 1}] {row.device}: {row.note}")
            tags.append(f"[{len(notes)}]")
        rows.append(
            (
                row.device,
                _ranges(row.layers),
                str(len(row.layers)),
                format_bytes(row.weight_bytes),
                format_bytes(row.kv_bytes),
                format_bytes(row.activation_bytes),
                format_bytes(row.reserve_bytes),
                format_bytes(row.capacity_bytes),
                format_bytes(row.headroom_bytes),
                ", ".join(tags) or "-",
            )
        )
    columns = (
        "device",
        "layers",
        "#",
        "weights",
        "KV",
        "activations",
        "reserve",
        "capacity",
        "headroom",
        "note",
    )
    return Table(title, columns, tuple(rows), frozenset(range(2, 9))), notes


def paged_status(plan: streamload.Plan) -> str:
    """One line on the KV cache: paged (blocks per layer), off, or fallen back and why."""
    if plan.paged_attention:
        blocks = "" if plan.paged_blocks is None else f", {plan.paged_blocks} blocks per layer"
        return f"paged attention: on{blocks} (KV cache {plan.kv_cache_dtype})"
    if plan.paged_attention_reason is not None:
        reason = plan.paged_attention_reason.removeprefix("paged attention disabled: ")
        return f"paged attention: off, fell back to non-paged KV sizing: {reason}"
    return f"paged attention: off (KV cache {plan.kv_cache_dtype}, non-paged)"


def _show_plan(plan: streamload.Plan, out: Output, title: str = "plan") -> None:
    table, notes = plan_table(plan, title)
    out.table(table)
    for note in notes:
        out.line(note)
    out.line(f"primary device: {plan.primary}   cpu policy: {plan.cpu_policy}")
    out.line(paged_status(plan))


def _cmd_plan(args: argparse.Namespace, out: Output) -> int:
    setup = _setup(args)
    plan = streamload.plan(args.path, setup.params)
    if args.json:
        _json({"inputs": setup.inputs, **plan.to_dict()})
    else:
        _show_plan(plan, out)
    return 0


# --------------------------------------------------------------------------------------------
# load: progress, re-plans, report


class _Bar(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, nbytes: int, description: str) -> None: ...
    def clear(self) -> None: ...
    def stop(self) -> None: ...


class _RichBar:
    """A rich progress bar (bytes placed / total, GB/s, current layer and device)."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self.progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            # Lines written to stderr go above the bar only when stderr is this terminal too;
            # otherwise (``--json-logs 2> file``) they must reach the file.
            redirect_stderr=sys.stderr.isatty(),
        )
        self.task = self.progress.add_task("planning", total=None)

    def start(self, total: int) -> None:
        self.progress.update(self.task, total=total, description="loading")
        self.progress.start()

    def advance(self, nbytes: int, description: str) -> None:
        self.progress.update(self.task, advance=nbytes, description=description)

    def clear(self) -> None:
        """Nothing to do: rich prints the console's lines above the bar."""

    def stop(self) -> None:
        self.progress.stop()


class _PlainBar:
    """Without rich: one rewritten status line on stderr, only when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.total = 0
        self.done = 0
        self.started = 0.0

    def start(self, total: int) -> None:
        self.total = total
        self.started = time.perf_counter()

    def advance(self, nbytes: int, description: str) -> None:
        self.done += nbytes
        if not self.live:
            return
        seconds = max(time.perf_counter() - self.started, 1e-9)
        percent = 100 * self.done / self.total if self.total else 100.0
        self.stream.write(
            f"\r{description}: {format_bytes(self.done)} / {format_bytes(self.total)} "
            f"({percent:.0f}%, {self.done / seconds / 1e9:.2f} GB/s)\x1b[K"
        )
        self.stream.flush()

    def clear(self) -> None:
        """Erase the status line, so that a line printed next starts at the margin."""
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def stop(self) -> None:
        self.clear()


class LoadView:
    """The ``on_event`` callback of a CLI load: shows the plan when it is computed, drives the
    progress bar from ``LayerPlaced``, and prints re-plans and fallbacks as they happen."""

    def __init__(self, out: Output | None, total_bytes: int, layers: int, headline: str) -> None:
        self.out = out
        self.headline = headline
        self.total_bytes = total_bytes
        self.layers = layers
        console = None if out is None else out.console
        self.bar: _Bar = _PlainBar(sys.stderr) if console is None else _RichBar(console)
        self.running = False
        self.shown: str | None = None  # the fallback reason the plan's status line gave

    def __enter__(self) -> LoadView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.bar.stop()
            self.running = False

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.PlanComputed):
            if self.out is not None:
                self.out.line(self.headline)
                _show_plan(event.plan, self.out)
                self.shown = event.plan.paged_attention_reason
            self.bar.start(self.total_bytes)
            self.running = True
        elif isinstance(event, events.LayerPlaced):
            what = event.part if event.layer is None else f"layer {event.layer}/{self.layers - 1}"
            self.bar.advance(event.nbytes, f"{what} -> {event.device}")
        elif self.out is None:
            return
        elif isinstance(event, events.Replanned):
            self.line(replan_line(event))
        elif isinstance(event, events.PagedAttentionDisabled) and event.reason != self.shown:
            self.line(f"fallback: {event.reason}")

    def line(self, text: str) -> None:
        """Print a line while the load runs (the demo's tenant speaks through this too)."""
        if self.out is not None:
            self.bar.clear()
            self.out.line(text)


def replan_line(event: events.Replanned) -> str:
    """A re-plan in one line: where, why, the numbers, and the assignment before and after."""
    at = "before the non-mapped parts" if event.at_layer is None else f"at layer {event.at_layer}"
    return (
        f"re-plan {at}: {event.device} {event.reason} "
        f"(needs {format_bytes(event.expected_free)}, has {format_bytes(event.live_free)}): "
        f"{_assignment(event.old_layer_devices)}  ->  {_assignment(event.new_layer_devices)}"
    )


def report_table(report: events.LoadReport, plan: streamload.Plan) -> Table:
    """One row per device: the layers it ended up with (``plan`` is the plan used), tensors,
    bytes, seconds spent placing them and the resulting GB/s."""
    rows = tuple(
        (
            d.device,
            _ranges([i for i, name in enumerate(plan.layer_devices) if name == d.device]),
            str(d.layers),
            str(d.tensors),
            format_bytes(d.nbytes),
            f"{d.seconds:.2f}",
            f"{d.gb_per_s:.2f}",
        )
        for d in report.devices
    )
    columns = ("device", "layers", "#", "tensors", "bytes", "seconds", "GB/s")
    return Table("placed", columns, rows, frozenset(range(2, 7)))


def _show_report(model: streamload.LoadedModel, out: Output) -> None:
    report = model.report
    out.table(report_table(report, model.plan))
    out.line(
        f"loaded {format_bytes(report.nbytes)} ({report.tensors} tensors) in "
        f"{report.seconds:.2f} s: {report.gb_per_s:.2f} GB/s read from disk"
    )
    out.line(f"re-plans: {len(report.replans)}")
    for replan in report.replans:
        out.line(f"  {replan_line(replan)}")
    if report.replans:
        table, notes = plan_table(model.plan, "plan after re-planning")
        out.table(table)
        for note in notes:
            out.line(note)
    if report.fallbacks:
        out.line("fallbacks: " + "; ".join(f.reason for f in report.fallbacks))
    else:
        out.line("fallbacks: none")


def report_summary(model: streamload.LoadedModel) -> dict[str, Any]:
    """The JSON-ready outcome of a load: report, every re-plan, the plan used, where each module
    went (``placement``: streamload device names; ``device_map``: torch devices, HF form)."""
    report = model.report
    return {
        "report": events.event_fields(events.LoadFinished(report)),
        "replans": [events.event_fields(replan) for replan in report.replans],
        "plan": model.plan.to_dict(),
        "placement": dict(model.placement),
        "device_map": dict(model.device_map),
    }


def _run_load(
    path: str | Path,
    params: streamload.LoadParams,
    out: Output | None,
    on_event: Callable[[events.Event, LoadView], None] | None = None,
) -> streamload.LoadedModel:
    """Load ``path`` with a live view (``out=None``: the progress bar only); ``on_event`` (the
    demo's tenant) runs after the view has shown each event, and may print through it."""
    spec = streamload.inspect(path, params.dtype)
    headline = (
        f"loading {path}: {spec.facts.model_type}, {_plural(len(spec.layers), 'layer')}, "
        f"{format_bytes(spec.total_bytes)} ({spec.target_dtype or 'as stored'})"
    )
    view = LoadView(out, spec.total_bytes, len(spec.layers), headline)

    def callback(event: events.Event) -> None:
        view(event)
        if on_event is not None:
            on_event(event, view)

    with view:
        return anyio.run(functools.partial(streamload.load, path, params, on_event=callback))


def _cmd_load(args: argparse.Namespace, out: Output) -> int:
    setup = _setup(args)
    model = _run_load(args.path, setup.params, None if args.json else out)
    try:
        if args.json:
            _json({"inputs": setup.inputs, **report_summary(model)})
        else:
            _show_report(model, out)
    finally:
        model.release()
    return 0


# --------------------------------------------------------------------------------------------
# demo


_DEMO_LAYERS = 12
_DEMO_HIDDEN = 1024
_DEMO_SEQ = 256


def _demo_config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": _DEMO_HIDDEN,
        "intermediate_size": 2048,
        "num_hidden_layers": _DEMO_LAYERS,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "vocab_size": 8192,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


_DEMO_FILES = ("model.safetensors", "config.json")


def write_demo_checkpoint(directory: Path) -> int:
    """A dense, random, bf16 Llama-shaped checkpoint with transformers names (~220 MiB) and its
    ``config.json`` in ``directory`` (``_DEMO_FILES``); returns the bytes written."""
    from streamload.testing import write_safetensors

    config = _demo_config()
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return torch.ones(hidden, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        tensors |= {
            f"{prefix}.input_layernorm.weight": norm(),
            f"{prefix}.self_attn.q_proj.weight": weight(hidden, hidden),
            f"{prefix}.self_attn.k_proj.weight": weight(kv, hidden),
            f"{prefix}.self_attn.v_proj.weight": weight(kv, hidden),
            f"{prefix}.self_attn.o_proj.weight": weight(hidden, hidden),
            f"{prefix}.post_attention_layernorm.weight": norm(),
            f"{prefix}.mlp.gate_proj.weight": weight(inter, hidden),
            f"{prefix}.mlp.up_proj.weight": weight(inter, hidden),
            f"{prefix}.mlp.down_proj.weight": weight(hidden, inter),
        }
    tensors["model.norm.weight"] = norm()
    weights_name, config_name = _DEMO_FILES
    weights = write_safetensors(directory / weights_name, tensors, {"format": "pt"})
    (directory / config_name).write_text(json.dumps(config, indent=2) + "\n")
    return weights.stat().st_size + (directory / config_name).stat().st_size


def _demo_params() -> streamload.LoadParams:
    """Small reserves and a short context suit the demo's small GPUs; a fixed host budget makes
    the plan the same on every machine."""
    return streamload.LoadParams(
        devices=["cpu"],
        max_seq_len=_DEMO_SEQ,
        reserve_fraction=0.0,
        reserve_min_bytes=16 * MiB,
        cpu_memory_bytes=4 * GiB,
        host_reserve_bytes=0,
        staging_bytes=64 * MiB,
        chunk_bytes=8 * MiB,
    )


@dataclass(frozen=True, slots=True)
class DemoSizes:
    """The demo's simulated GPUs and tenant: sized from the checkpoint so that the plan needs
    both GPUs and the CPU, and the tenant's grab forces a re-plan."""

    gpu0: int
    gpu1: int
    steal: int


def demo_sizes(path: Path, params: streamload.LoadParams) -> DemoSizes:
    """Measure one layer's cost and the activations with a single roomy simulated GPU, then give
    GPU 0 the non-mapped parts and 4.5 layers, GPU 1 5.5 layers, and the tenant 3 layers."""
    from streamload.testing import SimulatedGPU

    probe = SimulatedGPU("probe", total_bytes=64 * GiB)
    roomy = streamload.plan(path, dataclasses.replace(params, devices=[probe]))
    spec = streamload.inspect(path, params.dtype)
    row = roomy.devices[0]
    layer = max(layer.nbytes for layer in spec.layers) + max(roomy.layer_kv_bytes, default=0)
    fixed = row.reserve_bytes + row.activation_bytes
    return DemoSizes(
        gpu0=fixed + spec.non_mapped_bytes + int(4.5 * layer),
        gpu1=fixed + int(5.5 * layer),
        steal=3 * layer,
    )


def _tenant(gpu: SimulatedGPU, nbytes: int, after_layer: int) -> Callable[[Any, LoadView], None]:
    """An ``on_event`` that has another tenant take ``nbytes`` of ``gpu`` once ``after_layer``
    is placed, and says so."""
    taken = False

    def on_event(event: events.Event, view: LoadView) -> None:
        nonlocal taken
        if isinstance(event, events.LayerPlaced) and event.layer == after_layer and not taken:
            taken = True
            gpu.steal(nbytes)
            view.line(
                f"tenant: took {format_bytes(nbytes)} on {gpu.name} after layer {after_layer} "
                f"(live free now {format_bytes(gpu.free_bytes)})"
            )

    return on_event


def _demo_load(directory: Path, out: Output) -> None:
    """Plan over two simulated GPUs and the CPU, load with a tenant arriving on GPU 1 before its
    first layer, report."""
    from streamload.testing import SimulatedGPU

    base = _demo_params()
    sizes = demo_sizes(directory, base)
    gpu0 = SimulatedGPU("sim:0", total_bytes=sizes.gpu0)
    gpu1 = SimulatedGPU("sim:1", total_bytes=sizes.gpu1)
    params = dataclasses.replace(base, devices=[gpu0, gpu1, "cpu"])
    layer_devices = streamload.plan(directory, params).layer_devices
    first_on_gpu1 = next(
        (i for i, name in enumerate(layer_devices) if name == gpu1.name), len(layer_devices)
    )
    # A LayerPlaced for layer k arrives before layer k + 2 is allocated, so a tenant that
    # appears then is seen by the recheck before GPU 1's first layer.
    trigger = max(first_on_gpu1 - 2, 0)
    out.line(
        f"simulated GPUs: sim:0 {format_bytes(sizes.gpu0)}, sim:1 {format_bytes(sizes.gpu1)}; "
        f"another tenant will take {format_bytes(sizes.steal)} of sim:1 "
        f"once layer {trigger} is placed"
    )
    model = _run_load(directory, params, out, _tenant(gpu1, sizes.steal, trigger))
    try:
        _show_report(model, out)
    finally:
        model.release()


def _cmd_demo(args: argparse.Namespace, out: Output) -> int:
    made_dir = args.dir is None
    directory: Path = Path(tempfile.mkdtemp(prefix="streamload-demo-")) if made_dir else args.dir
    present = [name for name in _DEMO_FILES if (directory / name).exists()]
    if present:
        raise ValueError(f"--dir {directory} already holds {', '.join(present)}; not overwriting")
    existed = directory.exists()
    try:
        started = time.perf_counter()
        directory.mkdir(parents=True, exist_ok=True)
        size = write_demo_checkpoint(directory)
        out.line(
            f"wrote a random Llama-shaped checkpoint ({_DEMO_LAYERS} layers, hidden "
            f"{_DEMO_HIDDEN}, bf16, {format_bytes(size)}) to {directory} "
            f"in {time.perf_counter() - started:.1f} s"
        )
        _demo_load(directory, out)
        if args.keep:
            out.line(f"kept the checkpoint in {directory}")
    finally:
        if not args.keep and (made_dir or not existed):
            shutil.rmtree(directory, ignore_errors=True)
        elif not args.keep:  # a folder the user had: remove only what the demo wrote
            for name in _DEMO_FILES:
                (directory / name).unlink(missing_ok=True)
    return 0


# --------------------------------------------------------------------------------------------
# Arguments and main


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="checkpoint directory or .safetensors file")
    parser.add_argument(
        "--device",
        action="append",
        type=arg_type(parse_device),
        metavar="NAME=SIZE",
        help="a hypothetical GPU, e.g. sim:0=24GiB (repeatable, filled in order); a bare NAME "
        "such as cuda:1 is a real device; without --device: every visible GPU, then the CPU",
    )
    parser.add_argument(
        "--cpu-memory",
        type=arg_type(parse_size),
        metavar="SIZE",
        help="the CPU's memory (default: the host's available memory)",
    )
    parser.add_argument("--no-cpu", action="store_true", help="plan the GPUs only")
    parser.add_argument(
        "--cpu-policy", choices=("copy", "mmap"), default="copy", help="CPU layers (default copy)"
    )
    parser.add_argument(
        "--dtype",
        type=arg_type(_dtype),
        help="target dtype of floating tensors (default: as stored)",
    )
    parser.add_argument("--max-seq-len", type=arg_type(_positive_int), default=4096, metavar="N")
    parser.add_argument("--max-batch-size", type=arg_type(_positive_int), default=1, metavar="N")
    parser.add_argument(
        "--paged-attention",
        type=arg_type(parse_paged_attention),
        default=None,
        metavar="MODE",
        help=f"KV cache: {_PAGED_FORMS} (default off)",
    )
    parser.add_argument(
        "--block-size", type=arg_type(_positive_int), metavar="N", help="paged KV block size"
    )
    parser.add_argument(
        "--gpu-reserve",
        type=arg_type(parse_size),
        metavar="SIZE",
        help="minimum reserve per GPU (default 512MiB; the reserve is max(2%% of total, this))",
    )
    parser.add_argument(
        "--host-reserve",
        type=arg_type(parse_size),
        metavar="SIZE",
        help="host memory kept free (default 2GiB)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="streamload",
        description="Inspect, plan and stream safetensors checkpoints onto GPUs and the CPU.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {streamload.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="layers, bytes, dtypes and config facts")
    inspect.add_argument("path", type=Path, help="checkpoint directory or .safetensors file")
    inspect.add_argument("--dtype", type=arg_type(_dtype), help="count bytes in this dtype")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=_cmd_inspect, json_logs=False)

    plan = commands.add_parser("plan", help="the device map a load would start from")
    _add_plan_options(plan)
    plan.set_defaults(run=_cmd_plan, json_logs=False)

    load = commands.add_parser("load", help="load with a live progress bar, then report")
    _add_plan_options(load)
    load.add_argument("--json-logs", action="store_true", help="log every event as JSON (stderr)")
    load.set_defaults(run=_cmd_load)

    demo = commands.add_parser(
        "demo", help="write a small checkpoint and load it over two simulated GPUs and the CPU"
    )
    demo.add_argument("--dir", type=Path, help="write the checkpoint here (default: a temp dir)")
    demo.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    demo.add_argument("--json-logs", action="store_true", help="log every event as JSON (stderr)")
    demo.set_defaults(run=_cmd_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a does-not-fit breakdown becomes ``; ``-separated)."""
    lines = [line.strip().removeprefix("- ") for line in str(exc).splitlines()]
    return "; ".join(line for line in lines if line) or type(exc).__name__


def _fail(message: str) -> int:
    print(f"streamload: error: {message}", file=sys.stderr, flush=True)
    return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for errors, 130 if interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    run: Callable[[argparse.Namespace, Output], int] = args.run
    try:
        with configured_logging(args.json_logs):
            return run(args, Output.create())
    except KeyboardInterrupt:
        print("streamload: interrupted; nothing is left loaded", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `streamload plan --json | head`: the reader left
        _silence_stdout()
        return 1
    except (streamload.StreamloadError, ValueError, OSError) as exc:
        return _fail(_one_line(exc))
