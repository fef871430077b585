"""Errors and events that name the knob: the minimum GPU reserve, and a ``max_seq_len`` beyond
what the model was made for."""

from __future__ import annotations

from pathlib import Path

import pytest

import streamload
from streamload.events import Event, MaxSeqLenClamped
from streamload.testing import SimulatedGPU
from tests.engine_support import llama_config, llama_tensors, params, write_checkpoint

pytestmark = pytest.mark.anyio

MiB = 2**20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "m", llama_tensors(4), llama_config(4))


def test_a_gpu_too_small_for_the_minimum_reserve_names_the_knob(ckpt: Path) -> None:
    """A 4 MiB GPU with the default 512 MiB minimum reserve holds nothing; the error says the
    reserve is the minimum and names ``reserve_min_bytes`` and ``--gpu-reserve``."""
    gpu = SimulatedGPU("sim:0", total_bytes=4 * MiB)
    load_params = streamload.LoadParams(devices=[gpu], max_seq_len=16)
    with pytest.raises(streamload.DoesNotFitError) as info:
        streamload.plan(ckpt, load_params)
    assert "reserve_min_bytes (--gpu-reserve)" in str(info.value)
    with_less = streamload.LoadParams(devices=[gpu], max_seq_len=16, reserve_min_bytes=0)
    assert "sim:0" == streamload.plan(ckpt, with_less).primary


def test_a_fraction_reserve_is_not_blamed(ckpt: Path) -> None:
    """When the reserve is the fraction of a big GPU's total, the hint stays out."""
    gpu = SimulatedGPU("sim:0", total_bytes=2**40, free_bytes=MiB)
    with pytest.raises(streamload.DoesNotFitError) as info:
        streamload.plan(ckpt, streamload.LoadParams(devices=[gpu], max_seq_len=16))
    assert "reserve_min_bytes" not in str(info.value)


async def test_max_seq_len_beyond_the_model_is_clamped_with_a_warning(ckpt: Path) -> None:
    """``max_seq_len=8192`` for a model of 512 positions: the plan sizes KV cache and
    activations for 512 tokens (as a plan asked for 512 does) and the load says so in a
    ``MaxSeqLenClamped`` warning event."""
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    asked = params([gpu], max_seq_len=8192, attention_chunk=1024)
    plan = streamload.plan(ckpt, asked)
    exact = streamload.plan(ckpt, params([gpu], max_seq_len=512, attention_chunk=1024))
    assert 512 == plan.max_seq_len
    assert exact.layer_kv_bytes == plan.layer_kv_bytes
    assert exact.devices[0].activation_bytes == plan.devices[0].activation_bytes
    events: list[Event] = []
    model = await streamload.load(ckpt, asked, on_event=events.append)
    clamps = [e for e in events if isinstance(e, MaxSeqLenClamped)]
    assert [(8192, 512, str(ckpt))] == [(e.requested, e.used, e.path) for e in clamps]
    model.release()
