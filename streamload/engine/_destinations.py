"""Destinations: where each unit's tensors go, their allocation and their completion.

One layout decision per unit (``layout``) from the CPU policy, ``LoadParams.huge_pages`` and
the device's kind, then one allocation (``Destinations.allocate``):

- on the host itself (a ``host_memory`` device that is not a GPU: the CPU), a unit's tensors
  are laid out in one mapping and its raw conversion buffers in another
  (``_hostmem.HostBlock``), read destinations first in file order, each starting at its file
  bytes' position in a cache line (``_hostmem.lead``) so the kernel's copy out of the page
  cache runs co-aligned; converted tensors follow, cache-line aligned;
- on any other device, one ``device.empty`` per tensor (a GPU's allocator places them, and a
  simulated GPU charges and credits each), raw conversion buffers carved from the device's
  conversion scratch: one allocation of ``planner.conversion_scratch`` bytes, made with the
  device's first unit that converts and kept to the end of the load; the device's units take
  its start and its end by turns (at most two units are in flight on a GPU, the scratch holds
  any two consecutive ones, and a unit is placed only once converted, so its end of the
  scratch is free again when its turn comes);
- under ``cpu_policy="mmap"``, tensors on the CPU that keep their stored dtype are
  copy-on-write maps of the checkpoint (zero copy) instead.

A tensor whose dtype changes is read into a raw buffer in its stored dtype and converted on its
device once read (``Destinations.complete``). The conversion scratch a load holds is counted per
device in ``Transient`` (read by the budget from the event loop, written from worker threads:
locked): it is what the plan's ``scratch_bytes`` stand for.
"""

from __future__ import annotations

import math
import mmap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamload import _hostmem
from streamload.checkpoint import TensorEntry
from streamload.devices import Device
from streamload.engine._direct import DIRECT_ALIGN
from streamload.engine._flight import Completion, InFlight
from streamload.engine._reader import await_fence
from streamload.engine._units import (
    Destination,
    Unit,
    converts,
    cut_chunks,
    read_chunk_bytes,
)
from streamload.model import ModelSpec
from streamload.params import LoadParams, torch_dtype
from streamload.planner import SCRATCH_ALIGN
from streamload.sources import SourceFiles

__all__ = ["Destinations", "Layout", "Transient", "faults_ahead", "layout"]


@dataclass(frozen=True, slots=True)
class Layout:
    """How one unit's tensors are laid out on its device."""

    block: bool  # in one host mapping per unit (the host itself), not ``empty`` per tensor
    mmap: bool  # tensors that keep their stored dtype are maps of the checkpoint
    huge_pages: bool  # whole 2 MiB stretches of destinations in transparent huge pages
    # Read with O_DIRECT (``LoadParams.direct_io``): host blocks co-aligned to ``DIRECT_ALIGN``.
    direct_io: bool = False
    # Read straight into (not staged) and mostly not in the page cache: the reader gives it
    # more lanes, so reads stay in flight while other lanes fault fresh pages in.
    cold: bool = False
    # A host block the disk must fill (``faults_ahead``): faulted in ahead of its reads
    # (``engine/_faults``), in a deeper window (``_load.room_for``).
    fault_ahead: bool = False


