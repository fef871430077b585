"""``SimulatedGPU(prefault=True)``: device memory as one pre-faulted arena, blocks carved from it,
the ledger, exhaustion, reuse, and loads through it."""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

import anyio
import pytest
import torch

import streamload
from streamload.testing import SimulatedGPU
from streamload.testing._arena import ARENA_ALIGN, Arena
from tests.engine_support import (
    assert_identical,
    llama_config,
    llama_tensors,
    params,
    reference,
    write_checkpoint,
)

KiB = 1024


def _inside(gpu: SimulatedGPU, tensor: torch.Tensor) -> bool:
    assert gpu.arena is not None
    start = gpu.arena.address()
    return start <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= start + (
        gpu.arena.nbytes
    )


def test_tensors_are_aligned_blocks_inside_the_arena() -> None:
    """Each tensor is a 512-byte aligned block of the arena, charged rounded up to 512 bytes
    (as a caching allocator's blocks are); the ledger is credited when it is freed."""
    gpu = SimulatedGPU("sim:0", total_bytes=64 * KiB, prefault=True)
    a = gpu.empty((1000,), torch.float32)  # 4000 bytes -> one 4096-byte block
    b = gpu.empty((3,), torch.uint8)  # 3 bytes -> 512
    assert _inside(gpu, a)
    assert _inside(gpu, b)
    assert gpu.arena is not None
    assert [0, 0] == [(t.data_ptr() - gpu.arena.address()) % ARENA_ALIGN for t in (a, b)]
    assert 4096 + 512 == gpu.allocated_bytes
    assert 64 * KiB - 4096 - 512 == gpu.free_bytes
    del a, b
    gc.collect()
    assert 0 == gpu.allocated_bytes
    assert [(0, 64 * KiB)] == gpu.arena.free_stretches()


def test_a_full_arena_is_out_of_memory_and_charges_nothing() -> None:
    gpu = SimulatedGPU("sim:0", total_bytes=16 * KiB, prefault=True)
    held = [gpu.empty((4 * KiB,), torch.uint8) for _ in range(4)]
    assert 16 * KiB == gpu.allocated_bytes
    with pytest.raises(torch.OutOfMemoryError, match="exceeds live free memory"):
        gpu.empty((1,), torch.uint8)
    assert 16 * KiB == gpu.allocated_bytes
    assert 4 == len(held)


def test_a_fragmented_arena_is_out_of_memory_though_the_ledger_has_room() -> None:
    """Free bytes that are not one stretch cannot hold a block (as on a GPU)."""
    gpu = SimulatedGPU("sim:0", total_bytes=3 * KiB, prefault=True)
    first, middle, last = (gpu.empty((KiB,), torch.uint8) for _ in range(3))
    del first, last
    gc.collect()
    assert 2 * KiB == gpu.free_bytes
    with pytest.raises(torch.OutOfMemoryError, match="no free block"):
        gpu.empty((2 * KiB,), torch.uint8)
    assert KiB == gpu.allocated_bytes
    assert middle.nbytes == KiB


def test_freed_blocks_are_reused_and_merged() -> None:
    gpu = SimulatedGPU("sim:0", total_bytes=8 * KiB, prefault=True)
    a = gpu.empty((2 * KiB,), torch.uint8)
    b = gpu.empty((2 * KiB,), torch.uint8)
    where_a, where_b = a.data_ptr(), b.data_ptr()
    a.fill_(7)
    del a
    gc.collect()
    again = gpu.empty((2 * KiB,), torch.uint8)
    assert where_a == again.data_ptr()  # the first free stretch long enough
    del again, b
    gc.collect()
    merged = gpu.empty((8 * KiB,), torch.uint8)  # the whole arena again: the blocks merged
    assert min(where_a, where_b) == merged.data_ptr()
    assert 8 * KiB == gpu.peak_allocated_bytes


def test_stolen_memory_is_counted_in_the_ledger() -> None:
    gpu = SimulatedGPU("sim:0", total_bytes=8 * KiB, prefault=True)
    gpu.steal(6 * KiB)
    with pytest.raises(torch.OutOfMemoryError):
        gpu.empty((4 * KiB,), torch.uint8)
    gpu.give_back(6 * KiB)
    assert 4 * KiB == gpu.empty((4 * KiB,), torch.uint8).nbytes


def _faults_writing(tensor: torch.Tensor) -> int:
    """Minor page faults this thread takes writing every byte of ``tensor`` once."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    ctypes.memset(tensor.data_ptr(), 1, tensor.nbytes)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_the_arena_is_faulted_in_at_construction() -> None:
    """Writing a fresh tensor of a pre-faulted GPU takes no page faults; without ``prefault``
    the same write faults in every page."""
    nbytes = 16 * 2**20
    pages = nbytes // 4096
    arena = SimulatedGPU("sim:0", total_bytes=nbytes, prefault=True)
    plain = SimulatedGPU("sim:1", total_bytes=nbytes)
    assert _faults_writing(arena.empty((nbytes,), torch.uint8)) < pages // 100
    assert _faults_writing(plain.empty((nbytes,), torch.uint8)) > pages // 2


def test_an_arena_is_not_host_memory_to_the_engine() -> None:
    """No huge pages, no pre-faulting asked for: the arena is device memory."""
    assert not SimulatedGPU("sim:0", total_bytes=KiB, prefault=True).host_memory
    assert SimulatedGPU("sim:0", total_bytes=KiB).host_memory


def test_arena_free_merges_both_neighbours() -> None:
    arena = Arena(4 * ARENA_ALIGN)
    starts = [arena.carve(ARENA_ALIGN) for _ in range(4)]
    assert [0, 512, 1024, 1536] == starts
    assert arena.carve(ARENA_ALIGN) is None
    arena.free(0, ARENA_ALIGN)
    arena.free(1024, ARENA_ALIGN)
    assert [(0, 512), (1024, 512)] == arena.free_stretches()
    arena.free(512, ARENA_ALIGN)
    assert [(0, 1536)] == arena.free_stretches()
    arena.free(1536, ARENA_ALIGN)
    assert [(0, 2048)] == arena.free_stretches()


@pytest.mark.parametrize("direct_io", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("staged", [True, False])
def test_loads_into_the_arena_are_exact(
    tmp_path: Path, staged: bool, dtype: torch.dtype | None, direct_io: bool
) -> None:
    """A load into a pre-faulted GPU places every tensor in its arena, bit for bit; released,
    the arena is whole again."""
    ckpt = write_checkpoint(tmp_path / "ckpt", llama_tensors(3), llama_config(3))
    gpu = SimulatedGPU("sim:0", total_bytes=2**24, staged=staged, prefault=True)
    load_params = params([gpu], dtype=dtype, direct_io=direct_io)
    model = anyio.run(streamload.load, ckpt, load_params)
    assert_identical(model.tensors, reference(ckpt), dtype)
    assert all(_inside(gpu, t) for t in model.tensors.values() if t.nbytes)
    model.release()
    gc.collect()
    assert 0 == gpu.allocated_bytes
    assert gpu.arena is not None
    assert [(0, 2**24)] == gpu.arena.free_stretches()
