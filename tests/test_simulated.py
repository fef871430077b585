"""SimulatedGPU: the ledger, out-of-memory behaviour, tenants, hooks and thread safety."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from streamload.devices import Device, Fence
from streamload.testing._simulated import SimulatedGPU

MiB = 2**20


def test_is_a_device() -> None:
    """A SimulatedGPU satisfies the runtime-checkable ``Device`` protocol and says it is a
    staged GPU."""
    gpu = SimulatedGPU("sim:3", total_bytes=MiB)
    assert isinstance(gpu, Device)
    assert ("sim:3", True, True) == (gpu.name, gpu.is_gpu, gpu.staged)
    assert MiB == gpu.total_bytes()


def test_unstaged_flag() -> None:
    """``staged=False`` makes the device ask to be read into directly."""
    assert not SimulatedGPU(staged=False).staged


def test_defaults_and_busy_start() -> None:
    """Defaults are an 8 GiB ``sim:0``; ``free_bytes`` starts it with other tenants' memory."""
    gpu = SimulatedGPU()
    assert ("sim:0", 8 * 2**30, 8 * 2**30) == (gpu.name, gpu.total_bytes(), gpu.free_bytes)
    busy = SimulatedGPU("sim:1", total_bytes=10 * MiB, free_bytes=4 * MiB)
    assert (4 * MiB, 6 * MiB, 0) == (busy.free_bytes, busy.stolen_bytes, busy.allocated_bytes)


@pytest.mark.parametrize(
    ("total", "free"), [(-1, None), (10, 11), (10, -1)], ids=["total", "free>total", "free<0"]
)
def test_rejects_bad_sizes(total: int, free: int | None) -> None:
    """Impossible capacities are a ``ValueError`` at construction."""
    with pytest.raises(ValueError):
        SimulatedGPU(total_bytes=total, free_bytes=free)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((4, 8), torch.float32),
        ((3,), torch.float16),
        ((5,), torch.uint8),
        ((7, 3), torch.bfloat16),
        ((2, 3, 5), torch.float64),
        ((), torch.float32),
        ((9,), torch.bool),
        ((6,), torch.float8_e4m3fn),
    ],
)
def test_empty_charges_exact_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """``empty`` returns a CPU tensor of the shape and dtype asked for and charges exactly its
    bytes (odd sizes and 0-dim included); freeing it credits them back."""
    gpu = SimulatedGPU(total_bytes=MiB)
    tensor = gpu.empty(shape, dtype)
    assert (shape, dtype, torch.device("cpu")) == (tuple(tensor.shape), tensor.dtype, tensor.device)
    assert tensor.nbytes == gpu.allocated_bytes
    assert MiB - tensor.nbytes == gpu.live_free_bytes()
    tensor.fill_(1)
    assert 1 == int(tensor.reshape(-1)[0].item())
    del tensor
    assert 0 == gpu.allocated_bytes


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 0, 7)])
def test_zero_element_tensors_cost_nothing(shape: tuple[int, ...]) -> None:
    """Zero-element tensors have the right shape and charge nothing."""
    gpu = SimulatedGPU(total_bytes=16)
    tensor = gpu.empty(shape, torch.float32)
    assert (shape, 0, 1) == (tuple(tensor.shape), gpu.allocated_bytes, gpu.allocation_count)


def test_negative_dimension_is_rejected() -> None:
    """A negative dimension is a ``ValueError``, and nothing is charged."""
    gpu = SimulatedGPU(total_bytes=MiB)
    with pytest.raises(ValueError):
        gpu.empty((2, -1), torch.float32)
    assert 0 == gpu.allocated_bytes