def layout(device: Device, params: LoadParams, warm: Callable[[], bool | None]) -> Layout:
    """The layout of a unit bound for ``device``. Huge pages only where memory is host memory
    and the host has them; under ``huge_pages="auto"`` only for a unit ``warm()`` (mostly in
    the page cache, so the copy is not waiting for the disk while pages are compacted).
    ``O_DIRECT`` reads (``LoadParams.direct_io``) always, or under ``"auto"`` for a unit that
    is not ``warm()``, whatever its device: bytes in the page cache are copied from it, not
    read again; bytes the disk must read skip the cache, whose pages would be fresh memory to
    fault in beside the destination's (``benchmarks/results/measurements.md``); not for a
    unit ``cpu_policy="mmap"`` maps, whose pages the read-ahead advice brings in, nor for an
    object (``warm()`` is ``None``: no page cache and no file to open with ``O_DIRECT``)."""
    mapped = not device.is_gpu and not device.staged and params.cpu_policy == "mmap"
    direct = params.direct_io is True or (
        params.direct_io == "auto" and not mapped and warm() is False
    )
    cold = not device.staged and not warm()
    huge = (
        params.huge_pages is not False
        and device.host_memory
        and _hostmem.huge_pages_available()
        and (params.huge_pages is True or warm() is True)
    )
    return Layout(
        block=device.host_memory and not device.is_gpu,
        mmap=mapped,
        huge_pages=huge,
        direct_io=direct,
        cold=cold,
        fault_ahead=faults_ahead(device, params, warm()),
    )


def faults_ahead(device: Device, params: LoadParams, warm: bool | None) -> bool:
    """Whether a unit bound for ``device`` is faulted in ahead of its reads (``engine/_faults``)
    and allocated further ahead (``_load.room_for``): one laid out in a host block (the CPU),
    read rather than mapped, from a local file mostly not in the page cache (``warm`` is
    ``False``; ``None``, unknown or an object, is not). Huge pages are left to the copy
    (``_hostmem.prefault``), so such a unit's huge stretches are not faulted ahead."""
    return (
        device.host_memory
        and not device.is_gpu
        and not device.staged
        and params.cpu_policy != "mmap"
        and warm is False
    )


