"""Spills: when another tenant takes what a device's placed layers still need (their KV cache,
the device's activations), the device's last placed layers move to the devices after it, the
fewest that make the rest fit, and the load goes on (DESIGN §5)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.from_thread
import pytest

import streamload
from streamload.events import Event, LayerPlaced, LayersMoved, Replanned
from streamload.testing import SimulatedGPU
from tests.engine_support import (
    SLOW_COPY,
    assert_identical,
    llama_config,
    llama_tensors,
    open_fds_under,
    params,
    reference,
    three_way,
    write_checkpoint,
)

pytestmark = pytest.mark.anyio

LAYERS = 6
LEFT = 4096  # what the tenant leaves free on its victim


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))


def _in_device_order(plan: streamload.Plan) -> bool:
    names = [row.device for row in plan.devices]
    order = [names.index(device) for device in plan.layer_devices]
    return order == sorted(order)


@pytest.mark.parametrize("victim", [0, 1], ids=["primary", "second"])
@pytest.mark.parametrize("after", [0, 1, 2, 3])
async def test_a_tenant_taking_all_but_4_kib_after_a_layer_is_survived(
    ckpt: Path, victim: int, after: int
) -> None:
    """Right after layer ``after`` is placed a tenant takes all but 4 KiB of one GPU. Whatever
    that GPU already holds beyond what it can still keep moves on (and what the next device
    then cannot keep moves on from there); the load completes bit-identical, layers stay in
    device order, and no GPU ever held more than its total."""
    devices = three_way(ckpt)
    gpu: SimulatedGPU = devices[victim]
    planned = streamload.plan(ckpt, params(devices)).layer_devices
    assert ("sim:0", "sim:0", "sim:1", "sim:1") == planned[:4]
    # Placed by then, or allocated: the unit after a placed one may already be in flight.
    held = [i for i in range(after + 2) if planned[i] == gpu.name]
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, LayerPlaced) and event.layer == after:
            gpu.steal(gpu.free_bytes - LEFT)

    model = await streamload.load(ckpt, params(devices), on_event=on_event)

    assert_identical(model.tensors, reference(ckpt), None)
    assert _in_device_order(model.plan)
    moves = [e for e in events if isinstance(e, LayersMoved)]
    if any(i <= after for i in held):
        assert gpu.name in {move.from_device for move in moves}
    names = [row.device for row in model.plan.devices]
    for move in moves:
        # Layers move on, never back: the victim's layers to make room, a later device's to
        # make room for them in turn.
        assert names.index(move.to_device) > names.index(move.from_device)
        if move.from_device == gpu.name:
            assert set(move.layers) <= set(held)
        assert all(model.plan.layer_devices[i] == move.to_device for i in move.layers)
    assert tuple(moves) == model.report.moves
    for device in devices[:2]:
        assert device.peak_allocated_bytes <= device.total_bytes()
    assert gpu.allocated_bytes <= gpu.total_bytes() - gpu.stolen_bytes
    model.release()
    assert [0, 0] == [d.allocated_bytes for d in devices[:2]]


async def test_a_spill_moves_the_fewest_layers(ckpt: Path) -> None:
    """A tenant that leaves room for one of two placed layers' needs moves only the last one."""
    devices = three_way(ckpt)
    gpu0: SimulatedGPU = devices[0]
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, LayerPlaced) and event.layer == 1:
            gpu0.steal(gpu0.free_bytes - LEFT)

    model = await streamload.load(ckpt, params(devices), on_event=on_event)
    moves = [e for e in events if isinstance(e, LayersMoved)]
    assert [((1,), "sim:0", "sim:1")] == [(m.layers, m.from_device, m.to_device) for m in moves]
    assert "sim:0" == model.plan.layer_devices[0]
    assert_identical(model.tensors, reference(ckpt), None)


