"""The CUDA path, run here: the real ``CudaDevice`` against ``streamload.testing.FakeCuda``.

Each test pins one rule a first GPU run would otherwise break (issue 16); the fake enforces
the runtime's semantics (per-thread current device, contexts that cost memory, copies that
complete only when waited for, events with their flags), so breaking a rule shows as wrong
bytes, a context where none should be, or a recorded call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pynvml
import pytest
import torch

import streamload
from streamload.devices import CudaDevice, Nvml
from streamload.events import Event, LayerPlaced, Replanned
from streamload.testing import FakeCuda, SimulatedGPU
from tests.engine_support import (
    assert_identical,
    llama_config,
    llama_tensors,
    params,
    reference,
    write_checkpoint,
)

pytestmark = pytest.mark.anyio

LAYERS = 4
MiB = 2**20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))


def gpu(fake: FakeCuda, ordinal: int, nvml: Any = None) -> CudaDevice:
    """``cuda:<ordinal>`` on the fake, reading free memory from the fake's NVML."""
    return CudaDevice(ordinal, runtime=fake, nvml=Nvml(nvml or fake.nvml_api()))


def layer_bytes(ckpt: Path) -> int:
    return streamload.inspect(ckpt).layers[0].nbytes


# --------------------------------------------------------------------------------------------
# 1. conversions are complete before a unit counts as placed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
async def test_converted_tensors_are_complete_when_handed_out(
    ckpt: Path, dtype: torch.dtype
) -> None:
    """A conversion queued on the device completes only once its stream is waited for; every
    tensor the load hands out already holds its converted bytes."""
    fake = FakeCuda([2**30])
    model = await streamload.load(ckpt, params([gpu(fake, 0)], dtype=dtype))
    assert_identical(model.tensors, reference(ckpt), dtype)


async def test_stored_dtype_loads_are_bit_identical(ckpt: Path) -> None:
    """Without a dtype change the pinned ring's copies arrive intact (each slot refilled only
    after its copy ran)."""
    fake = FakeCuda([2**30])
    model = await streamload.load(ckpt, params([gpu(fake, 0)]))
    assert_identical(model.tensors, reference(ckpt), None)


async def test_late_conversions_on_a_simulated_gpu_are_waited_for(ckpt: Path) -> None:
    """``SimulatedGPU(copy_delay=...)`` converts late, after its copies, on its copy thread;
    the load hands tensors out only once those conversions ran."""
    sim = SimulatedGPU("sim:0", total_bytes=2**30, copy_delay=0.002)
    model = await streamload.load(ckpt, params([sim], dtype=torch.bfloat16))
    assert_identical(model.tensors, reference(ckpt), torch.bfloat16)


# --------------------------------------------------------------------------------------------
# 4. no context on a GPU the load does not use


async def test_loading_onto_gpu_1_creates_no_context_on_gpu_0(ckpt: Path) -> None:
    """Worker threads start on device 0; leaving a stream context for GPU 1 there must not
    set device 0 (which creates its context: memory on a GPU the load never uses)."""
    fake = FakeCuda([2**30, 2**30], context_bytes=300 * MiB)
    model = await streamload.load(ckpt, params([gpu(fake, 1)], dtype=torch.bfloat16))
    assert_identical(model.tensors, reference(ckpt), torch.bfloat16)
    assert [1] == sorted({ordinal for ordinal, _ in fake.contexts})
    assert 0 == fake.reserved(0)


# --------------------------------------------------------------------------------------------
# 5. the context's own memory is no reason to re-plan


def _tight_total(ckpt: Path, context: int) -> int:
    """A GPU total that holds the non-mapped parts, activations and two layers next to a
    context of ``context`` bytes, and four layers without it."""
    probe = streamload.plan(ckpt, params([SimulatedGPU("probe", total_bytes=2**40)]))
    spec = streamload.inspect(ckpt)
    row = probe.devices[0]
    layer = spec.layers[0].nbytes + probe.layer_kv_bytes[0]
    return int(row.activation_bytes + spec.non_mapped_bytes + 2.5 * layer) + context


