"""The streaming engine: exact bytes, re-planning, cancellation, concurrency, events and logs."""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import structlog.testing
import torch

import streamload
from streamload import _hostmem
from streamload.engine import _load, _reader
from streamload.events import (
    Event,
    LayerPlaced,
    LoadCancelled,
    LoadFailed,
    LoadFinished,
    LoadStarted,
    PagedAttentionDisabled,
    PlanComputed,
    Replanned,
)
from streamload.testing import SimulatedGPU
from tests.conftest import BlockingIOGuard
from tests.engine_support import (
    SLOW_COPY,
    assert_identical,
    llama_config,
    llama_tensors,
    load_cancelled_after,
    open_fds_under,
    params,
    reference,
    sized_gpu,
    three_way,
    write_checkpoint,
)

pytestmark = pytest.mark.anyio

LAYERS = 6


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))


PLACEMENTS = ["gpu", "cpu", "mixed", "unstaged-gpu", "cpu-mmap"]


def devices_for(placement: str, ckpt: Path) -> tuple[list[Any], dict[str, Any]]:
    if placement == "gpu":
        return [SimulatedGPU("sim:0", total_bytes=2**30)], {}
    if placement == "cpu":
        return ["cpu"], {}
    if placement == "cpu-mmap":
        return ["cpu"], {"cpu_policy": "mmap"}
    if placement == "unstaged-gpu":
        return [SimulatedGPU("sim:0", total_bytes=2**30, staged=False)], {}
    return three_way(ckpt), {}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
async def test_tensors_are_bit_identical_to_safetensors(
    ckpt: Path, placement: str, dtype: torch.dtype | None
) -> None:
    """Every tensor equals safetensors' own load, byte for byte (floats converted exactly as
    ``Tensor.to`` does when a dtype is asked for; non-float and FP8 tensors untouched)."""
    devices, extra = devices_for(placement, ckpt)
    model = await streamload.load(ckpt, params(devices, dtype=dtype, **extra))
    assert_identical(model.tensors, reference(ckpt), dtype)
    if placement == "mixed":
        assert {"sim:0", "sim:1", "cpu"} == set(model.plan.layer_devices)
    model.release()
    assert {} == model.tensors


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_loads_under_asyncio_and_trio(ckpt: Path, anyio_backend: str) -> None:
    """The same mixed load works on both anyio backends."""
    model = await streamload.load(ckpt, params(three_way(ckpt)))
    assert_identical(model.tensors, reference(ckpt), None)


async def test_device_map_and_tensor_placement_follow_the_plan(ckpt: Path) -> None:
    """``placement`` names every module's device, ``device_map`` gives the torch device in
    Hugging Face form, and every simulated GPU holds exactly the bytes placed on it."""
    devices = three_way(ckpt)
    model = await streamload.load(ckpt, params(devices))
    plan = model.plan
    expected = {"model.embed_tokens": plan.primary, "model.norm": plan.primary}
    expected["lm_head"] = plan.primary
    expected.update({f"model.layers.{i}": plan.layer_devices[i] for i in range(LAYERS)})
    assert expected == model.placement
    torch_map = dict.fromkeys(expected, "cpu")
    assert torch_map == model.device_map
    gpus = {d.name: d for d in devices if isinstance(d, SimulatedGPU)}
    for name in gpus:
        on_device = sum(
            t.nbytes for n, t in model.tensors.items() if model.placement[_module_of(n)] == name
        )
        assert on_device == gpus[name].allocated_bytes


def _module_of(tensor: str) -> str:
    parts = tensor.split(".")
    if parts[0] == "model" and parts[1] == "layers":
        return ".".join(parts[:3])
    return ".".join(parts[:-1])


async def test_release_returns_simulated_memory(ckpt: Path) -> None:
    """After ``release()`` (and no caller references) every simulated ledger is back to zero."""
    devices = three_way(ckpt)
    async with await streamload.load(ckpt, params(devices)) as model:
        assert devices[0].allocated_bytes > 0
    assert {} == model.tensors
    assert [0, 0] == [devices[0].allocated_bytes, devices[1].allocated_bytes]


