"""``plan`` is the truth: a load starts from exactly the plan ``streamload.plan`` shows, never
fails or re-plans on idle simulated devices the plan fits, and charges each device what the
plan's row says (``load_bytes``: weights + conversion scratch)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import streamload
from streamload.cli import main
from streamload.events import Event, PlanComputed, Replanned
from streamload.testing import (
    LLAMA_3_1_70B,
    SimulatedGPU,
    TensorShape,
    llama_shapes,
    tiny_llama_config,
    write_sharded,
)
from streamload.testing._shapes import bert_config, bert_shapes, gpt2_config, gpt2_shapes
from tests.engine_support import (
    assert_identical,
    llama_config,
    llama_tensors,
    params,
    reference,
    write_checkpoint,
)

pytestmark = pytest.mark.anyio

CHUNK = 4096
BIG = 2**40


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _llama(directory: Path) -> Path:
    return write_checkpoint(directory, llama_tensors(4), llama_config(4))


def _llama_tied(directory: Path) -> Path:
    tensors = llama_tensors(3, extras=False)
    del tensors["lm_head.weight"]
    return write_checkpoint(directory, tensors, llama_config(3, tie=True), shards=2)


def _shapes(shapes: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, TensorShape]:
    return {name: TensorShape(dtype, shape) for name, (dtype, shape) in shapes.items()}


def _bert(directory: Path) -> Path:
    config = bert_config(num_hidden_layers=3)
    write_sharded(directory, _shapes(bert_shapes(config)), num_shards=2, sparse=True, config=config)
    return directory


def _gpt2(directory: Path) -> Path:
    config = gpt2_config()
    write_sharded(directory, _shapes(gpt2_shapes(config)), num_shards=1, sparse=True, config=config)
    return directory


def _tiny_llama_bf16(directory: Path) -> Path:
    config = tiny_llama_config(torch_dtype="bfloat16")
    shapes = _shapes(llama_shapes(config))
    write_sharded(directory, shapes, num_shards=2, sparse=True, config=config)
    return directory


CHECKPOINTS: dict[str, Callable[[Path], Path]] = {
    "llama-mixed": _llama,
    "llama-tied": _llama_tied,
    "bert": _bert,
    "gpt2": _gpt2,
    "llama-bf16": _tiny_llama_bf16,
}


def _load_params(devices: list[Any], dtype: torch.dtype | None, policy: str) -> Any:
    return params(devices, dtype=dtype, cpu_policy=policy, chunk_bytes=CHUNK)


def _gpu_rows(plan: streamload.Plan) -> list[dict[str, Any]]:
    """The plan's GPU rows (the CPU's numbers follow the host's live free memory)."""
    return [row.to_dict() for row in plan.devices if row.is_gpu]


async def _load_recording(
    ckpt: Path, load_params: Any
) -> tuple[streamload.LoadedModel, list[Event]]:
    events: list[Event] = []
    model = await streamload.load(ckpt, load_params, on_event=events.append)
    return model, events


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["stored", "bf16"])
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
async def test_a_gpu_sized_to_the_plan_loads_without_a_replan(
    tmp_path: Path, name: str, dtype: torch.dtype | None
) -> None:
    """A simulated GPU whose total is exactly what the plan needs there (zero headroom) takes
    the whole model: no re-plan, bit-identical tensors, and its peak allocation equals the
    plan's ``load_bytes`` (weights + conversion scratch) within one chunk."""
    ckpt = CHECKPOINTS[name](tmp_path / name)
    probe = streamload.plan(ckpt, _load_params([SimulatedGPU("sim:0", BIG)], dtype, "copy"))
    need = probe.devices[0].need_bytes
    gpu = SimulatedGPU("sim:0", total_bytes=need)
    load_params = _load_params([gpu], dtype, "copy")
    expected = streamload.plan(ckpt, load_params)
    assert 0 == expected.devices[0].headroom_bytes

    model, events = await _load_recording(ckpt, load_params)

    assert [] == [e for e in events if isinstance(e, Replanned)]
    planned = next(e.plan for e in events if isinstance(e, PlanComputed))
    assert expected == planned
    assert_identical(model.tensors, reference(ckpt), dtype)
    assert abs(gpu.peak_allocated_bytes - planned.devices[0].load_bytes) <= CHUNK
    model.release()
    assert 0 == gpu.allocated_bytes


