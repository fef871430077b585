"""What a load reads, in which order, cut into which reads: pure functions of the model spec.

A *unit* is one step of the stream: a non-mapped part (on the primary device) or a layer.
Units come in plan order: the non-mapped parts, then layers 0..n-1 (DESIGN §5). A unit's read
destinations are cut into *chunks*: reads of at most ``chunk_bytes`` over file-adjacent tensors,
each chunk a list of *pieces* (one per destination it fills), at most ``MAX_PIECES_PER_CHUNK``
of them so one ``preadv`` takes a chunk whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamload.checkpoint import TensorEntry
from streamload.model import ModelSpec
from streamload.planner import raw_bytes

__all__ = [
    "MAX_PIECES_PER_CHUNK",
    "STAGING_ALIGN",
    "Chunk",
    "Destination",
    "Piece",
    "Unit",
    "converts",
    "cut_chunks",
    "read_chunk_bytes",
    "runs",
    "units",
]

MAX_PIECES_PER_CHUNK = 512  # well under IOV_MAX (1024) for one preadv
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
    tensors merged; other units' tensors stored between them are left out."""
    out: list[tuple[Path, int, int]] = []
    for entry in sorted(unit.entries, key=lambda e: (str(e.path), e.offset)):
        if out and out[-1][0] == entry.path and out[-1][2] == entry.offset:
            out[-1] = (entry.path, out[-1][1], entry.end)
        elif entry.nbytes:
            out.append((entry.path, entry.offset, entry.end))
    return out


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
    path: Path
    offset: int
    nbytes: int = 0
    pieces: list[Piece] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def read_chunk_bytes(chunk_bytes: int, staged: bool) -> int:
    """The longest read for a device: staged reads leave ``STAGING_ALIGN`` bytes of their slot
    free to start co-aligned with the file offset."""
    if staged and chunk_bytes >= 2 * STAGING_ALIGN:
        return chunk_bytes - STAGING_ALIGN
    return chunk_bytes


def cut_chunks(items: Sequence[Destination], chunk_bytes: int) -> list[Chunk]:
    """Cut file-adjacent destinations into reads of at most ``chunk_bytes``, in file order."""
    chunks: list[Chunk] = []
    current: Chunk | None = None
    for item in sorted(items, key=lambda item: (str(item.entry.path), item.entry.offset)):
        entry, dst = item.entry, item.view
        pos = 0
        while pos < entry.nbytes:
            start = entry.offset + pos
            if (
                current is None
                or current.path != entry.path
                or current.end != start
                or current.nbytes >= chunk_bytes
                or len(current.pieces) >= MAX_PIECES_PER_CHUNK
            ):
                current = Chunk(entry.path, start)
                chunks.append(current)
            take = min(entry.nbytes - pos, chunk_bytes - current.nbytes)
            fault_from = min(max(item.small_from - pos, 0), take)
            current.pieces.append(
                Piece(dst[pos : pos + take], current.nbytes, entry.name, fault_from)
            )
            current.nbytes += take
            pos += take
    return chunks
