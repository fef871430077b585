"""The reader: shard files, the staging ring, the read queue and its lanes, the prefetch.

Staged devices (CUDA, ``SimulatedGPU``) read each chunk into a slot of a host staging ring
(pinned on CUDA; ``LoadParams.staging_bytes`` in all, independent of the model's size) at its
file offset's position modulo ``STAGING_ALIGN`` and copy it to the device; a slot is refilled
only after its copy's fence completes. A staged unit is read by up to one lane per slot, each a
worker thread holding one slot and taking chunk after chunk of that unit. Unstaged devices are
read into directly with ``os.preadv`` by up to ``reader_threads // 2`` lanes for the whole load,
each a worker thread taking chunk after chunk from one queue in plan order, across unit
boundaries, until it is empty (``ReadQueue``; cancellation is checked between chunks). Reads run
in worker threads under one ``CapacityLimiter`` of ``reader_threads``. Host blocks the disk must
fill are faulted in ahead of their reads by one more worker thread (``engine/_faults``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import torch

from streamload import _hostmem
from streamload.devices import Device, Fence
from streamload.engine._boundary import single
from streamload.engine._direct import DIRECT_ALIGN, DirectReads, align_up
from streamload.engine._faults import FaultAhead
from streamload.engine._flight import ChunkTimes, InFlight
from streamload.engine._units import (
    STAGING_ALIGN,
    Chunk,
    Unit,
    file_reads,
    read_through_bytes,
    runs,
)
from streamload.errors import CheckpointError, StreamloadError, TruncatedDataError
from streamload.events import DirectIOFallback
from streamload.model import ModelSpec
from streamload.params import LoadParams
from streamload.sources import SourceFiles

__all__ = [
    "Files",
    "PageCache",
    "ReadQueue",
    "Reader",
    "StagingRing",
    "await_fence",
    "host_view",
    "read_into",
    "ring_slots",
    "slot_bytes",
    "start_workers",
    "usable_cpus",
]


def host_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous host tensor's bytes (no numpy needed).

    The caller keeps ``tensor`` alive while the view is in use.
    """
    assert tensor.device.type == "cpu"
    assert tensor.is_contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    array = (ctypes.c_uint8 * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


class Files:
    """One read-only descriptor per shard for the whole load, checked against the headers
    (local files; ``streamload.sources.SourceFiles`` is the seam objects are read through)."""

    local = True

    def __init__(self, spec: ModelSpec) -> None:
        self._fds: dict[Path, int] = {}
        self._sizes = {shard.path: shard.file_size for shard in spec.checkpoint.shards}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        """The shard's descriptor, opened on first use (thread-safe)."""
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(path)
            if fd is not None:
                return fd
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise CheckpointError(path, f"cannot open: {exc.strerror}") from exc
            self._fds[path] = fd
        size = os.fstat(fd).st_size
        if size != self._sizes[path]:
            raise TruncatedDataError(
                path,
                f"file changed since its header was read: {size} bytes, "
                f"expected {self._sizes[path]}",
            )
        return fd

    def read(
        self,
        path: Path,
        views: list[memoryview],
        offset: int,
        tensor: str,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        """Fill ``views`` from the shard at ``offset`` (``read_into``; blocking), after
        ``prepare``."""
        if prepare is not None:
            prepare()
        read_into(self.fd(path), views, offset, path, tensor)

    def head(self, path: Path, nbytes: int) -> bytes:
        """The shard's first ``nbytes`` (its prefix and header, for hashing; blocking)."""
        return os.pread(self.fd(path), nbytes, 0)

    def close(self) -> None:
        with self._lock:
            while self._fds:
                _, fd = self._fds.popitem()
                os.close(fd)


def read_into(fd: int, views: list[memoryview], offset: int, path: Path, tensor: str) -> None:
    """Fill ``views`` from ``fd`` at ``offset``; a short file is ``TruncatedDataError``."""
    pending = [v for v in views if v.nbytes]
    while pending:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, pending, offset)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, pending[0].nbytes, offset)
            pending[0][: len(data)] = data
            got = len(data)
        if got == 0:
            raise TruncatedDataError(
                path, f"file ends at byte {offset}, before the tensor's data", tensor=tensor
            )
        offset += got
        while pending and got >= pending[0].nbytes:
            got -= pending[0].nbytes
            pending.pop(0)
        if got:
            pending[0] = pending[0][got:]