@pytest.mark.parametrize(
    ("budget_slots", "threads", "cpus", "expected"),
    [
        (16, 8, 2, 3),  # CPUs + 1
        (16, 8, 64, 8),  # no more than the reads that run at once
        (4, 8, 64, 4),  # no more than the budget
        (16, 8, 1, 2),  # at least two: one fills while the other's copy runs
        (1, 1, 1, 2),
    ],
)
def test_staging_ring_slots(budget_slots: int, threads: int, cpus: int, expected: int) -> None:
    chunk = 4096
    p = params([], chunk_bytes=chunk, staging_bytes=budget_slots * chunk, reader_threads=threads)
    assert expected == _reader.ring_slots(p, cpus)


def test_staging_ring_slots_with_room_for_direct_reads_stay_in_the_budget() -> None:
    """Slots with room for O_DIRECT spans (two 4 KiB blocks more each) count against the
    budget at that size: 16 chunks of 4 KiB hold 5 such slots."""
    chunk = 4096
    p = params([], chunk_bytes=chunk, staging_bytes=16 * chunk, reader_threads=8)
    assert 3 * chunk == _reader.slot_bytes(chunk, direct=True)
    assert 5 == _reader.ring_slots(p, 64, direct=True)
    assert 8 == _reader.ring_slots(p, 64, direct=False)


async def test_staging_ring_is_sized_to_the_cpus_within_the_budget(ckpt: Path) -> None:
    """The report names the ring's size: CPUs + 1 slots of ``chunk_bytes`` (two 4 KiB blocks
    more each where units may be read with O_DIRECT: ``direct_io`` not ``False``), inside the
    staging budget; a load with no staged device has no ring."""
    for direct_io, extra in ((False, 0), ("auto", 2 * 4096), (True, 2 * 4096)):
        p = params(
            [sized_gpu("sim:0", ckpt, 10, primary=True)],
            staging_bytes=64 * 4096,
            direct_io=direct_io,
        )
        async with await streamload.load(ckpt, p) as model:
            slots = _reader.ring_slots(p, _reader.usable_cpus(), direct_io is not False)
            assert min(_reader.usable_cpus() + 1, p.reader_threads) == slots
            assert slots * (p.chunk_bytes + extra) == model.report.staging_bytes
            assert model.report.staging_bytes <= p.staging_bytes
    async with await streamload.load(ckpt, params(["cpu"])) as model:
        assert 0 == model.report.staging_bytes


