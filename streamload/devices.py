"""Devices: discovery, live free memory, allocation and the host->device copy primitive.

Everything the engine does to a device goes through the ``Device`` protocol, so CUDA GPUs, the
CPU and ``streamload.testing.SimulatedGPU`` share one engine path. CUDA specifics (NVML UUID
mapping, ``CUDA_VISIBLE_DEVICES``, pinned buffers, side-stream copies) are kept thin here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = [
    "CpuDevice",
    "CudaDevice",
    "Device",
    "Fence",
    "ReservationBook",
    "host_available_bytes",
    "resolve_devices",
]


@runtime_checkable
class Fence(Protocol):
    """Completion of one host->device copy; the staging slot it read from is reusable after."""

    def done(self) -> bool: ...

    def wait(self) -> None:
        """Block until the copy finished (call from a worker thread, never the event loop)."""


@runtime_checkable
class Device(Protocol):
    """A place tensors can live.

    ``staged`` devices receive data through the host staging ring (``host_buffer`` +
    ``copy_from_host``); unstaged ones (the CPU) are read into directly.
    """

    @property
    def name(self) -> str: ...

    @property
    def is_gpu(self) -> bool: ...

    @property
    def staged(self) -> bool: ...

    def total_bytes(self) -> int: ...

    def live_free_bytes(self) -> int:
        """Bytes this process could allocate now (GPU: NVML free + own reusable cache)."""

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new uninitialised tensor on this device; ``torch.OutOfMemoryError`` if it
        does not fit."""

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A reusable ``uint8`` host staging buffer for this device (pinned on CUDA)."""

    def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        """Start copying ``src`` (host ``uint8``) into ``dst`` (``uint8`` view of device memory).

        ``src`` must stay unmodified until the returned fence is done.
        """

    def synchronize(self) -> None:
        """Wait for every copy this device started."""


DeviceSpec = Literal["auto"] | Sequence["str | Device"]
