"""Faulting in the host blocks of units the disk must fill, ahead of their reads.

A unit read from disk straight into a host block (``Layout.fault_ahead``: the CPU, a local file
mostly not in the page cache) costs the CPUs little while its reads are in flight, but each of
its fresh pages costs a fault, and that cost varies: on a guest whose hypervisor has taken back
the memory the kernel hands out, faulting a chunk in can take longer than reading it. Lanes that
fault their own chunks in then all end up faulting at once while the disk waits, worst near the
end of a load, where the memory handed out is the most recently reported
(``benchmarks/results/measurements.md``). So one worker thread faults these units in, in the
order they were allocated, ahead of the lanes, on CPU time the lanes leave idle while they wait
for the disk; the orchestrator allocates such units further ahead (``_load.room_for``) to give it
room. A read that reaches pages the worker has not faulted in yet faults them itself (the
kernel's ``O_DIRECT`` path pins a destination bio by bio, the disk working on one while the next
is faulted in).

The worker holds units, never their tensors: it looks up the next piece of at most
``_hostmem.PREFAULT_PIECE`` bytes under a lock, faults it in, and lets go of it before it checks
for cancellation, so a cancelled or failed load frees its memory when it drops its units. A unit
whose reads are over, failed, or dropped is passed over.
"""

from __future__ import annotations

import threading
from collections import deque

import anyio.from_thread
import torch

from streamload import _hostmem
from streamload.engine._flight import InFlight
from streamload.engine._units import Piece

__all__ = ["FaultAhead"]


class FaultAhead:
    """The units to fault in ahead of their reads, and the one worker doing it (thread-safe).

    ``put`` queues a unit and says whether a worker must be started (``run``, in a worker
    thread); the worker ends once the queue is empty, and the next ``put`` starts another.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[InFlight] = deque()
        self._current: InFlight | None = None
        # Where the worker is in ``_current``: chunk, piece, and byte in the piece's ``dst``.
        self._chunk = 0
        self._piece = 0
        self._at = 0
        self._running = False
        self._closed = False
        self.faulted_bytes = 0  # bytes the worker asked the kernel to fault in, in all

    def put(self, flight: InFlight) -> bool:
        """Queue ``flight`` (its reads queued); ``True`` when the caller must start ``run``."""
        with self._lock:
            if self._closed:
                return False
            self._queue.append(flight)
            if self._running:
                return False
            self._running = True
            return True

    def run(self) -> None:
        """The worker (blocking: an anyio worker thread): piece after piece until no queued
        unit has any left; cancellation is checked between pieces."""
        try:
            while True:
                anyio.from_thread.check_cancelled()
                if not self._step():
                    return  # ``_step`` let go of the worker's place under the lock
        except BaseException:
            # Not in a ``finally``: once ``_step`` has let go, a ``put`` may have started the
            # next worker, whose place this one must not clear.
            with self._lock:
                self._running = False
            raise

    def close(self) -> None:
        """Forget every unit (the load is over); a running worker ends at its next piece."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._current = None

    def _step(self) -> bool:
        """Fault in the next piece; ``False`` (the worker ends) when there is none."""
        with self._lock:
            piece = self._next_locked()
            if piece is None:
                self._running = False
                return False
        _hostmem.prefault(piece)
        with self._lock:
            self.faulted_bytes += piece.numel()
        return True

    def _next_locked(self) -> torch.Tensor | None:
        """The next bytes to fault in, advancing the position past them (lock held)."""
        while not self._closed:
            flight = self._current
            piece = None if flight is None or not _reading(flight) else self._piece_of(flight)
            if piece is None:
                if not self._queue:
                    self._current = None
                    return None
                self._current = self._queue.popleft()
                self._chunk = self._piece = self._at = 0
                continue
            start = max(self._at, piece.fault_from)
            end = min(start + _hostmem.PREFAULT_PIECE, len(piece.dst))
            if start >= end:
                self._piece, self._at = self._piece + 1, 0
                continue
            self._at = end
            return piece.dst[start:end]
        return None

    def _piece_of(self, flight: InFlight) -> Piece | None:
        """The piece at the position in ``flight`` (moving on to the next chunk where one
        ends), or ``None`` past its last. The orchestrator may drop the unit meanwhile (its
        lists cleared on the event loop): that is its end too."""
        try:
            while self._piece >= len(flight.chunks[self._chunk].pieces):
                self._chunk, self._piece, self._at = self._chunk + 1, 0, 0
            return flight.chunks[self._chunk].pieces[self._piece]
        except IndexError:
            return None


def _reading(flight: InFlight) -> bool:
    """Whether ``flight``'s reads are still under way (not over, failed, or dropped)."""
    return flight.error is None and not flight.done.is_set() and bool(flight.chunks)
