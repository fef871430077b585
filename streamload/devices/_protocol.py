"""The seam: what the engine asks of a device (``Device``) and of a copy (``Fence``)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Fence(Protocol):
    """Completion of one host->device copy; the staging slot it read from is reusable after."""

    def done(self) -> bool: ...

    def wait(self) -> None:
        """Block until the copy finished (call from a worker thread, never the event loop)."""


@runtime_checkable
class Device(Protocol):
    """A place tensors can live: everything the engine asks of a device, and nothing more.

    ``staged`` devices receive data through the host staging ring (``host_buffer`` +
    ``copy_from_host``); unstaged ones are read into directly. ``host_memory`` devices hold
    their tensors in this process's host memory, so host page rules apply to them
    (``LoadParams.huge_pages``, pre-faulting before a read). A host-memory device that is not a
    GPU is the host itself: the engine lays a unit's tensors out in one mapping of its own there
    (``streamload._hostmem.HostBlock``) instead of calling ``empty`` per tensor, as nothing
    charges the host per tensor.
    """

    @property
    def name(self) -> str: ...

    @property
    def is_gpu(self) -> bool: ...

    @property
    def staged(self) -> bool: ...

    @property
    def host_memory(self) -> bool: ...

    @property
    def ledger_key(self) -> str:
        """The key this device's bytes are reserved under in the process-wide ledger: equal
        for two objects that stand for the same memory, different otherwise."""

    def total_bytes(self) -> int: ...

    def prepare(self) -> None:
        """Make what using the device costs by itself exist before its memory is read for a
        plan (CUDA: the primary context, which takes device memory at the first allocation
        otherwise); blocking, idempotent."""

    def live_free_bytes(self) -> int:
        """Bytes this process could allocate now (GPU: NVML free + own reusable cache)."""

    def take_notices(self) -> list[str]:
        """What the device had to fall back on since the last call (e.g. its free memory read
        another way because NVML failed), each once; the engine reports them as events."""

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, huge_pages: bool = False
    ) -> torch.Tensor:
        """A new uninitialised tensor on this device; ``torch.OutOfMemoryError`` if it
        does not fit. ``huge_pages``: the tensor's whole 2 MiB stretches in transparent huge
        pages (``streamload._hostmem.huge_mapping``); only ``host_memory`` devices are asked."""

    def mark_allocated(self) -> None:
        """Called in the allocating thread once a unit's tensors are allocated: copies and
        conversions started from now on are ordered after the work queued where they were
        allocated (a GPU's allocator may reuse memory that work still touches)."""

    def current(self) -> AbstractContextManager[None]:
        """Make this device the calling thread's current device for the duration (CUDA:
        ``torch.cuda.device``; code that stages on "the current device", such as NCCL object
        collectives, lands on GPU 0 in a fresh thread otherwise); a no-op for other devices."""

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A reusable ``uint8`` host staging buffer for this device (pinned on CUDA)."""

    def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        """Start copying ``src`` (host ``uint8``) into ``dst`` (``uint8`` view of device memory).

        ``src`` must stay unmodified until the returned fence is done. Copies one device started
        complete in the order they were started, so a done fence implies every earlier copy to
        that device is done too. ``dst`` may be used once the fence is done or waited.
        """

    def receive(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        """Start copying ``src`` (a tensor on another device, complete) into ``dst`` (a tensor
        of the same shape and dtype from this device's ``empty``); ``dst`` may be used once
        the fence is done or waited. Used to move placed layers when a device spills."""

    def convert(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Fence:
        """Start converting each ``(dst, src)``: ``src`` (this device's raw buffer in the stored
        dtype, its copies started) into ``dst`` (on this device, the target dtype), ordered
        after every copy this device started. ``dst`` holds the result once the returned fence
        is done; until then it may hold anything (a GPU queues the work)."""

    def synchronize(self) -> None:
        """Wait for every copy this device started."""

    def release_cache(self) -> None:
        """Return memory this process's allocators cache for this device but do not use to
        the system (CUDA: the caching allocator's free blocks and the pinned-host cache), so
        other processes can have it; memory still referenced stays. Blocking."""


DeviceSpec = Literal["auto"] | Sequence["str | Device"]


# --------------------------------------------------------------------------------------------
# Fences


class DoneFence:
    """The fence of a copy that finished before ``copy_from_host`` returned."""

    __slots__ = ()

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def __repr__(self) -> str:
        return "DONE"


DONE = DoneFence()
"""The one ``DoneFence``: returned by devices whose copy primitive is synchronous."""