async def test_a_staged_unit_is_read_by_one_lane_per_slot(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staged unit of many chunks is read by at most one lane per ring slot, each one
    worker-thread call that reads chunk after chunk of that unit through the one slot it
    holds (one event-loop round trip per lane, not per chunk), and the bytes are exact."""
    lanes: list[tuple[int, int]] = []  # (unit, slot) per lane
    reads: list[tuple[int, int, int]] = []  # (lane, slot, thread) per chunk
    current = threading.local()
    real_stage, real_read = _reader.Reader._stage_chunks, _reader.read_staged

    def stage(self: Any, flight: Any, slot: Any, work: Any) -> None:
        current.lane = len(lanes)
        lanes.append((id(flight.unit), slot.buffer.data_ptr()))
        real_stage(self, flight, slot, work)

    def read(files: Any, device: Any, chunk: Any, slot: Any, *rest: Any) -> Any:
        reads.append((current.lane, slot.buffer.data_ptr(), threading.get_ident()))
        return real_read(files, device, chunk, slot, *rest)

    monkeypatch.setattr(_reader.Reader, "_stage_chunks", stage)
    monkeypatch.setattr(_reader, "read_staged", read)
    p = params([SimulatedGPU("sim:0", total_bytes=2**30)])
    slots = _reader.ring_slots(p, _reader.usable_cpus())
    async with await streamload.load(ckpt, p) as model:
        assert_identical(model.tensors, reference(ckpt), None)
    per_unit = collections.Counter(unit for unit, _ in lanes)
    assert max(per_unit.values()) <= slots
    assert len(reads) > len(per_unit) * slots >= len(lanes)
    for lane, slot, thread in reads:
        assert lanes[lane][1] == slot
        assert {t for ln, _, t in reads if ln == lane} == {thread}


def _file_offsets(directory: Path) -> dict[str, int]:
    """Each tensor's first byte's offset in its shard, from the safetensors headers."""
    offsets = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with shard.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            offsets[name] = 8 + length + entry["data_offsets"][0]
    return offsets


async def test_staged_reads_are_co_aligned_with_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every byte copied out of a staging slot sits at its file offset's position modulo 64
    (the kernel's copy from the page cache then runs co-aligned), and no chunk outgrows its
    slot; tensors of odd sizes put most offsets off a cache line."""
    tensors = llama_tensors(3)
    for i in range(3):
        tensors[f"model.layers.{i}.odd"] = torch.arange(1000 + 7 * i, dtype=torch.int8)
    ckpt = write_checkpoint(tmp_path / "odd", tensors, llama_config(3), shards=2)
    offsets = _file_offsets(ckpt)
    assert len({o % 64 for o in offsets.values()}) > 4
    copies: list[tuple[int, int, int]] = []
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    real = gpu.copy_from_host

    def record(dst: torch.Tensor, src: torch.Tensor) -> Any:
        copies.append((dst.data_ptr(), src.data_ptr(), src.nbytes))
        return real(dst, src)

    monkeypatch.setattr(gpu, "copy_from_host", record)
    p = params([gpu], chunk_bytes=4096, staging_bytes=4 * 4096)
    async with await streamload.load(ckpt, p) as model:
        assert_identical(model.tensors, reference(ckpt), None)
        starts = {t.data_ptr(): (n, t.nbytes) for n, t in model.tensors.items() if t.nbytes}
        placed = sorted(starts)
        checked = 0
        for dst, src, nbytes in copies:
            assert nbytes <= 4096 - 64
            base = max(b for b in placed if b <= dst)
            name, size = starts[base]
            assert dst + nbytes <= base + size
            assert src % 64 == (offsets[name] + dst - base) % 64, name
            checked += 1
        assert checked == len(copies) > 3 * 9


def steal_after(layer: int, gpu: SimulatedGPU, events: list[Event], plan: Any) -> Any:
    """After ``layer`` is placed, a tenant takes all of ``gpu``'s free memory but what the
    layers already allocated there (up to ``layer + 1``, in flight) still need: their KV cache
    and the device's activations. Nothing more fits there afterwards."""

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, LayerPlaced) and event.layer == layer:
            mine = [i for i, d in enumerate(plan.layer_devices) if d == gpu.name and i <= layer + 1]
            keep = sum(plan.layer_kv_bytes[i] for i in mine)
            if mine or plan.primary == gpu.name:
                keep += plan.device(gpu.name).activation_bytes
            gpu.steal(max(gpu.free_bytes - keep, 0))

    return on_event


@pytest.mark.parametrize("after", range(LAYERS))
async def test_under_delivery_after_each_layer_replans_and_stays_exact(
    ckpt: Path, after: int
) -> None:
    """A tenant grabbing the second GPU after layer ``after`` is placed: layers not yet
    allocated move to the CPU, placed ones stay, the bytes are exact, and the re-plan is in the
    report and the log."""
    devices = three_way(ckpt, SLOW_COPY)  # layer after + 1 is allocated before the steal
    gpu1 = devices[1]
    first = streamload.plan(ckpt, params(devices))
    planned = first.layer_devices
    events: list[Event] = []
    with structlog.testing.capture_logs() as logs:
        model = await streamload.load(
            ckpt, params(devices), on_event=steal_after(after, gpu1, events, first)
        )
    assert_identical(model.tensors, reference(ckpt), None)
    moved = [i for i in range(after + 2, LAYERS) if planned[i] == "sim:1"]
    replans = [e for e in events if isinstance(e, Replanned)]
    assert (len(replans) > 0) == bool(moved)
    assert tuple(replans) == model.report.replans
    for i in moved:
        assert "cpu" == model.plan.layer_devices[i]
    for i in range(min(after + 2, LAYERS)):
        assert planned[i] == model.plan.layer_devices[i]
    if replans:
        replan = replans[0]
        assert "sim:1" == replan.device
        assert replan.live_free < replan.expected_free
        assert planned == replan.old_layer_devices
        assert [e["event"] for e in logs].count("replanned") == len(replans)
        logged = next(e for e in logs if e["event"] == "replanned")
        assert replan.new_layer_devices == tuple(logged["new_layer_devices"])