# Called with a chunk's bytes once they are in host memory, in the reader thread: the file,
# the offset, the bytes (uint8 host tensors, in file order) and whether they stay where they
# are after the call (a destination) or are reused (a staging slot). ``LoadParams.verify``.
Feed = Callable[[Path, int, list[torch.Tensor], bool], None]


def read_direct(
    files: SourceFiles,
    chunk: Chunk,
    feed: Feed | None = None,
    stable: bool = True,
    direct: DirectReads | None = None,
) -> ChunkTimes:
    """Read ``chunk`` straight into its host destinations (blocking), faulting in the 4 KiB
    pages the pieces say (``_hostmem.prefault``) before the bytes arrive: before a file's read,
    while an object's response is on its way; not before an ``O_DIRECT`` read, which faults
    them in itself a bio at a time, each bio's read under way while the next is faulted in
    (where a lane faulted the whole chunk first, the disk waited while every lane faulted).
    Returns when the read ran. ``stable``: the
    destinations keep these bytes after the read (no conversion buffer, which a later unit may
    reuse). A chunk with holes (a strided slice) is never fed to the verifier: its bytes are
    not the file's. ``direct``: with ``O_DIRECT`` where the filesystem allows (chunks without
    holes)."""
    started = time.perf_counter()

    def prefault() -> None:
        for piece in chunk.pieces:
            if piece.fault_from < len(piece.dst):
                _hostmem.prefault(piece.dst[piece.fault_from :])

    if direct is not None and not chunk.holes:
        if not direct.read_pieces(chunk):  # refused: through the page cache, faulted in
            _read_pieces(files, chunk, prefault)
    else:
        _read_pieces(files, chunk, prefault)
    if feed is not None and not chunk.holes:
        feed(chunk.path, chunk.offset, [piece.dst for piece in chunk.pieces], stable)
    ended = time.perf_counter()
    return ChunkTimes(started, ended, ended)


_POLL_FIRST = 50e-6  # seconds: the first pause between polls of a fence
_POLL_MOST = 1e-3  # seconds: pauses double up to this


def await_fence(fence: Fence) -> None:
    """Wait for ``fence`` in an anyio worker thread: poll ``done()`` with short sleeps (doubling
    up to a millisecond) and check for cancellation between polls. A thread blocked in a CUDA
    event's ``synchronize()`` cannot be abandoned, so a hung GPU would keep a cancelled load
    from ending; a poll never blocks."""
    pause = _POLL_FIRST
    while not fence.done():
        anyio.from_thread.check_cancelled()
        time.sleep(pause)
        pause = min(pause * 2, _POLL_MOST)


@dataclass(slots=True)
class Slot:
    buffer: torch.Tensor  # uint8 host buffer (pinned on CUDA)
    view: memoryview  # writable view of the same bytes, for preadv
    fence: Fence | None = None
    aligned: int = 0  # the buffer's first DIRECT_ALIGN-aligned byte (O_DIRECT reads start there)


