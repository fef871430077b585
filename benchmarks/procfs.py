"""What ``/proc`` says about this process: resident memory, its peak, and which tensors are
memory-mapped from a checkpoint file rather than held in the process's own memory."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Iterable
from types import TracebackType

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``RssAnon``, ``RssFile``) in bytes."""
    prefix = field + ":"
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(prefix):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``; unlike ``ru_maxrss`` it is not inherited from the
    parent across ``exec``)."""
    return status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (``/proc/self/clear_refs``, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def populate(address: int, nbytes: int) -> bool:
    """Fault in ``nbytes`` of anonymous memory at ``address`` in one call
    (``madvise(MADV_POPULATE_WRITE)``, Linux >= 5.14); False where the kernel refuses."""
    aligned = address - address % PAGE
    result: int = _libc.madvise(aligned, address + nbytes - aligned, _MADV_POPULATE_WRITE)
    return result == 0


def prime(nbytes: int) -> None:
    """Fault in ``nbytes`` of fresh anonymous memory, then give it back: once in transparent
    huge pages (``MADV_HUGEPAGE``), once in 4 KiB pages.

    On a virtual machine whose guest reports free pages to the host (virtio-balloon free page
    reporting), a page the guest has not touched for a while costs a host fault on its first
    touch, several times the cost of zeroing it; how much of the guest's free memory is in that
    state depends on what ran before and how long ago. Priming just before a load hands the
    load pages that are backed again, the state a bare-metal host, or a GPU virtual machine
    (its memory is pinned for device passthrough) is always in, so every run meets the same.

    Both page sizes are primed because the kernel serves them from different free lists: a
    4 KiB pass backs the pages a 4 KiB allocation gets next, but a huge-page allocation made
    after it (a loader that advises huge pages) still met unbacked memory, most of all after
    the page cache was just evicted: populating 3 GiB of huge pages took 1.3-3.5 s after a
    4 KiB prime, 0.35-0.7 s after a huge-page one (4 KiB pages: ~1.0 s either way).
    """
    if nbytes <= 0:
        return
    for huge in (True, False):
        area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            view = (ctypes.c_char * nbytes).from_buffer(area)
            try:
                address = ctypes.addressof(view)
                if huge:
                    _libc.madvise(address, nbytes, _MADV_HUGEPAGE)
                if not populate(address, nbytes):
                    for offset in range(0, nbytes, PAGE):  # kernels before 5.14
                        area[offset] = 1
            finally:
                del view
        finally:
            area.close()


# System-wide /proc/vmstat counters that say what fresh memory cost a load: huge pages found
# at fault time or not, and direct compaction run to find them.
VMSTAT_KEYS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "compact_fail")


def vmstat() -> dict[str, int]:
    """``/proc/vmstat``'s ``VMSTAT_KEYS`` (empty where there is no such file)."""
    try:
        with open("/proc/vmstat") as f:
            fields = dict(line.split() for line in f)
    except OSError:
        return {}
    return {key: int(fields[key]) for key in VMSTAT_KEYS if key in fields}


class AnonPeak:
    """Samples ``RssAnon`` every ``interval`` seconds on a thread; ``peak`` is the largest seen.

    The kernel keeps no high-water mark for anonymous memory alone, and ``VmHWM`` also counts
    file pages a loader maps (page cache, not memory it allocated). A sample can miss a spike
    shorter than the interval; buffers that matter live far longer.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = status_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


def file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files whose name ends in ``suffix``."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n").endswith(suffix):
                start, end = fields[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` without repeats of the same bytes (tied weights count once)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            out.append(tensor)
    return out


def mapped_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` whose data lies in a mapping of a checkpoint file."""
    ranges = file_mappings()
    return sum(t.nbytes for t in tensors if any(lo <= t.data_ptr() < hi for lo, hi in ranges))


def touch_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Read one byte of every page of every tensor (faults memory-mapped data in)."""
    for tensor in tensors:
        if tensor.nbytes:
            flat = tensor.detach().reshape(-1).view(torch.uint8)
            int(flat[::PAGE].sum())
