"""The orchestrator: the window of units in flight, placement in order, the only emitter.

Units are streamed in plan order (``_units``). Each is rechecked against the budget and
allocated (``_allocate``: ``_budget`` decides, ``_destinations`` allocates), read by the reader
(``_reader``), then finished and reported in order by a task of its own (``_place_in_order``).
A unit bound for a GPU is not allocated before the unit two before it is placed and its
``LayerPlaced`` delivered, so reads of the next layer overlap the copies and conversion of the
current one while memory readings stay exact; a unit bound for host memory only waits until
the unit two before it has been read (``_room_for``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import torch

from streamload._api import resolve_source, spec_of
from streamload.devices import Device, resolve_devices
from streamload.engine import _boundary
from streamload.engine._budget import Budget
from streamload.engine._destinations import Destinations, Layout, layout
from streamload.engine._flight import InFlight
from streamload.engine._loaded import LoadedModel
from streamload.engine._reader import Files, PageCache, Reader, start_workers
from streamload.engine._units import Unit, units
from streamload.engine._verify import Verifier
from streamload.errors import location
from streamload.events import (
    DeviceReport,
    Event,
    EventCallback,
    LayerPlaced,
    LoadFailed,
    LoadFinished,
    LoadReport,
    PlanComputed,
    emit,
)
from streamload.model import ModelSpec
from streamload.params import LoadParams
from streamload.planner import conversion_scratch

__all__ = ["load"]


@dataclass(slots=True)
class _DeviceStats:
    """What one device received so far (for the report)."""

    nbytes: int = 0
    tensors: int = 0
    layers: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class _Parts:
    """The stages of one load, made once the spec and the devices are known."""

    spec: ModelSpec
    units: list[Unit]
    budget: Budget
    reader: Reader
    destinations: Destinations
    page_cache: PageCache
    scratch: int
    verifier: Verifier | None


class _Load:
    def __init__(
        self,
        path: str | os.PathLike[str],
        params: LoadParams,
        on_event: EventCallback | None,
        spec: ModelSpec | None,
    ) -> None:
        self.path = path
        self.params = params
        self.on_event = on_event
        self.given_spec = spec
        self.tensors: dict[str, torch.Tensor] = {}
        self.inflight: deque[InFlight] = deque()  # allocated, not yet placed, in plan order
        self.placed = 0  # units whose LayerPlaced was delivered
        self.progress = anyio.Event()  # replaced each time a unit is read or placed
        self.device_stats: dict[str, _DeviceStats] = {}
        self.huge_bytes = 0
        self.emit_lock = anyio.Lock()
        self.parts: _Parts | None = None

    @property
    def p(self) -> _Parts:
        assert self.parts is not None, "set up first"
        return self.parts

    async def _emit(self, *events: Event) -> None:
        # Placements are reported by a task of their own while the stream allocates (and may
        # re-plan): one event at a time, so a callback never runs alongside itself.
        async with self.emit_lock:
            for event in events:
                await emit(event, self.on_event)

    async def run(self) -> LoadedModel:
        started = time.perf_counter()
        try:
            return await self._run(started)
        except BaseException as exc:
            self._release()
            _boundary.scrub(exc)
            error = _boundary.single(exc)
            with anyio.CancelScope(shield=True):
                await self._emit(LoadFailed(error))
            raised = _boundary.failure(error)
            if raised is not error:
                raise raised from error
            if not isinstance(error, Exception):
                raise  # cancellation: unchanged, as it arrived
            raise error  # noqa: B904 - keeps the cause it was raised with
        finally:
            if self.parts is not None:
                self.parts.budget.release()
                if self.parts.verifier is not None:
                    self.parts.verifier.clear()
                with anyio.CancelScope(shield=True):
                    # Copies still in flight may write into the conversion scratch: the reader
                    # waits for them before the scratch goes.
                    await anyio.to_thread.run_sync(self.parts.reader.close)
                self.parts.destinations.release()

    async def _setup(self) -> _Parts:
        params = self.params
        # A hub download in this thread checks the load's cancel scope as bytes arrive.
        source = await anyio.to_thread.run_sync(
            lambda: resolve_source(self.path, params, anyio.from_thread.check_cancelled)
        )
        spec = self.given_spec or spec_of(source, params.target_code)
        devices = await anyio.to_thread.run_sync(resolve_devices, params.devices)
        unit_list = units(spec)
        scratch = conversion_scratch(spec)
        files = Files(spec) if source.objects is None else source.objects
        verifier = Verifier(spec, files, source.checksums) if params.verify else None
        feed = None if verifier is None else verifier.feed
        reader = Reader(spec, params, self._filled, files, feed)
        destinations = Destinations(spec, params, files, scratch)
        budget = Budget(spec, devices, params, transient=destinations.transient)
        return _Parts(
            spec, unit_list, budget, reader, destinations, PageCache(files), scratch, verifier
        )

    async def _run(self, started: float) -> LoadedModel:
        await start_workers(self.params.reader_threads + 2)
        self.parts = await self._setup()
        p = self.p
        plan_seconds, fallbacks = await p.budget.first_plan()
        await self._emit(PlanComputed(p.budget.current, str(self.path), plan_seconds), *fallbacks)
        async with anyio.create_task_group() as group:
            await self._stream(group)
        # A cancellation requested by the last event callback still cancels the load.
        await anyio.lowlevel.checkpoint_if_cancelled()

        for alias, source in p.spec.tied.items():
            self.tensors[alias] = self.tensors[source]
        report = self._report(time.perf_counter() - started, plan_seconds)
        await self._emit(LoadFinished(report))
        model = LoadedModel(self.tensors, p.budget.current, report, p.spec)
        self.tensors = {}
        return model

    async def _stream(self, group: anyio.abc.TaskGroup) -> None:
        p = self.p
        parts_left = p.spec.non_mapped_bytes
        group.start_soon(self._place_in_order)
        for index, unit in enumerate(p.units):
            while not self._room_for(index, unit):
                await self.progress.wait()
            ahead = p.units[index + 2] if index + 2 < len(p.units) else None
            if ahead is not None and not self._mmap_only(ahead):
                group.start_soon(self._prefetch, ahead)
            flight = await self._allocate(unit, parts_left)
            if unit.layer is None:
                parts_left -= unit.nbytes
            self.inflight.append(flight)
            p.reader.start(flight, group)

    def _room_for(self, index: int, unit: Unit) -> bool:
        """Whether unit ``index`` may be allocated now: at most two units are being read.

        A unit bound for a GPU also waits until the unit two before it is placed and its
        ``LayerPlaced`` delivered, so the recheck before it sees that placement (and whatever a
        callback did about it). A unit bound for host memory is rechecked against nothing a
        placement changes: it is allocated as soon as the unit two before it has been read,
        while that one's placement is still being reported (at most three units unplaced,
        their conversion buffers within the scratch the plan left), so the next unit's reads
        start before the current ones drain; three units read at once cost more system time than
        they save (``benchmarks/results/measurements.md``).
        """
        p = self.p
        unplaced = index - self.placed
        if unplaced < 2:
            return True
        if unplaced > 2 or p.budget.device_for(unit).is_gpu:
            return False
        reading = sum(1 for flight in self.inflight if not flight.done.is_set())
        held = sum(flight.raw_bytes for flight in self.inflight)
        return reading < 2 and held + unit.raw_bytes <= p.scratch

    def _progress(self) -> None:
        """Wake ``_stream`` to look at its window again (a unit was read or placed)."""
        self.progress.set()
        self.progress = anyio.Event()

    def _filled(self, flight: InFlight) -> None:
        """``flight``'s reads are over (the reader calls this on the event loop)."""
        self._progress()

    async def _place_in_order(self) -> None:
        """Finish and report every unit in plan order as its reads complete."""
        for _ in self.p.units:
            while not self.inflight:
                await self.progress.wait()
            await self._finish(self.inflight[0])
            self.placed += 1
            self._progress()

    def _mmap_only(self, unit: Unit) -> bool:
        """Whether ``unit`` will be memory-mapped rather than read (nothing to prefetch)."""
        return self.params.cpu_policy == "mmap" and not self.p.budget.device_for(unit).is_gpu

    def _layout(self, unit: Unit, device: Device) -> Layout:
        return layout(device, self.params, lambda: self.p.page_cache.warm(unit))

    async def _prefetch(self, unit: Unit) -> None:
        # Under huge_pages="auto" the layout probes the page cache: before the read-ahead.
        device = self.p.budget.device_for(unit)
        await anyio.to_thread.run_sync(
            self.p.reader.prefetch, unit, lambda: self._layout(unit, device)
        )

    async def _allocate(self, unit: Unit, parts_left: int) -> InFlight:
        budget = self.p.budget
        next_layer = 0 if unit.layer is None else unit.layer
        while True:
            device = budget.device_for(unit)
            need = budget.need_rest(device.name, next_layer, parts_left)
            live: int | None = None  # host memory: read in the allocating call (one hop less)
            if device.is_gpu:
                live = await anyio.to_thread.run_sync(budget.live_free, device)
                have = budget.have(device, live)
                if have < need:
                    reason = "under-delivered: live free memory is below what its plan still needs"
                    events = await budget.replan(unit, device.name, reason, need, have, parts_left)
                    await self._emit(*events)
                    continue
            try:
                return await anyio.to_thread.run_sync(
                    self._allocate_sync, unit, device, live, parts_left
                )
            except torch.OutOfMemoryError as exc:
                reason = f"allocation failed: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                del exc
                if live is None:
                    live = await anyio.to_thread.run_sync(budget.live_free, device)
                # The device has less than its reading said: re-plan as if it could not hold
                # all it was given (at least one layer moves on; repeated failures move more).
                events = await budget.replan(
                    unit, device.name, reason, need, live, parts_left, cap=(device.name, need - 1)
                )
                await self._emit(*events)

    def _allocate_sync(
        self, unit: Unit, device: Device, live: int | None, parts_left: int
    ) -> InFlight:
        """Allocate ``unit`` on ``device`` (blocking) and shrink the load's reservation by what
        it took, in one step for other loads' readings (``Budget.allocating``); ``live``: the
        free memory read before, or ``None`` to read it here first."""
        budget = self.p.budget
        if live is None:
            live = budget.live_free(device)
        how = self._layout(unit, device)
        with budget.allocating(device):
            flight = self.p.destinations.allocate(unit, device, how, live)
            budget.allocated(device, unit.nbytes)
            after = parts_left - unit.nbytes if unit.layer is None else parts_left
            budget.reserve(unit.layer + 1 if unit.layer is not None else 0, after)
        return flight

    async def _finish(self, flight: InFlight) -> None:
        await flight.done.wait()
        unit, device = flight.unit, flight.device
        if flight.error is not None:
            error, flight.error = flight.error, None
            flight.drop()
            raise _boundary.translate(error, unit, device.name) from error
        completing = time.perf_counter()
        completed, free_after = await anyio.to_thread.run_sync(self._complete, flight)
        # Allocation to the last read, plus waiting for the copies and converting; not the time
        # the finished unit waited for its turn to be reported.
        seconds = flight.filled - flight.started + completed - completing
        stats = self.device_stats.setdefault(device.name, _DeviceStats())
        stats.nbytes += unit.nbytes
        stats.tensors += len(flight.final)
        stats.layers += 1 if unit.layer is not None else 0
        stats.seconds += seconds
        self.huge_bytes += flight.huge_bytes
        self.tensors.update(flight.final)
        tensors = len(flight.final)
        flight.drop()
        self.inflight.popleft()
        await self._emit(
            LayerPlaced(
                layer=unit.layer,
                device=device.name,
                nbytes=unit.nbytes,
                seconds=seconds,
                free_before=flight.free_before,
                free_after=free_after,
                part=unit.part,
                stored_bytes=unit.stored_bytes,
                tensors=tensors,
                files=tuple(sorted({location(entry.path) for entry in unit.entries})),
            )
        )

    def _complete(self, flight: InFlight) -> tuple[float, int]:
        """Complete the unit (copies waited, conversions done); returns when that was done
        (``perf_counter``) and the device's live free memory after it (one thread hop)."""
        self.p.destinations.complete(flight)
        return time.perf_counter(), self.p.budget.live_free(flight.device)

    def _report(self, seconds: float, plan_seconds: float) -> LoadReport:
        p = self.p
        devices = tuple(
            DeviceReport(name, s.nbytes, s.tensors, s.layers, s.seconds)
            for name, s in self.device_stats.items()
        )
        return LoadReport(
            path=str(self.path),
            nbytes=sum(d.nbytes for d in devices),
            stored_bytes=p.spec.checkpoint.total_bytes,
            tensors=len(self.tensors),
            seconds=seconds,
            plan_seconds=plan_seconds,
            devices=devices,
            replans=tuple(p.budget.replans),
            fallbacks=tuple(p.budget.fallbacks),
            staging_bytes=p.reader.staging_bytes,
            huge_page_bytes=self.huge_bytes,
            checks=() if p.verifier is None else p.verifier.checks(),
        )

    def _release(self) -> None:
        """Drop every tensor this load placed or allocated (containers cleared in place)."""
        self.tensors.clear()
        while self.inflight:
            self.inflight.popleft().drop()