def read_staged(
    files: SourceFiles,
    device: Device,
    chunk: Chunk,
    slot: Slot,
    feed: Feed | None = None,
    direct: DirectReads | None = None,
) -> tuple[Fence, ChunkTimes]:
    """Read ``chunk`` into ``slot`` and start its copies to ``device`` (blocking); returns the
    fence of the last copy (copies to one device complete in order) and when the read and the
    copy submissions ran (waiting for the slot's previous copy is neither). ``direct``: with
    ``O_DIRECT`` where the filesystem allows (the aligned span around the chunk)."""
    if slot.fence is not None:
        await_fence(slot.fence)  # the previous copy out of this slot has finished
        slot.fence = None
    started = time.perf_counter()
    lead = None
    if direct is not None and not chunk.holes:
        lead = direct.read_staged(chunk, slot.view, slot.aligned)
    if lead is None:
        lead = _read_buffered(files, chunk, slot)
    if feed is not None and not chunk.holes:
        feed(chunk.path, chunk.offset, [slot.buffer[lead : lead + chunk.nbytes]], False)
    read = time.perf_counter()
    fence: Fence | None = None
    for piece in chunk.pieces:
        # Host-memory devices' destinations take host page faults (a pre-faulted arena none).
        if piece.fault_from < len(piece.dst) and device.host_memory:
            _hostmem.prefault(piece.dst[piece.fault_from :])
        at = lead + piece.at
        fence = device.copy_from_host(piece.dst, slot.buffer[at : at + piece.dst.numel()])
    assert fence is not None
    slot.fence = fence
    return fence, ChunkTimes(started, read, time.perf_counter())


def _read_buffered(files: SourceFiles, chunk: Chunk, slot: Slot) -> int:
    """Read ``chunk`` into ``slot`` through the page cache, co-aligned with it; returns where
    the chunk's first byte landed."""
    lead = chunk.offset % STAGING_ALIGN  # co-align with the page cache
    if lead + chunk.nbytes > len(slot.view):
        lead = 0
    if chunk.holes:
        _read_holed(files, chunk, lambda start, end: [slot.view[lead + start : lead + end]])
    else:
        view = slot.view[lead : lead + chunk.nbytes]
        files.read(chunk.path, [view], chunk.offset, chunk.pieces[0].tensor)
    return lead


def _read_pieces(files: SourceFiles, chunk: Chunk, prepare: Callable[[], None] | None) -> None:
    """Fill the chunk's pieces through ``files`` (``prepare``: fault them in once the read is
    under way, or first for a chunk with holes)."""
    views = [host_view(piece.dst) for piece in chunk.pieces]
    try:
        if chunk.holes:
            if prepare is not None:
                prepare()
            _read_holed(files, chunk, lambda start, end: _piece_views(chunk, views, start, end))
        else:
            files.read(chunk.path, views, chunk.offset, chunk.pieces[0].tensor, prepare)
    finally:
        for view in views:
            view.release()


def _read_holed(
    files: SourceFiles, chunk: Chunk, data: Callable[[int, int], list[memoryview]]
) -> None:
    """Fill a chunk with holes: one ``files.read`` per run of rows (``file_reads``), each a
    vector of the rows' pieces (``data(start, end)``: the buffers for chunk data ``start`` to
    ``end``) with the holes it reads through going to one discard buffer."""
    reads = file_reads(chunk, read_through_bytes(files.local))
    longest = max((n for r in reads for at, n in r.parts if at is None), default=0)
    discard = memoryview(bytearray(longest))
    tensor = chunk.pieces[0].tensor
    for read in reads:
        views: list[memoryview] = []
        for at, length in read.parts:
            if at is None:
                views.append(discard[:length])
            else:
                views.extend(data(at, at + length))
        files.read(chunk.path, views, read.offset, tensor)


def _piece_views(chunk: Chunk, views: list[memoryview], start: int, end: int) -> list[memoryview]:
    """The parts of the pieces' ``views`` that hold chunk data ``start`` to ``end``."""
    out = []
    for piece, view in zip(chunk.pieces, views, strict=True):
        lo, hi = max(start, piece.at), min(end, piece.at + view.nbytes)
        if lo < hi:
            out.append(view[lo - piece.at : hi - piece.at])
    return out


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # pragma: no cover - platforms without affinity


