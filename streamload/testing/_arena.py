"""The pre-faulted device memory of ``SimulatedGPU(prefault=True)``: one arena, blocks carved
from it."""

from __future__ import annotations

import bisect
import collections
import ctypes
import mmap
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from streamload import _hostmem

if TYPE_CHECKING:
    import torch

__all__ = ["ARENA_ALIGN", "Arena", "arena_bytes"]

# Blocks start at, and are sized in, multiples of 512 bytes, as torch's CUDA caching allocator
# rounds every block (its ``kMinBlockSize``).
ARENA_ALIGN = 512


def arena_bytes(nbytes: int) -> int:
    """What a block for ``nbytes`` takes in the arena (rounded up to ``ARENA_ALIGN``)."""
    return -(-nbytes // ARENA_ALIGN) * ARENA_ALIGN


class Arena:
    """``nbytes`` of host memory in one private anonymous mapping, every page faulted in at
    construction (as a caching allocator's reserved blocks take no page faults when reused),
    and blocks carved from it first fit, freed blocks merged with free neighbours.

    ``carve`` returns a block's offset or ``None`` when no free stretch is long enough; ``free``
    may be called from any thread at any point (a tensor's finaliser runs wherever its last
    reference goes, possibly inside ``carve`` on the same thread), so it only queues the block,
    and ``carve`` applies the queue under the arena's lock.
    """

    def __init__(self, nbytes: int) -> None:
        import threading

        import torch

        self.nbytes = nbytes
        length = max(nbytes + (-nbytes) % mmap.PAGESIZE, mmap.PAGESIZE)
        self._area = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(self._area, dtype=torch.uint8)
        _hostmem.prefault(whole)  # one call where the kernel has MADV_POPULATE_WRITE
        whole[:: mmap.PAGESIZE].zero_()  # and a write to every page, where it has not
        del whole
        self._lock = threading.Lock()
        self._starts = [0]  # free stretches, by start
        self._sizes = {0: nbytes} if nbytes else {}
        if not nbytes:
            self._starts.clear()
        self._freed: collections.deque[tuple[int, int]] = collections.deque()

    def carve(self, nbytes: int) -> int | None:
        """The offset of a free block of ``nbytes`` (a multiple of ``ARENA_ALIGN``), taken
        from the first free stretch long enough; ``None`` when there is none."""
        with self._lock:
            self._merge_freed()
            for start in self._starts:
                size = self._sizes[start]
                if size >= nbytes:
                    self._take(start, size, nbytes)
                    return start
        return None

    def free(self, start: int, nbytes: int) -> None:
        """Give the block back (queued: see the class docstring)."""
        self._freed.append((start, nbytes))

    def free_stretches(self) -> list[tuple[int, int]]:
        """The free ``(start, size)`` stretches, by start (freed blocks merged in)."""
        with self._lock:
            self._merge_freed()
            return [(start, self._sizes[start]) for start in self._starts]

    def tensor(
        self,
        start: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        nbytes: int,
        on_free: Callable[[], None],
    ) -> torch.Tensor:
        """A tensor over ``nbytes`` of the arena from ``start``; ``on_free`` runs when its
        storage (every view, ``Parameter`` or dtype view of it) is gone."""
        import torch

        holder = (ctypes.c_uint8 * nbytes).from_buffer(self._area, start)
        weakref.finalize(holder, on_free).atexit = False
        flat = torch.frombuffer(holder, dtype=torch.uint8)  # keeps ``holder`` alive
        return flat.view(dtype).view(shape)

    def address(self) -> int:
        """Where the arena starts in this process's memory."""
        return ctypes.addressof(ctypes.c_uint8.from_buffer(self._area))

    def _take(self, start: int, size: int, nbytes: int) -> None:
        """Carve ``nbytes`` off the front of the free stretch at ``start`` (lock held)."""
        index = bisect.bisect_left(self._starts, start)
        del self._starts[index]
        del self._sizes[start]
        if size > nbytes:
            self._starts.insert(index, start + nbytes)
            self._sizes[start + nbytes] = size - nbytes

    def _merge_freed(self) -> None:
        """Put queued blocks back, merged with adjacent free stretches (lock held)."""
        while True:
            try:
                start, size = self._freed.popleft()
            except IndexError:
                return
            index = bisect.bisect_left(self._starts, start)
            if index < len(self._starts) and self._starts[index] == start + size:
                size += self._sizes.pop(self._starts.pop(index))
            if index > 0:
                before = self._starts[index - 1]
                if before + self._sizes[before] == start:
                    self._sizes[before] += size
                    continue
            self._starts.insert(index, start)
            self._sizes[start] = size