async def test_context_cost_on_a_fake_gpu_causes_no_replan(ckpt: Path) -> None:
    """The first allocation on a GPU creates its context; capacities read before that would
    make the next recheck see a GPU that under-delivered."""
    context = 2 * layer_bytes(ckpt)
    fake = FakeCuda([_tight_total(ckpt, context)], context_bytes=context)
    events: list[Event] = []
    model = await streamload.load(ckpt, params([gpu(fake, 0), "cpu"]), on_event=events.append)
    assert [] == [e for e in events if isinstance(e, Replanned)]
    assert ["cuda:0", "cuda:0", "cpu", "cpu"] == list(model.plan.layer_devices)
    assert_identical(model.tensors, reference(ckpt), None)


async def test_context_cost_on_a_simulated_gpu_causes_no_replan(ckpt: Path) -> None:
    """``SimulatedGPU(context_bytes=...)`` charges its context at the first allocation, as a
    real GPU does; the engine creates it before reading capacities."""
    context = 2 * layer_bytes(ckpt)
    sim = SimulatedGPU("sim:0", total_bytes=_tight_total(ckpt, context), context_bytes=context)
    events: list[Event] = []
    model = await streamload.load(ckpt, params([sim, "cpu"]), on_event=events.append)
    assert [] == [e for e in events if isinstance(e, Replanned)]
    assert ["sim:0", "sim:0", "cpu", "cpu"] == list(model.plan.layer_devices)


# --------------------------------------------------------------------------------------------
# 6, 9. waits poll blocking events and let cancellation through


async def test_events_are_blocking_and_never_spun_on(ckpt: Path) -> None:
    """Every event is created ``blocking=True`` and no thread spins in ``synchronize()``."""
    fake = FakeCuda([2**30])
    await streamload.load(ckpt, params([gpu(fake, 0)], dtype=torch.bfloat16))
    assert fake.events
    assert [True] * len(fake.events) == [event.blocking for event in fake.events]
    assert 0 == fake.spin_waits


async def test_cancellation_gets_through_a_hung_gpu(ckpt: Path) -> None:
    """A GPU that stops completing work leaves every wait pending; cancelling the load still
    ends it, and no thread is left inside a blocking wait."""
    fake = FakeCuda([2**30])

    def on_event(event: Event) -> None:
        if isinstance(event, LayerPlaced):
            fake.hang()

    with anyio.move_on_after(1) as scope:
        await streamload.load(ckpt, params([gpu(fake, 0)]), on_event=on_event)
    assert scope.cancelled_caught
    assert [] == fake.blocked_waits


# --------------------------------------------------------------------------------------------
# 7. cached memory goes back after failure, cancellation and release


def _take_everything_after_first_layer(fake: FakeCuda) -> Any:
    def on_event(event: Event) -> None:
        if isinstance(event, LayerPlaced) and event.layer == 0:
            fake.take(0, fake.nvml_api().nvmlDeviceGetMemoryInfo(0).free)

    return on_event


async def test_failure_returns_the_caches_to_the_driver(ckpt: Path) -> None:
    """After a failed load neither freed device blocks nor the pinned ring stay in torch's
    caches, where other processes cannot use them."""
    fake = FakeCuda([2**30], context_bytes=64 * MiB)
    with pytest.raises(streamload.StreamloadError):
        await streamload.load(
            ckpt,
            params([gpu(fake, 0)], dtype=torch.bfloat16),
            on_event=_take_everything_after_first_layer(fake),
        )
    assert (0, 0) == (fake.memory_reserved(0), fake.pinned_bytes)


async def test_cancellation_returns_the_caches_to_the_driver(ckpt: Path) -> None:
    """Cancelled after its first layer, the load leaves nothing in torch's caches."""
    fake = FakeCuda([2**30])
    with anyio.CancelScope() as scope:

        def on_event(event: Event) -> None:
            if isinstance(event, LayerPlaced):
                scope.cancel()

        await streamload.load(ckpt, params([gpu(fake, 0)]), on_event=on_event)
    assert (0, 0) == (fake.memory_reserved(0), fake.pinned_bytes)