async def test_a_primary_that_cannot_keep_its_non_mapped_parts_fails_cleanly(
    ckpt: Path,
) -> None:
    """If a tenant takes even what the primary's non-mapped parts need (their activations and
    reserve), no spill helps: the load fails with ``DoesNotFitError`` naming the primary, with
    every device's numbers, and releases everything. (Placed layers that no longer fit spill to
    the devices after theirs instead: ``tests/test_spill.py``.)"""
    # Long sequences: the primary's activations outweigh the layer it could pass on.
    long = {"max_seq_len": 512, "attention_chunk": 512}
    probe = streamload.plan(ckpt, params([SimulatedGPU("probe", total_bytes=2**40)], **long))
    row, spec = probe.devices[0], streamload.inspect(ckpt)
    layer = spec.layers[0].nbytes + probe.layer_kv_bytes[0]
    gpu0 = SimulatedGPU("sim:0", int(row.activation_bytes + spec.non_mapped_bytes + 1.5 * layer))
    devices: list[Any] = [gpu0, SimulatedGPU("sim:1", total_bytes=2**30), "cpu"]
    assert layer < row.activation_bytes

    def on_event(event: Event) -> None:
        if isinstance(event, LayerPlaced) and event.layer == 0:
            gpu0.steal(gpu0.free_bytes)

    with pytest.raises(streamload.DoesNotFitError) as info:
        await streamload.load(ckpt, params(devices, **long), on_event=on_event)
    assert "sim:0" in str(info.value)
    assert {"sim:0", "sim:1", "cpu"} <= {need.device for need in info.value.devices}
    assert [0, 0] == [devices[0].allocated_bytes, devices[1].allocated_bytes]
    assert [] == open_fds_under(ckpt)


async def test_allocation_failure_replans(ckpt: Path) -> None:
    """``torch.OutOfMemoryError`` at a layer's allocation re-plans that layer onward."""
    devices = three_way(ckpt)
    gpu1 = devices[1]
    planned = streamload.plan(ckpt, params(devices)).layer_devices
    first_on_gpu1 = planned.index("sim:1")
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, PlanComputed):
            gpu1.fail_allocations(1)

    model = await streamload.load(ckpt, params(devices), on_event=on_event)
    assert_identical(model.tensors, reference(ckpt), None)
    replans = [e for e in events if isinstance(e, Replanned)]
    assert 1 == len(replans)
    assert first_on_gpu1 == replans[0].at_layer
    assert "allocation failed" in replans[0].reason


async def test_replan_that_needs_cpu_disables_paged_attention(ckpt: Path) -> None:
    """A paged plan that fit the GPUs falls back to non-paged KV when a re-plan needs the CPU,
    and says so with an event."""
    devices: list[Any] = [
        sized_gpu("sim:0", ckpt, LAYERS + 1, primary=True),
        "cpu",
    ]
    gpu0 = devices[0]
    p = params(devices, paged_attention=streamload.PagedAttention(block_size=4))
    first = streamload.plan(ckpt, p)
    assert first.paged_attention
    events: list[Event] = []
    model = await streamload.load(ckpt, p, on_event=steal_after(0, gpu0, events, first))
    disabled = [e for e in events if isinstance(e, PagedAttentionDisabled)]
    assert 1 == len(disabled)
    assert not model.plan.paged_attention
    assert disabled == list(model.report.fallbacks)


@pytest.mark.parametrize("after", [None, *range(LAYERS)])
async def test_cancellation_after_each_layer_releases_everything(
    ckpt: Path, after: int | None
) -> None:
    """Cancelling the load (cancel scope) after layer ``after`` (``None``: after the non-mapped
    parts) leaves every simulated ledger at zero and no checkpoint file open."""
    devices = three_way(ckpt)
    cancelled, events = await load_cancelled_after(ckpt, params(devices), after)
    assert cancelled
    assert [0, 0] == [devices[0].allocated_bytes, devices[1].allocated_bytes]
    assert [] == open_fds_under(ckpt)
    assert isinstance(events[-1], LoadCancelled)
    assert not any(isinstance(e, LoadFailed) for e in events)