async def load(
    path: str | os.PathLike[str],
    params: LoadParams | None = None,
    *,
    on_event: EventCallback | None = None,
    spec: ModelSpec | None = None,
) -> LoadedModel:
    """Load the checkpoint at ``path`` onto the devices ``params`` names.

    ``path`` is a local checkpoint, a Hugging Face repo id ``org/name`` (at
    ``params.revision``, through huggingface_hub's cache) or an object-store URL
    (``s3://bucket/prefix``, ``gs://``, ``az://``); see ``streamload.sources``.

    Runs under asyncio or trio (anyio). Events go to ``on_event`` (a plain or coroutine
    function, called in order on the event loop) and to the ``streamload`` structlog logger.

    Cancellation (a cancel scope, a cancelled task, a server shutting down): every tensor the
    load placed is released, reader threads finish, every file descriptor is closed, a
    ``LoadFailed`` event is emitted, and the cancellation propagates. Any other failure does the
    same and raises a ``StreamloadError`` naming the file, tensor, layer or device involved.

    ``spec``: stream exactly this model spec (a subset of the checkpoint's layers and parts,
    as ``streamload.distributed`` builds per pipeline stage) instead of inspecting ``path``;
    it must come from the same checkpoint and the same target dtype as ``params``.
    """
    return await _Load(path, params or LoadParams(), on_event, spec).run()
