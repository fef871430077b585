"""Tests for ``streamload.cli``: argument parsing at the edge, the four commands run in-process
(``main([...])`` with captured output) on small checkpoints the tests write, errors as one line
with exit status 2, Ctrl-C as a clean cancellation with exit status 130."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch

import streamload
from streamload import events
from streamload.cli import (
    DeviceArg,
    LoadView,
    Output,
    Table,
    main,
    parse_device,
    parse_paged_attention,
    parse_size,
    plain_table,
    replan_line,
)
from streamload.testing import (
    SimulatedGPU,
    TensorShape,
    write_safetensors,
    write_sparse_safetensors,
)
from streamload.testing._shapes import LLAMA_3_1_405B, llama_shapes

MiB = 2**20
GiB = 2**30

LAYERS = 6
HIDDEN = 256
INTER = 2048
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
VOCAB = 1000


def _config() -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": LAYERS,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    kv = KV_HEADS * HEAD_DIM
    out = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.input_layernorm.weight": rand(HIDDEN),
            f"{p}.self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.k_proj.weight": rand(kv, HIDDEN),
            f"{p}.self_attn.v_proj.weight": rand(kv, HIDDEN),
            f"{p}.self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
            f"{p}.post_attention_layernorm.weight": rand(HIDDEN),
            f"{p}.mlp.gate_proj.weight": rand(INTER, HIDDEN),
            f"{p}.mlp.up_proj.weight": rand(INTER, HIDDEN),
            f"{p}.mlp.down_proj.weight": rand(HIDDEN, INTER),
        }
    out["model.norm.weight"] = rand(HIDDEN)
    out["lm_head.weight"] = rand(VOCAB, HIDDEN)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense 6-layer Llama-shaped BF16 checkpoint (~22 MiB) with its ``config.json``."""
    root = tmp_path_factory.mktemp("ckpt")
    write_safetensors(root / "model.safetensors", _tensors(), {"format": "pt"})
    (root / "config.json").write_text(json.dumps(_config()))
    return root


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


COMMON = ("--max-seq-len", "64", "--gpu-reserve", "1MiB", "--cpu-memory", "4GiB")


@pytest.fixture(scope="module")
def sim_sizes(checkpoint: Path) -> tuple[int, int]:
    """GPU sizes that hold 2.5 layers each after fixed costs (GPU 0 also the non-mapped parts),
    measured with the public API so the tests follow the estimators rather than copy them."""
    spec = streamload.inspect(checkpoint)
    probe = SimulatedGPU("probe", total_bytes=64 * GiB)
    params = streamload.LoadParams(devices=[probe], max_seq_len=64, reserve_min_bytes=MiB)
    roomy = streamload.plan(checkpoint, params)
    layer = max(layer.nbytes for layer in spec.layers) + max(roomy.layer_kv_bytes)
    fixed = MiB + roomy.devices[0].activation_bytes
    return fixed + spec.non_mapped_bytes + int(2.5 * layer), fixed + int(2.5 * layer)


def table_rows(out: str, keys: tuple[str, ...] = ("sim:0", "sim:1", "cpu")) -> dict[str, list[str]]:
    """The table rows in ``out`` whose first cell is one of ``keys``, split into cells (two or
    more spaces apart, in rich and plain tables alike); a later table's row replaces an
    earlier one with the same key."""
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in keys:
            rows[cells[0]] = cells
    return rows


def sim_devices(sizes: tuple[int, int]) -> list[str]:
    return ["--device", f"sim:0={sizes[0]}B", "--device", f"sim:1={sizes[1]}B"]


EXPECTED_LAYERS = ["sim:0", "sim:0", "sim:1", "sim:1", "cpu", "cpu"]