async def test_task_cancellation_propagates(ckpt: Path) -> None:
    """A task group cancelled from outside (server shutdown) cancels the load cleanly."""
    devices = three_way(ckpt)
    async with anyio.create_task_group() as group:

        async def run() -> None:
            await streamload.load(ckpt, params(devices), on_event=slow_events)

        async def slow_events(event: Event) -> None:
            if isinstance(event, LayerPlaced):
                await anyio.sleep(0.05)

        group.start_soon(run)
        await anyio.sleep(0.08)
        group.cancel_scope.cancel()
    assert [0, 0] == [devices[0].allocated_bytes, devices[1].allocated_bytes]
    assert [] == open_fds_under(ckpt)


async def test_file_that_shrinks_after_planning_is_an_error(ckpt: Path) -> None:
    """A shard truncated after the plan was computed fails with a ``StreamloadError`` naming
    the file; nothing stays placed."""
    devices = three_way(ckpt)
    shard = sorted(ckpt.glob("*.safetensors"))[-1]

    def on_event(event: Event) -> None:
        if isinstance(event, PlanComputed):
            with shard.open("r+b") as f:
                f.truncate(shard.stat().st_size - 100)

    with pytest.raises(streamload.StreamloadError) as info:
        await streamload.load(ckpt, params(devices), on_event=on_event)
    assert shard.name in str(info.value)
    assert [0, 0] == [devices[0].allocated_bytes, devices[1].allocated_bytes]
    assert [] == open_fds_under(ckpt)


async def test_two_concurrent_loads_share_one_gpu_without_double_counting(
    tmp_path: Path,
) -> None:
    """Two loads on one simulated GPU that holds about one and a half models both complete;
    their plans together never promise more than the GPU has."""
    a = write_checkpoint(tmp_path / "a", llama_tensors(LAYERS, seed=1), llama_config(LAYERS))
    b = write_checkpoint(tmp_path / "b", llama_tensors(LAYERS, seed=2), llama_config(LAYERS))
    gpu = sized_gpu("sim:0", a, LAYERS * 1.5 + 1, primary=True)
    results: dict[str, streamload.LoadedModel] = {}

    async def run(name: str, path: Path) -> None:
        results[name] = await streamload.load(path, params([gpu, "cpu"]))

    async with anyio.create_task_group() as group:
        group.start_soon(run, "a", a)
        group.start_soon(run, "b", b)
    assert_identical(results["a"].tensors, reference(a), None)
    assert_identical(results["b"].tensors, reference(b), None)
    gpu_need = 0
    for model in results.values():
        row = model.plan.device("sim:0")
        gpu_need += row.weight_bytes + row.kv_bytes + row.activation_bytes
    assert gpu_need <= gpu.total_bytes()
    assert gpu.peak_allocated_bytes <= gpu.total_bytes()


async def test_events_arrive_in_order_with_a_layer_placed_per_unit(ckpt: Path) -> None:
    """``LoadStarted``, the plan, then one ``LayerPlaced`` per non-mapped part and per layer in
    plan order, then ``LoadFinished``; async callbacks are awaited."""
    seen: list[Event] = []

    async def on_event(event: Event) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(event)

    model = await streamload.load(ckpt, params(three_way(ckpt)), on_event=on_event)
    assert isinstance(seen[0], LoadStarted)
    assert isinstance(seen[1], PlanComputed)
    assert isinstance(seen[-1], LoadFinished)
    placed = [e for e in seen if isinstance(e, LayerPlaced)]
    parts = [e.part for e in placed if e.layer is None]
    assert sorted(p.name for p in model.spec.non_mapped) == sorted(p or "" for p in parts)
    assert list(range(LAYERS)) == [e.layer for e in placed if e.layer is not None]
    assert model.report == seen[-1].report
    assert model.report.nbytes == sum(e.nbytes for e in placed)


