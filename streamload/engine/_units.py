"""What a load reads, in which order, cut into which reads: pure functions of the model spec.

A *unit* is one step of the stream: a non-mapped part (on the primary device) or a layer.
Units come in plan order: the non-mapped parts, then layers 0..n-1 (DESIGN §5). A unit's read
destinations are cut into *chunks*: reads of at most ``chunk_bytes`` over file-adjacent tensors,
each chunk a list of *pieces* (one per destination it fills), at most ``MAX_PIECES_PER_CHUNK``
of them so one ``preadv`` takes a chunk whole.

A strided entry (a tensor-parallel slice along a later dimension: one run of bytes per row)
is cut the same way, its rows in order; a chunk may then skip file bytes between two of its
rows (its *holes*: other ranks' pieces of those rows). ``file_reads`` turns a chunk into the
reads that fill it: one per run of rows, each a vector of the rows' pieces, a hole shorter
than the source's read-through length read into a discard buffer rather than starting a new
read, and no read longer than ``MAX_IOVECS`` buffers.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamload.checkpoint import TensorEntry
from streamload.model import ModelSpec
from streamload.planner import raw_bytes

__all__ = [
    "MAX_IOVECS",
    "MAX_PIECES_PER_CHUNK",
    "STAGING_ALIGN",
    "Chunk",
    "Destination",
    "FileRead",
    "Piece",
    "Unit",
    "converts",
    "cut_chunks",
    "file_reads",
    "read_chunk_bytes",
    "read_through_bytes",
    "runs",
    "units",
]

MAX_PIECES_PER_CHUNK = 512  # well under IOV_MAX (1024) for one preadv
MAX_IOVECS = 1024  # Linux's IOV_MAX: the most buffers one preadv takes
# A hole of at most this many bytes between two rows of a strided read is read through into a
# discard buffer instead of ending the read: from local files, a hole shorter than the kernel's
# default read-ahead window (128 KiB) is read from the disk anyway, and copying that much costs
# less than another system call; from an object store, another ranged GET costs a round trip,
# worth several MiB of transfer.
READ_THROUGH_LOCAL = 64 * 2**10
READ_THROUGH_OBJECT = 4 * 2**20
# A staged chunk is read into its slot at the file offset's position modulo a cache line, so
# the kernel's copy out of the page cache runs with source and destination co-aligned (a read
# into a misaligned destination is slower: benchmarks/results and the CHANGELOG have the
# figures). Staged chunks are cut this much short of ``chunk_bytes`` to make room.
STAGING_ALIGN = 64


@dataclass(frozen=True, slots=True)
class Unit:
    """A layer (``layer`` set) or a non-mapped part (``part`` set) streamed as one step."""

    layer: int | None
    part: str | None
    entries: tuple[TensorEntry, ...]
    nbytes: int
    stored_bytes: int
    raw_bytes: int  # stored bytes of the tensors that convert (``planner.raw_bytes``)

    @property
    def where(self) -> str:
        """How messages name the unit: ``"layer 3"`` or the part's name."""
        return f"layer {self.layer}" if self.layer is not None else str(self.part)


def units(spec: ModelSpec) -> list[Unit]:
    """``spec``'s units in plan order: non-mapped parts, then layers by index."""
    entries = spec.checkpoint.tensors
    out = []
    for part in spec.non_mapped:
        got = tuple(entries[name] for name in part.tensors)
        raw = raw_bytes(spec, part.tensors)
        out.append(Unit(None, part.name, got, part.nbytes, part.stored_bytes, raw))
    for layer in spec.layers:
        got = tuple(entries[name] for name in layer.tensors)
        raw = raw_bytes(spec, layer.tensors)
        out.append(Unit(layer.index, None, got, layer.nbytes, layer.stored_bytes, raw))
    return out


def converts(spec: ModelSpec, target: str | None, entry: TensorEntry) -> bool:
    """Whether ``entry`` changes dtype when placed (the spec decides which tensors take the
    target dtype: floats do; integer, FP8 and quantization side tensors keep theirs)."""
    return target is not None and spec.placed_dtype(entry.name) != entry.dtype


def runs(unit: Unit) -> list[tuple[Path, int, int]]:
    """The byte ranges ``unit``'s tensors fill in its files (path, start, end), adjacent
    tensors merged; other units' tensors stored between them are left out. A strided entry
    gives the ranges a local read of it covers (rows whose holes it reads through merged)."""
    out: list[tuple[Path, int, int]] = []
    for entry in sorted(unit.entries, key=lambda e: (str(e.path), e.offset)):
        for start, end in _entry_ranges(entry):
            if out and out[-1][0] == entry.path and out[-1][2] == start:
                out[-1] = (entry.path, out[-1][1], end)
            elif end > start:
                out.append((entry.path, start, end))
    return out


def _entry_ranges(entry: TensorEntry) -> list[tuple[int, int]]:
    if entry.contiguous:
        return [(entry.offset, entry.end)]
    out: list[tuple[int, int]] = []
    for row in range(entry.rows):
        start = entry.offset + row * entry.row_stride
        if out and start - out[-1][1] <= READ_THROUGH_LOCAL:
            out[-1] = (out[-1][0], start + entry.row_bytes)
        else:
            out.append((start, start + entry.row_bytes))
    return out


