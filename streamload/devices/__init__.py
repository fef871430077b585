"""Devices: discovery, live free memory, allocation and the host->device copy primitive.

Everything the engine does to a device goes through the ``Device`` protocol, so CUDA GPUs, the
CPU and ``streamload.testing.SimulatedGPU`` share one engine path. CUDA specifics (NVML UUID
mapping, ``CUDA_VISIBLE_DEVICES``, pinned buffers, side-stream copies) are kept thin here.

Live free memory of a CUDA GPU is NVML's free bytes for that GPU plus what this process's torch
caching allocator holds but does not use (``memory_reserved - memory_allocated``): NVML counts
that cache as used, yet this process can allocate into it. NVML needs no CUDA context;
``torch.cuda.mem_get_info`` (the fallback when NVML is missing or the GPU cannot be matched to an
NVML device) creates one on the device it asks about.

Torch ordinals and NVML indices are different numberings (CUDA orders ``FASTEST_FIRST`` by
default and honours ``CUDA_VISIBLE_DEVICES``; NVML ignores both), so a GPU is matched to its NVML
handle by UUID: ``torch.cuda.get_device_properties(i).uuid``, else the ``CUDA_VISIBLE_DEVICES``
entries (``parse_cuda_visible_devices``) where they determine the mapping.

Every ``pynvml.NVMLError`` becomes a ``DeviceError`` naming the device (``raise ... from exc``);
a missing NVML library or driver means "no NVML", never an error.

Modules: ``_protocol`` (``Device``, ``Fence``: the whole contract the engine relies on),
``_host`` (host memory readings, ``CpuDevice``), ``_nvml`` (NVML and the ordinal -> handle
mapping), ``_runtime`` (``CudaRuntime``: the seam where ``CudaDevice`` calls ``torch.cuda``, and
``TorchCuda``, the real one), ``_cuda`` (``CudaDevice``), ``_discovery`` (``resolve_devices``,
``capacities``).
Process-wide state (the NVML wrapper, the cgroup directories) lives in ``streamload._state``.
"""

from typing import TYPE_CHECKING, Any

from streamload.devices._discovery import capacities, resolve_devices
from streamload.devices._host import CpuDevice, host_available_bytes, host_total_bytes
from streamload.devices._nvml import (
    Nvml,
    NvmlApi,
    NvmlMemory,
    VisibleGpu,
    default_nvml,
    nvml_uuid_from_torch,
    parse_cuda_visible_devices,
    resolve_nvml_handle,
)
from streamload.devices._protocol import DONE, Device, DeviceSpec, DoneFence, Fence

if TYPE_CHECKING:
    from streamload.devices._cuda import CudaDevice, CudaFence
    from streamload.devices._runtime import CudaEvent, CudaRuntime, CudaStream, TorchCuda

__all__ = [
    "DONE",
    "CpuDevice",
    "CudaDevice",
    "CudaEvent",
    "CudaFence",
    "CudaRuntime",
    "CudaStream",
    "Device",
    "DeviceSpec",
    "DoneFence",
    "Fence",
    "Nvml",
    "NvmlApi",
    "NvmlMemory",
    "TorchCuda",
    "VisibleGpu",
    "capacities",
    "default_nvml",
    "host_available_bytes",
    "host_total_bytes",
    "nvml_uuid_from_torch",
    "parse_cuda_visible_devices",
    "resolve_devices",
    "resolve_nvml_handle",
]


def __getattr__(name: str) -> Any:
    # The CUDA device and its runtime import torch; they are imported when first named, so
    # that planning over the CPU and simulated GPUs (``streamload plan``) never imports torch.
    if name in ("CudaDevice", "CudaFence"):
        from streamload.devices import _cuda

        return getattr(_cuda, name)
    if name in ("CudaEvent", "CudaRuntime", "CudaStream", "TorchCuda"):
        from streamload.devices import _runtime

        return getattr(_runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
