"""Host memory: available and total bytes (cgroup-aware), and the CPU as a device."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from streamload import _hostmem
from streamload._state import STATE
from streamload.devices._protocol import DONE, Fence
from streamload.errors import DeviceError

if TYPE_CHECKING:
    import torch

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


def _cgroup_levels(fs_root: Path, self_cgroup_text: str) -> tuple[tuple[Path, bool], ...]:
    """This process's memory cgroup directories (v2 unified, v1 memory) as listed in
    ``/proc/self/cgroup`` (its text given), innermost first, each followed by its ancestors up
    to the mount root; the mount root alone where the process's path is not visible (a
    container without a cgroup namespace). Each comes with whether it speaks v2
    (``memory.max``). Cached per cgroup path: finding the directories costs more than reading
    their limits, which are read afresh on every call (a limit can change under a process;
    the directories of the cgroup it is in cannot), in ``STATE.probes``."""
    cache = STATE.probes.cgroup_levels
    found = cache.get((fs_root, self_cgroup_text))
    if found is None:
        found = cache[(fs_root, self_cgroup_text)] = _find_cgroup_levels(fs_root, self_cgroup_text)
    return found


def _find_cgroup_levels(fs_root: Path, self_cgroup_text: str) -> tuple[tuple[Path, bool], ...]:
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
# CPU


_CPU_OOM = "can't allocate memory"  # DefaultCPUAllocator's message on ENOMEM


class CpuDevice:
    """Host memory. Unstaged: the engine reads straight into tensors from ``empty``."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return "cpu"

    @property
    def host_memory(self) -> bool:
        return True

    @property
    def ledger_key(self) -> str:
        return "cpu"  # one host per process, whichever object names it

    @property
    def is_gpu(self) -> bool:
        return False

    @property
    def staged(self) -> bool:
        return False

    def total_bytes(self) -> int:
        return host_total_bytes()

    def prepare(self) -> None:
        return None

    def live_free_bytes(self) -> int:
        return host_available_bytes()

    def take_notices(self) -> list[str]:
        return []

    def mark_allocated(self) -> None:
        return None

    def current(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, huge_pages: bool = False
    ) -> torch.Tensor:
        """``torch.empty`` on the CPU; the allocator's ENOMEM becomes ``torch.OutOfMemoryError``.

        ``huge_pages``: a tensor of at least 2 MiB gets a mapping of its own in transparent huge
        pages instead (``streamload._hostmem.empty``).
        """
        import torch

        try:
            if huge_pages:
                return _hostmem.empty(shape, dtype)
            return torch.empty(shape, dtype=dtype, device="cpu")
        except RuntimeError as exc:
            if _CPU_OOM not in str(exc):
                raise
            raise torch.OutOfMemoryError(f"cpu: {exc}") from exc

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        dst.copy_(src)
        return DONE

    def receive(self, dst: torch.Tensor, src: torch.Tensor) -> Fence:
        dst.copy_(src)
        return DONE

    def convert(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Fence:
        for dst, src in pairs:
            dst.copy_(src)
        return DONE

    def synchronize(self) -> None:
        return None

    def release_cache(self) -> None:
        return None  # freed host memory goes back to the allocator, not a cache of ours

    def __repr__(self) -> str:
        return "CpuDevice()"
