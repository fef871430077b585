"""NVML behind one error boundary, and the torch ordinal -> NVML handle mapping (by UUID,
else by ``CUDA_VISIBLE_DEVICES`` where that determines it)."""

from __future__ import annotations

import contextlib
import re
import threading
import uuid as uuid_module
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pynvml

from streamload._state import STATE
from streamload.errors import DeviceError

# --------------------------------------------------------------------------------------------
# NVML


class NvmlApi(Protocol):
    """The part of ``pynvml`` (PyPI ``nvidia-ml-py``) streamload calls; the module itself is the
    real implementation. Tests pass a fake that raises ``pynvml.NVMLError`` subclasses."""

    def nvmlInit(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int: ...

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any: ...

    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        """``c_nvmlMemory_t``: ``total``, ``free``, ``used`` in bytes."""

    def nvmlDeviceGetMigMode(self, handle: Any) -> Sequence[int]:
        """``[current, pending]``; ``NVML_DEVICE_MIG_ENABLE`` is 1."""


@dataclass(frozen=True, slots=True)
class NvmlMemory:
    """One NVML memory reading (``nvmlDeviceGetMemoryInfo``, v1), bytes."""

    total: int
    free: int
    used: int


_NO_NVML = (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded)
_NOT_MIG = (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound)


@contextlib.contextmanager
def _nvml_errors(device: str, call: str) -> Iterator[None]:
    """The one boundary where ``pynvml.NVMLError`` becomes ``DeviceError``."""
    try:
        yield
    except pynvml.NVMLError as exc:
        raise DeviceError(device, f"NVML {call} failed: {exc}") from exc


def _uuid_text(value: str | bytes) -> str:
    """nvidia-ml-py >= 11.515.48 returns ``str``, older releases ``bytes``."""
    return value.decode() if isinstance(value, bytes) else value


class Nvml:
    """``pynvml`` behind one error boundary, initialised on first use (thread-safe).

    A missing library or driver (``NVMLError_LibraryNotFound``, ``NVMLError_DriverNotLoaded``
    from ``nvmlInit``) makes ``available()`` false for good; any other ``NVMLError`` becomes a
    ``DeviceError`` naming the device the call was for. NVML is never shut down: ``nvmlInit``
    is reference-counted, and this keeps one reference for the life of the process.
    """

    def __init__(self, api: NvmlApi | None = None) -> None:
        self._api: NvmlApi = pynvml if api is None else api
        self._lock = threading.Lock()
        self._available: bool | None = None

    def available(self, *, device: str = "nvml") -> bool:
        """Whether NVML works on this host (calls ``nvmlInit`` the first time)."""
        with self._lock:
            if self._available is None:
                with _nvml_errors(device, "nvmlInit"):
                    try:
                        self._api.nvmlInit()
                    except _NO_NVML:
                        self._available = False
                    else:
                        self._available = True
            return self._available

    def gpu_uuids(self, *, device: str = "nvml") -> list[str]:
        """UUIDs (``GPU-...``) of every GPU NVML sees, in NVML index order."""
        with _nvml_errors(device, "nvmlDeviceGetCount"):
            count = self._api.nvmlDeviceGetCount()
        uuids = []
        for index in range(count):
            with _nvml_errors(device, f"nvmlDeviceGetHandleByIndex({index})"):
                handle = self._api.nvmlDeviceGetHandleByIndex(index)
            uuids.append(self.uuid(handle, device=device))
        return uuids

    def uuid(self, handle: Any, *, device: str) -> str:
        with _nvml_errors(device, "nvmlDeviceGetUUID"):
            return _uuid_text(self._api.nvmlDeviceGetUUID(handle))

    def handle_by_uuid(self, uuid: str, *, device: str) -> Any | None:
        """The handle of a GPU or MIG instance by its full UUID; ``None`` when NVML knows none
        (``NotFound``, or ``InvalidArgument`` for a UUID form it does not take)."""
        with _nvml_errors(device, f"nvmlDeviceGetHandleByUUID({uuid})"):
            try:
                return self._api.nvmlDeviceGetHandleByUUID(uuid)
            except (pynvml.NVMLError_NotFound, pynvml.NVMLError_InvalidArgument):
                return None

    def memory(self, handle: Any, *, device: str) -> NvmlMemory:
        with _nvml_errors(device, "nvmlDeviceGetMemoryInfo"):
            info = self._api.nvmlDeviceGetMemoryInfo(handle)
        return NvmlMemory(total=int(info.total), free=int(info.free), used=int(info.used))

    def mig_enabled(self, handle: Any, *, device: str) -> bool:
        """Whether MIG mode is on for this (physical) GPU; GPUs without MIG say no."""
        with _nvml_errors(device, "nvmlDeviceGetMigMode"):
            try:
                current, _ = self._api.nvmlDeviceGetMigMode(handle)
            except _NOT_MIG:
                return False
        return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)