# --------------------------------------------------------------------------------------------
# Parsing at the edge


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096B", 4096),
        ("0", 0),
        ("24GiB", 24 * GiB),
        ("24GB", 24 * 10**9),
        ("512MiB", 512 * MiB),
        ("1.5TiB", 3 * 2**39),
        ("1.5 KiB", 1536),
        (" 2gib ", 2 * GiB),
        ("100b", 100),
        ("8kb", 8000),
        ("0.5MB", 500_000),
        (".5GiB", GiB // 2),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    """Decimal (GB) and binary (GiB) units, fractions that land on whole bytes, bytes (``B``),
    and zero without a unit."""
    assert expected == parse_size(text)


@pytest.mark.parametrize(
    "text",
    ["lots", "", "GiB", "1.5", "-1GiB", "10G", "1e3", "nan", "24 GiBs", "1,5GiB", "24", "4096"],
)
def test_parse_size_refuses(text: str) -> None:
    """Garbage, negative sizes, partial bytes, ambiguous units (``G``) and numbers without a
    unit (``sim:0=24`` is never meant as 24 bytes) are refused."""
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_a_size_without_a_unit_says_which_unit_to_add() -> None:
    """The error for ``24`` suggests ``24GiB`` (and ``24B`` for bytes)."""
    with pytest.raises(ValueError, match=r"needs a unit, e\.g\. 24GiB \(or 24B for bytes\)"):
        parse_size("24")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("off", None),
        ("context", streamload.PagedAttention()),
        ("CONTEXT", streamload.PagedAttention()),
        ("context:8192", streamload.PagedAttention(memory=streamload.ContextSize(8192))),
        ("mb:4096", streamload.PagedAttention(memory=streamload.MbAmount(4096))),
        ("util:0.9", streamload.PagedAttention(memory=streamload.Utilization(0.9))),
    ],
)
def test_parse_paged_attention(text: str, expected: streamload.PagedAttention | None) -> None:
    """Each ``--paged-attention`` mode maps to the ``PagedAttention`` memory mode it names."""
    assert expected == parse_paged_attention(text)


@pytest.mark.parametrize("text", ["on:3", "fast", "util:2", "util", "mb:x", "context:0", "off:1"])
def test_parse_paged_attention_refuses(text: str) -> None:
    """Unknown modes and out-of-range values are a ``ValueError`` listing the valid forms."""
    with pytest.raises(ValueError, match="bad paged-attention mode"):
        parse_paged_attention(text)


def test_parse_device() -> None:
    """``NAME=SIZE`` is a simulated GPU of that size; a bare name a real device."""
    assert DeviceArg("sim:0", 24 * GiB) == parse_device("sim:0=24GiB")
    assert DeviceArg("cuda:1", None) == parse_device("cuda:1")
    for bad in ("=1GiB", "cpu=1GiB", "sim:0=lots"):
        with pytest.raises(ValueError):
            parse_device(bad)


def test_plain_table_aligns_columns() -> None:
    """Without rich, tables are aligned text; numeric columns are right-aligned."""
    table = Table(
        "t", ("device", "bytes"), (("sim:0", "1 B"), ("cpu", "10.00 KiB")), frozenset({1})
    )
    expected = "\n".join(
        ["t", "device      bytes", "------  ---------", "sim:0         1 B", "cpu     10.00 KiB"]
    )
    assert expected == plain_table(table)


def test_replan_line() -> None:
    """A re-plan is one line: where, why, the numbers, the assignment before and after."""
    event = events.Replanned(
        device="sim:1",
        reason="under-delivered",
        expected_free=2 * MiB,
        live_free=MiB,
        old_layer_devices=("sim:0", "sim:1", "sim:1", "cpu"),
        new_layer_devices=("sim:0", "sim:1", "cpu", "cpu"),
        at_layer=1,
    )
    expected = (
        "re-plan at layer 1: sim:1 under-delivered (needs 2.00 MiB, has 1.00 MiB): "
        "sim:0 0 | sim:1 1-2 | cpu 3  ->  sim:0 0 | sim:1 1 | cpu 2-3"
    )
    assert expected == replan_line(event)


# --------------------------------------------------------------------------------------------
# inspect


def test_inspect_json(capsys: pytest.CaptureFixture[str], checkpoint: Path) -> None:
    """``inspect --json`` reports layers, bytes, dtypes, non-mapped parts and config facts,
    matching the tensors the test wrote."""
    code, out, err = run(capsys, "inspect", checkpoint, "--json")
    assert (0, "") == (code, err)
    data = json.loads(out)
    tensors = _tensors()
    layer_bytes = sum(t.nbytes for n, t in tensors.items() if n.startswith("model.layers.0."))
    assert len(tensors) == data["tensors"]
    assert sum(t.nbytes for t in tensors.values()) == data["total_bytes"]
    assert {"BF16": {"tensors": len(tensors), "bytes": data["total_bytes"]}} == data["dtypes"]
    assert LAYERS == data["layers"]["count"]
    assert (layer_bytes, layer_bytes) == (data["layers"]["min_bytes"], data["layers"]["max_bytes"])
    assert ["lm_head", "model.embed_tokens", "model.norm"] == sorted(
        part["name"] for part in data["non_mapped"]
    )
    config = data["config"]
    facts = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads")
    assert ("llama", HIDDEN, HEADS, KV_HEADS) == tuple(config[k] for k in facts)
    assert (HEAD_DIM, VOCAB, None, "standard") == (
        config["head_dim"],
        config["vocab_size"],
        config["sliding_window"],
        config["kv_kind"],
    )


def test_inspect_json_in_target_dtype(capsys: pytest.CaptureFixture[str], checkpoint: Path) -> None:
    """``--dtype f32`` counts floating tensors at 4 bytes: twice the stored BF16 bytes."""
    code, out, _ = run(capsys, "inspect", checkpoint, "--json", "--dtype", "f32")
    data = json.loads(out)
    assert (0, "F32") == (code, data["target_dtype"])
    assert 2 * data["stored_bytes"] == data["total_bytes"]


def test_inspect_human(capsys: pytest.CaptureFixture[str], checkpoint: Path) -> None:
    """The human form names the model, the layer count and size, dtypes and non-mapped parts."""
    code, out, err = run(capsys, "inspect", checkpoint)
    assert (0, "") == (code, err)
    per_layer = streamload.inspect(checkpoint).layers[0].nbytes
    for text in ("llama", f"{LAYERS} x {per_layer / MiB:.2f} MiB", "BF16", "model.embed_tokens"):
        assert text in out


# --------------------------------------------------------------------------------------------
# plan


def test_plan_json_over_two_simulated_gpus_and_cpu(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, sim_sizes: tuple[int, int]
) -> None:
    """``--device`` builds simulated GPUs filled in order, the CPU last; the JSON holds the
    plan (``Plan.to_dict``) and the inputs."""
    code, out, err = run(capsys, "plan", checkpoint, *sim_devices(sim_sizes), *COMMON, "--json")
    assert (0, "") == (code, err)
    data = json.loads(out)
    assert EXPECTED_LAYERS == data["layer_devices"]
    assert ["sim:0", "sim:1", "cpu"] == [row["device"] for row in data["devices"]]
    assert "sim:0" == data["primary"]
    inputs = data["inputs"]
    expected_devices = [
        {"name": "sim:0", "simulated": True, "total_bytes": sim_sizes[0]},
        {"name": "sim:1", "simulated": True, "total_bytes": sim_sizes[1]},
    ]
    assert expected_devices == inputs["devices"]
    assert (64, MiB, 4 * GiB, None) == (
        inputs["max_seq_len"],
        inputs["reserve_min_bytes"],
        inputs["cpu_memory_bytes"],
        inputs["paged_attention"],
    )


def test_plan_human(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, sim_sizes: tuple[int, int]
) -> None:
    """The human plan shows a row per device with its layer range, the primary and KV mode."""
    code, out, _ = run(capsys, "plan", checkpoint, *sim_devices(sim_sizes), *COMMON)
    assert 0 == code
    rows = table_rows(out)
    assert ["0-1", "2-3", "4-5"] == [rows[d][1] for d in ("sim:0", "sim:1", "cpu")]
    assert "primary device: sim:0" in out
    assert "paged attention: off" in out


def test_plan_plain_text_without_rich(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    checkpoint: Path,
    sim_sizes: tuple[int, int],
) -> None:
    """Where rich cannot be imported the same plan is printed as aligned plain text."""
    monkeypatch.setitem(sys.modules, "rich.console", None)
    code, out, _ = run(capsys, "plan", checkpoint, *sim_devices(sim_sizes), *COMMON)
    assert 0 == code
    rows = table_rows(out)
    assert ["0-1", "2-3", "4-5"] == [rows[d][1] for d in ("sim:0", "sim:1", "cpu")]
    assert "─" not in out


def test_plan_paged_attention_falls_back_when_the_cpu_is_needed(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, sim_sizes: tuple[int, int]
) -> None:
    """With paged attention and a plan that needs the CPU, the plan says it fell back, and why."""
    argv: tuple[str | Path, ...] = (
        "plan",
        checkpoint,
        *sim_devices(sim_sizes),
        *COMMON,
        "--paged-attention",
        "context",
    )
    code, out, _ = run(capsys, *argv, "--json")
    data = json.loads(out)
    assert (0, False) == (code, data["paged_attention"])
    assert data["paged_attention_reason"]
    code, out, _ = run(capsys, *argv)
    assert "paged attention: off, fell back to non-paged KV sizing: " in out


def test_plan_no_cpu_gpus_only(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, sim_sizes: tuple[int, int]
) -> None:
    """``--no-cpu`` plans the listed GPUs only."""
    argv: tuple[str | Path, ...] = (
        "plan",
        checkpoint,
        "--device",
        "sim:0=1GiB",
        *COMMON,
        "--no-cpu",
        "--json",
    )
    code, out, _ = run(capsys, *argv)
    data = json.loads(out)
    assert (0, ["sim:0"] * LAYERS) == (code, data["layer_devices"])
    assert ["sim:0"] == [row["device"] for row in data["devices"]]


def test_plan_405b_on_hypothetical_gpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A Llama-3.1-405B-shaped header (data region a file hole) planned over four hypothetical
    80 GiB GPUs and a 1 TiB host: GPUs filled in the order given, the rest on the CPU."""
    write_sparse_safetensors(
        tmp_path / "model.safetensors",
        {name: TensorShape(*value) for name, value in llama_shapes(LLAMA_3_1_405B).items()},
    )
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA_3_1_405B)))
    gpus = [arg for i in range(4) for arg in ("--device", f"gpu:{i}=80GiB")]
    code, out, _ = run(capsys, "plan", tmp_path, *gpus, "--cpu-memory", "1TiB", "--json")
    data = json.loads(out)
    layer_devices = data["layer_devices"]
    order = ["gpu:0", "gpu:1", "gpu:2", "gpu:3", "cpu"]
    assert (0, 126) == (code, len(layer_devices))
    assert sorted(layer_devices, key=order.index) == layer_devices
    assert set(order) == set(layer_devices)
    assert "cpu" == layer_devices[-1]