@pytest.mark.parametrize("policy", ["copy", "mmap"])
@pytest.mark.parametrize("staged", [True, False], ids=["staged", "unstaged"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["stored", "bf16"])
async def test_a_split_over_gpus_and_the_cpu_loads_as_planned(
    tmp_path: Path, dtype: torch.dtype | None, staged: bool, policy: str
) -> None:
    """Two simulated GPUs sized for a few layers each and the CPU: the load's plan is the one
    ``streamload.plan`` showed for the same devices, nothing re-plans, and each GPU's peak
    equals its row's ``load_bytes`` within one chunk."""
    ckpt = _llama(tmp_path / "llama")
    probe = streamload.plan(ckpt, _load_params([SimulatedGPU("probe", BIG)], dtype, policy))
    spec = streamload.inspect(ckpt, dtype)
    row = probe.devices[0]
    layer = spec.layers[0].nbytes + probe.layer_kv_bytes[0]
    first = row.activation_bytes + row.scratch_bytes + spec.non_mapped_bytes + layer
    second = row.activation_bytes + row.scratch_bytes + layer
    gpus = [
        SimulatedGPU("sim:0", total_bytes=first, staged=staged),
        SimulatedGPU("sim:1", total_bytes=second, staged=staged),
    ]
    load_params = _load_params([*gpus, "cpu"], dtype, policy)
    expected = streamload.plan(ckpt, load_params)
    assert ("sim:0", "sim:1", "cpu", "cpu") == expected.layer_devices

    model, events = await _load_recording(ckpt, load_params)

    assert [] == [e for e in events if isinstance(e, Replanned)]
    planned = next(e.plan for e in events if isinstance(e, PlanComputed))
    assert (expected.layer_devices, _gpu_rows(expected)) == (
        planned.layer_devices,
        _gpu_rows(planned),
    )
    assert_identical(model.tensors, reference(ckpt), dtype)
    for gpu, row in zip(gpus, planned.devices, strict=False):
        assert abs(gpu.peak_allocated_bytes - row.load_bytes) <= CHUNK, gpu.name
    model.release()


async def test_the_sparse_70b_starts_from_the_plan_that_plan_shows(tmp_path: Path) -> None:
    """For a 70B-shaped checkpoint (a file hole, too big to stream here) converted to bf16 over
    two simulated 80 GiB GPUs and the CPU, the plan a load starts from is ``plan``'s: the load
    is stopped as soon as it has planned."""
    shapes = {
        name: TensorShape("F32", shape) for name, (_, shape) in llama_shapes(LLAMA_3_1_70B).items()
    }
    ckpt = tmp_path / "70b"
    write_sharded(ckpt, shapes, max_shard_bytes=40 * 2**30, sparse=True, config=dict(LLAMA_3_1_70B))
    gpus: list[Any] = [SimulatedGPU(f"sim:{i}", total_bytes=80 * 2**30) for i in range(2)]
    load_params = streamload.LoadParams(devices=[*gpus, "cpu"], dtype=torch.bfloat16)
    expected = streamload.plan(ckpt, load_params)
    planned: list[streamload.Plan] = []

    with anyio.CancelScope() as scope:

        def stop_after_planning(event: Event) -> None:
            if isinstance(event, PlanComputed):
                planned.append(event.plan)
                scope.cancel()

        await streamload.load(ckpt, load_params, on_event=stop_after_planning)

    assert (expected.layer_devices, _gpu_rows(expected)) == (
        planned[0].layer_devices,
        _gpu_rows(planned[0]),
    )
    assert all(row.scratch_bytes > 0 for row in planned[0].devices if row.is_gpu)
    assert [0, 0] == [gpu.allocated_bytes for gpu in gpus]


@pytest.mark.parametrize("mib", [64, 160])
def test_the_cli_plan_and_load_agree_on_a_pair_of_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mib: int
) -> None:
    """The MiniLM-shaped encoder stored in f32, loaded in bf16 over two simulated GPUs with a
    1 MiB reserve: ``streamload plan`` and ``streamload load`` with the same flags give the same
    answer. At 64 MiB each both refuse, naming the conversion scratch (the f32 word embeddings
    are converted on the device); at 160 MiB ``plan`` shows the scratch in its rows and ``load``
    places every layer where the plan put it, with no re-plan."""
    config = bert_config(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=12,
        vocab_size=30522,
        max_position_embeddings=512,
    )
    ckpt = tmp_path / "minilm"
    write_sharded(ckpt, _shapes(bert_shapes(config)), num_shards=1, sparse=True, config=config)
    flags = [
        *("--device", f"sim:0={mib}MiB", "--device", f"sim:1={mib}MiB"),
        *("--gpu-reserve", "1MiB", "--max-seq-len", "256", "--dtype", "bf16"),
    ]
    planned = main(["plan", str(ckpt), *flags, "--json"])
    shown = capsys.readouterr()
    loaded = main(["load", str(ckpt), *flags, "--json"])
    done = capsys.readouterr()
    if mib == 64:
        assert (2, 2) == (planned, loaded)
        assert "conversion scratch" in shown.err
        assert shown.err.splitlines()[-1] == done.err.splitlines()[-1]
        return
    assert (0, 0) == (planned, loaded)
    plan, outcome = json.loads(shown.out), json.loads(done.out)
    used = [row for row in plan["devices"] if row["layers"] or row["holds_non_mapped"]]
    assert all(row["scratch_bytes"] > 0 for row in used)
    assert plan["layer_devices"] == outcome["plan"]["layer_devices"]
    assert [] == outcome["replans"]