def default_nvml() -> Nvml:
    """The process's ``Nvml`` over the real ``pynvml`` (made on first use and kept in
    ``streamload._state.STATE``; NVML itself is initialised on its first call)."""
    with STATE.lock:
        if STATE.nvml is None:
            STATE.nvml = Nvml()
        nvml: Nvml = STATE.nvml
        return nvml


# --------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES and the torch ordinal -> NVML mapping


@dataclass(frozen=True, slots=True)
class VisibleGpu:
    """One device CUDA makes visible: its CUDA ordinal and how NVML knows it.

    ``uuid`` is the full ``GPU-...`` UUID, or a ``MIG-...`` entry as written; ``nvml_index`` is
    the GPU's NVML index (``None`` for a MIG instance).
    """

    ordinal: int
    uuid: str
    nvml_index: int | None


def _strtoul(text: str) -> int:
    """The leading integer of ``text`` like C ``strtoul`` (``"1gpu2" -> 1``); -1 if none."""
    match = re.match(r"[+-]?\d+", text)
    return -1 if match is None else int(match.group())


def _uuid_prefix_index(candidate: str, nvml_uuids: Sequence[str]) -> int:
    """NVML index of the only UUID starting with ``candidate``; -1 if none or ambiguous."""
    found = [i for i, u in enumerate(nvml_uuids) if u.startswith(candidate)]
    return found[0] if len(found) == 1 else -1


def _parse_uuid_entries(entries: list[str], nvml_uuids: Sequence[str]) -> list[int]:
    indices: list[int] = []
    for entry in entries:
        if not entry.startswith("GPU-"):
            break
        index = _uuid_prefix_index(entry, nvml_uuids)
        if index < 0:
            break
        if index in indices:
            return []
        indices.append(index)
    return indices


def _parse_index_entries(entries: list[str], count: int) -> list[int]:
    indices: list[int] = []
    for entry in entries:
        index = _strtoul(entry.strip())
        if index < 0 or index >= count:
            break
        if index in indices:
            return []
        indices.append(index)
    return indices


def parse_cuda_visible_devices(value: str | None, nvml_uuids: Sequence[str]) -> list[VisibleGpu]:
    """The devices ``CUDA_VISIBLE_DEVICES=value`` makes visible, in CUDA ordinal order.

    ``nvml_uuids`` are the UUIDs of all GPUs in NVML index order. Rules (CUDA's, as torch's
    NVML-based ``device_count`` applies them):

    - unset (``None``): every GPU, in NVML order (CUDA's own order is ``CUDA_DEVICE_ORDER``);
    - ``""``: none;
    - the first invalid entry ends the list (``"0,2,-1,1"`` -> 0, 2); a repeated device
      empties it (``"0,0"`` -> none);
    - integers are NVML indices read like ``strtoul`` (``"1gpu2"`` -> 1), an index past the
      last GPU ends the list;
    - ``GPU-<uuid>`` entries match a full UUID or a unique prefix; an unknown or ambiguous
      prefix, or an entry of another form after them, ends the list;
    - ``MIG-...``: a process sees one MIG instance, the first entry, as ordinal 0.
    """
    if value is None:
        return [VisibleGpu(i, u, i) for i, u in enumerate(nvml_uuids)]
    entries = value.split(",")
    if value.startswith("MIG-"):
        return [VisibleGpu(0, entries[0], None)]
    if value.startswith("GPU-"):
        indices = _parse_uuid_entries(entries, nvml_uuids)
    else:
        indices = _parse_index_entries(entries, len(nvml_uuids))
    return [VisibleGpu(ordinal, nvml_uuids[i], i) for ordinal, i in enumerate(indices)]