class Transient:
    """Bytes of conversion scratch a load holds per device (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = {}

    def add(self, device: str, nbytes: int) -> None:
        with self._lock:
            self._bytes[device] = self._bytes.get(device, 0) + nbytes

    def get(self, device: str) -> int:
        with self._lock:
            return self._bytes.get(device, 0)


# (entry, dtype it is laid out in, its lead in a cache line)
_Slot = tuple[TensorEntry, torch.dtype, int]


@dataclass(slots=True)
class _Tensors:
    final: dict[str, torch.Tensor]
    raw: dict[str, torch.Tensor]
    items: list[Destination]
    huge_bytes: int


@dataclass(slots=True)
class _Scratch:
    """One GPU's conversion scratch and whose turn it is."""

    block: torch.Tensor  # uint8, ``scratch`` bytes on the device
    turns: int = 0

    def region(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` at the start of the scratch, or at its end, by turns (the turn passes
        only once the unit's allocation succeeded: ``taken``)."""
        size = self.block.numel()
        start = 0 if self.turns % 2 == 0 else size - nbytes
        return self.block[start : start + nbytes]

    def taken(self) -> None:
        self.turns += 1


class Destinations:
    """Allocates units' tensors and completes them (all calls blocking: worker threads).

    ``scratch`` is the conversion scratch a GPU gets (``planner.conversion_scratch``)."""

    def __init__(
        self, spec: ModelSpec, params: LoadParams, files: SourceFiles, scratch: int
    ) -> None:
        self._spec = spec
        self._params = params
        self._target = params.target_code
        self._files = files
        self._scratch_bytes = scratch
        self._scratch: dict[str, _Scratch] = {}
        self._lock = threading.Lock()
        self.transient = Transient()

    def allocate(self, unit: Unit, device: Device, how: Layout, free_before: int) -> InFlight:
        """``unit``'s tensors on ``device`` laid out ``how``, cut into reads; ``free_before``
        is the device's live free memory read just before. ``torch.OutOfMemoryError`` when
        the device refuses (nothing of the unit is kept once the caller has scrubbed the
        error's frames, ``_boundary.refusal``)."""
        started = time.perf_counter()
        if how.block:
            got = self._block(unit, how)
        else:
            got = self._per_tensor(unit, device, how)
            device.mark_allocated()
        raw_bytes = sum(t.nbytes for t in got.raw.values())
        chunks = cut_chunks(got.items, read_chunk_bytes(self._params.chunk_bytes, device.staged))
        got.items.clear()
        flight = InFlight(
            unit,
            device,
            got.final,
            got.raw,
            chunks,
            raw_bytes,
            started,
            free_before,
            got.huge_bytes,
            direct_io=how.direct_io,
            cold=how.cold,
            fault_ahead=how.fault_ahead,
        )
        flight.allocated = time.perf_counter()
        return flight

    def complete(self, flight: InFlight) -> Completion:
        """Wait for the unit's copies, convert raw buffers into the final tensors on the
        device, and wait for the conversions: a tensor is handed out only once it holds its
        bytes for work on any stream. Waits poll (``await_fence``): an anyio worker thread.
        Returns when each step ended."""
        started = time.perf_counter()
        for fence in flight.fences:
            await_fence(fence)
        copied = time.perf_counter()
        pairs = [(flight.final[name], raw) for name, raw in flight.raw.items()]
        flight.raw.clear()
        if pairs:
            fence = flight.device.convert(pairs)
            pairs.clear()
            # Waited here, before the unit counts as placed: a later unit's raw buffers reuse
            # this one's part of the scratch, and the tensors go out to other streams.
            await_fence(fence)
        return Completion(started, copied, time.perf_counter())

    def release(self) -> None:
        """Give back every device's conversion scratch (the load is over)."""
        with self._lock:
            for name, scratch in self._scratch.items():
                self.transient.add(name, -scratch.block.nbytes)
            self._scratch.clear()

    def _raw_space(self, unit: Unit, device: Device) -> _Scratch | None:
        """``device``'s conversion scratch (made on first use; ``torch.OutOfMemoryError`` if the
        device refuses it), or ``None`` when ``unit`` converts nothing."""
        if unit.raw_bytes == 0:
            return None
        with self._lock:
            scratch = self._scratch.get(device.name)
            if scratch is None:
                block = device.empty((self._scratch_bytes,), torch.uint8)
                scratch = self._scratch[device.name] = _Scratch(block)
                self.transient.add(device.name, block.nbytes)
            return scratch

    def _converts(self, entry: TensorEntry) -> bool:
        return converts(self._spec, self._target, entry)

    def _placed(self, entry: TensorEntry) -> torch.dtype:
        return torch_dtype(self._spec.placed_dtype(entry.name))

    def _per_tensor(self, unit: Unit, device: Device, how: Layout) -> _Tensors:
        """``unit``'s tensors from ``device.empty``, one allocation each; raw buffers from the
        device's conversion scratch."""
        got = _Tensors({}, {}, [], 0)
        scratch = self._raw_space(unit, device)
        space = None if scratch is None else scratch.region(unit.raw_bytes)
        used = 0
        try:
            for entry in unit.entries:
                stored = torch_dtype(entry.dtype)
                if self._converts(entry):
                    assert space is not None
                    got.final[entry.name] = device.empty(
                        entry.shape, self._placed(entry), huge_pages=how.huge_pages
                    )
                    got.raw[entry.name] = dst = _carve_raw(space, used, entry, stored)
                    used += -(-entry.nbytes // SCRATCH_ALIGN) * SCRATCH_ALIGN
                elif how.mmap and entry.contiguous:
                    got.final[entry.name] = self._mmap(entry, stored)
                    continue
                else:
                    got.final[entry.name] = dst = device.empty(
                        entry.shape, stored, huge_pages=how.huge_pages
                    )
                # Asked for huge pages, a tensor of 2 MiB or more has its whole 2 MiB stretches
                # in them (``_hostmem.huge_mapping``): left to the copy to fault in.
                small = _hostmem.huge_stretches(dst.nbytes) if how.huge_pages else 0
                got.items.append(Destination(entry, _byte_view(dst), small))
                if how.huge_pages:
                    got.huge_bytes += _hostmem.huge_stretches(got.final[entry.name].nbytes)
        except BaseException:
            got.final.clear()
            got.raw.clear()
            got.items.clear()
            raise
        if scratch is not None:
            scratch.taken()
        return got

    def _block(self, unit: Unit, how: Layout) -> _Tensors:
        """``unit``'s host tensors in one mapping, raw conversion buffers in another (freed
        once converted); read destinations first, in file order, co-aligned."""
        order = sorted(unit.entries, key=lambda entry: (str(entry.path), entry.offset))
        # O_DIRECT reads need 4 KiB-aligned memory: co-aligned modulo DIRECT_ALIGN, file-adjacent
        # tensors lie as in the file and a chunk's aligned middle is read straight into them.
        align = DIRECT_ALIGN if how.direct_io else _hostmem.CACHE_LINE
        kept: list[_Slot] = []
        converted: list[_Slot] = []
        scratch: list[_Slot] = []
        final: dict[str, torch.Tensor] = {}
        for entry in order:
            stored = torch_dtype(entry.dtype)
            if self._converts(entry):
                converted.append((entry, self._placed(entry), 0))
                scratch.append((entry, stored, _hostmem.lead(entry.offset, stored, align)))
            elif how.mmap and entry.contiguous:  # a strided slice is copied: no zero-copy view
                final[entry.name] = self._mmap(entry, stored)
            else:
                kept.append((entry, stored, _hostmem.lead(entry.offset, stored, align)))
        items: list[Destination] = []
        placed, huge_bytes = _carve(kept + converted, how.huge_pages, items, align)
        final.update(placed)
        raw, _ = _carve(scratch, how.huge_pages, items, align)
        final = {entry.name: final[entry.name] for entry in unit.entries}
        return _Tensors(final, raw, items, huge_bytes)

    def _mmap(self, entry: TensorEntry, dtype: torch.dtype) -> torch.Tensor:
        """A copy-on-write memory map of ``entry``'s bytes (zero copy; page cache backed)."""
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        fd = self._files.fd(entry.path)
        page = mmap.ALLOCATIONGRANULARITY
        start = entry.offset - entry.offset % page
        mapping = mmap.mmap(fd, entry.end - start, access=mmap.ACCESS_COPY, offset=start)
        flat = torch.frombuffer(
            mapping, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset - start
        )
        return flat.view(dtype).view(entry.shape)


def _carve_raw(
    space: torch.Tensor, at: int, entry: TensorEntry, dtype: torch.dtype
) -> torch.Tensor:
    """``entry``'s raw buffer: its stored bytes at ``at`` in a conversion scratch half."""
    view = space[at : at + entry.nbytes]
    return (
        view.view(dtype).view(entry.shape)
        if entry.nbytes
        else torch.empty(entry.shape, dtype=dtype)
    )


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's bytes."""
    return tensor.reshape(-1).view(torch.uint8)


def _carve(
    slots: list[_Slot], huge: bool, items: list[Destination], align: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Tensors for ``slots`` in one new ``HostBlock``; those in the stored dtype are read
    destinations (added to ``items``). Returns them and their bytes in huge pages."""
    sizes = [(math.prod(entry.shape) * dtype.itemsize, lead) for entry, dtype, lead in slots]
    positions, total = _hostmem.pack(sizes, align)
    block = _hostmem.HostBlock(total, huge_pages=huge)
    tensors: dict[str, torch.Tensor] = {}
    huge_bytes = 0
    for (entry, dtype, _), at, (nbytes, _) in zip(slots, positions, sizes, strict=True):
        tensor = tensors[entry.name] = block.tensor(at, entry.shape, dtype)
        huge_bytes += max(0, min(at + nbytes, block.huge_bytes) - at)
        if dtype == torch_dtype(entry.dtype):
            # Bytes from ``small`` on are in 4 KiB pages: pre-faulted before the read.
            small = min(max(block.huge_bytes - at, 0), nbytes)
            items.append(Destination(entry, _byte_view(tensor), small))
    return tensors, huge_bytes
