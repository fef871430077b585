"""Host memory a load fills: pre-faulting destinations, destinations in transparent huge pages,
and how much of a checkpoint's bytes the page cache already holds.

Linux only, best effort: elsewhere (or on kernels without the calls) ``prefault`` does nothing,
``empty`` is ``torch.empty`` and ``cached_bytes`` answers ``None`` (unknown).
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from streamload._state import STATE

if TYPE_CHECKING:
    import torch

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 * 2**20  # a PMD-sized transparent huge page with 4 KiB base pages
CACHE_LINE = 64
PREFAULT_PIECE = 2 * 2**20  # bytes faulted in by one madvise call (``prefault``)
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not in Python 3.11's mmap module
_NR_CACHESTAT = 451  # Linux >= 6.5, the same number on every architecture
_PROT_READ = 1
_MAP_SHARED = 1

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise.restype = ctypes.c_int
    _libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    _libc.mmap.restype = ctypes.c_void_p
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _libc.syscall.restype = ctypes.c_long


def prefault(tensor: torch.Tensor) -> None:
    """Fault in a fresh host destination's pages in one call before reading into it.

    Taking the page faults one 4 KiB page at a time inside ``preadv`` dominates a warm load to
    the CPU; ``madvise(MADV_POPULATE_WRITE)`` on the reader thread does the same work in bulk.
    Contents are unchanged. Not for destinations in huge pages: the copy faults those in 2 MiB at
    a time, and a page it has just zeroed is still in cache when it writes the data, where
    zeroing a whole chunk ahead evicts it first (``benchmarks/results/measurements.md``).
    """
    if _libc is None:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    # In pieces: the kernel holds the process's mmap_lock for reading through one call, and an
    # mmap or munmap anywhere in the process (a Python arena, a new destination) waits for it
    # and, once waiting, holds up every later reader: one 16 MiB call on memory the hypervisor
    # has to back took the event loop's allocations with it for tens of milliseconds.
    at = start - start % PAGE
    while at < end:
        piece = min(PREFAULT_PIECE - at % PREFAULT_PIECE, end - at)
        _libc.madvise(at, piece, _MADV_POPULATE_WRITE)
        at += piece


def _anonymous(length: int) -> mmap.mmap:
    import torch

    try:
        return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            raise torch.OutOfMemoryError(f"cpu: cannot map {length} bytes: {exc}") from exc
        raise


def huge_stretches(nbytes: int) -> int:
    """Bytes of a ``huge_mapping`` of ``nbytes`` advised into huge pages: its whole 2 MiB
    stretches (none under 2 MiB)."""
    return nbytes - nbytes % HUGE_PAGE


def huge_mapping(nbytes: int) -> tuple[mmap.mmap, int]:
    """A private anonymous mapping with room for ``nbytes`` starting at a 2 MiB boundary, and
    that start's offset in it; the whole 2 MiB stretches from there are advised
    ``MADV_HUGEPAGE`` (a tail under 2 MiB stays in 4 KiB pages, so no memory is spent beyond
    ``nbytes``; the unused lead is never touched). Advice the kernel refuses (THP ``never``, no
    ``madvise``) leaves ordinary pages. ``torch.OutOfMemoryError`` when the kernel refuses the
    mapping."""
    import torch

    area = _anonymous(nbytes + (-nbytes) % PAGE + HUGE_PAGE)
    base = torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr()
    offset = -base % HUGE_PAGE
    if _libc is not None and nbytes >= HUGE_PAGE:
        _libc.madvise(base + offset, huge_stretches(nbytes), _MADV_HUGEPAGE)
    return area, offset


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new uninitialised host tensor whose whole 2 MiB stretches are transparent huge pages.

    Tensors of at least 2 MiB get a mapping of their own (``huge_mapping``). The tensor's
    storage is exactly its bytes (``torch.frombuffer``) and holds the mapping, which is
    unmapped when the last tensor sharing the storage is freed. Smaller tensors, and platforms
    without ``madvise``, get ``torch.empty``.
    """
    import torch

    nbytes = math.prod(shape) * dtype.itemsize
    if _libc is None or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    area, offset = huge_mapping(nbytes)
    flat = torch.frombuffer(area, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def lead(offset: int, dtype: torch.dtype) -> int:
    """Where in a cache line a destination read from file ``offset`` should start: the same
    position (``offset % 64``), or 0 when that position does not suit ``dtype``."""
    position = offset % CACHE_LINE
    return position if position % dtype.itemsize == 0 else 0


def pack(runs: Sequence[tuple[int, int]]) -> tuple[list[int], int]:
    """Positions for ``(nbytes, lead)`` runs laid one after another, each starting ``lead``
    bytes past a cache-line boundary (at most 63 bytes of padding before it), and the bytes
    they span in all."""
    positions = []
    end = 0
    for nbytes, at in runs:
        end += (at - end) % CACHE_LINE
        positions.append(end)
        end += nbytes
    return positions, end


class HostBlock:
    """One private anonymous mapping that a load lays a unit's host tensors out in.

    With ``huge_pages``, the data starts at a 2 MiB boundary and its whole 2 MiB stretches are
    advised ``MADV_HUGEPAGE`` (``huge_bytes`` of them; the tail stays in 4 KiB pages). Why one
    mapping per unit rather than per tensor: every ``mmap`` and ``madvise`` takes the process's
    ``mmap_lock`` for writing, and the first fault in a new mapping needs it to set the mapping
    up, so per-tensor mappings made while reader threads fault in earlier tensors leave those
    readers queued on the lock (``benchmarks/results/measurements.md``). The block's first page
    is touched here, on the allocating thread, so the readers' faults find the mapping set up.

    Tensors from ``tensor`` are views of the mapping (each storage exactly its bytes); it is
    unmapped when the last of them is freed, so a unit's memory returns as a whole.
    ``torch.OutOfMemoryError`` when the kernel refuses the mapping.
    """

    __slots__ = ("_area", "_start", "huge_bytes", "nbytes")

    def __init__(self, nbytes: int, *, huge_pages: bool) -> None:
        import torch

        self.nbytes = nbytes
        self.huge_bytes = 0
        self._area: mmap.mmap | None = None
        self._start = 0
        if nbytes <= 0:
            return
        if huge_pages and _libc is not None and nbytes >= HUGE_PAGE:
            self._area, self._start = huge_mapping(nbytes)
            self.huge_bytes = huge_stretches(nbytes)
        else:
            self._area = _anonymous(nbytes + (-nbytes) % PAGE)
        # The first fault, here rather than in a reader (``madvise`` through ctypes: the GIL
        # is released while the kernel zeroes the page, up to 2 MiB of it).
        address = torch.frombuffer(self._area, dtype=torch.uint8, count=1).data_ptr()
        if _libc is None or _libc.madvise(address + self._start, PAGE, _MADV_POPULATE_WRITE):
            self._area[self._start] = 0  # no MADV_POPULATE_WRITE (Linux < 5.14)

    def tensor(self, at: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor over the block's bytes from ``at`` (``at`` a multiple of the dtype's
        size; a tensor with no elements has storage of its own)."""
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if self._area is None or at < 0 or at + nbytes > self.nbytes or at % dtype.itemsize:
            raise ValueError(f"{nbytes} bytes at {at} do not fit a {self.nbytes}-byte block")
        flat = torch.frombuffer(
            self._area, dtype=torch.uint8, count=nbytes, offset=self._start + at
        )
        return flat.view(dtype).view(shape)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


def _cachestat(fd: int, start: int, length: int) -> int | None:
    """Pages of ``[start, start + length)`` in the page cache (``cachestat``, Linux >= 6.5).

    A kernel that refuses the call once refuses it for good: ``STATE.probes`` remembers."""
    if _libc is None or not STATE.probes.cachestat:
        return None
    span = _CachestatRange(start, length)
    stat = _Cachestat()
    result = _libc.syscall(
        ctypes.c_long(_NR_CACHESTAT),
        ctypes.c_int(fd),
        ctypes.byref(span),
        ctypes.byref(stat),
        ctypes.c_uint(0),
    )
    if result == 0:
        return int(stat.nr_cache)
    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # old kernel, or a seccomp filter
        STATE.probes.cachestat = False
    return None


def _mincore(fd: int, start: int, length: int) -> int | None:
    """Pages of ``[start, start + length)`` in the page cache (``mincore`` on a read-only map
    of the range; touches no data)."""
    if _libc is None:
        return None
    low = start - start % PAGE
    size = start + length - low
    address = _libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, low)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        vector = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
        if _libc.mincore(address, size, vector) != 0:
            return None
        return sum(byte & 1 for byte in bytes(vector))
    finally:
        _libc.munmap(address, size)


def cached_bytes(fd: int, start: int, length: int) -> int | None:
    """About how many bytes of the file range are in the page cache now (whole pages counted,
    at most ``length``); ``None`` where the kernel cannot say."""
    if length <= 0:
        return 0
    pages = _cachestat(fd, start, length)
    if pages is None:
        pages = _mincore(fd, start, length)
    if pages is None:
        return None
    return min(pages * PAGE, length)


_SAMPLES = 16
_WINDOW = 256 * 1024


def cached_fraction(ranges: Sequence[tuple[int, int, int]]) -> float | None:
    """The share of the file ranges ``(fd, start, length)`` in the page cache, from 16 windows
    of 256 KiB spread evenly over their bytes taken together (every byte when they are
    shorter), so the cost does not grow with their size; ``None`` where the kernel cannot say.
    """
    total = sum(length for _, _, length in ranges)
    if total <= 0:
        return 1.0
    if total <= _SAMPLES * _WINDOW:
        windows = [r for r in ranges if r[2] > 0]
    else:
        step = (total - _WINDOW) // (_SAMPLES - 1)
        windows = []
        points = [i * step for i in range(_SAMPLES)]
        seen = 0
        for fd, start, length in ranges:
            while points and points[0] < seen + length:
                at = points.pop(0) - seen
                windows.append((fd, start + at, min(_WINDOW, length - at)))
            seen += length
    cached = probed = 0
    for fd, start, length in windows:
        got = cached_bytes(fd, start, length)
        if got is None:
            return None
        cached += got
        probed += length
    return cached / probed


def huge_pages_available() -> bool:
    """Whether ``empty`` can ask for huge pages here (Linux, THP not ``never``); read once per
    process (``STATE.probes``)."""
    probes = STATE.probes
    if probes.huge_pages is None:
        probes.huge_pages = _thp_enabled()
    return probes.huge_pages


def _thp_enabled() -> bool:
    if _libc is None:
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


__all__ = [
    "CACHE_LINE",
    "HUGE_PAGE",
    "PAGE",
    "HostBlock",
    "cached_bytes",
    "cached_fraction",
    "empty",
    "huge_mapping",
    "huge_pages_available",
    "huge_stretches",
    "lead",
    "pack",
    "prefault",
]
