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
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import uuid as uuid_module
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import pynvml
import torch

from streamload import _hostmem
from streamload.errors import DeviceError

__all__ = [
    "DONE",
    "RESERVATIONS",
    "CpuDevice",
    "CudaDevice",
    "CudaFence",
    "Device",
    "DeviceSpec",
    "DoneFence",
    "Fence",
    "Nvml",
    "NvmlApi",
    "NvmlMemory",
    "ReservationBook",
    "VisibleGpu",
    "default_nvml",
    "host_available_bytes",
    "host_total_bytes",
    "ledger_key",
    "nvml_uuid_from_torch",
    "parse_cuda_visible_devices",
    "resolve_devices",
    "resolve_nvml_handle",
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

    event: torch.cuda.Event

    def done(self) -> bool:
        return bool(self.event.query())  # type: ignore[no-untyped-call]

    def wait(self) -> None:
        self.event.synchronize()


# --------------------------------------------------------------------------------------------
# Host memory


_MEMINFO = Path("/proc/meminfo")
_CGROUP_FS = Path("/sys/fs/cgroup")
_SELF_CGROUP = Path("/proc/self/cgroup")
_UNLIMITED = 2**62  # cgroup v1 reports "no limit" as a huge page-rounded number


def _meminfo_bytes(field: str, meminfo: Path) -> int | None:
    """``MemAvailable`` / ``MemTotal`` from ``/proc/meminfo`` in bytes (the file says kB)."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s*kB", text, re.MULTILINE)
    return None if match is None else int(match.group(1)) * 1024


def _sysconf_bytes(pages: str) -> int | None:
    try:
        return int(os.sysconf(pages)) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: Path) -> int | None:
    """An integer file such as ``memory.max``; ``None`` when absent, ``"max"`` or unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_field(path: Path, field: str) -> int:
    try:
        text = path.read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field} (\d+)$", text, re.MULTILINE)
    return 0 if match is None else int(match.group(1))


@functools.lru_cache(maxsize=8)
def _cgroup_levels(fs_root: Path, self_cgroup_text: str) -> tuple[tuple[Path, bool], ...]:
    """This process's memory cgroup directories (v2 unified, v1 memory) as listed in
    ``/proc/self/cgroup`` (its text given), innermost first, each followed by its ancestors up
    to the mount root; the mount root alone where the process's path is not visible (a
    container without a cgroup namespace). Each comes with whether it speaks v2
    (``memory.max``). Cached per cgroup path: finding the directories costs more than reading
    their limits, which are read afresh on every call (a limit can change under a process;
    the directories of the cgroup it is in cannot)."""
    dirs: list[Path] = []
    for line in self_cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            root = fs_root if (fs_root / "cgroup.controllers").exists() else fs_root / "unified"
        elif "memory" in controllers.split(","):
            root = fs_root / "memory"
        else:
            continue
        own = root / path.lstrip("/")
        start = own if own.is_dir() else root
        dirs.extend([start, *[p for p in start.parents if p.is_relative_to(root)]])
    return tuple((d, (d / "memory.max").exists() or (d / "memory.current").exists()) for d in dirs)


def _cgroup_limits(fs_root: Path, self_cgroup: Path) -> tuple[int | None, int | None]:
    """``(limit, headroom)`` of the tightest memory cgroup this process is in, or ``None``s.

    Headroom is ``limit - (usage - inactive_file)``: reclaimable page cache does not count as
    used (the kubelet's working set), so reading a checkpoint does not shrink it.
    """
    try:
        text = self_cgroup.read_text()
    except OSError:
        text = ""
    limit: int | None = None
    headroom: int | None = None
    for directory, v2 in _cgroup_levels(fs_root, text):
        cap = _read_int(directory / ("memory.max" if v2 else "memory.limit_in_bytes"))
        if cap is None or cap >= _UNLIMITED:
            continue  # no limit at this level: its usage is not read (memory.stat is costly)
        usage = _read_int(directory / ("memory.current" if v2 else "memory.usage_in_bytes"))
        if usage is None:
            continue
        inactive = _stat_field(
            directory / "memory.stat", "inactive_file" if v2 else "total_inactive_file"
        )
        room = max(cap - max(usage - inactive, 0), 0)
        limit = cap if limit is None else min(limit, cap)
        headroom = room if headroom is None else min(headroom, room)
    return limit, headroom


