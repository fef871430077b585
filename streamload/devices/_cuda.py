"""CUDA GPUs: live free memory (NVML, else ``cudaMemGetInfo``), pinned staging, side-stream
copies marked by events."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamload.devices._nvml import Nvml, default_nvml, nvml_uuid_from_torch, resolve_nvml_handle
from streamload.devices._protocol import DONE, Fence
from streamload.devices._runtime import CudaEvent, CudaRuntime, CudaStream, TorchCuda
from streamload.errors import DeviceError


@dataclass(frozen=True, slots=True)
class CudaFence:
    """An H2D copy enqueued on a device's copy stream, marked by ``event``.

    ``wait()`` blocks the calling thread until the copy has finished (``event.synchronize()``);
    ``done()`` asks without blocking (``event.query()``). Once either says the copy finished,
    ``dst`` holds the data for work on *any* stream and the staging source may be refilled.
    Work that must be ordered after the copy without waiting on the host first has to make its
    stream wait for the event itself: ``torch.cuda.current_stream(dev).wait_event(fence.event)``.
    ``wait()`` does not do that: it runs in a worker thread, whose current stream need not be
    the consumer's.
    """

    event: CudaEvent

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> None:
        self.event.synchronize()


# --------------------------------------------------------------------------------------------
# CUDA


_UNRESOLVED: Any = object()


class CudaDevice:
    """CUDA GPU ``cuda:N`` (torch ordinal ``N``).

    Allocation is ``torch.empty`` on the device. Staging buffers are pinned host memory; each
    ``copy_from_host`` is a ``non_blocking`` copy on this device's own copy stream, which first
    waits for the work already queued on the calling thread's current stream (``dst`` may
    reuse memory that work still touches), and marks ``dst`` as used by the copy stream
    (``record_stream``) so freeing it early cannot hand its memory to another tensor while the
    copy runs. The returned ``CudaFence`` says when the copy finished.

    Construction creates no CUDA context: it reads ``get_device_properties``. ``runtime`` is
    the CUDA runtime every call goes through (``TorchCuda``, the real one, by default;
    ``streamload.testing.FakeCuda`` in tests).
    """

    def __init__(
        self, ordinal: int, *, nvml: Nvml | None = None, runtime: CudaRuntime | None = None
    ) -> None:
        rt: CudaRuntime = TorchCuda() if runtime is None else runtime
        count = rt.device_count() if rt.is_available() else 0
        if not 0 <= ordinal < count:
            raise DeviceError(f"cuda:{ordinal}", f"not visible ({count} CUDA devices)")
        self._rt = rt
        self._ordinal = ordinal
        self._props = rt.get_device_properties(ordinal)
        self._nvml = default_nvml() if nvml is None else nvml
        self._lock = threading.Lock()
        self._handle: Any = _UNRESOLVED
        self._stream: CudaStream | None = None

    @property
    def name(self) -> str:
        return f"cuda:{self._ordinal}"

    @property
    def host_memory(self) -> bool:
        return False

    @property
    def ledger_key(self) -> str:
        return self.name  # ``cuda:N`` is one physical device for the whole process

    @property
    def is_gpu(self) -> bool:
        return True

    @property
    def staged(self) -> bool:
        return True

    def total_bytes(self) -> int:
        return int(self._props.total_memory)

    def live_free_bytes(self) -> int:
        """NVML free (else ``mem_get_info`` free) + torch-reserved-but-unallocated bytes."""
        rt = self._rt
        cached = rt.memory_reserved(self._ordinal) - rt.memory_allocated(self._ordinal)
        handle = self._nvml_handle()
        if handle is None:
            try:
                driver_free, _ = rt.mem_get_info(self._ordinal)
            except RuntimeError as exc:
                raise DeviceError(self.name, f"cudaMemGetInfo failed: {exc}") from exc
        else:
            driver_free = self._nvml.memory(handle, device=self.name).free
        return int(driver_free) + max(int(cached), 0)

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, huge_pages: bool = False
    ) -> torch.Tensor:
        """``torch.empty`` on the GPU (``huge_pages`` concerns host pages: not asked here)."""
        return self._rt.empty(shape, dtype, self._ordinal)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return self._rt.pinned_empty(nbytes)

    def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        rt = self._rt
        stream = self._copy_stream()
        stream.wait_stream(rt.current_stream(self._ordinal))
        event = rt.new_event(blocking=False)
        with rt.stream(stream):
            rt.copy(dst, src, non_blocking=True)
            event.record(stream)
        rt.record_stream(dst, stream)
        return CudaFence(event)

    def convert(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Fence:
        for dst, src in pairs:
            self._rt.copy(dst, src, non_blocking=False)
        return DONE

    def synchronize(self) -> None:
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.synchronize()

    def _copy_stream(self) -> CudaStream:
        with self._lock:
            if self._stream is None:
                self._stream = self._rt.new_stream(self._ordinal)
            return self._stream

    def _nvml_handle(self) -> Any | None:
        with self._lock:
            if self._handle is _UNRESOLVED:
                self._handle = resolve_nvml_handle(
                    self._nvml,
                    self._ordinal,
                    torch_uuid=nvml_uuid_from_torch(getattr(self._props, "uuid", None)),
                    visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                    device_order=os.environ.get("CUDA_DEVICE_ORDER"),
                )
            return self._handle

    def __repr__(self) -> str:
        return f"CudaDevice({self._ordinal})"