def _mapping_known(value: str | None, device_order: str | None, nvml_uuids: Sequence[str]) -> bool:
    """Whether ``parse_cuda_visible_devices`` gives CUDA's ordinals: UUID entries name devices
    exactly; integer entries and "unset" follow NVML (PCI bus) order only under
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, or trivially with a single GPU."""
    if value is not None and value.startswith(("GPU-", "MIG-")):
        return True
    return device_order == "PCI_BUS_ID" or len(nvml_uuids) == 1


def nvml_uuid_from_torch(value: object) -> str | None:
    """``torch.cuda.get_device_properties(i).uuid`` as NVML writes it (``GPU-xxxxxxxx-...``).

    torch >= 2.5 gives a ``_CUuuid`` whose ``str()`` is the bare UUID and whose ``.bytes`` is
    its 16 bytes (a list of ints; ``bytes`` in an early revision); torch 2.4 has no ``uuid``
    (pass ``None``). ``None`` when the value cannot be read as a UUID.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)) and len(value) != 16:
        value = bytes(value).decode("ascii", errors="replace")
    text = None if isinstance(value, (bytes, bytearray)) else str(value)
    if text is not None and _UUID_TEXT.fullmatch(text):
        return "GPU-" + text.removeprefix("GPU-").lower()
    raw = value if isinstance(value, (bytes, bytearray)) else getattr(value, "bytes", None)
    if not isinstance(raw, (bytes, bytearray, list)) or len(raw) != 16:
        return None
    try:
        return f"GPU-{uuid_module.UUID(bytes=bytes(raw))}"
    except (ValueError, TypeError):
        return None


_HEX_UUID = r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"
_UUID_TEXT = re.compile(rf"(?:GPU-)?{_HEX_UUID}")
_MIG_UUID = re.compile(rf"MIG-{_HEX_UUID}")


def resolve_nvml_handle(
    nvml: Nvml,
    ordinal: int,
    *,
    torch_uuid: str | None,
    visible: str | None,
    device_order: str | None,
) -> Any | None:
    """The NVML handle of CUDA device ``ordinal``, or ``None`` when NVML cannot say which it is.

    ``torch_uuid`` is ``nvml_uuid_from_torch(props.uuid)``; ``visible`` and ``device_order`` are
    ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER``. By UUID first (``GPU-<uuid>``, then
    ``MIG-<uuid>``); a GPU in MIG mode is never the answer (its memory is the sum of its
    instances): the MIG instance named in ``CUDA_VISIBLE_DEVICES`` is. ``None`` sends the
    caller to ``torch.cuda.mem_get_info``.
    """
    name = f"cuda:{ordinal}"
    if not nvml.available(device=name):
        return None
    if torch_uuid is not None:
        handle = nvml.handle_by_uuid(torch_uuid, device=name)
        if handle is None:
            handle = nvml.handle_by_uuid(torch_uuid.replace("GPU-", "MIG-", 1), device=name)
            if handle is not None:
                return handle
        elif not nvml.mig_enabled(handle, device=name):
            return handle
    uuids = nvml.gpu_uuids(device=name)
    if not _mapping_known(visible, device_order, uuids):
        return None
    gpus = parse_cuda_visible_devices(visible, uuids)
    if ordinal >= len(gpus):
        return None
    gpu = gpus[ordinal]
    if gpu.nvml_index is None and not _MIG_UUID.fullmatch(gpu.uuid):
        return None  # MIG-GPU-<uuid>/<gi>/<ci> or a prefix: NVML looks up full UUIDs only
    handle = nvml.handle_by_uuid(gpu.uuid, device=name)
    if handle is None or (gpu.nvml_index is not None and nvml.mig_enabled(handle, device=name)):
        return None
    return handle