def host_available_bytes(
    *, meminfo: Path = _MEMINFO, cgroup_fs: Path = _CGROUP_FS, self_cgroup: Path = _SELF_CGROUP
) -> int:
    """Host memory this process could still take: ``MemAvailable`` (fallback: free pages from
    ``os.sysconf``), capped by the headroom of its memory cgroup (a container's limit).

    The keyword arguments exist for tests. ``DeviceError`` when nothing can be read.
    """
    available = _meminfo_bytes("MemAvailable", meminfo)
    if available is None:
        available = _sysconf_bytes("SC_AVPHYS_PAGES")
    if available is None:
        raise DeviceError("cpu", "cannot read available host memory")
    _, headroom = _cgroup_limits(cgroup_fs, self_cgroup)
    return available if headroom is None else min(available, headroom)


def host_total_bytes(
    *, meminfo: Path = _MEMINFO, cgroup_fs: Path = _CGROUP_FS, self_cgroup: Path = _SELF_CGROUP
) -> int:
    """Host memory in all: ``MemTotal`` (fallback ``os.sysconf``), capped by the cgroup limit."""
    total = _meminfo_bytes("MemTotal", meminfo)
    if total is None:
        total = _sysconf_bytes("SC_PHYS_PAGES")
    if total is None:
        raise DeviceError("cpu", "cannot read total host memory")
    limit, _ = _cgroup_limits(cgroup_fs, self_cgroup)
    return total if limit is None else min(total, limit)


# --------------------------------------------------------------------------------------------
# Reservations


class ReservationBook:
    """Process-wide ledger of device bytes that in-flight loads have spoken for.

    Two loads in one process both see a GPU's live free memory; each reserves what it is about
    to allocate and subtracts ``held_by_others`` from live readings, so the same free bytes are
    not counted twice. Thread-safe. Owners are compared by identity and kept referenced until
    released: call ``release_all(owner)`` in a ``finally``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[object, dict[str, int]]] = {}

    def reserve(self, owner: object, device: str, nbytes: int) -> None:
        """Add ``nbytes`` on ``device`` to ``owner``'s reservations."""
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative number of bytes ({nbytes})")
        with self._lock:
            _, held = self._held.setdefault(id(owner), (owner, {}))
            held[device] = held.get(device, 0) + nbytes

    def release(self, owner: object, device: str, nbytes: int) -> None:
        """Return ``nbytes`` of ``owner``'s reservation on ``device``; ``ValueError`` if it
        holds fewer."""
        if nbytes < 0:
            raise ValueError(f"cannot release a negative number of bytes ({nbytes})")
        with self._lock:
            entry = self._held.get(id(owner))
            have = 0 if entry is None else entry[1].get(device, 0)
            if nbytes > have:
                raise ValueError(f"{owner!r} holds {have} bytes on {device}, not {nbytes}")
            if entry is None:
                return
            entry[1][device] = have - nbytes
            if not any(entry[1].values()):
                del self._held[id(owner)]

    def release_all(self, owner: object) -> None:
        """Drop every reservation of ``owner`` (no-op for an unknown owner)."""
        with self._lock:
            self._held.pop(id(owner), None)

    def held_by(self, owner: object, device: str) -> int:
        """Bytes ``owner`` holds on ``device``."""
        with self._lock:
            entry = self._held.get(id(owner))
            return 0 if entry is None else entry[1].get(device, 0)

    def held_by_others(self, owner: object, device: str) -> int:
        """Bytes every owner except ``owner`` holds on ``device`` (``owner=None``: everyone's,
        unless ``None`` itself reserved)."""
        with self._lock:
            return sum(
                held.get(device, 0) for key, (_, held) in self._held.items() if key != id(owner)
            )