async def test_log_lines_carry_the_event_fields(ckpt: Path) -> None:
    """Each event is one structlog line keyed by the event's field names."""
    with structlog.testing.capture_logs() as logs:
        await streamload.load(ckpt, params(three_way(ckpt)))
    names = [e["event"] for e in logs]
    assert ["load_started", "plan_computed"] == names[:2]
    assert "load_finished" == names[-1]
    placed = next(e for e in logs if e["event"] == "layer_placed" and e["layer"] == 0)
    for key in ("layer", "device", "nbytes", "seconds", "free_before", "free_after"):
        assert key in placed
    finished = logs[-1]
    for key in ("nbytes", "seconds", "gb_per_s", "devices"):
        assert key in finished


async def test_missing_checkpoint_is_a_streamload_error(tmp_path: Path) -> None:
    """A path with no checkpoint fails with a ``StreamloadError`` naming it."""
    with pytest.raises(streamload.StreamloadError) as info:
        await streamload.load(tmp_path / "nope", params(["cpu"]))
    assert "nope" in str(info.value)


async def test_event_loop_keeps_ticking_during_a_large_load(tmp_path: Path) -> None:
    """During a load of over 1 GB (sparse file, staged simulated GPU) a heartbeat on the same
    loop is never starved for long (the benchmark records the real figure)."""
    from streamload.testing import TensorShape, write_sharded

    shapes = {
        f"model.layers.{i}.mlp.up_proj.weight": TensorShape("BF16", (8192, 8192)) for i in range(8)
    }
    shapes["model.embed_tokens.weight"] = TensorShape("BF16", (1024, 1024))
    config = llama_config(8) | {"hidden_size": 1024}
    path = write_sharded(tmp_path / "big", shapes, num_shards=2, sparse=True, config=config)
    gaps: list[float] = []
    done = anyio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    gpu = SimulatedGPU("sim:0", total_bytes=4 * 2**30)
    async with anyio.create_task_group() as group:
        group.start_soon(heartbeat)
        model = await streamload.load(
            path, params([gpu], chunk_bytes=16 * 2**20, staging_bytes=64 * 2**20)
        )
        done.set()
    assert model.report.nbytes > 2**30
    assert max(gaps) < 0.5


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("placement", ["mixed", "cpu-mmap"])
async def test_no_file_io_runs_on_the_event_loop(
    ckpt: Path, placement: str, anyio_backend: str, no_blocking_io: BlockingIOGuard
) -> None:
    """Inventory, planning, reads, memory maps and closing all happen off the event loop's
    thread (the fixture fails the test otherwise), also on failure."""
    devices, extra = devices_for(placement, ckpt)
    with no_blocking_io.watch():
        model = await streamload.load(ckpt, params(devices, **extra))
        with pytest.raises(streamload.StreamloadError):
            await streamload.load(ckpt / "missing", params(["cpu"]))
    assert_identical(model.tensors, reference(ckpt), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
async def test_cuda_load_is_bit_identical(ckpt: Path, dtype: torch.dtype | None) -> None:
    """On a real GPU (pinned staging ring, side-stream copies, events), with a tiny staging
    budget so every slot is reused many times, every tensor equals safetensors' bytes."""
    model = await streamload.load(ckpt, params(["cuda:0", "cpu"], dtype=dtype))
    assert {"cuda:0"} == set(model.plan.layer_devices)
    on_host = {name: t.cpu() for name, t in model.tensors.items()}
    assert_identical(on_host, reference(ckpt), dtype)
    assert all(t.device.type == "cuda" for t in model.tensors.values())


async def test_same_named_simulated_gpus_of_two_loads_are_two_devices(tmp_path: Path) -> None:
    """Reservations follow device objects, not names: two concurrent loads, each with its own
    ``SimulatedGPU("sim:0")`` sized for one model, both fit entirely on their own GPU."""
    a = write_checkpoint(tmp_path / "a", llama_tensors(LAYERS, seed=1), llama_config(LAYERS))
    b = write_checkpoint(tmp_path / "b", llama_tensors(LAYERS, seed=2), llama_config(LAYERS))
    results: dict[str, streamload.LoadedModel] = {}

    async def run(name: str, path: Path) -> None:
        gpu = sized_gpu("sim:0", path, LAYERS + 0.5, primary=True)
        results[name] = await streamload.load(path, params([gpu, "cpu"]))

    async with anyio.create_task_group() as group:
        group.start_soon(run, "a", a)
        group.start_soon(run, "b", b)
    for model in results.values():
        assert ("sim:0",) * LAYERS == model.plan.layer_devices


async def test_layer_seconds_exclude_waiting_for_the_callback(ckpt: Path) -> None:
    """``LayerPlaced.seconds`` measures allocation to placement, not the time a slow
    ``on_event`` callback held the pipeline."""
    placed: list[LayerPlaced] = []

    async def on_event(event: Event) -> None:
        if isinstance(event, LayerPlaced):
            placed.append(event)
            await anyio.sleep(0.2)

    await streamload.load(
        ckpt, params([SimulatedGPU("sim:0", total_bytes=2**30)]), on_event=on_event
    )
    assert max(e.seconds for e in placed) < 0.15


@pytest.mark.parametrize("target", ["cpu", "gpu"])
async def test_units_bound_for_host_memory_are_read_ahead_of_a_slow_callback(
    ckpt: Path, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a callback holds ``LayerPlaced`` of layer 0, the CPU layers after it are
    allocated and read (two being read, one more waiting to be placed); a GPU layer waits until
    the unit two before it is placed, so its recheck sees what the callback did."""
    allocated: list[int | None] = []
    allocate = _load._Load._allocate_sync

    def recording(self: Any, unit: Any, device: Any, live: int, parts_left: int) -> Any:
        allocated.append(unit.layer)
        return allocate(self, unit, device, live, parts_left)

    monkeypatch.setattr(_load._Load, "_allocate_sync", recording)
    seen: list[list[int | None]] = []
    want = 2 if target == "cpu" else 1

    async def on_event(event: Event) -> None:
        if isinstance(event, LayerPlaced) and event.layer == 0:
            # Layer 0 is unit ``parts``: placed units are ``parts``, the callback holds one
            # more. Wait for the units the window allows (however busy the machine), then a
            # while longer, in which no further unit may be allocated.
            parts = allocated.count(None)
            with anyio.move_on_after(10):
                while len(allocated) < parts + 1 + want:  # noqa: ASYNC110 - another thread appends
                    await anyio.sleep(0.01)
            await anyio.sleep(0.2)  # far longer than reading a few tiny layers
            seen.append(list(allocated))

    device: Any = "cpu" if target == "cpu" else SimulatedGPU("sim:0", total_bytes=2**30)
    model = await streamload.load(ckpt, params([device]), on_event=on_event)
    assert_identical(model.tensors, reference(ckpt), None)
    parts = len(allocated) - LAYERS
    assert [None] * parts + list(range(LAYERS)) == allocated
    ahead = len(seen[0]) - (parts + 1)
    assert ahead == want


async def test_a_slow_callback_does_not_hold_the_next_gpu_units_recheck(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layer 1's recheck comes after layer 0's ``LayerPlaced`` callback has started (forced
    here). The recheck has no event to deliver, so it does not wait for that callback, and
    layer 1 is allocated while the callback still holds layer 0's placement."""
    allocated: list[int | None] = []
    allocate_sync, allocate = _load._Load._allocate_sync, _load._Load._allocate
    started = anyio.Event()

    def recording(self: Any, unit: Any, device: Any, live: int, parts_left: int) -> Any:
        allocated.append(unit.layer)
        return allocate_sync(self, unit, device, live, parts_left)

    async def after_callback(self: Any, unit: Any, parts_left: int) -> Any:
        if unit.layer == 1:
            await started.wait()
        return await allocate(self, unit, parts_left)

    monkeypatch.setattr(_load._Load, "_allocate_sync", recording)
    monkeypatch.setattr(_load._Load, "_allocate", after_callback)
    during: list[bool] = []

    async def on_event(event: Event) -> None:
        if isinstance(event, LayerPlaced) and event.layer == 0:
            started.set()
            with anyio.move_on_after(5):
                while 1 not in allocated:  # noqa: ASYNC110 - another thread appends to it
                    await anyio.sleep(0.01)
            during.append(1 in allocated)

    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    model = await streamload.load(ckpt, params([gpu]), on_event=on_event)
    assert_identical(model.tensors, reference(ckpt), None)
    assert [True] == during


@pytest.mark.parametrize("reader_threads", [3, 8])
def test_worker_threads_are_started_before_the_first_read(
    ckpt: Path, reader_threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Thread.start`` holds the event loop until the new thread runs, which takes
    milliseconds once the CPUs are busy reading: every worker thread a load uses is started
    before its first read (a fresh event loop, so anyio's pool starts empty)."""
    order: list[str] = []
    start = threading.Thread.start

    def recording_start(self: threading.Thread) -> None:
        order.append("start")
        start(self)

    read_direct = _reader.read_direct

    def recording_read(files: Any, chunk: Any) -> None:
        order.append("read")
        read_direct(files, chunk)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    monkeypatch.setattr(_reader, "read_direct", recording_read)

    load_params = params(["cpu"], reader_threads=reader_threads)
    model = anyio.run(lambda: streamload.load(ckpt, load_params))

    assert_identical(model.tensors, reference(ckpt), None)
    first = order.index("read")
    assert order.count("start") >= reader_threads // 2  # the lanes of the first unit at least
    assert "start" not in order[first:]


@pytest.mark.parametrize(("cached", "lanes"), [(1.0, 2), (0.0, 4)])
async def test_cpu_reads_run_in_lanes_that_go_on_across_units(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, cached: float, lanes: int
) -> None:
    """CPU chunks are read by at most ``reader_threads // 2`` lanes at once from the page
    cache, ``reader_threads`` when the disk must read them (a lane faulting pages in has no
    read in flight), and a lane goes on to the next unit's chunks instead of ending with its
    unit: while reads are slower than allocations (so the queue never runs dry), the whole
    load takes a few lane runs, not one per lane and unit."""
    monkeypatch.setattr(_hostmem, "cached_fraction", lambda ranges: cached)
    lock = threading.Lock()
    running = most = reads = 0
    read_direct = _reader.read_direct
    read_lane = _reader.Reader._read_lane
    lanes_run = 0

    def slow(files: Any, chunk: Any, *rest: Any) -> None:
        nonlocal running, most, reads
        with lock:
            running += 1
            reads += 1
            most = max(most, running)
        time.sleep(0.002)
        read_direct(files, chunk, *rest)  # cold: with O_DIRECT (direct_io="auto")
        with lock:
            running -= 1

    def counting(self: Any) -> None:
        nonlocal lanes_run
        with lock:
            lanes_run += 1
        read_lane(self)

    monkeypatch.setattr(_reader, "read_direct", slow)
    monkeypatch.setattr(_reader.Reader, "_read_lane", counting)
    p = params(["cpu"], chunk_bytes=4096, reader_threads=4)
    model = await streamload.load(ckpt, p)
    assert_identical(model.tensors, reference(ckpt), None)
    units = len(model.plan.layer_devices) + len(streamload.inspect(ckpt).non_mapped)
    assert most == lanes
    assert reads > 4 * units  # several chunks per unit
    assert lanes_run < units  # per-unit lanes would take at least two runs per unit


async def test_cancelling_stops_a_lane_of_reads_between_chunks(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane reads its share of a unit's chunks in one worker thread; cancelling the load
    stops every lane after the chunk it is reading, releases everything and closes the files
    (without the check between chunks, the lanes would read their whole share first)."""
    reads = 0
    started = threading.Event()
    read_direct = _reader.read_direct

    def slow(files: Any, chunk: Any) -> None:
        nonlocal reads
        reads += 1
        if reads == 4:
            started.set()
        time.sleep(0.005)
        read_direct(files, chunk)

    monkeypatch.setattr(_reader, "read_direct", slow)
    p = params(["cpu"], chunk_bytes=512, reader_threads=4)
    entries = streamload.inspect(ckpt).checkpoint.tensors.values()
    total = sum(-(-entry.nbytes // 512) for entry in entries)
    async with anyio.create_task_group() as group:

        async def run() -> None:
            await streamload.load(ckpt, p)

        group.start_soon(run)
        await anyio.to_thread.run_sync(started.wait)
        group.cancel_scope.cancel()
    assert reads < 4 + 2 * 4 < total  # the chunk each lane was reading, at most
    assert [] == open_fds_under(ckpt)
