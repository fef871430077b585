"""Tests for ``benchmarks``: the runner on a tiny checkpoint (each method in its own process,
the JSON, the table, the chart), and failures reported as reasons rather than dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import __main__ as runner
from benchmarks import load_throughput, report
from benchmarks.methods import METHODS, Loaded, Method

# A peer from the dev extra (runai-model-streamer and fastsafetensors come with `bench`).
SMOKE_METHODS = ("safetensors", "materialise", "streamload-cpu", "streamload-mmap", "accelerate")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench") / "llama-20mb"
    return load_throughput.ensure_checkpoint(directory, 0.02)


def test_runner_reports_every_method_with_figures_or_a_reason(
    checkpoint: Path, tmp_path: Path
) -> None:
    argv = ["--dir", str(checkpoint), "--size-gb", "0.02", "--rounds", "1"]
    argv += ["--methods", ",".join(SMOKE_METHODS), "--modes", "warm", "--no-plan-time"]
    argv += ["--results", str(tmp_path)]

    assert 0 == runner.main(argv)

    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["load"]["warm"]
    assert list(SMOKE_METHODS) == list(rows)
    for method, row in rows.items():
        assert "error" in row or row["gb_per_s"] > 0, method
    assert rows["streamload-mmap"]["mapped"]
    assert not rows["streamload-cpu"]["mapped"]
    assert rows["streamload-cpu"]["placed_bytes"] == rows["streamload-cpu"]["bytes"]
    assert "worst_loop_gap_ms" in rows["streamload-cpu"]
    assert "x_safetensors" in rows["streamload-cpu"]
    # Timed from anyio.run: the loop's start is inside the figure, the load's time within it.
    assert rows["streamload-cpu"]["seconds"] >= rows["streamload-cpu"]["loop_seconds"] > 0
    if Path("/proc/vmstat").exists():
        assert "vm_thp_fault_alloc" in rows["streamload-cpu"]
        assert "vm_compact_stall" in rows["safetensors"]
    assert summary["machine"]["cpu"]["usable_cores"] >= 1
    table = (tmp_path / "README_TABLE.md").read_text()
    for method in SMOKE_METHODS:
        assert f"| `{method}` |" in table
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert (tmp_path / "load_warm.json").exists()


def test_a_failing_load_in_the_child_is_a_reason_without_paths(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)

    result = load_throughput.spawn("safetensors", tmp_path, timeout=60)

    assert ["error"] == list(result)
    assert str(tmp_path) not in result["error"]


def test_a_raising_method_is_caught_in_the_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fail(directory: Path) -> Loaded:
        raise RuntimeError(f"cannot read {directory}")

    monkeypatch.setitem(METHODS, "disk", Method(fail))

    assert {"error": "RuntimeError: cannot read <checkpoint>"} == load_throughput.child(
        "disk", tmp_path
    )


def test_summary_keeps_a_method_that_never_ran_with_its_reason() -> None:
    ok: dict[str, Any] = {"gb_per_s": 2.0, "seconds": 1.0, "mapped_bytes": 0}
    ok |= {"extra_host_bytes": 0, "extra_anon_bytes": 0, "user_s": 0.5, "sys_s": 0.5}
    runs = {
        "safetensors": [{**ok, "gb_per_s": 1.0}, {**ok, "gb_per_s": 1.0}],
        "streamload-cpu": [ok, {**ok, "gb_per_s": 3.0}],
        "runai": [{"error": "ImportError: no runai"}, {"error": "ImportError: no runai"}],
    }

    summary = load_throughput.summarise(runs)

    assert "ImportError: no runai" == summary["runai"]["error"]
    assert 2.5 == summary["streamload-cpu"]["gb_per_s"]
    assert 2.5 == summary["streamload-cpu"]["x_safetensors"]
    table = report.load_table({"warm": summary})
    assert any(line.startswith("| `runai` |") and "not run" in line for line in table)
    assert "Not run: `runai` (warm): ImportError: no runai." in table


def test_the_goals_are_read_from_the_headline_and_primed_figures_are_labelled() -> None:
    row: dict[str, Any] = {"gb_per_s": 2.0, "seconds": 1.0, "mapped_bytes": 0, "note": ""}
    row |= {"extra_host_bytes": 0, "extra_anon_bytes": 0, "user_s": 0.5, "sys_s": 0.5}
    fast = {**row, "x_safetensors": 1.6, "x_runai-buffered": 1.2, "x_disk": 0.95}
    slow = {**row, "x_safetensors": 1.1, "x_runai-buffered": 0.9, "x_disk": 0.5}
    load = {
        "warm": {"safetensors": row, "streamload-cpu": {**fast, "worst_loop_gap_ms": 20.0}},
        "cold": {"safetensors": row, "streamload-cpu": {**slow, "worst_loop_gap_ms": 70.0}},
        report.PRIMED: {"streamload-cpu": {**row, "gb_per_s": 3.0, "x_safetensors": 1.4}},
    }

    goals = report.goal_lines(load)

    assert any("time over safetensors'" in g and "0.62" in g and "met" in g for g in goals)
    assert any(
        "cold, defaults, throughput over the disk limit" in g and "missed" in g for g in goals
    )
    assert any("event-loop gap" in g and "70.00 ms" in g and "missed" in g for g in goals)
    assert any("pre-faulted arena, warm" in g and "not measured" in g for g in goals)
    table = report.load_table(load)
    assert "primed warm GB/s (extra)" in table[0]
    cpu = next(line for line in table if line.startswith("| `streamload-cpu` |"))
    assert f"| 3.00 | 1.40{report.TIMES} |" in cpu
    safetensors = next(line for line in table if line.startswith("| `safetensors` |"))
    assert "|  |  |" in safetensors  # not run primed: left blank, not an error


def test_the_materialise_floor_holds_every_tensor_bit_identical(checkpoint: Path) -> None:
    from safetensors.torch import load_file

    from benchmarks.methods import run_materialise, shard_files

    loaded = run_materialise(checkpoint)

    expected = [
        t.contiguous().view(-1).view(torch.uint8)
        for path in shard_files(checkpoint)
        for t in load_file(path).values()
    ]
    assert sum(t.nbytes for t in expected) == loaded.bytes_read
    assert len(expected) == len(loaded.tensors)
    for want, got in zip(expected, loaded.tensors, strict=True):
        assert torch.equal(want, got)


def test_priming_gives_the_memory_back_and_the_peak_is_reset() -> None:
    from benchmarks import procfs

    before = procfs.rss_bytes()
    procfs.prime(256 * 2**20)
    assert procfs.peak_rss_bytes() >= before + 240 * 2**20  # every page was faulted in
    assert procfs.rss_bytes() < before + 64 * 2**20

    procfs.reset_peak_rss()

    assert procfs.peak_rss_bytes() < before + 64 * 2**20


def test_the_heartbeat_runs_apart_from_the_throughput_run(checkpoint: Path) -> None:
    plain = load_throughput.run_one("streamload-cpu", checkpoint)
    beating = load_throughput.run_one("streamload-cpu", checkpoint, stall=True)

    assert "worst_loop_gap_ms" not in plain
    assert beating["worst_loop_gap_ms"] >= 1.0  # at least one 1 ms sleep was measured
    assert plain["placed_bytes"] == beating["placed_bytes"] == plain["bytes"]


def test_a_round_takes_the_stall_from_its_heartbeat_run_or_reports_why_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, bool]] = []
    settled: list[float] = []
    ok: dict[str, Any] = {"gb_per_s": 2.0, "seconds": 1.0, "mapped_bytes": 0}

    def fake_spawn(
        name: str,
        directory: Path,
        timeout: float,
        prime_bytes: int = 0,
        stall: bool = False,
        settle: float = 0.0,
    ) -> dict[str, Any]:
        calls.append((name, stall))
        settled.append(settle)
        if stall and len(calls) > 3:
            return {"error": "exit status 1: boom"}
        return {**ok, "worst_loop_gap_ms": 7.0, "worst_loop_gap_at_s": 0.5} if stall else {**ok}

    monkeypatch.setattr(load_throughput, "spawn", fake_spawn)
    monkeypatch.setattr(load_throughput, "warm", lambda directory: None)
    monkeypatch.setattr(load_throughput, "checkpoint_bytes", lambda directory: 0)

    runs = load_throughput.measure(
        tmp_path, ["disk", "streamload-cpu"], rounds=2, cold=False, settle=2.5
    )

    # disk has no heartbeat run; streamload-cpu's follows its load, in each round's order.
    assert [
        ("disk", False),
        ("streamload-cpu", False),
        ("streamload-cpu", True),
        ("streamload-cpu", False),
        ("streamload-cpu", True),
        ("disk", False),
    ] == calls
    # Every throughput run waits before its timed call; the heartbeat runs do not.
    assert [0.0 if stall else 2.5 for _, stall in calls] == settled
    first, second = runs["streamload-cpu"]
    assert 7.0 == first["worst_loop_gap_ms"]
    assert "stall_error" not in first
    assert "worst_loop_gap_ms" not in second
    assert "exit status 1: boom" == second["stall_error"]
    assert all("worst_loop_gap_ms" not in r for r in runs["disk"])


@pytest.mark.parametrize(
    "name",
    [
        "streamload-direct",
        "streamload-direct-auto",
        "streamload-sim-arena",
        "streamload-sim-arena-direct",
    ],
)
def test_the_direct_and_arena_methods_hold_every_tensor_bit_identical(
    checkpoint: Path, name: str
) -> None:
    from safetensors.torch import load_file

    from benchmarks.methods import shard_files

    loaded = METHODS[name].run(checkpoint)

    expected = sorted(
        (
            t.contiguous().view(-1).view(torch.uint8)
            for path in shard_files(checkpoint)
            for t in load_file(path).values()
        ),
        key=lambda t: (t.numel(), t[:64].tolist()),
    )
    got = sorted(
        (t.contiguous().view(-1).view(torch.uint8) for t in loaded.tensors),
        key=lambda t: (t.numel(), t[:64].tolist()),
    )
    assert sum(t.nbytes for t in expected) == loaded.bytes_read
    assert len(expected) == len(got)
    for want, have in zip(expected, got, strict=True):
        assert torch.equal(want, have)