RESERVATIONS = ReservationBook()
"""The process-wide ``ReservationBook`` every load in this process uses."""


# --------------------------------------------------------------------------------------------
# CPU


_CPU_OOM = "can't allocate memory"  # DefaultCPUAllocator's message on ENOMEM


class CpuDevice:
    """Host memory. Unstaged: the engine reads straight into tensors from ``empty``."""

    __slots__ = ()

    #: Tensors from ``empty`` are host memory (``empty`` takes ``huge_pages``).
    host_memory = True

    @property
    def name(self) -> str:
        return "cpu"

    @property
    def is_gpu(self) -> bool:
        return False

    @property
    def staged(self) -> bool:
        return False

    def total_bytes(self) -> int:
        return host_total_bytes()

    def live_free_bytes(self) -> int:
        return host_available_bytes()

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, huge_pages: bool = False
    ) -> torch.Tensor:
        """``torch.empty`` on the CPU; the allocator's ENOMEM becomes ``torch.OutOfMemoryError``.

        ``huge_pages``: a tensor of at least 2 MiB gets a mapping of its own in transparent huge
        pages instead (``streamload._hostmem.empty``).
        """
        try:
            if huge_pages:
                return _hostmem.empty(shape, dtype)
            return torch.empty(shape, dtype=dtype, device="cpu")
        except RuntimeError as exc:
            if _CPU_OOM not in str(exc):
                raise
            raise torch.OutOfMemoryError(f"cpu: {exc}") from exc

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        dst.copy_(src)
        return DONE

    def synchronize(self) -> None:
        return None

    def __repr__(self) -> str:
        return "CpuDevice()"


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


_DEFAULT_NVML = Nvml()


def default_nvml() -> Nvml:
    """The process's ``Nvml`` over the real ``pynvml`` (initialised lazily)."""
    return _DEFAULT_NVML


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

    Construction creates no CUDA context: it reads ``get_device_properties``.
    """

    def __init__(self, ordinal: int, *, nvml: Nvml | None = None) -> None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not 0 <= ordinal < count:
            raise DeviceError(f"cuda:{ordinal}", f"not visible ({count} CUDA devices)")
        self._ordinal = ordinal
        self._device = torch.device("cuda", ordinal)
        self._props = torch.cuda.get_device_properties(ordinal)
        self._nvml = default_nvml() if nvml is None else nvml
        self._lock = threading.Lock()
        self._handle: Any = _UNRESOLVED
        self._stream: torch.cuda.Stream | None = None

    @property
    def name(self) -> str:
        return f"cuda:{self._ordinal}"

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
        cached = torch.cuda.memory_reserved(self._ordinal) - torch.cuda.memory_allocated(
            self._ordinal
        )
        handle = self._nvml_handle()
        if handle is None:
            try:
                driver_free, _ = torch.cuda.mem_get_info(self._ordinal)
            except RuntimeError as exc:
                raise DeviceError(self.name, f"cudaMemGetInfo failed: {exc}") from exc
        else:
            driver_free = self._nvml.memory(handle, device=self.name).free
        return int(driver_free) + max(int(cached), 0)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self._device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        stream = self._copy_stream()
        stream.wait_stream(torch.cuda.current_stream(self._device))
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event.record(stream)
        dst.record_stream(stream)
        return CudaFence(event)

    def synchronize(self) -> None:
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.synchronize()

    def _copy_stream(self) -> torch.cuda.Stream:
        with self._lock:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]
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


def ledger_key(device: Device) -> str:
    """The key ``RESERVATIONS`` uses for ``device``: a CUDA GPU by its name (``cuda:N`` is one
    physical device for the whole process), any other device by object identity (two
    ``SimulatedGPU("sim:0")`` objects are two devices)."""
    if isinstance(device, CudaDevice):
        return device.name
    return f"{device.name}@{id(device):x}"


# --------------------------------------------------------------------------------------------
# Discovery


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
