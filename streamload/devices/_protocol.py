"""The seam: what the engine asks of a device (``Device``) and of a copy (``Fence``)."""

from __future__ import annotations

from collections.abc import Sequence
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

    def live_free_bytes(self) -> int:
        """Bytes this process could allocate now (GPU: NVML free + own reusable cache)."""

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, huge_pages: bool = False
    ) -> torch.Tensor:
        """A new uninitialised tensor on this device; ``torch.OutOfMemoryError`` if it
        does not fit. ``huge_pages``: the tensor's whole 2 MiB stretches in transparent huge
        pages (``streamload._hostmem.huge_mapping``); only ``host_memory`` devices are asked."""

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A reusable ``uint8`` host staging buffer for this device (pinned on CUDA)."""

    def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        """Start copying ``src`` (host ``uint8``) into ``dst`` (``uint8`` view of device memory).

        ``src`` must stay unmodified until the returned fence is done. Copies one device started
        complete in the order they were started, so a done fence implies every earlier copy to
        that device is done too. ``dst`` may be used once the fence is done or waited.
        """

    def synchronize(self) -> None:
        """Wait for every copy this device started."""


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
