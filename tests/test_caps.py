"""``LoadParams.max_memory`` and ``--device cuda:N=SIZE``: caps on what a load may take per
device, applied when planning and at every recheck."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import streamload
from streamload.cli import main
from streamload.events import Event, Replanned
from streamload.testing import SimulatedGPU
from tests.engine_support import (
    assert_identical,
    llama_config,
    llama_tensors,
    params,
    reference,
    write_checkpoint,
)

pytestmark = pytest.mark.anyio

GiB = 2**30


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "m", llama_tensors(6), llama_config(6))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"cuda:0": "10GiB", "cpu": "64GiB"}, {"cuda:0": 10 * GiB, "cpu": 64 * GiB}),
        ({"sim:0": 4096}, {"sim:0": 4096}),
        ({"sim:0": "1.5 MiB"}, {"sim:0": 3 * 2**19}),
        (None, {}),
    ],
)
def test_max_memory_takes_bytes_and_size_strings(
    given: dict[str, int | str] | None, expected: dict[str, int]
) -> None:
    """Accelerate's spelling: ints are bytes, strings are sizes with a unit."""
    assert expected == dict(streamload.LoadParams(max_memory=given).memory_caps)


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"cuda:0": "10"}, "needs a unit"),
        ({"cuda:0": "lots"}, "bad size"),
        ({"cuda:0": -1}, "must be >= 0"),
        ({"cuda:0": 1.5}, "must be bytes or a size string"),
        ({"cuda:0": True}, "must be bytes or a size string"),
    ],
)
def test_bad_caps_are_refused_when_params_are_made(given: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        streamload.LoadParams(max_memory=given)  # type: ignore[arg-type]


async def test_a_capped_gpu_gets_no_more_than_its_cap(ckpt: Path) -> None:
    """A 1 GiB simulated GPU capped at about half the model holds only what fits the cap; the
    rest goes to the CPU, nothing re-plans, and the GPU's peak stays within the cap."""
    gpu = SimulatedGPU("sim:0", total_bytes=GiB)
    spec = streamload.inspect(ckpt)
    cap = spec.non_mapped_bytes + 3 * spec.layers[0].nbytes + 64 * 1024
    load_params = params([gpu, "cpu"], max_memory={"sim:0": cap})
    plan = streamload.plan(ckpt, load_params)
    assert plan.device("sim:0").capacity_bytes == cap
    assert 0 < plan.layer_devices.count("sim:0") < 6
    events: list[Event] = []
    model = await streamload.load(ckpt, load_params, on_event=events.append)
    assert [] == [e for e in events if isinstance(e, Replanned)]
    assert plan.layer_devices == model.plan.layer_devices
    assert gpu.peak_allocated_bytes <= cap
    assert_identical(model.tensors, reference(ckpt), None)


def test_a_cap_for_a_device_the_load_does_not_use_is_an_error(ckpt: Path) -> None:
    with pytest.raises(streamload.DeviceError, match="sim:9"):
        streamload.plan(ckpt, params([SimulatedGPU("sim:0", GiB)], max_memory={"sim:9": GiB}))


def test_the_cli_passes_a_size_on_a_real_gpu_as_its_cap(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--device cuda:0=10GiB`` names a real GPU with a cap (here no GPU is visible, so the
    error names it), while ``sim:0=24`` without a unit is refused as a bad size."""
    assert 2 == main(["plan", str(ckpt), "--device", "cuda:0=10GiB"])
    assert "cuda:0" in capsys.readouterr().err
    assert 2 == main(["plan", str(ckpt), "--device", "sim:0=24"])
    assert "needs a unit" in capsys.readouterr().err


def test_the_cli_reports_caps_in_its_inputs(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert 0 == main(["plan", str(ckpt), "--device", "sim:0=1GiB", "--json"])
    assert {} == json.loads(capsys.readouterr().out)["inputs"]["max_memory"]


def test_device_arguments_split_into_devices_and_caps() -> None:
    """``cuda:N=SIZE`` is the real GPU with a cap; any other ``NAME=SIZE`` a simulated GPU;
    the CPU comes last."""
    from streamload._cmdline import DeviceArg, devices_from_args

    devices, caps = devices_from_args(
        [DeviceArg("cuda:0", 10 * GiB), DeviceArg("sim:1", GiB), DeviceArg("cuda:1", None)],
        cpu=True,
    )
    assert "cuda:0" == devices[0]
    assert isinstance(devices[1], SimulatedGPU)
    assert GiB == devices[1].total_bytes()
    assert ["cuda:1", "cpu"] == devices[2:]
    assert {"cuda:0": 10 * GiB} == caps
