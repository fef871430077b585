"""A unit in flight: allocated on its device, being read, not yet placed."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import torch

from streamload.devices import Device, Fence
from streamload.engine._units import Chunk, Unit

__all__ = ["InFlight"]


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
    fences: list[Fence] = field(default_factory=list)
    error: BaseException | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    pending: int = 0  # chunks queued for the reader lanes and not yet read (unstaged devices)
    filled: float = 0.0  # when the last read (and copy submission) finished

    def drop(self) -> None:
        """Forget every tensor (pieces too: a stale frame may still hold a chunk)."""
        self.final.clear()
        self.raw.clear()
        for chunk in self.chunks:
            chunk.pieces.clear()
        self.chunks.clear()
        self.fences.clear()
