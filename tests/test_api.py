"""The public surface: exports, and the issue's headline plan on a 70B-shaped checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import streamload
import streamload.cli
import streamload.devices
import streamload.distributed
import streamload.engine
import streamload.model
import streamload.planner
import streamload.testing
from streamload import cli
from streamload.testing import SimulatedGPU, TensorShape, write_sharded
from streamload.testing._shapes import LLAMA_3_1_70B, llama_shapes

GiB = 2**30


def test_all_matches_what_the_package_exports() -> None:
    """``__all__`` (ordered by ruff's RUF022) has no duplicates, names only real attributes,
    and lists every public attribute of ``streamload``, ``streamload.testing`` and the faces of
    the ``cli``, ``devices``, ``distributed``, ``engine``, ``model`` and ``planner`` packages
    defined by the project (as anyio's test_all_attributes does)."""
    faces = (streamload.cli, streamload.devices, streamload.distributed, streamload.engine)
    for module in (streamload, streamload.testing, *faces, streamload.model, streamload.planner):
        public = sorted(
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", "").startswith("stream")
        )
        assert len(set(module.__all__)) == len(module.__all__)
        assert public == sorted(set(public) & set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), name


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-3.1-70B-shaped sparse checkpoint: real names and shapes, data regions that are
    file holes (141 GB of tensors, almost no disk)."""
    shapes = {
        name: TensorShape(dtype, shape)
        for name, (dtype, shape) in llama_shapes(LLAMA_3_1_70B).items()
    }
    directory = tmp_path_factory.mktemp("llama-70b")
    return write_sharded(
        directory, shapes, max_shard_bytes=5 * 10**9, sparse=True, config=dict(LLAMA_3_1_70B)
    )


def three_way_params() -> streamload.LoadParams:
    return streamload.LoadParams(
        devices=[
            SimulatedGPU("sim:0", total_bytes=48 * GiB),
            SimulatedGPU("sim:1", total_bytes=48 * GiB),
            "cpu",
        ],
        cpu_memory_bytes=256 * GiB,
    )


_IMPORTED = """
import json, sys
{first}
import streamload
print(json.dumps({{m: m in sys.modules for m in ("torch", "streamload.engine")}}))
"""


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        ("", {"torch": False, "streamload.engine": False}),
        ("import torch", {"torch": True, "streamload.engine": True}),
    ],
    ids=["alone", "after-torch"],
)
def test_the_engine_is_imported_with_streamload_only_where_torch_already_is(
    first: str, expected: dict[str, bool]
) -> None:
    """``import streamload`` alone imports no torch (nor the engine, which needs it); after
    ``import torch`` it imports the engine too, so the first ``load`` does not import it on the
    event loop (a fresh interpreter each)."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED.format(first=first)],
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    assert expected == json.loads(done.stdout)


def test_70b_over_two_48gib_gpus_and_the_cpu_splits_three_ways(llama_70b: Path) -> None:
    """``streamload.plan`` gives a valid three-way split: contiguous runs on sim:0, sim:1, then
    the CPU; the non-mapped parts on sim:0; no device over its budget; nothing paged."""
    plan = streamload.plan(llama_70b, three_way_params())
    devices = plan.layer_devices
    assert 80 == len(devices)
    order = [d for i, d in enumerate(devices) if i == 0 or devices[i - 1] != d]
    assert ["sim:0", "sim:1", "cpu"] == order
    assert "sim:0" == plan.primary
    for row in plan.devices:
        assert row.need_bytes <= row.capacity_bytes, row
    # A layer is 1,711,308,800 bytes of bf16 weights + 16 MiB of KV (2 x 8 kv heads x 128 x
    # 4096 tokens x 2 bytes) = 1,728,086,016. Each GPU: 48 GiB = 51,539,607,552, minus the
    # reserve (2% of total = 1,030,792,151) and the attention-scores activations (64 heads x
    # 1024 x 4096 x 4 = 1 GiB) leaves 49,435,073,577: sim:1 fits 28 layers (28.6). sim:0 first
    # holds embeddings + lm_head + norm (4,202,708,992): 45,232,364,585 left, 26 layers (26.2).
    # The other 26 go to the CPU.
    assert [26, 28, 26] == [devices.count(name) for name in ("sim:0", "sim:1", "cpu")]


def test_70b_plan_from_the_cli_matches_python(
    llama_70b: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``streamload plan --device sim:0=48GiB --device sim:1=48GiB --cpu-memory 256GiB --json``
    prints the same device map as the Python call."""
    argv = ["plan", str(llama_70b), "--device", "sim:0=48GiB", "--device", "sim:1=48GiB"]
    argv += ["--cpu-memory", "256GiB", "--json"]
    assert 0 == cli.main(argv)
    printed = json.loads(capsys.readouterr().out)
    expected = streamload.plan(llama_70b, three_way_params())
    assert list(expected.layer_devices) == printed["layer_devices"]