def test_views_keep_memory_charged() -> None:
    """Slices, reshapes and dtype views keep the storage (and the charge) alive; the credit
    comes when the last of them goes."""
    gpu = SimulatedGPU(total_bytes=MiB)
    tensor = gpu.empty((64, 16), torch.float32)
    row = tensor[3]
    as_bytes = tensor.reshape(-1).view(torch.uint8)
    as_half = tensor.view(torch.float16)
    del tensor
    assert 4096 == gpu.allocated_bytes
    del row, as_bytes
    assert 4096 == gpu.allocated_bytes
    del as_half
    assert 0 == gpu.allocated_bytes


def test_parameter_keeps_memory_charged() -> None:
    """Wrapping the tensor in ``nn.Parameter`` (as model loading does) keeps it charged until
    the parameter and its module are gone."""
    gpu = SimulatedGPU(total_bytes=MiB)
    module = torch.nn.Linear(8, 8, bias=False)
    module.weight = torch.nn.Parameter(gpu.empty((8, 8), torch.float32))
    assert 256 == gpu.allocated_bytes
    del module
    gc.collect()
    assert 0 == gpu.allocated_bytes


def test_reference_cycle_is_credited_after_gc() -> None:
    """A tensor held only by a reference cycle is credited once the cycle is collected."""
    gpu = SimulatedGPU(total_bytes=MiB)
    holder: list[object] = [gpu.empty((128,), torch.uint8)]
    holder.append(holder)
    del holder
    gc.collect()
    assert 0 == gpu.allocated_bytes


def test_converted_copies_are_not_charged() -> None:
    """Only memory from ``empty`` is charged: ``.to(dtype)`` makes ordinary host memory."""
    gpu = SimulatedGPU(total_bytes=MiB)
    tensor = gpu.empty((16,), torch.float32)
    converted = tensor.to(torch.float16)
    del tensor
    assert (0, 32) == (gpu.allocated_bytes, converted.nbytes)


def test_memory_is_aligned_and_writable() -> None:
    """Allocations are page aligned and writable for any dtype."""
    gpu = SimulatedGPU(total_bytes=MiB)
    tensor = gpu.empty((3, 5), torch.float64)
    tensor.copy_(torch.arange(15, dtype=torch.float64).reshape(3, 5))
    assert 0 == tensor.data_ptr() % 64
    assert 105.0 == float(tensor.sum())


def test_out_of_memory_raises_and_charges_nothing() -> None:
    """An allocation larger than live free raises ``torch.OutOfMemoryError`` (a
    ``RuntimeError``) naming the device, and leaves the ledger as it was."""
    gpu = SimulatedGPU("sim:7", total_bytes=1000)
    keep = gpu.empty((600,), torch.uint8)
    with pytest.raises(torch.OutOfMemoryError, match=r"sim:7") as caught:
        gpu.empty((401,), torch.uint8)
    assert isinstance(caught.value, RuntimeError)
    assert (600, 400, 600, 1) == (
        gpu.allocated_bytes,
        gpu.free_bytes,
        gpu.peak_allocated_bytes,
        gpu.allocation_count,
    )
    exact = gpu.empty((400,), torch.uint8)
    assert 0 == gpu.free_bytes
    del keep, exact


def test_steal_and_give_back_move_live_free() -> None:
    """``steal`` lowers live free without freeing anything; ``give_back`` returns it; an
    allocation that fit before the theft no longer does."""
    gpu = SimulatedGPU(total_bytes=1000)
    gpu.steal(700)
    assert (300, 700, 0) == (gpu.free_bytes, gpu.stolen_bytes, gpu.allocated_bytes)
    with pytest.raises(torch.OutOfMemoryError):
        gpu.empty((301,), torch.uint8)
    gpu.give_back(200)
    tensor = gpu.empty((500,), torch.uint8)
    assert (0, 500) == (gpu.free_bytes, tensor.numel())


@pytest.mark.parametrize(
    ("action", "amount"),
    [("steal", 1001), ("steal", -1), ("give_back", 1), ("give_back", -1)],
)
def test_tenant_bounds(action: str, amount: int) -> None:
    """A tenant cannot take more than is free or return more than it holds."""
    gpu = SimulatedGPU(total_bytes=1000)
    with pytest.raises(ValueError):
        getattr(gpu, action)(amount)
    assert (1000, 0) == (gpu.free_bytes, gpu.stolen_bytes)