async def test_a_move_whose_allocation_fails_moves_on_further(ckpt: Path) -> None:
    """The first allocation of a move fails (``fail_allocations`` on its target): the spill is
    planned again with that device holding less, the layer goes further on, and the load still
    completes bit-identical."""
    devices = three_way(ckpt, SLOW_COPY)  # layer 2's allocation comes before the failing one
    gpu0, gpu1 = devices[0], devices[1]
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, LayerPlaced) and event.layer == 1:
            gpu0.steal(gpu0.free_bytes - LEFT)
            gpu1.fail_allocations(1)

    model = await streamload.load(ckpt, params(devices), on_event=on_event)
    assert_identical(model.tensors, reference(ckpt), None)
    assert _in_device_order(model.plan)
    replans = [e for e in events if isinstance(e, Replanned)]
    assert any("moving layer 1 failed" in e.reason for e in replans)
    moves = [e for e in events if isinstance(e, LayersMoved)]
    assert moves
    for device in devices[:2]:
        assert device.peak_allocated_bytes <= device.total_bytes()


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic garbage collector off for the test: what a failure leaves reachable only
    through a reference cycle (an exception's traceback and the frames in it) then stays alive,
    as it does whenever the collector happens not to run before the caller looks."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize("where", ["unit", "move"])
async def test_a_failed_allocation_keeps_none_of_its_tensors(
    ckpt: Path, no_collector: None, where: str
) -> None:
    """An allocation that fails part-way through a layer (its second tensor refused) keeps
    none of the tensors it already had, collector or not: after the load and ``release()``
    both GPUs hold nothing. ``unit``: a layer being loaded onto sim:1; ``move``: a placed
    layer being moved onto sim:1 when a tenant fills sim:0 (slow copies: layer 2's allocation
    comes before the failing one)."""
    devices = three_way(ckpt, SLOW_COPY if where == "move" else 0.0)
    gpu0, gpu1 = devices[0], devices[1]
    events: list[Event] = []
    if where == "unit":
        gpu1.fail_allocations(1, after=1)

    def on_event(event: Event) -> None:
        events.append(event)
        if where == "move" and isinstance(event, LayerPlaced) and event.layer == 1:
            gpu0.steal(gpu0.free_bytes - LEFT)
            gpu1.fail_allocations(1, after=1)

    model = await streamload.load(ckpt, params(devices), on_event=on_event)
    failed = "allocation failed" if where == "unit" else "moving layer 1 failed"
    assert any(failed in e.reason for e in events if isinstance(e, Replanned))
    assert_identical(model.tensors, reference(ckpt), None)
    model.release()
    assert [0, 0] == [gpu0.allocated_bytes, gpu1.allocated_bytes]


async def test_cancelling_during_a_move_releases_everything(ckpt: Path) -> None:
    """A load cancelled while a layer is being moved (the target's allocation hook cancels the
    load's scope) releases every tensor on every device and closes its files."""
    devices = three_way(ckpt)
    gpu0, gpu1 = devices[0], devices[1]
    moving = False

    with anyio.CancelScope() as scope:

        def on_allocate(nbytes: int) -> None:
            if moving:
                anyio.from_thread.run_sync(scope.cancel)

        def on_event(event: Event) -> None:
            nonlocal moving
            if isinstance(event, LayerPlaced) and event.layer == 1:
                gpu0.steal(gpu0.free_bytes - LEFT)
            if isinstance(event, Replanned) and "placed layers" in event.reason:
                moving = True

        gpu1.on_allocate = on_allocate
        await streamload.load(ckpt, params(devices), on_event=on_event)

    assert scope.cancelled_caught
    assert moving
    assert [0, 0] == [gpu0.allocated_bytes, gpu1.allocated_bytes]
    assert [] == open_fds_under(ckpt)


async def test_a_spill_between_cuda_gpus_goes_through_the_runtime(ckpt: Path) -> None:
    """On two (fake) CUDA GPUs, a tenant that takes what GPU 0's placed layers need makes them
    move to GPU 1 by a copy on GPU 1's copy stream, waited for before the load goes on: the
    load is bit-identical and GPU 0 ends holding none of the moved layers."""
    from streamload.devices import CudaDevice, Nvml
    from streamload.testing import FakeCuda

    spec = streamload.inspect(ckpt)
    probe = streamload.plan(ckpt, params([SimulatedGPU("probe", total_bytes=2**40)]))
    row, layer = probe.devices[0], spec.layers[0].nbytes + probe.layer_kv_bytes[0]
    first = int(row.activation_bytes + spec.non_mapped_bytes + 2.5 * layer)
    fake = FakeCuda([first, 2**30])
    nvml = Nvml(fake.nvml_api())
    gpus = [CudaDevice(i, runtime=fake, nvml=nvml) for i in range(2)]
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, LayerPlaced) and event.layer == 1:
            fake.take(0, gpus[0].live_free_bytes() - LEFT)

    model = await streamload.load(ckpt, params([*gpus, "cpu"]), on_event=on_event)
    moves = [e for e in events if isinstance(e, LayersMoved)]
    assert ["cuda:0"] == sorted({m.from_device for m in moves})
    assert {"cuda:1"} == {m.to_device for m in moves}
    assert_identical(model.tensors, reference(ckpt), None)
    for move in moves:
        assert all(model.plan.layer_devices[i] == "cuda:1" for i in move.layers)
