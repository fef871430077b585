"""A unit in flight: allocated on its device, being read, not yet placed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import torch

from streamload.devices import Device, Fence
from streamload.engine._units import Chunk, Unit

__all__ = ["ChunkTimes", "Completion", "InFlight", "covered"]


@dataclass(frozen=True, slots=True)
class ChunkTimes:
    """When one chunk's read ran (``perf_counter``) and, on a staged device, until when its
    copies were being submitted (``copy_end``; equal to ``read_end`` for direct reads)."""

    read_start: float
    read_end: float
    copy_end: float


@dataclass(frozen=True, slots=True)
class Completion:
    """When a unit's completion started, its copies had been waited for and its dtypes
    converted (``perf_counter``)."""

    start: float
    copied: float
    converted: float


def covered(spans: Iterable[tuple[float, float]]) -> float:
    """Seconds covered by at least one of ``spans`` (``(start, end)`` pairs; overlaps once)."""
    total = 0.0
    reach = float("-inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


@dataclass(slots=True)
class InFlight:
    """One unit between its allocation and its placement.

    The orchestrator makes it from an allocation; the reader fills it (``fences``, ``error``,
    ``pending``, then ``done``); completion converts it and hands ``final`` on.
    """

    unit: Unit
    device: Device
    final: dict[str, torch.Tensor]  # name -> tensor on the device, target dtype
    raw: dict[str, torch.Tensor]  # name -> stored-dtype buffer on the device (converted only)
    chunks: list[Chunk]
    raw_bytes: int
    started: float
    free_before: int
    huge_bytes: int  # bytes of final tensors given huge pages
    direct_io: bool = False  # read with O_DIRECT where the filesystem allows (``_direct``)
    cold: bool = False  # read by the lanes and mostly not in the page cache (``Layout.cold``)
    fault_ahead: bool = False  # faulted in ahead of its reads (``Layout.fault_ahead``)
    fences: list[Fence] = field(default_factory=list)
    error: BaseException | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    pending: int = 0  # chunks queued for the reader lanes and not yet read (unstaged devices)
    allocated: float = 0.0  # when the allocation returned
    filled: float = 0.0  # when the last read (and copy submission) finished
    # Each chunk's read and copy times (and, staged, its copy's fence in ``fences``), appended
    # by a reader lane under its unit's lock (staged) or the read queue's (direct reads).
    times: list[ChunkTimes] = field(default_factory=list)

    def drop(self) -> None:
        """Forget every tensor (pieces too: a stale frame may still hold a chunk)."""
        self.final.clear()
        self.raw.clear()
        for chunk in self.chunks:
            chunk.pieces.clear()
        self.chunks.clear()
        self.fences.clear()