def test_peak_tracks_the_high_water_mark() -> None:
    """``peak_allocated_bytes`` keeps the maximum; ``reset_peak`` restarts it from now."""
    gpu = SimulatedGPU(total_bytes=MiB)
    a = gpu.empty((300,), torch.uint8)
    b = gpu.empty((200,), torch.uint8)
    del a
    c = gpu.empty((100,), torch.uint8)
    assert (300, 500) == (gpu.allocated_bytes, gpu.peak_allocated_bytes)
    gpu.reset_peak()
    assert 300 == gpu.peak_allocated_bytes
    del b, c


def test_fail_allocations_next() -> None:
    """``fail_allocations()`` makes exactly the next allocation raise, charging nothing."""
    gpu = SimulatedGPU(total_bytes=MiB)
    gpu.fail_allocations()
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        gpu.empty((4,), torch.uint8)
    tensor = gpu.empty((4,), torch.uint8)
    assert (4, 1) == (gpu.allocated_bytes, gpu.allocation_count)
    del tensor


def test_fail_allocations_nth_and_count() -> None:
    """``fail_allocations(2, after=2)`` fails the third and fourth calls from now only."""
    gpu = SimulatedGPU(total_bytes=MiB)
    gpu.fail_allocations(2, after=2)
    outcomes = []
    kept = []
    for _ in range(6):
        try:
            kept.append(gpu.empty((1,), torch.uint8))
        except torch.OutOfMemoryError:
            outcomes.append("oom")
        else:
            outcomes.append("ok")
    assert ["ok", "ok", "oom", "oom", "ok", "ok"] == outcomes


def test_fail_allocations_rejects_negative() -> None:
    """Negative counts are a ``ValueError``."""
    with pytest.raises(ValueError):
        SimulatedGPU().fail_allocations(-1)


def test_on_allocate_sees_size_and_may_steal() -> None:
    """``on_allocate`` is called with each request's bytes before the ledger check, may
    change the device (no deadlock), and an exception from it fails the allocation."""
    gpu = SimulatedGPU(total_bytes=1000)
    seen: list[int] = []

    def hook(nbytes: int) -> None:
        seen.append(nbytes)
        if len(seen) == 2:
            gpu.steal(gpu.free_bytes)

    gpu.on_allocate = hook
    first = gpu.empty((10,), torch.float32)
    with pytest.raises(torch.OutOfMemoryError):
        gpu.empty((1,), torch.uint8)
    assert ([40, 1], 40) == (seen, gpu.allocated_bytes)

    def refuse(nbytes: int) -> None:
        raise torch.OutOfMemoryError(f"refused {nbytes}")

    gpu.on_allocate = refuse
    with pytest.raises(torch.OutOfMemoryError, match="refused 8"):
        gpu.empty((2,), torch.float32)
    assert 40 == gpu.allocated_bytes
    del first


def test_host_buffer_is_plain_and_uncharged() -> None:
    """``host_buffer`` is a host ``uint8`` tensor of the size asked, not charged to the GPU."""
    gpu = SimulatedGPU(total_bytes=MiB)
    buffer = gpu.host_buffer(4096)
    assert ((4096,), torch.uint8, 0) == (tuple(buffer.shape), buffer.dtype, gpu.allocated_bytes)


def test_copy_from_host_copies_now() -> None:
    """``copy_from_host`` copies at once and returns a fence that is already done."""
    gpu = SimulatedGPU(total_bytes=MiB)
    dst = gpu.empty((8,), torch.uint8)
    src = torch.arange(8, dtype=torch.uint8)
    fence = gpu.copy_from_host(dst, src)
    assert isinstance(fence, Fence)
    assert fence.done()
    fence.wait()
    gpu.synchronize()
    assert src.tolist() == dst.tolist()


