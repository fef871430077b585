"""The benchmark summary as a markdown table (``README_TABLE.md``) and a chart
(``throughput.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MiB = 2**20
MODES = ("warm", "cold")  # the headline: unprimed, as users meet a load
PRIMED = "warm-primed"  # the labelled extra: memory primed before each load
TIMES = "×"  # noqa: RUF001 - ratios are written with the multiplication sign, as in the README


def _rate(row: dict[str, Any]) -> str:
    """GB/s; a memory-mapped load shows the rate including one read of every page."""
    if "error" in row:
        return "—"
    if row.get("mapped"):
        return f"{row['gb_per_s_touched']:.2f}\\*"
    return f"{row['gb_per_s']:.2f}"


def _ratio(method: str, row: dict[str, Any], base: str) -> str:
    if "error" in row:
        return "—"
    if method == base:
        return f"1.00{TIMES}"
    key = f"x_{base}_touched" if row.get("mapped") else f"x_{base}"
    return f"{row[key]:.2f}{TIMES}" if key in row else "—"


def _memory(row: dict[str, Any]) -> str:
    if "error" in row:
        return "—"
    return f"{row['extra_host_bytes'] / MiB:,.0f} / {row['extra_anon_bytes'] / MiB:,.0f}"


def _kind(row: dict[str, Any]) -> str:
    if "error" in row:
        return "not run"
    return "memory-mapped" if row.get("mapped") else "in memory"


def load_table(load: dict[str, dict[str, Any]]) -> list[str]:
    modes = [m for m in MODES if m in load]
    in_memory, mapped_methods = groups(load)
    methods = in_memory + mapped_methods
    bases = [b for b in ("safetensors", "disk", "materialise") if b in methods]
    primed = load.get(PRIMED, {})
    head = ["method", "how", "tensors"]
    for mode in modes:
        head += [f"{mode} GB/s", *(f"{TIMES} {b}" for b in bases)]
    if primed:
        head += ["primed warm GB/s (extra)", f"{TIMES} safetensors (primed)"]
    head += [f"{modes[0]} CPU s", "extra host MiB (RSS / anon)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    errors = []
    for method in methods:
        first = load[modes[0]][method]
        cells = [f"`{method}`", first.get("note", ""), _kind(first)]
        for mode in modes:
            row = load[mode].get(method, {"error": "not run"})
            cells += [_rate(row), *(_ratio(method, row, b) for b in bases)]
            if "error" in row:
                errors.append(f"`{method}` ({mode}): {row['error']}")
        if primed:
            row = primed.get(method)
            if row is None:
                cells += ["", ""]
            else:
                cells += [_rate(row), _ratio(method, row, "safetensors")]
                if "error" in row:
                    errors.append(f"`{method}` ({PRIMED}): {row['error']}")
        cells.append("—" if "error" in first else f"{first['user_s'] + first['sys_s']:.2f}")
        cells.append(_memory(first))
        lines.append("| " + " | ".join(cells) + " |")
    mapped = [
        f"`{m}` {load[modes[0]][m]['seconds']:.2f} s"
        for m in methods
        if load[modes[0]][m].get("mapped")
    ]
    lines.append("")
    if mapped:
        lines.append(
            "\\* Memory-mapped: the tensors point into the checkpoint file, so the call returns "
            "before the data is read (warm call: " + ", ".join(mapped) + "). The rate shown "
            "adds one pass, on one thread, that reads a byte of every page."
        )
        lines.append("")
    for error in errors:
        lines.append(f"Not run: {error}.")
    if errors:
        lines.append("")
    return lines


def _figure(load: dict[str, Any], mode: str, method: str, key: str) -> float | None:
    value = load.get(mode, {}).get(method, {}).get(key)
    return None if value is None else float(value)


def _goal(text: str, value: float | None, target: float, at_most: bool, unit: str = "") -> str:
    if value is None:
        return f"- {text}: not measured"
    met = value <= target if at_most else value >= target
    sign = "≤" if at_most else "≥"
    shown = f"{value:.2f}{unit or TIMES}"
    goal = f"{target:g}{unit or TIMES}"
    return f"- {text}: {shown} (goal {sign} {goal}: {'met' if met else 'missed'})"


def goal_lines(load: dict[str, dict[str, Any]]) -> list[str]:
    """The headline run against the goals it is held to (default parameters, unprimed)."""
    if not all(mode in load for mode in MODES):
        return []

    cpu, sim = "streamload-cpu", "streamload-sim-arena"
    # (what, mode, method, ratio key, target, at most); a time ratio is the inverse of the
    # throughput ratio (the median of an odd number of per-round ratios inverts exactly).
    goals = (
        ("warm, defaults, time over safetensors'", "warm", cpu, "x_safetensors", 0.8, True),
        (
            "warm, defaults, throughput over runai-buffered's",
            "warm",
            cpu,
            "x_runai-buffered",
            1.0,
            False,
        ),
        ("cold, defaults, throughput over the disk limit", "cold", cpu, "x_disk", 0.9, False),
        (
            "cold, defaults, throughput over runai-buffered's",
            "cold",
            cpu,
            "x_runai-buffered",
            1.0,
            False,
        ),
        (
            "staged into a pre-faulted arena, warm, over the disk limit",
            "warm",
            sim,
            "x_disk",
            0.6,
            False,
        ),
        (
            "staged into a pre-faulted arena, cold, over the disk limit",
            "cold",
            sim,
            "x_disk",
            0.9,
            False,
        ),
    )
    lines = []
    for what, mode, method, key, target, at_most in goals:
        value = _figure(load, mode, method, key)
        if at_most and value is not None:
            value = 1 / value
        lines.append(_goal(what, value, target, at_most))
    extra, gap = 0.0, 0.0
    for mode in MODES:
        # The arena rows leave out: their unused arena is the simulated device's memory.
        for method in (cpu, "streamload-sim"):
            row = load[mode].get(method, {})
            if "extra_host_bytes" in row:
                budget = row.get("staging_bytes", 0) + 100 * MiB
                extra = max(extra, (row["extra_host_bytes"] - budget) / MiB)
            gap = max(gap, row.get("worst_loop_gap_ms", 0.0))
        gap = max(gap, load[mode].get(sim, {}).get("worst_loop_gap_ms", 0.0))
    lines.append(_goal("extra host memory beyond staging budget + 100 MiB", extra, 0, True, " MiB"))
    lines.append(_goal("worst event-loop gap, defaults", gap, 50, True, " ms"))
    return [
        "**Goals** (headline figures, default `LoadParams`; medians of per-round ratios):",
        "",
        *lines,
        "",
    ]


def sim_line(load: dict[str, dict[str, Any]]) -> list[str]:
    """How much longer the simulated GPU's path takes than the CPU's, per mode."""
    parts = [
        f"{load[mode]['streamload-sim']['cpu_over_sim']:.2f}{TIMES} {mode}"
        for mode in MODES
        if "cpu_over_sim" in load.get(mode, {}).get("streamload-sim", {})
    ]
    if not parts:
        return []
    return [
        "`streamload-sim` takes " + ", ".join(parts) + " the time of `streamload-cpu` "
        "(median of per-round ratios).",
        "",
    ]


def stall_table(load: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for method in load[next(m for m in MODES if m in load)]:
        cells = []
        for mode in MODES:
            row = load.get(mode, {}).get(method, {})
            gap = row.get("worst_loop_gap_ms")
            cells.append("—" if gap is None else f"{gap:.0f}")
        if any(c != "—" for c in cells):
            rows.append(f"| `{method}` | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "| load | worst event-loop gap, warm (ms) | cold (ms) |",
        "|---|---|---|",
        *rows,
        "",
    ]


def plan_table(plan: dict[str, Any]) -> list[str]:
    if not plan:
        return []
    lines = [
        "| checkpoint | shards | read + parse headers (ms) | `streamload.plan` (ms) | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, row in plan.items():
        lines.append(
            f"| {name} | {row['shards']} | {row['headers_ms']:.1f} | {row['plan_ms']:.1f} "
            f"| {row['plan_over_headers']:.2f}{TIMES} |"
        )
    return [*lines, ""]


def _machine_line(machine: dict[str, Any]) -> str:
    cpu, memory, storage = machine["cpu"], machine["memory"], machine["storage"]
    device = storage.get("device", {})
    kind = device.get("kind", "unknown device")
    return (
        f"{cpu['usable_cores']} cores ({cpu['model']}), {memory['total_gib']} GiB RAM, "
        f"{storage['filesystem']} on {kind}, {machine['os']}; "
        f"streamload {machine['versions'].get('streamload')} "
        f"({machine.get('streamload_commit') or 'no commit'}), "
        f"torch {machine['versions'].get('torch')}."
    )


def markdown(summary: dict[str, Any]) -> str:
    """The README's benchmark section, from ``summary.json``'s content."""
    load = summary["load"]
    checkpoint = summary["checkpoint"]
    lines = [
        f"Command: `{summary['command']}`. Machine: {_machine_line(summary['machine'])} "
        f"Load average {summary['load_average']['before']} before, "
        f"{summary['load_average']['after']} after.",
        "",
        f"**Load** — a {checkpoint['bytes'] / 1e9:.2f} GB Llama-shaped bf16 checkpoint "
        f"({checkpoint['layers']} layers, {checkpoint['shards']} shards) onto the CPU, each "
        f"method in its own process, methods alternating, median of {summary['rounds']} "
        "rounds; ratios are medians of per-round ratios to `safetensors` (`load_file` + "
        "`clone`), `disk` (8 threads `pread` into reused buffers: the read limit) and "
        "`materialise` (8 threads `pread` straight into fresh, pre-faulted tensors: the floor "
        "of any load into process memory). Nothing is prepared: each load meets memory as the "
        "machine leaves it, timed from the call (streamload's from `anyio.run`, the event "
        "loop's start included), default `LoadParams` but for the one field a row names. "
        + (
            f"Each run waits {summary['settle_s']:g} s after its imports before the call, so "
            "it meets memory the machine has taken back from the run before, whatever its "
            "imports cost (the guest reports freed pages to its host after about 2 s). "
            if summary.get("settle_s")
            else ""
        )
        + (
            "The primed columns, an extra and not the headline, are warm runs of a few methods "
            "whose process first faults in and frees twice the checkpoint's size + 1 GiB, so "
            "the load meets memory the host has just backed. "
            if PRIMED in load
            else ""
        )
        + "Warm: "
        "the files are in the page cache; cold: evicted before each run. Extra host memory: "
        "peak RSS beyond the process after imports and beyond the bytes placed (a simulated "
        "GPU's memory is host memory and counts as placed); anon leaves out file pages a "
        "loader maps.",
        "",
        *load_table(load),
        *sim_line(load),
        *goal_lines(load),
        "**Event loop** — worst gap between 1 ms heartbeats on the loop during a load (a second "
        "run of the same load each round: the throughput runs have no heartbeat):",
        "",
        *stall_table(load),
    ]
    plan = plan_table(summary.get("plan_time") or {})
    if plan:
        lines += [
            "**Plan time** — sparse checkpoints (real headers, no data), simulated GPUs, "
            "median of 15:",
            "",
            *plan,
        ]
    return "\n".join(lines).rstrip() + "\n"


def groups(load: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Methods whose tensors end up in process memory (or that failed), and memory-mapped ones,
    each in the order measured."""
    first = load[next(m for m in MODES if m in load)]
    mapped = [m for m, row in first.items() if row.get("mapped")]
    return [m for m in first if m not in mapped], mapped


