"""``O_DIRECT`` reads (``LoadParams.direct_io``): descriptors of their own, aligned spans, and
the page-cache fallback where a filesystem refuses them.

Linux requires an ``O_DIRECT`` read's file offset, length and buffer address to be multiples
of the file's direct-I/O alignment, the logical block size of the device under it (512 bytes
or 4 KiB on today's disks; ``open(2)`` NOTES, ``statx(2)`` ``STATX_DIOALIGN``); a misaligned
read fails with ``EINVAL``. Every read here is aligned to ``DIRECT_ALIGN`` (4 KiB), which
satisfies either. A device whose logical block size (sysfs) is larger counts as refusing.

A chunk rarely starts or ends aligned (a safetensors header leaves most offsets anywhere), so:

- into a staging slot: the aligned span around the chunk is read into the slot's aligned part,
  and the copies out start at the chunk's first byte (``read_staged``);
- into host destinations laid out as in the file and co-aligned modulo 4 KiB (the CPU's unit
  blocks under ``direct_io``): the chunk's aligned middle straight into them, its partial first
  and last blocks through a 4 KiB bounce buffer (``read_pieces``);
- into any other destinations: the aligned span into a bounce buffer, then each piece's bytes
  copied out.

Only the tensor's own bytes are written to a destination in every case. ``O_DIRECT``
descriptors are opened apart from the buffered ones (``Files``), which read-ahead advice,
page-cache probes, memory maps and hashing keep using. A filesystem that refuses ``O_DIRECT``
(``EINVAL`` or ``EOPNOTSUPP``, at open or at a read) is remembered by its device number: its
files are read through the page cache from then on, and the refusal is reported once
(``take_notices``, a ``DirectIOFallback`` event).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from streamload.engine._units import Chunk
from streamload.errors import CheckpointError, TruncatedDataError
from streamload.events import DirectIOFallback
from streamload.sources import SourceFiles

__all__ = [
    "DIRECT_ALIGN",
    "DirectReads",
    "Opener",
    "Preadv",
    "align_down",
    "align_up",
    "logical_block_size",
    "open_direct",
]

DIRECT_ALIGN = 4096

# Opens a file for O_DIRECT reads (the seam tests simulate a refusing filesystem through).
Opener = Callable[[Path], int]
# ``os.preadv``'s shape: descriptor, buffers, offset -> bytes read.
Preadv = Callable[[int, list[memoryview], int], int]

# What a filesystem that does not do O_DIRECT answers, at open or at the first read.
_REFUSALS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)})


def align_down(value: int) -> int:
    return value - value % DIRECT_ALIGN


def align_up(value: int) -> int:
    return -(-value // DIRECT_ALIGN) * DIRECT_ALIGN


def open_direct(path: Path) -> int:
    """``path`` opened read-only with ``O_DIRECT`` (``OSError`` as ``os.open`` raises it)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags)


def logical_block_size(device: int) -> int | None:
    """The logical block size of the block device numbered ``device`` (a file's ``st_dev``),
    from sysfs (a partition's is its disk's); ``None`` where sysfs does not say (a virtual
    filesystem, another platform)."""
    base = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for queue in (base / "queue", base / ".." / "queue"):
        try:
            return int((queue / "logical_block_size").read_text())
        except (OSError, ValueError):
            continue
    return None


def _view(address: int, nbytes: int) -> memoryview:
    """A writable memoryview of ``nbytes`` at ``address`` (the caller keeps the memory alive)."""
    return memoryview((ctypes.c_uint8 * nbytes).from_address(address)).cast("B")