def read_through_bytes(local: bool) -> int:
    """The longest hole a strided read reads through (``READ_THROUGH_LOCAL`` or ``_OBJECT``)."""
    return READ_THROUGH_LOCAL if local else READ_THROUGH_OBJECT


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one tensor's file bytes go: ``view`` is a ``uint8`` view of the destination (the
    final tensor, or its raw buffer when it converts); bytes from ``small_from`` on are in
    4 KiB pages (pre-faulted before the read), those before in huge pages (left to the copy)."""

    entry: TensorEntry
    view: torch.Tensor
    small_from: int


@dataclass(slots=True)
class Piece:
    dst: torch.Tensor  # uint8 view of the destination (raw) bytes
    at: int  # offset inside the chunk
    tensor: str
    # Fault the host destination's bytes from here on in before the read/copy (``len(dst)``:
    # none). Those in 4 KiB pages only: ``_hostmem.prefault`` says why not huge pages.
    fault_from: int = 0


@dataclass(slots=True)
class Chunk:
    """One read's worth of destinations: ``nbytes`` of data from ``path`` at ``offset``, in
    ``pieces`` (laid end to end, ``Piece.at`` apart). ``holes``: file bytes the data skips,
    as (data position, bytes skipped), in order; a chunk of whole tensors has none."""

    path: Path
    offset: int
    nbytes: int = 0
    pieces: list[Piece] = field(default_factory=list)
    holes: list[tuple[int, int]] = field(default_factory=list)
    skipped: int = 0  # the holes' bytes, summed

    @property
    def end(self) -> int:
        """One past the chunk's last byte in its file."""
        return self.offset + self.nbytes + self.skipped


@dataclass(frozen=True, slots=True)
class FileRead:
    """One read of a chunk: from file ``offset``, ``parts`` in order, each (data position,
    length) or (``None``, length) for a hole read through into a discard buffer."""

    offset: int
    parts: tuple[tuple[int | None, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.parts)


def read_chunk_bytes(chunk_bytes: int, staged: bool) -> int:
    """The longest read for a device: staged reads leave ``STAGING_ALIGN`` bytes of their slot
    free to start co-aligned with the file offset."""
    if staged and chunk_bytes >= 2 * STAGING_ALIGN:
        return chunk_bytes - STAGING_ALIGN
    return chunk_bytes


def cut_chunks(items: Sequence[Destination], chunk_bytes: int) -> list[Chunk]:
    """Cut file-adjacent destinations into reads of at most ``chunk_bytes``, in file order; a
    strided destination's rows join one chunk across the holes between them."""
    chunks: list[Chunk] = []
    current: Chunk | None = None
    for item in sorted(items, key=lambda item: (str(item.entry.path), item.entry.offset)):
        entry, dst = item.entry, item.view
        row_bytes = entry.row_bytes
        opened = -1  # data position in ``dst`` where the chunk's piece of it starts
        for row in range(entry.rows):
            base = entry.offset + row * entry.row_stride
            pos = 0
            while pos < row_bytes:
                start = base + pos
                joins = (
                    current is not None
                    and current.path == entry.path
                    and current.nbytes < chunk_bytes
                    and (
                        current.end == start
                        or (pos == 0 and row > 0 and opened >= 0 and current.end < start)
                    )
                )
                if current is None or not joins or len(current.pieces) >= MAX_PIECES_PER_CHUNK:
                    current = Chunk(entry.path, start)
                    chunks.append(current)
                    opened = -1
                elif current.end != start:
                    current.holes.append((current.nbytes, start - current.end))
                    current.skipped += start - current.end
                take = min(row_bytes - pos, chunk_bytes - current.nbytes)
                at = row * row_bytes + pos  # position in the destination
                if opened < 0:
                    opened = at
                    current.pieces.append(Piece(dst[at:at], current.nbytes, entry.name))
                piece = current.pieces[-1]
                piece.dst = dst[opened : at + take]
                piece.fault_from = min(max(item.small_from - opened, 0), at + take - opened)
                current.nbytes += take
                pos += take
    return chunks


def file_reads(chunk: Chunk, read_through: int) -> list[FileRead]:
    """The reads that fill ``chunk``: a hole of at most ``read_through`` bytes is read into a
    discard buffer, a longer one starts the next read; a read takes at most ``MAX_IOVECS``
    buffers (a data part crossing a piece boundary takes one buffer per piece)."""
    starts = [piece.at for piece in chunk.pieces]
    reads: list[FileRead] = []
    parts: list[tuple[int | None, int]] = []
    iovecs = 0
    offset = chunk.offset
    cursor = chunk.offset
    edges = [*chunk.holes, (chunk.nbytes, 0)]
    data = 0
    for at, skip in edges:
        if at > data:
            need = 1 + bisect_left(starts, at) - bisect_right(starts, data)
            if parts and iovecs + need > MAX_IOVECS:
                reads.append(FileRead(offset, tuple(parts)))
                parts, iovecs, offset = [], 0, cursor
            parts.append((data, at - data))
            iovecs += need
            cursor += at - data
            data = at
        if skip == 0:
            continue
        # Room for the discard buffer and the next row's piece, or the hole ends the read.
        if skip <= read_through and parts and iovecs + 2 <= MAX_IOVECS:
            parts.append((None, skip))
            iovecs += 1
        elif parts:
            reads.append(FileRead(offset, tuple(parts)))
            parts, iovecs, offset = [], 0, cursor + skip
        else:
            offset = cursor + skip
        cursor += skip
    if parts:
        reads.append(FileRead(offset, tuple(parts)))
    return reads