def test_delayed_copies_complete_in_order_behind_their_fence() -> None:
    """With ``copy_delay`` a copy lands only when its fence is done, copies finish in the order
    started, and ``synchronize`` waits for all of them."""
    gpu = SimulatedGPU(total_bytes=MiB, copy_delay=0.2)
    dst = gpu.empty((2, 4), torch.uint8)
    first = gpu.copy_from_host(dst[0], torch.full((4,), 7, dtype=torch.uint8))
    second = gpu.copy_from_host(dst[1], torch.full((4,), 9, dtype=torch.uint8))
    assert (False, [0, 0, 0, 0]) == (first.done(), dst[0].tolist())
    second.wait()
    assert first.done()
    gpu.synchronize()
    assert [[7] * 4, [9] * 4] == dst.tolist()


def test_delayed_copy_reads_source_late() -> None:
    """A delayed copy reads its source when it runs: overwriting the source before the fence
    is done corrupts the destination, as it would with a real asynchronous copy."""
    gpu = SimulatedGPU(total_bytes=MiB, copy_delay=0.05)
    dst = gpu.empty((4,), torch.uint8)
    src = torch.full((4,), 1, dtype=torch.uint8)
    fence = gpu.copy_from_host(dst, src)
    src.fill_(2)
    fence.wait()
    assert [2, 2, 2, 2] == dst.tolist()


def test_rejects_negative_copy_delay() -> None:
    """A negative ``copy_delay`` is a ``ValueError``."""
    with pytest.raises(ValueError):
        SimulatedGPU(copy_delay=-1.0)


def test_concurrent_allocations_and_frees_keep_the_ledger_exact() -> None:
    """Eight threads allocating, stealing and freeing at once never over-commit, and leave the
    ledger exactly at zero."""
    total = 64 * 1024
    gpu = SimulatedGPU(total_bytes=total)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(seed: int) -> None:
        try:
            start.wait()
            held: list[torch.Tensor] = []
            for i in range(300):
                size = 64 + (seed * 131 + i * 17) % 1024
                try:
                    held.append(gpu.empty((size,), torch.uint8))
                except torch.OutOfMemoryError:
                    held.clear()
                if i % 50 == 0:
                    try:
                        gpu.steal(16)
                        gpu.give_back(16)
                    except ValueError:
                        pass
                assert gpu.free_bytes >= 0
                if i % 7 == 0:
                    held = held[1:]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [] == errors
    assert (0, total) == (gpu.allocated_bytes, gpu.free_bytes)
    assert 0 < gpu.peak_allocated_bytes <= total


def test_free_from_another_thread_is_credited() -> None:
    """A tensor whose last reference dies on another thread is credited all the same."""
    gpu = SimulatedGPU(total_bytes=MiB)
    box = [gpu.empty((1024,), torch.uint8)]
    thread = threading.Thread(target=box.clear)
    thread.start()
    thread.join()
    assert 0 == gpu.allocated_bytes


def test_repr_names_the_ledger() -> None:
    """``repr`` shows name, capacity, allocated and stolen bytes."""
    gpu = SimulatedGPU("sim:2", total_bytes=2048)
    gpu.steal(1024)
    assert "SimulatedGPU('sim:2', total=2.00 KiB, allocated=0 B, stolen=1.00 KiB)" == repr(gpu)


def test_allocation_is_fast_enough_for_many_tensors() -> None:
    """Thousands of small allocations (a large model's tensor count) take well under a
    second each thousand."""
    gpu = SimulatedGPU(total_bytes=2**30)
    started = time.perf_counter()
    tensors = [gpu.empty((256,), torch.float16) for _ in range(2000)]
    elapsed = time.perf_counter() - started
    assert 2000 * 512 == gpu.allocated_bytes
    del tensors
    assert 0 == gpu.allocated_bytes
    assert elapsed < 2.0
