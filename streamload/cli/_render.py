"""What the ``streamload`` command shows: tables and lines (through rich when it is installed),
the ``inspect`` inventory, plans, re-plans and load reports, and their JSON forms."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import streamload
from streamload import events
from streamload.errors import format_bytes, location

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "Output",
    "Table",
    "paged_status",
    "paged_summary",
    "plain_table",
    "plan_table",
    "replan_line",
    "report_summary",
    "report_table",
    "spec_summary",
]


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
            # In a narrow terminal the last column (notes) gives way; names and numbers are
            # never cut.
            rich_table.add_column(
                name,
                justify="right" if i in table.right else "left",
                min_width=None if i == last else len(name),
                no_wrap=i == 0 or i in table.right,
            )
        for row in table.rows:
            rich_table.add_row(*row)
        self.console.print(rich_table)


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def compact_size(nbytes: int) -> str:
    """Bytes in at most 7 characters and 3 significant digits, no space (``"75.6GiB"``,
    ``"720MiB"``, ``"0B"``), so that a table of sizes fits 80 columns and a number is never
    broken across lines."""
    value = float(nbytes)
    unit = 0
    while value >= 999.5 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{nbytes}B"
    digits = 0 if value >= 99.95 else 1 if value >= 9.995 else 2
    return f"{value:.{digits}f}{_UNITS[unit]}"


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
        "path": location(spec.checkpoint.root),
        "files": [location(shard.path) for shard in spec.checkpoint.shards],
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
        "has_config": bool(spec.config),
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
    ]
    if not summary["has_config"]:
        facts.append(("config", "no config.json: headers only, layers grouped by tensor names"))
        out.table(Table("model", ("fact", "value"), tuple(facts)))
        _show_parts(summary, out)
        return
    facts += [
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
    _show_parts(summary, out)


def _show_parts(summary: Mapping[str, Any], out: Output) -> None:
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


# --------------------------------------------------------------------------------------------
# plan


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


PRIMARY_MARK = "*"


def plan_table(plan: streamload.Plan, title: str = "plan") -> tuple[Table, list[str]]:
    """One row per device of ``plan`` (what it holds and what that costs), and the notes
    below it: the note column holds ``*`` on the device with the non-mapped parts and ``[n]``
    pointing to note n (the planner's notes, memory-mapped bytes). Sizes are compact, so the
    table of a plan over ``cuda:0``-style names fits 80 columns."""
    rows = []
    notes: list[str] = []
    for row in plan.devices:
        tags = [PRIMARY_MARK] if row.holds_non_mapped else []
        said = [f"{format_bytes(row.mmap_bytes)} memory-mapped"] if row.mmap_bytes else []
        if row.scratch_bytes:
            said.append(f"{format_bytes(row.scratch_bytes)} conversion scratch")
        if row.note:
            said.append(row.note)
        for text in said:
            notes.append(f"[{len(notes) + 1}] {row.device}: {text}")
            tags.append(f"[{len(notes)}]")
        rows.append(
            (
                row.device,
                _ranges(row.layers),
                str(len(row.layers)),
                compact_size(row.weight_bytes),
                compact_size(row.kv_bytes),
                compact_size(row.activation_bytes),
                compact_size(row.reserve_bytes),
                compact_size(row.capacity_bytes),
                compact_size(row.headroom_bytes),
                " ".join(tags) or "-",
            )
        )
    if any(row.holds_non_mapped for row in plan.devices):
        notes.insert(0, f"{PRIMARY_MARK} holds the non-mapped parts (embeddings, head, towers)")
    columns = (
        "device",
        "layers",
        "#",
        "weights",
        "KV",
        "act",
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


# --------------------------------------------------------------------------------------------
# load: re-plans and the report


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
    if report.checks:
        verified = sum(1 for check in report.checks if check.verified)
        out.line(f"verified: {verified} of {len(report.checks)} files (sha256)")
        for check in report.unverified:
            out.line(f"  unverified {check.file}: {check.reason}")


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
