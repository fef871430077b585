"""CUDA GPUs: live free memory (NVML, else ``cudaMemGetInfo``), pinned staging, side-stream
copies marked by events."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pynvml
import torch

from streamload.devices._nvml import Nvml, default_nvml, nvml_uuid_from_torch, resolve_nvml_handle
from streamload.devices._protocol import Fence
from streamload.devices._runtime import CudaEvent, CudaRuntime, CudaStream, TorchCuda
from streamload.errors import DeviceError


@dataclass(frozen=True, slots=True)
class CudaFence:
    """Work enqueued on a device's copy stream (copies, conversions), marked by ``event``.

    ``event`` is created ``blocking=True``: a thread in ``wait()`` (``event.synchronize()``)
    sleeps instead of spinning a CPU (``cudaEventBlockingSync``; torch's default is
    ``blocking=False``). The engine polls ``done()`` (``event.query()``, which never blocks)
    from worker threads instead, checking for cancellation between polls: a thread inside
    ``synchronize()`` on a hung GPU could not be abandoned. Once either says the work finished,
    its destinations hold the data for work on *any* stream and the staging source may be
    refilled.
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

    Every call that concerns the device runs inside ``device(N)`` (``torch.cuda.device``): the
    current device is per host thread and 0 in a fresh worker thread, and leaving a stream
    context for device ``N`` there would set device 0, which creates a context on GPU 0. The
    guard's exit restores the thread's device without creating one.

    Allocation is ``torch.empty`` on the device. ``mark_allocated`` records an event on the
    allocating thread's current stream after a unit's allocations and makes the copy stream
    wait for it, once per unit: the caching allocator may hand out a block whose previous
    tenant's work is still queued on that stream. Staging buffers are pinned host memory; each
    ``copy_from_host`` is a ``non_blocking`` copy on this device's own copy stream, marking
    ``dst`` as used by that stream (``record_stream``) so freeing it early cannot hand its
    memory to another tensor while the copy runs. Conversions run on the copy stream too, after
    the copies (stream order), and their fence says when they finished.

    ``prepare`` creates the device's primary context before its memory is read for a plan: the
    first allocation would otherwise create it (hundreds of MB) and make the device seem to
    under-deliver. Live free memory comes from NVML; when an NVML call fails for this device
    (no permission, an unknown error, a GPU lost), from ``cudaMemGetInfo`` from then on, with a
    notice (``take_notices``). ``release_cache`` returns what torch's caching allocator and its
    pinned-host cache hold unused to the driver.

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
        self._nvml_failed = False
        self._notices: list[str] = []
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

    def prepare(self) -> None:
        """Create the primary context now (the first allocation creates it otherwise)."""
        rt = self._rt
        if rt.has_primary_context(self._ordinal):
            return
        with rt.device(self._ordinal):
            rt.empty((1,), torch.uint8, self._ordinal)

    def live_free_bytes(self) -> int:
        """NVML free (else ``mem_get_info`` free) + torch-reserved-but-unallocated bytes."""
        rt = self._rt
        cached = rt.memory_reserved(self._ordinal) - rt.memory_allocated(self._ordinal)
        driver_free = self._nvml_free()
        if driver_free is None:
            try:
                with rt.device(self._ordinal):
                    driver_free, _ = rt.mem_get_info(self._ordinal)
            except RuntimeError as exc:
                raise DeviceError(self.name, f"cudaMemGetInfo failed: {exc}") from exc
        return int(driver_free) + max(int(cached), 0)

    def take_notices(self) -> list[str]:
        with self._lock:
            notices, self._notices = self._notices, []
        return notices

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, huge_pages: bool = False
    ) -> torch.Tensor:
        """``torch.empty`` on the GPU (``huge_pages`` concerns host pages: not asked here)."""
        with self._rt.device(self._ordinal):
            return self._rt.empty(shape, dtype, self._ordinal)

    def mark_allocated(self) -> None:
        rt = self._rt
        stream = self._copy_stream()
        event = rt.new_event(blocking=True)
        with rt.device(self._ordinal):
            event.record(rt.current_stream(self._ordinal))
            stream.wait_event(event)

    def current(self) -> AbstractContextManager[None]:
        return self._rt.device(self._ordinal)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return self._rt.pinned_empty(nbytes)

    def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        rt = self._rt
        stream = self._copy_stream()
        event = rt.new_event(blocking=True)
        with rt.device(self._ordinal), rt.stream(stream):
            rt.copy(dst, src, non_blocking=True)
            event.record(stream)
            rt.record_stream(dst, stream)
        return CudaFence(event)

    def convert(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Fence:
        rt = self._rt
        stream = self._copy_stream()
        event = rt.new_event(blocking=True)
        with rt.device(self._ordinal), rt.stream(stream):
            for dst, src in pairs:
                rt.copy(dst, src, non_blocking=True)
            event.record(stream)
        return CudaFence(event)

    def receive(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        """A peer (or host) copy of a complete ``src`` into ``dst`` on this device's copy
        stream, ordered after the work queued where ``dst`` was allocated (an event recorded
        there, as ``mark_allocated`` does), under this device's guard."""
        rt = self._rt
        stream = self._copy_stream()
        allocated = rt.new_event(blocking=True)
        done = rt.new_event(blocking=True)
        with rt.device(self._ordinal):
            allocated.record(rt.current_stream(self._ordinal))
            stream.wait_event(allocated)
            with rt.stream(stream):
                rt.copy(dst, src, non_blocking=True)
                done.record(stream)
                rt.record_stream(dst, stream)
        return CudaFence(done)

    def synchronize(self) -> None:
        with self._lock:
            stream = self._stream
        if stream is not None:
            with self._rt.device(self._ordinal):
                stream.synchronize()

    def release_cache(self) -> None:
        """``torch.cuda.empty_cache()`` and the pinned-host cache's ``_host_emptyCache()``;
        no-ops for memory still in use (the caller's tensors, copies in flight)."""
        rt = self._rt
        if not rt.has_primary_context(self._ordinal):
            return  # nothing was allocated here; do not create a context to empty nothing
        with rt.device(self._ordinal):
            rt.empty_cache()
        rt.host_empty_cache()

    def _copy_stream(self) -> CudaStream:
        with self._lock:
            if self._stream is None:
                with self._rt.device(self._ordinal):
                    self._stream = self._rt.new_stream(self._ordinal)
            return self._stream

    def _nvml_free(self) -> int | None:
        """NVML's free bytes, or ``None`` when NVML cannot say: absent, unmatched, or failed
        for this device (once failed, not asked again: a GPU lost to NVML stays lost)."""
        if self._nvml_failed:
            return None
        try:
            handle = self._nvml_handle()
            if handle is None:
                return None
            return self._nvml.memory(handle, device=self.name).free
        except DeviceError as exc:
            if not isinstance(exc.__cause__, pynvml.NVMLError):
                raise
            with self._lock:
                self._nvml_failed = True
                self._notices.append(f"{exc}; reading cudaMemGetInfo instead")
            return None

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