# --------------------------------------------------------------------------------------------
# Bad arguments: one line on stderr, exit status 2


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corrupt") / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    return path


BAD_ARGUMENTS: list[tuple[str, list[str]]] = [
    ("no command", []),
    ("unknown command", ["frobnicate"]),
    ("missing path", ["plan"]),
    ("unknown flag", ["plan", "{ckpt}", "--frobnicate"]),
    ("bad size", ["plan", "{ckpt}", "--device", "sim:0=lots"]),
    ("bad cpu size", ["plan", "{ckpt}", "--cpu-memory", "much"]),
    ("cpu as device", ["plan", "{ckpt}", "--device", "cpu=1GiB"]),
    ("duplicate device", ["plan", "{ckpt}", "--device", "sim:0=1GiB", "--device", "sim:0=2GiB"]),
    ("bad dtype", ["inspect", "{ckpt}", "--dtype", "int3"]),
    ("bad paged mode", ["plan", "{ckpt}", "--paged-attention", "fast"]),
    ("block size alone", ["plan", "{ckpt}", "--block-size", "16"]),
    ("zero seq len", ["plan", "{ckpt}", "--max-seq-len", "0"]),
    ("bad cpu policy", ["plan", "{ckpt}", "--cpu-policy", "swap"]),
    ("nonexistent path", ["inspect", "{missing}"]),
    ("nonexistent path for load", ["load", "{missing}", "--device", "sim:0=1GiB"]),
    ("corrupt header", ["inspect", "{corrupt}"]),
    ("demo over a checkpoint", ["demo", "--dir", "{ckpt}"]),
    ("does not fit", ["plan", "{ckpt}", "--device", "sim:0=1MiB", "--no-cpu"]),
    ("does not fit on load", ["load", "{ckpt}", "--device", "sim:0=1MiB", "--no-cpu"]),
]


