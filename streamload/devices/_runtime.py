"""The CUDA runtime as ``CudaDevice`` uses it: one seam, passed in (as httpx takes a transport).

``TorchCuda`` is the real implementation: each method is one call into ``torch.cuda`` (or the
tensor method it names), nothing more, so the logic around those calls lives in
``CudaDevice`` and runs unchanged against ``streamload.testing.FakeCuda``, a recording fake
that enforces the semantics the methods below document.

Semantics that matter (torch's, which ``FakeCuda`` keeps):

- the current device is per host thread and starts at 0 in every new thread;
- ``device(i)`` makes ``i`` current (``torch.cuda.device``: ``cudaSetDevice``, which creates
  ``i``'s primary context under CUDA 12) and restores the previous device on exit without
  creating a context there (``MaybeExchangeDevice``);
- ``stream(s)`` makes ``s`` current for its device (``torch.cuda.stream``); on exit it restores
  the previous current stream of the *calling thread's current device*, and setting a stream
  of another device sets that device (``cudaSetDevice``): leaving ``stream(s)`` for device 1 in a
  thread whose current device is 0 creates a context on GPU 0 unless ``device(1)`` is entered
  around it;
- copies and conversions are queued on the current stream of the destination's device and are
  complete only once that stream is synchronised or an event recorded after them completes;
- events are ``torch.cuda.Event(blocking=...)``: ``blocking=False`` (torch's default) makes
  ``synchronize()`` spin a CPU; ``query()`` never blocks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

__all__ = ["CudaEvent", "CudaRuntime", "CudaStream", "TorchCuda"]


class CudaStream(Protocol):
    """``torch.cuda.Stream``: the calls streamload makes on one."""

    def wait_event(self, event: Any) -> None: ...

    def wait_stream(self, stream: Any) -> None: ...

    def synchronize(self) -> None: ...


class CudaEvent(Protocol):
    """``torch.cuda.Event``: the calls streamload makes on one."""

    def record(self, stream: Any = None) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class CudaRuntime(Protocol):
    """What ``CudaDevice`` calls; ``ordinal`` is a torch CUDA device index."""

    def is_available(self) -> bool: ...

    def device_count(self) -> int: ...

    def get_device_properties(self, ordinal: int) -> Any:
        """Has ``total_memory`` and (torch >= 2.5) ``uuid``; creates no context."""

    def has_primary_context(self, ordinal: int) -> bool:
        """Whether the device's primary context exists (``torch._C._cuda_hasPrimaryContext``)."""

    def mem_get_info(self, ordinal: int) -> tuple[int, int]:
        """``(free, total)`` from ``cudaMemGetInfo``; creates a context on ``ordinal``."""

    def memory_reserved(self, ordinal: int) -> int: ...

    def memory_allocated(self, ordinal: int) -> int: ...

    def empty_cache(self) -> None:
        """Return the caching allocator's unoccupied blocks to the driver."""

    def host_empty_cache(self) -> None:
        """Return the pinned-host cache's unused blocks (``torch._C._host_emptyCache``)."""

    def device(self, ordinal: int) -> AbstractContextManager[None]: ...

    def stream(self, stream: Any) -> AbstractContextManager[None]: ...

    def new_stream(self, ordinal: int) -> CudaStream: ...

    def new_event(self, *, blocking: bool) -> CudaEvent: ...

    def current_stream(self, ordinal: int) -> CudaStream: ...

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, ordinal: int) -> torch.Tensor: ...

    def pinned_empty(self, nbytes: int) -> torch.Tensor: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, non_blocking: bool) -> None:
        """``dst.copy_(src, non_blocking=...)``, queued on the current stream of dst's device."""

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...


class TorchCuda:
    """The real CUDA runtime: ``torch.cuda``, one call per method."""

    __slots__ = ()

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def get_device_properties(self, ordinal: int) -> Any:
        return torch.cuda.get_device_properties(ordinal)

    def has_primary_context(self, ordinal: int) -> bool:
        return bool(torch._C._cuda_hasPrimaryContext(ordinal))  # type: ignore[attr-defined]

    def mem_get_info(self, ordinal: int) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(ordinal)
        return int(free), int(total)

    def memory_reserved(self, ordinal: int) -> int:
        return torch.cuda.memory_reserved(ordinal)

    def memory_allocated(self, ordinal: int) -> int:
        return torch.cuda.memory_allocated(ordinal)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def host_empty_cache(self) -> None:
        torch._C._host_emptyCache()

    def device(self, ordinal: int) -> AbstractContextManager[None]:
        return torch.cuda.device(ordinal)

    def stream(self, stream: Any) -> AbstractContextManager[None]:
        return torch.cuda.stream(stream)

    def new_stream(self, ordinal: int) -> CudaStream:
        return torch.cuda.Stream(device=ordinal)  # type: ignore[no-untyped-call]

    def new_event(self, *, blocking: bool) -> CudaEvent:
        return torch.cuda.Event(blocking=blocking)  # type: ignore[no-untyped-call]

    def current_stream(self, ordinal: int) -> CudaStream:
        return torch.cuda.current_stream(ordinal)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, ordinal: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=torch.device("cuda", ordinal))

    def pinned_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, non_blocking: bool) -> None:
        dst.copy_(src, non_blocking=non_blocking)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)