def slot_bytes(chunk_bytes: int, direct: bool) -> int:
    """A staging slot's size: ``chunk_bytes``, and for ``O_DIRECT`` reads room for the 4 KiB
    aligned span around any chunk from the slot's first aligned byte (two 4 KiB blocks more:
    one for the span, one for the buffer's start)."""
    return align_up(chunk_bytes) + 2 * DIRECT_ALIGN if direct else chunk_bytes


def ring_slots(params: LoadParams, cpus: int, direct: bool = False) -> int:
    """How many slots the staging ring gets (``slot_bytes`` each; ``direct``: with room for
    ``O_DIRECT`` reads).

    A staged read is a copy by the CPU (page cache to the slot) and, on a simulated GPU,
    another (slot to device memory). Slots beyond what the CPUs can keep busy only add host
    memory that has to be faulted in and falls out of cache; one slot fewer than that leaves
    the disk idle on a cold load (the CHANGELOG has the measurements). So: the usable CPUs + 1,
    at most as many as the budget holds (``staging_bytes``), at most ``reader_threads`` (no more
    reads run at once), and at least 2 (one slot fills while the other's copy runs).
    """
    budget = params.staging_bytes // slot_bytes(params.chunk_bytes, direct)
    return max(2, min(budget, params.reader_threads, cpus + 1))