@pytest.mark.parametrize(
    "argv", [argv for _, argv in BAD_ARGUMENTS], ids=[name for name, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    checkpoint: Path,
    corrupt: Path,
    tmp_path: Path,
    argv: list[str],
) -> None:
    """A bad argument, a missing or corrupt checkpoint, or a plan that cannot fit: exit status
    2, nothing on stdout, exactly one ``streamload: error: ...`` line on stderr."""
    paths = {"ckpt": checkpoint, "missing": tmp_path / "nowhere", "corrupt": corrupt}
    code, out, err = run(capsys, *(arg.format(**paths) for arg in argv))
    assert (2, "") == (code, out)
    assert 1 == len(err.splitlines()), err
    assert err.startswith("streamload: error: ")
    assert "Traceback" not in err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` and ``--version`` print to stdout and return 0 instead of raising."""
    code, out, _ = run(capsys, "plan", "--help")
    assert 0 == code
    assert "--device NAME=SIZE" in out
    code, out, _ = run(capsys, "--version")
    assert (0, f"streamload {streamload.__version__}") == (code, out.strip())


def test_python_dash_m_help() -> None:
    """``python -m streamload --help`` works in a fresh interpreter and lists the commands."""
    result = subprocess.run(
        [sys.executable, "-m", "streamload", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (0, "") == (result.returncode, result.stderr)
    for command in ("inspect", "plan", "load", "demo"):
        assert command in result.stdout


# --------------------------------------------------------------------------------------------
# load


def test_load_on_simulated_gpus_prints_a_report(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, sim_sizes: tuple[int, int]
) -> None:
    """``load --device ...`` streams onto simulated GPUs and the CPU, shows the plan, then the
    report: bytes per device, throughput, re-plans, fallbacks."""
    code, out, err = run(capsys, "load", checkpoint, *sim_devices(sim_sizes), *COMMON)
    assert (0, "") == (code, err)
    assert "primary device: sim:0" in out
    placed = table_rows(out)  # the report's table comes last: device, layers, #, tensors, ...
    assert [["0-1", "2"], ["2-3", "2"], ["4-5", "2"]] == [
        placed[d][1:3] for d in ("sim:0", "sim:1", "cpu")
    ]
    total = streamload.inspect(checkpoint).total_bytes
    assert f"loaded {total / MiB:.2f} MiB" in out
    assert "re-plans: 0" in out
    assert "fallbacks: none" in out


def test_load_json(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, sim_sizes: tuple[int, int]
) -> None:
    """``load --json`` prints one JSON document: report, re-plans, the plan used, device map."""
    code, out, _ = run(capsys, "load", checkpoint, *sim_devices(sim_sizes), *COMMON, "--json")
    data = json.loads(out)
    assert 0 == code
    report = data["report"]
    assert streamload.inspect(checkpoint).total_bytes == report["nbytes"]
    assert ["sim:0", "sim:1", "cpu"] == [d["device"] for d in report["devices"]]
    assert EXPECTED_LAYERS == data["plan"]["layer_devices"]
    assert [] == data["replans"]
    assert ("sim:0", "cpu") == (
        data["placement"]["model.embed_tokens"],
        data["placement"]["model.layers.5"],
    )


def test_load_json_logs(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, sim_sizes: tuple[int, int]
) -> None:
    """``--json-logs`` sends every event to stderr as a JSON line (keys are the event's
    fields), and the structlog configuration is restored afterwards."""
    before = structlog.get_config()
    argv: tuple[str | Path, ...] = (
        "load",
        checkpoint,
        *sim_devices(sim_sizes),
        *COMMON,
        "--json-logs",
    )
    code, _, err = run(capsys, *argv)
    assert 0 == code
    lines = [json.loads(line) for line in err.splitlines()]
    names = [line["event"] for line in lines]
    assert "plan_computed" == names[0]
    assert "load_finished" == names[-1]
    assert 3 + LAYERS == names.count("layer_placed")
    placed = [line for line in lines if line["event"] == "layer_placed"]
    assert {"layer", "device", "nbytes", "seconds", "free_before", "free_after"} <= set(placed[0])
    assert before == structlog.get_config()


def test_ctrl_c_cancels_the_load_cleanly(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    checkpoint: Path,
    sim_sizes: tuple[int, int],
) -> None:
    """SIGINT during a load cancels it: exit status 130, one line on stderr, and every byte it
    had placed on the simulated GPUs is released."""
    real_load = streamload.load
    seen: list[Any] = []

    async def interrupted_load(
        path: Path, params: streamload.LoadParams, *, on_event: Callable[[Any], None]
    ) -> streamload.LoadedModel:
        seen.extend(d for d in params.devices if isinstance(d, SimulatedGPU))

        def on_event_then_sigint(event: events.Event) -> None:
            on_event(event)
            if isinstance(event, events.LayerPlaced) and event.layer == 0:
                os.kill(os.getpid(), signal.SIGINT)

        return await real_load(path, params, on_event=on_event_then_sigint)

    monkeypatch.setattr(streamload, "load", interrupted_load)
    # A shell starts background jobs with SIGINT ignored (then Python installs no Ctrl-C
    # handler): give the test the handler an interactive process has.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, _, err = run(capsys, "load", checkpoint, *sim_devices(sim_sizes), *COMMON)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert 130 == code
    assert ["streamload: interrupted; nothing is left loaded"] == err.splitlines()
    assert [0, 0] == [gpu.allocated_bytes for gpu in seen]


def test_load_view_prints_replans_and_new_fallbacks_only(
    capsys: pytest.CaptureFixture[str], checkpoint: Path
) -> None:
    """During a load the view shows the plan once, each re-plan as it happens, and a fallback
    only when the plan's own status line has not already given that reason."""
    gpu = SimulatedGPU("sim:0", total_bytes=GiB)
    params = streamload.LoadParams(
        devices=[gpu, "cpu"], max_seq_len=64, paged_attention=streamload.PagedAttention()
    )
    plan = streamload.plan(checkpoint, params)
    view = LoadView(Output(None), total_bytes=100, layers=LAYERS, headline="loading x")
    replan = events.Replanned("sim:0", "under-delivered", 2, 1, ("sim:0",), ("cpu",), 0)
    with view:
        view(events.PlanComputed(plan))
        view(events.LayerPlaced(0, "sim:0", 100, 0.1, 10, 0))
        view(replan)
        view(events.PagedAttentionDisabled("the re-plan needs the CPU"))
    lines = capsys.readouterr().out.splitlines()
    assert (True, "loading x") == (plan.paged_attention, lines[0])
    expected = [replan_line(replan), "fallback: the re-plan needs the CPU"]
    assert expected == lines[-2:]


# --------------------------------------------------------------------------------------------
# demo


def test_demo_replans_and_cleans_up(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The demo writes a real checkpoint, loads it over two simulated GPUs and the CPU, a
    tenant's grab on the second GPU forces a re-plan, and the files are removed afterwards."""
    target = tmp_path / "demo"
    started = time.perf_counter()
    code, out, err = run(capsys, "demo", "--dir", target)
    seconds = time.perf_counter() - started
    assert (0, "") == (code, err)
    assert {"sim:0", "sim:1", "cpu"} <= set(table_rows(out))
    assert "tenant: took" in out
    assert "re-plan at layer" in out
    assert "re-plans: 1" in out
    assert "plan after re-planning" in out
    assert not target.exists()
    assert seconds < 30


def test_demo_never_overwrites(capsys: pytest.CaptureFixture[str], checkpoint: Path) -> None:
    """``--dir`` pointing at a folder that already holds a checkpoint is refused (exit 2) and
    the files there are left as they were."""
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    code, _, err = run(capsys, "demo", "--dir", checkpoint)
    assert (2, 1) == (code, len(err.splitlines()))
    assert "not overwriting" in err
    assert before == {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}


def test_demo_keep(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--keep`` leaves the checkpoint where ``--dir`` put it, loadable by ``inspect``."""
    target = tmp_path / "kept"
    code, out, _ = run(capsys, "demo", "--dir", target, "--keep")
    assert 0 == code
    assert f"kept the checkpoint in {target}" in out
    code, out, _ = run(capsys, "inspect", target, "--json")
    assert (0, 12) == (code, json.loads(out)["layers"]["count"])
