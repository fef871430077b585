"""From ``LoadParams.devices`` to ``Device`` objects, and their live capacities for the planner."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from streamload._state import STATE
from streamload.devices._cuda import CudaDevice
from streamload.devices._host import CpuDevice
from streamload.devices._nvml import Nvml
from streamload.devices._protocol import Device, DeviceSpec
from streamload.errors import DeviceError
from streamload.planner import DeviceCapacity

# --------------------------------------------------------------------------------------------
# Discovery and capacities


_CUDA_NAME = re.compile(r"cuda:(\d+)")


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _from_name(name: str, nvml: Nvml | None) -> Device:
    if name == "cpu":
        return CpuDevice()
    match = _CUDA_NAME.fullmatch(name)
    if match is None:
        raise DeviceError(name, "unknown device; expected 'cpu', 'cuda:N' or a Device object")
    ordinal = int(match.group(1))
    count = _cuda_count()
    if ordinal >= count:
        raise DeviceError(name, f"not visible: this process sees {count} CUDA devices")
    return CudaDevice(ordinal, nvml=nvml)


def _validate(devices: list[Device]) -> list[Device]:
    if not devices:
        raise DeviceError("devices", "no devices given")
    seen: set[str] = set()
    for position, device in enumerate(devices):
        if device.name in seen:
            raise DeviceError(device.name, "listed more than once")
        seen.add(device.name)
        if not device.is_gpu and position != len(devices) - 1:
            raise DeviceError(device.name, "a non-GPU device must come last (layers spill to it)")
    return devices


def resolve_devices(spec: DeviceSpec, *, nvml: Nvml | None = None) -> list[Device]:
    """Turn ``LoadParams.devices`` into ``Device`` objects, in fill order.

    ``"auto"``: every CUDA GPU torch can see, in torch ordinal order, then the CPU (only the
    CPU where CUDA or its driver is absent). A sequence: ``"cpu"``, ``"cuda:N"`` and objects
    implementing ``Device`` (passed through). ``DeviceError`` for an unknown string, a CUDA
    ordinal torch cannot see, a repeated name, or a non-GPU device that is not last.
    ``nvml`` replaces the process's NVML for the CUDA devices made here.
    """
    if isinstance(spec, str):
        if spec != "auto":
            raise DeviceError(spec, "unknown device spec; expected 'auto' or a list of devices")
        gpus: list[Device] = [CudaDevice(i, nvml=nvml) for i in range(_cuda_count())]
        return _validate([*gpus, CpuDevice()])
    devices: list[Device] = []
    for item in spec:
        if isinstance(item, str):
            devices.append(_from_name(item, nvml))
        elif isinstance(item, Device):
            devices.append(item)
        else:
            raise DeviceError(repr(item), "not a device name or a Device object")
    return _validate(devices)


def capacities(
    devices: Sequence[Device],
    *,
    owner: object = None,
    caps: Mapping[str, int] | None = None,
    used: Mapping[str, int] | None = None,
) -> list[DeviceCapacity]:
    """Live capacities of ``devices`` as the planner takes them (blocking: probes devices).

    Bytes other loads in this process hold on a device (every owner's but ``owner``'s, in
    ``STATE.reservations``) are subtracted from its free bytes. ``caps`` (``LoadParams.
    max_memory``) bound a device's free bytes to its cap less what the load already ``used``
    there; a cap for a device not in ``devices`` is a ``DeviceError``.
    """
    caps = caps or {}
    unknown = sorted(set(caps) - {device.name for device in devices})
    if unknown:
        names = [device.name for device in devices]
        raise DeviceError(unknown[0], f"max_memory names a device the load does not use: {names}")
    rows = []
    for device in devices:
        free = device.live_free_bytes() - STATE.reservations.held_by_others(
            owner, device.ledger_key
        )
        cap = caps.get(device.name)
        if cap is not None:
            free = min(free, cap - (used or {}).get(device.name, 0))
        rows.append(
            DeviceCapacity(
                name=device.name,
                is_gpu=device.is_gpu,
                total_bytes=device.total_bytes(),
                free_bytes=max(free, 0),
            )
        )
    return rows