class StagingRing:
    """Fixed host buffers reused in turn; a slot is refilled only after its copy's fence.

    Free slots are handed out oldest-released first: on CUDA the copy out of the slot released
    longest ago is the likeliest to have finished already.
    """

    def __init__(self, slots: list[Slot], slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self._slots = list(slots)
        self._free = deque(slots)
        self._available = anyio.Semaphore(len(slots))

    @staticmethod
    def make_slots(
        device: Device, count: int, chunk_bytes: int, direct: bool = False
    ) -> list[Slot]:
        """``count`` host buffers from ``device`` (pinned on CUDA; blocking), each of
        ``slot_bytes(chunk_bytes, direct)``."""
        size = slot_bytes(chunk_bytes, direct)
        slots = []
        for _ in range(count):
            buffer = device.host_buffer(size)
            aligned = -buffer.data_ptr() % DIRECT_ALIGN if direct else 0
            slots.append(Slot(buffer, host_view(buffer), aligned=aligned))
        return slots

    @property
    def nbytes(self) -> int:
        return sum(slot.buffer.numel() for slot in self._slots)

    @property
    def count(self) -> int:
        return len(self._slots)

    async def acquire(self) -> Slot:
        await self._available.acquire()
        return self._free.popleft()

    def release(self, slot: Slot) -> None:
        self._free.append(slot)
        self._available.release()

    def close(self) -> None:
        """Drop the buffers without waiting for copies still reading them: a device that
        copies later keeps its source alive (torch's pinned-host allocator reuses a block only
        after the events recorded by copies out of it; a simulated GPU's copy holds a
        reference), and a wait here could hang a cancelled load on a hung GPU."""
        for slot in self._slots:
            slot.fence = None
            slot.view.release()
        self._slots.clear()
        self._free.clear()


class ReadQueue:
    """The chunks to read straight into host memory, in plan order, and the reader lanes
    (worker threads) taking them.

    Lanes are started as units are queued, up to ``lanes``, and each reads chunk after chunk,
    across unit boundaries, until the queue is empty; then it ends (and gives its
    ``CapacityLimiter`` token back). So a unit's last chunks and the next unit's first ones are
    read side by side, with one event-loop round trip per lane run and per unit read instead of
    one per lane and unit. Thread-safe.
    """

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        self._lock = threading.Lock()
        self._work: deque[tuple[InFlight, Chunk]] = deque()
        self._running = 0

    def put(self, flight: InFlight, lanes: int | None = None) -> int:
        """Queue ``flight``'s chunks; returns how many lanes to start for them (up to
        ``lanes`` running, ``self.lanes`` when not given)."""
        with self._lock:
            flight.pending = len(flight.chunks)
            self._work.extend((flight, chunk) for chunk in flight.chunks)
            most = self.lanes if lanes is None else lanes
            start = max(0, min(most, len(self._work)) - self._running)
            self._running += start
            return start

    def take(self) -> tuple[InFlight, Chunk] | None:
        """The next chunk, or ``None`` when there is none (the calling lane then ends)."""
        with self._lock:
            if self._work:
                return self._work.popleft()
            self._running -= 1
            return None

    def leave(self) -> None:
        """A lane ends without emptying the queue (cancelled)."""
        with self._lock:
            self._running -= 1

    def read(self, flight: InFlight, error: BaseException | None, times: ChunkTimes | None) -> bool:
        """Count one of ``flight``'s chunks as read (``error``: failed; the first is kept and
        its unit's other chunks are skipped; ``times``: when it was read, if it was). True
        when it was the unit's last one."""
        with self._lock:
            if error is not None and flight.error is None:
                flight.error = error
            if times is not None:
                flight.times.append(times)
            flight.pending -= 1
            return flight.pending == 0


class _UnitChunks:
    """One staged unit's chunks, handed to its lanes in plan order, and what their reads
    give back (each copy's fence and the chunk's times, into the unit's ``InFlight``).
    Thread-safe."""

    def __init__(self, flight: InFlight) -> None:
        self._flight = flight
        self._next = 0
        self._failed = False
        self._lock = threading.Lock()

    def take(self) -> Chunk | None:
        """The next chunk, or ``None`` when there is none or a read failed (the lane ends)."""
        with self._lock:
            chunks = self._flight.chunks
            if self._failed or self._next >= len(chunks):
                return None
            self._next += 1
            return chunks[self._next - 1]

    def read(self, fence: Fence, times: ChunkTimes) -> None:
        with self._lock:
            self._flight.fences.append(fence)
            self._flight.times.append(times)

    def fail(self) -> None:
        with self._lock:
            self._failed = True


class _Counted:
    """The load's files, counting the bytes read from them (holes read through included)."""

    def __init__(self, files: SourceFiles) -> None:
        self.files = files
        self.local = files.local
        self.read_bytes = 0
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        return self.files.fd(path)

    def read(
        self,
        path: Path,
        views: list[memoryview],
        offset: int,
        tensor: str,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self.files.read(path, views, offset, tensor, prepare)
        with self._lock:
            self.read_bytes += sum(view.nbytes for view in views)

    def head(self, path: Path, nbytes: int) -> bytes:
        return self.files.head(path, nbytes)

    def close(self) -> None:
        self.files.close()


class Reader:
    """Reads units into their destinations: staged through the ring, or by the lanes.

    ``on_filled`` runs on the event loop when a unit's reads are over (its ``done`` is then
    set); read errors are kept on the unit for the orchestrator to raise in order.
    """

    def __init__(
        self,
        spec: ModelSpec,
        params: LoadParams,
        on_filled: Callable[[InFlight], None],
        files: SourceFiles | None = None,
        feed: Feed | None = None,
        direct: DirectReads | None = None,
    ) -> None:
        self._counted = _Counted(Files(spec) if files is None else files)
        self.files: SourceFiles = self._counted
        # O_DIRECT reads of local files (``LoadParams.direct_io``); ``direct``: given by a test.
        if direct is None and params.direct_io is not False and self.files.local:
            direct = DirectReads(self.files, requested=params.direct_io is True)
        self.direct = direct
        self._feed = feed
        self._params = params
        self._on_filled = on_filled
        self._limiter = anyio.CapacityLimiter(params.reader_threads)
        self._queue = ReadQueue(max(1, params.reader_threads // 2))
        self.faults = FaultAhead()
        self._ring: StagingRing | None = None
        self._ring_lock = anyio.Lock()

    @property
    def read_bytes(self) -> int:
        """Bytes read from storage so far (tensor data, holes read through included; headers
        and memory-mapped tensors are not read here)."""
        direct = 0 if self.direct is None else self.direct.bytes_read
        return self._counted.read_bytes + direct

    @property
    def staging_bytes(self) -> int:
        """Host bytes in the staging ring (0 while no staged unit was read)."""
        return 0 if self._ring is None else self._ring.nbytes

    def take_notices(self) -> list[DirectIOFallback]:
        """Refusals of ``O_DIRECT`` since the last call, each once (the orchestrator emits
        them)."""
        return [] if self.direct is None else self.direct.take_notices()

    def start(self, flight: InFlight, group: anyio.abc.TaskGroup) -> None:
        """Start reading ``flight`` in ``group`` (on the event loop)."""
        if flight.device.staged:
            group.start_soon(self._fill, flight)
        elif not flight.chunks:
            self._filled(flight)
        else:
            for _ in range(self._queue.put(flight, self._lanes(flight))):
                group.start_soon(self._lane)
            if flight.fault_ahead and self.faults.put(flight):
                group.start_soon(self._fault_ahead)

    def _lanes(self, flight: InFlight) -> int:
        """Lanes for a unit read straight into its destination: ``reader_threads // 2`` from
        the page cache, where two lanes per core already keep both busy copying and more
        only contend; ``reader_threads`` for a local unit the disk must read, since a lane
        faulting fresh destination pages in has no read in flight meanwhile and the disk
        would wait (``benchmarks/results/measurements.md``)."""
        if flight.cold and self.files.local:
            return max(1, self._params.reader_threads)
        return self._queue.lanes

    def prefetch(self, unit: Unit, probe: Callable[[], bool]) -> None:
        """Ask the kernel to start reading ``unit``'s bytes into the page cache now, so the
        disk works ahead of the allocation window (no process memory is used); blocking.
        ``probe`` runs first (the page-cache warmth probe must see the cache before the
        read-ahead fills it); it answers whether the unit is read with ``O_DIRECT``, and then
        no advice is given (the disk would read the bytes twice: into the cache, then past it).
        Best effort: a file that cannot be opened is reported by the read, in context."""
        if not hasattr(os, "posix_fadvise") or not self.files.local:
            return
        direct = False
        with contextlib.suppress(OSError, StreamloadError):
            direct = probe()
        if direct and self.direct is not None:
            return
        for path, start, end in runs(unit):
            with contextlib.suppress(OSError, StreamloadError):
                os.posix_fadvise(self.files.fd(path), start, end - start, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        """Drop the ring, forget the units to fault in, close every file (blocking)."""
        self.faults.close()
        if self._ring is not None:
            with contextlib.suppress(Exception):
                self._ring.close()
            self._ring = None
        if self.direct is not None:
            with contextlib.suppress(OSError):
                self.direct.close()
        self.files.close()

    def _filled(self, flight: InFlight) -> None:
        flight.filled = time.perf_counter()
        flight.done.set()
        self._on_filled(flight)

    async def _fill(self, flight: InFlight) -> None:
        """Read and copy every chunk of one unit bound for a staged device, by up to one lane
        per ring slot: a worker thread that holds one slot and reads chunk after chunk of the
        unit into it, so a unit costs the event loop one round trip per lane, not one per
        chunk. A unit still ends only when its last chunk has been read."""
        try:
            ring = await self._ring_for(flight.device)
            work = _UnitChunks(flight)
            async with anyio.create_task_group() as group:
                for _ in range(min(ring.count, len(flight.chunks))):
                    group.start_soon(self._staged_lane, flight, ring, work)
        except Exception as exc:
            flight.error = single(exc)
        finally:
            self._filled(flight)

    async def _staged_lane(self, flight: InFlight, ring: StagingRing, work: _UnitChunks) -> None:
        slot = await ring.acquire()
        try:
            await anyio.to_thread.run_sync(
                self._stage_chunks, flight, slot, work, limiter=self._limiter
            )
        finally:
            ring.release(slot)

    def _stage_chunks(self, flight: InFlight, slot: Slot, work: _UnitChunks) -> None:
        """One staged lane (a worker thread): chunk after chunk of the unit through ``slot``
        until none is left or one failed; cancellation is checked between chunks."""
        direct = self.direct if flight.direct_io else None
        while (chunk := work.take()) is not None:
            anyio.from_thread.check_cancelled()
            try:
                fence, times = read_staged(
                    self.files, flight.device, chunk, slot, self._feed, direct
                )
            except BaseException:
                work.fail()
                raise
            work.read(fence, times)

    async def _ring_for(self, device: Device) -> StagingRing:
        """The load's staging ring, made on first use in a worker thread (pinning host memory
        can take tens of milliseconds, too long for the event loop)."""
        async with self._ring_lock:
            if self._ring is None:
                params = self._params
                direct = self.direct is not None
                count = ring_slots(params, usable_cpus(), direct)
                slots = await anyio.to_thread.run_sync(
                    StagingRing.make_slots, device, count, params.chunk_bytes, direct
                )
                self._ring = StagingRing(slots, params.chunk_bytes)
        return self._ring

    async def _lane(self) -> None:
        await anyio.to_thread.run_sync(self._read_lane, limiter=self._limiter)

    async def _fault_ahead(self) -> None:
        await anyio.to_thread.run_sync(self.faults.run)

    def _read_lane(self) -> None:
        """One reader lane (a worker thread): chunk after chunk from the queue until it is
        empty. Cancellation is checked between chunks; a read error is kept for its unit."""
        queue = self._queue
        try:
            anyio.from_thread.check_cancelled()
        except BaseException:
            queue.leave()
            raise
        while (item := queue.take()) is not None:
            flight, chunk = item
            error: BaseException | None = None
            times: ChunkTimes | None = None
            direct = self.direct if flight.direct_io else None
            try:
                if flight.error is None and self._feed is None and direct is None:
                    times = read_direct(self.files, chunk)
                elif flight.error is None:
                    times = read_direct(self.files, chunk, self._feed, not flight.raw, direct)
            except Exception as exc:
                error = exc
            if queue.read(flight, error, times):
                anyio.from_thread.run_sync(self._filled, flight)
            try:
                anyio.from_thread.check_cancelled()
            except BaseException:
                queue.leave()
                raise


def _no_op() -> None:
    pass


async def start_workers(count: int) -> None:
    """Make sure the loop's worker-thread pool holds ``count`` threads before reads start.

    anyio starts a worker thread the first time every existing one is busy, and
    ``Thread.start`` holds the event loop until the new thread runs; started mid-load, with the
    CPUs busy copying, that stalls the loop far longer than on idle CPUs before planning (the
    CHANGELOG has the figures). ``count`` calls that are all in flight at once need ``count``
    threads; threads already idle in the pool are used as they are (anyio retires a thread
    after 10 s idle).
    """
    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(anyio.to_thread.run_sync, _no_op)


class PageCache:
    """Whether each unit was mostly in the page cache when first asked, before the load's own
    read-ahead of it (``_hostmem.cached_fraction`` samples it; unknown counts as cold); for
    objects, ``None``: there is no page cache to find them in."""

    def __init__(self, files: SourceFiles) -> None:
        self._files = files
        self._warm: dict[int, bool] = {}  # by unit identity: units live as long as the load

    def known(self, unit: Unit) -> bool | None:
        """``warm``'s kept answer for ``unit``, or ``None`` when it was not asked yet (not
        blocking)."""
        return self._warm.get(id(unit))

    def warm(self, unit: Unit) -> bool | None:
        """Blocking (reads the page cache's state); the first answer for a unit is kept."""
        if not self._files.local:
            return None
        warm = self._warm.get(id(unit))
        if warm is None:
            ranges = [(self._files.fd(path), start, end - start) for path, start, end in runs(unit)]
            fraction = _hostmem.cached_fraction(ranges)
            warm = self._warm[id(unit)] = fraction is not None and fraction > 0.5
        return warm