async def test_release_can_return_the_caches(ckpt: Path) -> None:
    """``release(empty_cache=True)`` drops the model and returns freed blocks; the default
    keeps them cached for this process."""
    fake = FakeCuda([2**30])
    model = await streamload.load(ckpt, params([gpu(fake, 0)]))
    kept = await streamload.load(ckpt, params([gpu(fake, 0)]))
    kept.release()
    assert 0 < fake.memory_reserved(0) - fake.memory_allocated(0)
    model.release(empty_cache=True)
    assert 0 == fake.memory_reserved(0)


# --------------------------------------------------------------------------------------------
# 8. one wait per unit on the allocating stream


async def test_copies_wait_once_per_unit_not_per_piece(ckpt: Path) -> None:
    """The copy stream waits once per unit, on an event recorded where the unit was
    allocated, not on the whole default stream before every piece."""
    fake = FakeCuda([2**30])
    model = await streamload.load(ckpt, params([gpu(fake, 0)]))
    waits = [c for c in fake.calls if c.name in ("stream.wait_stream", "stream.wait_event")]
    copies = [c for c in fake.calls if c.name == "copy"]
    units = len(model.spec.layers) + len([p for p in model.spec.non_mapped if p.tensors])
    assert len(copies) > units
    assert units == len(waits)
    assert {"stream.wait_event"} == {c.name for c in waits}


# --------------------------------------------------------------------------------------------
# 10. NVML errors other than "no NVML" fall back to cudaMemGetInfo


@pytest.mark.parametrize(
    "error",
    [pynvml.NVMLError_NoPermission(), pynvml.NVMLError_Unknown(), pynvml.NVMLError_GpuIsLost()],
    ids=["no-permission", "unknown", "gpu-lost"],
)
async def test_nvml_errors_fall_back_to_mem_get_info(ckpt: Path, error: Exception) -> None:
    """A failing NVML reading is replaced by ``cudaMemGetInfo`` for that device (inside the
    device's guard), and an event says so, once."""
    fake = FakeCuda([2**30])
    nvml = fake.nvml_api()
    nvml.fail["memory"] = error
    events: list[Event] = []
    model = await streamload.load(ckpt, params([gpu(fake, 0, nvml)]), on_event=events.append)
    assert_identical(model.tensors, reference(ckpt), None)
    fallbacks = [e for e in events if type(e).__name__ == "MemoryReadingFallback"]
    assert ["cuda:0"] == [getattr(e, "device", None) for e in fallbacks]
    assert "mem_get_info" in fake.names()
    assert [0] == sorted({ordinal for ordinal, _ in fake.contexts})


# --------------------------------------------------------------------------------------------
# 3. collectives run under the rank's device


async def test_collectives_run_with_the_ranks_gpu_current(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Object collectives run in worker threads, which start on device 0; with an NCCL group
    they would stage every rank's objects on GPU 0. Inside each collective the current device
    is the rank's GPU (here ``cuda:1`` of a one-rank group)."""
    import torch.distributed as dist

    from streamload.distributed import load_distributed

    fake = FakeCuda([2**30, 2**30])
    seen: list[int] = []
    real_gather, real_broadcast = dist.all_gather_object, dist.broadcast_object_list

    def gather(*args: Any, **kwargs: Any) -> Any:
        seen.append(fake.current_device())
        return real_gather(*args, **kwargs)

    def broadcast(*args: Any, **kwargs: Any) -> Any:
        seen.append(fake.current_device())
        return real_broadcast(*args, **kwargs)

    monkeypatch.setattr(dist, "all_gather_object", gather)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    store = dist.HashStore()  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = await load_distributed(ckpt, params([gpu(fake, 1), "cpu"]))
        model.local.release()
    finally:
        dist.destroy_process_group()
    assert seen
    assert [1] * len(seen) == seen
    assert [1] == sorted({ordinal for ordinal, _ in fake.contexts})
