"""Loads in one process plan around each other: a load reserves its whole plan when it plans,
atomically with reading capacities; the reservation shrinks as its units are allocated and
goes when the load ends, however it ends."""

from __future__ import annotations

import contextlib
from pathlib import Path

import anyio
import pytest

import streamload
from streamload._state import STATE
from streamload.events import Event, LayerPlaced, Replanned
from streamload.testing import SimulatedGPU
from tests.engine_support import (
    assert_identical,
    llama_config,
    llama_tensors,
    params,
    reference,
    sized_gpu,
    write_checkpoint,
)

pytestmark = pytest.mark.anyio

LAYERS = 6


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _held(gpu: SimulatedGPU) -> int:
    return STATE.reservations.held_by_others(None, gpu.ledger_key)


async def test_two_loads_started_together_plan_around_each_other(tmp_path: Path) -> None:
    """Two loads started in the same instant on one simulated GPU that fits one and a half
    models: neither re-plans (the second planned around the first's reservation), both are
    bit-identical, and together they never held more than the GPU has."""
    a = write_checkpoint(tmp_path / "a", llama_tensors(LAYERS, seed=1), llama_config(LAYERS))
    b = write_checkpoint(tmp_path / "b", llama_tensors(LAYERS, seed=2), llama_config(LAYERS))
    gpu = sized_gpu("sim:0", a, LAYERS * 1.5 + 1, primary=True)
    results: dict[str, streamload.LoadedModel] = {}
    replans: list[Event] = []

    def on_event(event: Event) -> None:
        if isinstance(event, Replanned):
            replans.append(event)

    async def run(name: str, path: Path) -> None:
        results[name] = await streamload.load(path, params([gpu, "cpu"]), on_event=on_event)

    async with anyio.create_task_group() as group:
        group.start_soon(run, "a", a)
        group.start_soon(run, "b", b)

    assert [] == replans
    assert_identical(results["a"].tensors, reference(a), None)
    assert_identical(results["b"].tensors, reference(b), None)
    on_gpu = sorted(m.plan.layer_devices.count("sim:0") for m in results.values())
    assert on_gpu[1] == LAYERS
    assert 0 < on_gpu[0] < LAYERS
    assert gpu.peak_allocated_bytes <= gpu.total_bytes()
    assert 0 == _held(gpu)


async def test_a_reservation_shrinks_as_units_are_allocated_and_goes_at_the_end(
    tmp_path: Path,
) -> None:
    """While a load runs, what it holds in the ledger for a GPU only goes down, each
    ``LayerPlaced`` seeing less than the one before; after the load nothing is held."""
    ckpt = write_checkpoint(tmp_path / "m", llama_tensors(LAYERS), llama_config(LAYERS))
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    seen: list[int] = []

    def on_event(event: Event) -> None:
        if isinstance(event, LayerPlaced):
            seen.append(_held(gpu))

    model = await streamload.load(ckpt, params([gpu]), on_event=on_event)
    assert seen == sorted(seen, reverse=True)
    assert seen[0] > seen[-1]
    assert 0 == _held(gpu)
    model.release()


@pytest.mark.parametrize("how", ["failure", "cancellation"])
async def test_a_reservation_goes_when_a_load_fails_or_is_cancelled(
    tmp_path: Path, how: str
) -> None:
    """A load that fails (an allocation error past the re-plan limit) or is cancelled mid-way
    leaves nothing in the ledger."""
    ckpt = write_checkpoint(tmp_path / "m", llama_tensors(LAYERS), llama_config(LAYERS))
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    held: list[int] = []

    with anyio.CancelScope() as scope:

        def on_event(event: Event) -> None:
            if isinstance(event, LayerPlaced) and event.layer == 1:
                held.append(_held(gpu))
                if how == "cancellation":
                    scope.cancel()
                else:
                    gpu.fail_allocations(100)

        expected = pytest.raises(streamload.StreamloadError)
        with expected if how == "failure" else contextlib.nullcontext():
            await streamload.load(ckpt, params([gpu], max_replans=1), on_event=on_event)

    assert held
    assert held[0] > 0
    assert 0 == _held(gpu)
    assert 0 == gpu.allocated_bytes
