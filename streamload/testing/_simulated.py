"""``SimulatedGPU``: a GPU-shaped ``Device`` backed by host memory, for tests without GPUs."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import math
import mmap
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamload import _hostmem
from streamload.devices import DONE, Fence
from streamload.errors import format_bytes
from streamload.testing._arena import Arena, arena_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["SimulatedGPU"]

GiB = 2**30


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; a byte-for-byte copy between contiguous tensors of one dtype is one
    ``memmove`` (no GIL held), the nearest a host copy comes to a GPU's DMA engine: torch's
    elementwise copy kernel takes more CPU for the same bytes, and this device's copies stand
    for work that costs a real GPU's host none."""
    if (
        dst.dtype == src.dtype
        and dst.shape == src.shape
        and dst.is_contiguous()
        and src.is_contiguous()
        and dst.device.type == src.device.type == "cpu"
    ):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
    else:
        dst.copy_(src)


@dataclass(frozen=True, slots=True)
class _FutureFence:
    """A delayed copy's fence (``SimulatedGPU(copy_delay=...)``)."""

    future: Future[None]

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        self.future.result()


class _Copier:
    """Delayed copies, run in order on one background thread (started on first use)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None

    def submit(self, work: list[tuple[torch.Tensor, torch.Tensor]], delay: float) -> Fence:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self._name}-copy")
            future = self._last = self._pool.submit(self._run, work, delay)
        return _FutureFence(future)

    def synchronize(self) -> None:
        with self._lock:
            last = self._last
        if last is not None:
            last.result()

    @staticmethod
    def _run(work: list[tuple[torch.Tensor, torch.Tensor]], delay: float) -> None:
        time.sleep(delay)
        for dst, src in work:
            _copy(dst, src)
        work.clear()


class _Credits:
    """Bytes freed since the ledger last looked.

    A finaliser may run on any thread, at any point where a reference is dropped, including
    inside the device's own critical section; so it only appends here (no lock to deadlock on)
    and the device drains the queue under its lock.
    """

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: collections.deque[int] = collections.deque()

    def credit(self, nbytes: int) -> None:
        self._queue.append(nbytes)

    def drain(self) -> int:
        total = 0
        while True:
            try:
                total += self._queue.popleft()
            except IndexError:
                return total


def _host_block(nbytes: int) -> mmap.mmap:
    """``nbytes`` of private anonymous memory: page aligned, zero pages committed on touch."""
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    return mmap.mmap(-1, nbytes)  # pragma: no cover - Windows


class SimulatedGPU:
    """A GPU that lives in host memory and keeps an exact ledger of what it holds.

    ``total_bytes`` is its capacity; ``free_bytes`` (constructor) makes it start busy, as if
    other tenants held ``total_bytes - free_bytes``. Each ``empty()`` charges the ledger and
    raises ``torch.OutOfMemoryError`` (charging nothing) when the request exceeds live free
    memory; the ledger is credited when the tensor's memory is freed — whenever the last view,
    ``nn.Parameter`` or dtype view of its storage goes away, on whatever thread. Only memory
    from ``empty()`` is charged: a tensor made from it by ``.to(dtype)`` or ``.clone()`` is
    ordinary host memory, so code under test must allocate through ``empty()`` as it would on
    a real GPU.

    It takes the engine's CUDA path (probe, allocate, staging ring, copy, recheck) except for
    the copy primitive: ``copy_from_host`` is a host ``copy_``. With ``copy_delay`` (seconds)
    copies run later, in order, on a background thread and the fence is done only then, so a
    staging slot refilled before its fence would corrupt the result as it would on CUDA.
    Conversions (``convert``) run after them on the same thread, so a unit handed out before
    its conversion fence is done holds wrong bytes, as on CUDA. ``context_bytes`` is what its
    context costs, charged like another tenant's memory at the first allocation or at
    ``prepare()``, whichever comes first, as a real GPU's primary context is.
    ``staged=False`` makes the engine read straight into its memory, like the CPU.
    ``prefault=True`` gives it device memory as a GPU's caching allocator does: one arena of
    ``total_bytes`` faulted in at construction (``arena``), each tensor a block carved from it
    (512-byte aligned and charged so; a freed block is reused), so a load measures read, ring
    and copy, not host page faults; it is not host memory to the engine (no huge pages, no
    pre-faulting), and a fragmented arena is out of memory as a full one is.

    Hooks for failure tests: ``on_allocate(nbytes)`` runs before each allocation (outside the
    device's lock: it may ``steal``, or raise to fail the allocation) and
    ``fail_allocations(count, after=n)`` makes allocations from now on raise
    ``torch.OutOfMemoryError``.

    Thread-safe: allocations, frees and ``steal``/``give_back`` may come from any thread.
    """

    def __init__(
        self,
        name: str = "sim:0",
        total_bytes: int = 8 * GiB,
        free_bytes: int | None = None,
        *,
        staged: bool = True,
        copy_delay: float = 0.0,
        on_allocate: Callable[[int], None] | None = None,
        context_bytes: int = 0,
        prefault: bool = False,
    ) -> None:
        if total_bytes < 0:
            raise ValueError(f"total_bytes must be >= 0, got {total_bytes}")
        if free_bytes is not None and not 0 <= free_bytes <= total_bytes:
            raise ValueError(f"free_bytes must be in [0, total_bytes], got {free_bytes}")
        if copy_delay < 0:
            raise ValueError(f"copy_delay must be >= 0, got {copy_delay}")
        if context_bytes < 0:
            raise ValueError(f"context_bytes must be >= 0, got {context_bytes}")
        self._name = name
        self._total = total_bytes
        self._staged = staged
        self.copy_delay = copy_delay
        self.on_allocate = on_allocate
        self._lock = threading.Lock()
        self._credits = _Credits()
        self._allocated = 0
        self._peak = 0
        self._stolen = 0 if free_bytes is None else total_bytes - free_bytes
        self._attempts = 0
        self._allocations = 0
        self._fail_at: set[int] = set()
        self.context_bytes = context_bytes
        self._context = False
        self._copier = _Copier(name)
        self.arena = Arena(total_bytes) if prefault else None

    # -- Device protocol ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def is_gpu(self) -> bool:
        return True

    @property
    def staged(self) -> bool:
        return self._staged

    def total_bytes(self) -> int:
        return self._total

    def prepare(self) -> None:
        """Create the context now (charges ``context_bytes`` the first time)."""
        with self._lock:
            self._create_context()

    def take_notices(self) -> list[str]:
        return []

    def mark_allocated(self) -> None:
        return None

    def current(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def release_cache(self) -> None:
        return None  # freed tensors are credited at once: nothing is cached

    def live_free_bytes(self) -> int:
        """``total - allocated - stolen``: what another allocation could take now."""
        with self._lock:
            self._settle()
            return self._free()

    # Host memory: the engine passes ``huge_pages`` to ``empty`` as for CPU tensors.
    host_memory = property(lambda self: self.arena is None, doc="Host memory (no arena).")
    # By object identity: two ``SimulatedGPU("sim:0")`` objects are two devices.
    ledger_key = property(lambda self: f"{self._name}@{id(self):x}", doc="Its ledger key.")

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, huge_pages: bool = False
    ) -> torch.Tensor:
        """A new tensor of ``shape`` and ``dtype`` charged to this device (contents undefined;
        zeros in practice). ``huge_pages``: a block of 2 MiB or more is 2 MiB aligned and in
        transparent huge pages (``_hostmem.huge_mapping``)."""
        if any(size < 0 for size in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        charge = nbytes if self.arena is None else arena_bytes(nbytes)
        with self._lock:
            self._attempts += 1
            injected = self._attempts in self._fail_at
            self._fail_at.discard(self._attempts)
        if self.on_allocate is not None:
            self.on_allocate(nbytes)
        if injected:
            raise self._oom(nbytes, "injected by fail_allocations()")
        charged = 0
        with self._lock:
            self._create_context()
            self._settle()
            fits = charge <= self._free()
            if fits:
                self._allocated += charge
                charged = self._allocated
        if not fits:
            raise self._oom(nbytes, "exceeds live free memory")
        try:
            tensor = _materialise(self._credits, shape, dtype, charge, huge_pages, self.arena)
        except BaseException:
            self._credits.credit(charge)
            raise
        if tensor is None:
            self._credits.credit(charge)
            raise self._oom(nbytes, "no free block that long in the arena")
        with self._lock:
            self._peak = max(self._peak, charged)
            self._allocations += 1
        return tensor

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A plain host ``uint8`` buffer (not charged to this device)."""
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        """``dst.copy_(src)``, now, or after ``copy_delay`` seconds on the copy thread."""
        return self.convert([(dst, src)])

    def convert(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Fence:
        """Each ``dst.copy_(src)``, now, or after ``copy_delay`` on the copy thread (after the
        copies started before)."""
        if self.copy_delay == 0:
            for dst, src in pairs:
                _copy(dst, src)
            return DONE
        return self._copier.submit(list(pairs), self.copy_delay)

    def receive(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        _copy(dst, src)  # now: another device's placed tensors are complete
        return DONE

    def synchronize(self) -> None:
        self._copier.synchronize()

    # -- simulation --------------------------------------------------------------------------

    @property
    def free_bytes(self) -> int:
        """Live free bytes (the same as ``live_free_bytes()``)."""
        return self.live_free_bytes()

    @property
    def allocated_bytes(self) -> int:
        """Bytes of tensors from ``empty()`` that are still alive."""
        with self._lock:
            self._settle()
            return self._allocated

    @property
    def peak_allocated_bytes(self) -> int:
        """The most ``allocated_bytes`` has been since construction or ``reset_peak()``."""
        with self._lock:
            return self._peak

    @property
    def stolen_bytes(self) -> int:
        """Bytes other tenants hold (``steal`` minus ``give_back``, plus the initial busy)."""
        with self._lock:
            return self._stolen

    @property
    def allocation_count(self) -> int:
        """Successful ``empty()`` calls so far."""
        with self._lock:
            return self._allocations

    def steal(self, nbytes: int) -> None:
        """Another tenant takes ``nbytes`` now: live free drops, nothing here is freed.

        ``ValueError`` if fewer than ``nbytes`` are free (that tenant would be out of memory).
        """
        if nbytes < 0:
            raise ValueError(f"cannot steal a negative number of bytes ({nbytes})")
        with self._lock:
            self._settle()
            if nbytes > self._free():
                free = format_bytes(self._free())
                raise ValueError(f"{self._name}: cannot steal {format_bytes(nbytes)}, {free} free")
            self._stolen += nbytes

    def give_back(self, nbytes: int) -> None:
        """The other tenant frees ``nbytes``; ``ValueError`` if it holds fewer."""
        if nbytes < 0:
            raise ValueError(f"cannot give back a negative number of bytes ({nbytes})")
        with self._lock:
            if nbytes > self._stolen:
                held = format_bytes(self._stolen)
                raise ValueError(f"{self._name}: other tenants hold {held}, not {nbytes} bytes")
            self._stolen -= nbytes

    def fail_allocations(self, count: int = 1, *, after: int = 0) -> None:
        """Make ``count`` ``empty()`` calls raise ``torch.OutOfMemoryError``, starting with the
        one after the next ``after`` (``fail_allocations(1)``: the next call; ``after=n - 1``:
        the n-th call from now). Stacks with earlier requests; each failure fires once."""
        if count < 0 or after < 0:
            raise ValueError(f"count and after must be >= 0, got {count}, {after}")
        with self._lock:
            first = self._attempts + after + 1
            self._fail_at.update(range(first, first + count))

    def reset_peak(self) -> None:
        """Start ``peak_allocated_bytes`` again from the bytes allocated now."""
        with self._lock:
            self._settle()
            self._peak = self._allocated

    def __repr__(self) -> str:
        with self._lock:
            self._settle()
            allocated, stolen = self._allocated, self._stolen
        return (
            f"SimulatedGPU({self._name!r}, total={format_bytes(self._total)}, "
            f"allocated={format_bytes(allocated)}, stolen={format_bytes(stolen)})"
        )

    # -- internals ---------------------------------------------------------------------------

    def _create_context(self) -> None:
        """Charge the context the first time (call with the lock held)."""
        if not self._context:
            self._context = True
            self._stolen += min(self.context_bytes, self._free())

    def _settle(self) -> None:
        """Apply pending credits (call with the lock held)."""
        self._allocated -= self._credits.drain()

    def _free(self) -> int:
        return self._total - self._allocated - self._stolen

    def _oom(self, nbytes: int, why: str) -> torch.OutOfMemoryError:
        """The error a real allocator would raise (call without the lock held)."""
        import torch

        with self._lock:
            self._settle()
            free, allocated, stolen = self._free(), self._allocated, self._stolen
        return torch.OutOfMemoryError(
            f"{self._name} (simulated) out of memory: tried to allocate {format_bytes(nbytes)} "
            f"({why}); {format_bytes(free)} free of {format_bytes(self._total)}, "
            f"{format_bytes(allocated)} allocated here, {format_bytes(stolen)} held by others"
        )


def _materialise(
    credits: _Credits,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    nbytes: int,
    huge_pages: bool,
    arena: Arena | None = None,
) -> torch.Tensor | None:
    """A tensor over fresh host memory (or a block of ``arena``; ``None`` when none is free)
    whose release credits ``nbytes`` to ``credits`` (and gives the block back).

    The memory map is the only owner of the bytes; ``torch.frombuffer`` keeps it alive for
    exactly as long as the tensor storage (every view, Parameter or dtype view of it), and
    ``weakref.finalize`` credits the ledger when it dies.
    """
    import torch

    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if arena is not None:
        start = arena.carve(nbytes)
        if start is None:
            return None

        def freed(start: int = start) -> None:
            arena.free(start, nbytes)
            credits.credit(nbytes)

        return arena.tensor(start, shape, dtype, math.prod(shape) * dtype.itemsize, freed)
    offset = 0
    if huge_pages and nbytes >= _hostmem.HUGE_PAGE and hasattr(mmap, "MAP_ANONYMOUS"):
        block, offset = _hostmem.huge_mapping(nbytes)
    else:
        block = _host_block(nbytes)
    weakref.finalize(block, credits.credit, nbytes).atexit = False
    flat = torch.frombuffer(block, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)