class _Bounce:
    """Page-aligned host buffers reused across reads, each held by one thread at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            for i, buffer in enumerate(self._free):
                if buffer.numel() >= nbytes:
                    return self._free.pop(i)
        # Private anonymous memory: page aligned.
        area = mmap.mmap(-1, align_up(nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(area, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


class DirectReads:
    """``O_DIRECT`` reads of a load's local files (blocking calls, thread-safe).

    ``files`` are the load's buffered files: every file is opened there first (which checks
    its size against its header) and read there when its filesystem refuses ``O_DIRECT``; the
    read methods return ``False``/``None`` then, and the caller reads buffered. ``opener`` and
    ``preadv`` are the seams to the system (by default ``open_direct`` and ``os.preadv``, looked
    up at each call). ``requested``: ``direct_io=True`` asked for direct reads (the refusals'
    ``DirectIOFallback.requested``).
    """

    def __init__(
        self,
        files: SourceFiles,
        *,
        opener: Opener | None = None,
        preadv: Preadv | None = None,
        requested: bool = True,
    ) -> None:
        self._files = files
        self._requested = requested
        self._open = opener
        self._preadv = preadv
        self._lock = threading.Lock()
        self._fds: dict[Path, int | None] = {}  # None: read buffered
        self._devices: dict[Path, int] = {}
        self._refused: set[int] = set()  # device numbers of filesystems that refused
        self._retired: list[int] = []  # descriptors of refused files, closed at ``close``
        self._notices: list[DirectIOFallback] = []
        self._bytes = 0
        self._bounce = _Bounce()

    @property
    def bytes_read(self) -> int:
        """Chunk bytes read with ``O_DIRECT`` so far."""
        with self._lock:
            return self._bytes

    def take_notices(self) -> list[DirectIOFallback]:
        """Refusals since the last call, each once."""
        with self._lock:
            notices, self._notices = self._notices, []
        return notices

    def fd(self, path: Path) -> int | None:
        """``path``'s ``O_DIRECT`` descriptor (opened on first use), or ``None`` when its
        filesystem refuses ``O_DIRECT``."""
        with self._lock:
            if path in self._fds:
                return self._fds[path]
        device = os.fstat(self._files.fd(path)).st_dev
        with self._lock:
            if path in self._fds:
                return self._fds[path]
            self._devices[path] = device
            if device in self._refused:
                self._fds[path] = None
                return None
            block = logical_block_size(device)
            if block is not None and block > DIRECT_ALIGN:
                self._refuse_locked(path, f"logical block size {block} > {DIRECT_ALIGN} bytes")
                return None
            try:
                fd = (self._open or open_direct)(path)
            except OSError as exc:
                if exc.errno in _REFUSALS:
                    self._refuse_locked(path, f"O_DIRECT refused at open: {exc.strerror}")
                    return None
                raise CheckpointError(path, f"cannot open for O_DIRECT: {exc.strerror}") from exc
            self._fds[path] = fd
            return fd

    def read_staged(self, chunk: Chunk, slot: memoryview, aligned: int) -> int | None:
        """Read ``chunk`` into ``slot`` from its 4 KiB-aligned byte ``aligned`` on: the aligned
        span around the chunk. Returns where the chunk's first byte landed in ``slot``, or
        ``None`` when the read must be buffered (refused, or the slot too short)."""
        lead = chunk.offset % DIRECT_ALIGN
        length = align_up(lead + chunk.nbytes)
        if aligned + length > len(slot):
            return None
        view = slot[aligned : aligned + length]
        tensor = chunk.pieces[0].tensor
        if not self._span(chunk.path, view, chunk.offset - lead, lead + chunk.nbytes, tensor):
            return None
        self._count(chunk.nbytes)
        return aligned + lead

    def read_pieces(self, chunk: Chunk) -> bool:
        """Read ``chunk`` into its pieces' host memory; ``False`` when it must be buffered."""
        pieces = chunk.pieces
        base = pieces[0].dst.data_ptr() - pieces[0].at
        in_file_order = all(piece.dst.data_ptr() - piece.at == base for piece in pieces)
        if in_file_order and (base - chunk.offset) % DIRECT_ALIGN == 0:
            done = self._in_place(chunk, base)
        else:
            done = self._bounced(chunk)
        if done:
            self._count(chunk.nbytes)
        return done

    def close(self) -> None:
        """Close every ``O_DIRECT`` descriptor and drop the bounce buffers."""
        with self._lock:
            fds = [fd for fd in self._fds.values() if fd is not None] + self._retired
            self._fds.clear()
            self._retired.clear()
        for fd in fds:
            os.close(fd)
        self._bounce.clear()

    # -- internals ---------------------------------------------------------------------------

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self._bytes += nbytes

    def _refuse_locked(self, path: Path, reason: str) -> None:
        """Read ``path`` and its filesystem's other files buffered from now on (lock held).
        Their descriptors stay open until ``close``: other readers may be using them now."""
        device = self._devices.get(path)
        if device is None or device not in self._refused:
            self._notices.append(DirectIOFallback(str(path), reason, requested=self._requested))
        if device is not None:
            self._refused.add(device)
        for other, fd in list(self._fds.items()):
            if other == path or (device is not None and self._devices.get(other) == device):
                if fd is not None:
                    self._retired.append(fd)
                self._fds[other] = None
        self._fds[path] = None

    def _span(self, path: Path, view: memoryview, offset: int, need: int, tensor: str) -> bool:
        """Fill ``view`` (aligned address and length) from ``path`` at ``offset`` (aligned),
        at least its first ``need`` bytes (a file may end inside the last block); ``False``
        when the filesystem refuses."""
        fd = self.fd(path)
        if fd is None:
            return False
        pos = 0
        try:
            while pos < need:
                got = (self._preadv or os.preadv)(fd, [view[pos:]], offset + pos)
                # A read that stops inside a block before ``need`` hit the end of the file.
                if got <= 0 or (pos + got < need and got % DIRECT_ALIGN):
                    end = offset + pos + max(got, 0)
                    raise TruncatedDataError(
                        path, f"file ends at byte {end}, before the tensor's data", tensor=tensor
                    )
                pos += got
        except OSError as exc:
            if exc.errno not in _REFUSALS:
                raise
            with self._lock:
                self._refuse_locked(path, f"O_DIRECT refused at a read: {exc.strerror}")
            return False
        return True

    def _in_place(self, chunk: Chunk, base: int) -> bool:
        """The chunk's aligned middle straight into its memory at ``base`` (co-aligned with
        the file), its partial first and last blocks through a bounce buffer."""
        start, end = chunk.offset, chunk.end
        head = min(align_up(start), end)
        tail = max(align_down(end), head)
        tensor = chunk.pieces[0].tensor
        if tail > head:
            middle = _view(base + head - start, tail - head)
            try:
                if not self._span(chunk.path, middle, head, tail - head, tensor):
                    return False
            finally:
                middle.release()
        for lo, hi in ((start, head), (tail, end)):
            if hi > lo and not self._edge(chunk.path, lo, hi, base + lo - start, tensor):
                return False
        return True

    def _edge(self, path: Path, lo: int, hi: int, address: int, tensor: str) -> bool:
        """File bytes ``[lo, hi)``, inside one aligned block, to ``address``."""
        block = align_down(lo)
        bounce = self._bounce.take(DIRECT_ALIGN)
        try:
            view = _view(bounce.data_ptr(), DIRECT_ALIGN)
            try:
                if not self._span(path, view, block, hi - block, tensor):
                    return False
            finally:
                view.release()
            ctypes.memmove(address, bounce.data_ptr() + lo - block, hi - lo)
        finally:
            self._bounce.give(bounce)
        return True

    def _bounced(self, chunk: Chunk) -> bool:
        """The aligned span around the chunk into a bounce buffer, each piece copied out."""
        lo, hi = align_down(chunk.offset), align_up(chunk.end)
        bounce = self._bounce.take(hi - lo)
        try:
            view = _view(bounce.data_ptr(), hi - lo)
            try:
                if not self._span(chunk.path, view, lo, chunk.end - lo, chunk.pieces[0].tensor):
                    return False
            finally:
                view.release()
            first = chunk.offset - lo
            for piece in chunk.pieces:
                at = first + piece.at
                piece.dst.copy_(bounce[at : at + piece.dst.numel()])
        finally:
            self._bounce.give(bounce)
        return True