def _bars(ax: Any, load: dict[str, dict[str, Any]], methods: list[str], touched: bool) -> None:
    modes = [m for m in MODES if m in load]
    height = 0.8 / len(modes)
    top = 0.0
    for m_index, mode in enumerate(modes):
        for index, method in enumerate(methods):
            row = load[mode].get(method, {"error": "not run"})
            y = index + (m_index - (len(modes) - 1) / 2) * height
            if "error" in row:
                ax.text(
                    0.01,
                    y,
                    f"{mode}: not run ({row['error'][:70]})",
                    va="center",
                    fontsize=7,
                    color="#555555",
                    transform=ax.get_yaxis_transform(),
                )
                continue
            value = row["gb_per_s_touched" if touched else "gb_per_s"]
            top = max(top, value)
            ax.barh(
                y,
                value,
                height=height * 0.9,
                color=_COLOURS[mode],
                hatch="///" if touched else None,
                edgecolor="white" if touched else None,
            )
            ratio = row.get("x_safetensors_touched" if touched else "x_safetensors")
            label = f"{value:.2f}" + (f"  ({ratio:.2f}{TIMES} safetensors)" if ratio else "")
            ax.text(value, y, "  " + label, va="center", fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.set_ylim(len(methods) - 0.5, -0.5)
    ax.set_xlim(0, top * 1.5 if top else 1)
    ax.grid(axis="x", alpha=0.3)


_COLOURS = {"warm": "#d95f02", "cold": "#1b9e77"}


def plot(summary: dict[str, Any], path: Path) -> None:
    """Throughput per method, warm and cold, as horizontal bars (Agg backend): loads into
    memory above, memory-mapped ones below on their own scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    load = summary["load"]
    in_memory, mapped = groups(load)
    panels = [(in_memory, False)] + ([(mapped, True)] if mapped else [])
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(10, 0.5 * (len(in_memory) + len(mapped)) + 2.6),
        dpi=150,
        gridspec_kw={"height_ratios": [len(p[0]) for p in panels]},
        squeeze=False,
    )
    for ax, (methods, touched) in zip(axes[:, 0], panels, strict=True):
        _bars(ax, load, methods, touched)
    checkpoint = summary["checkpoint"]
    machine = summary["machine"]
    device = machine["storage"].get("device", {}).get("kind", "unknown device")
    axes[0, 0].set_title(
        f"Loading a {checkpoint['bytes'] / 1e9:.3g} GB bf16 checkpoint into host memory, "
        f"median of {summary['rounds']} rounds "
        f"({machine['cpu']['usable_cores']} cores, {machine['memory']['total_gib']:.0f} GiB "
        f"RAM, {machine['storage']['filesystem']} on {device})",
        fontsize=9,
    )
    axes[0, 0].set_xlabel(
        "GB/s: checkpoint bytes / seconds of the load call (higher is better)", fontsize=8
    )
    handles = [Patch(color=_COLOURS[m], label=m) for m in MODES if m in load]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="lower right")
    if mapped:
        axes[1, 0].set_title(
            "Left memory-mapped (not a load into memory): seconds of the call plus one pass "
            "reading a byte of every page",
            fontsize=8,
        )
        axes[1, 0].set_xlabel("GB/s including the first touch of every page", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
