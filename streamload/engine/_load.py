"""The orchestrator: the window of units in flight, placement in order, the only emitter.

Units are streamed in plan order (``_units``). Each is rechecked against the budget and
allocated (``_allocate``: ``_budget`` decides, ``_destinations`` allocates), read by the reader
(``_reader``), then finished and reported in order by a task of its own (``_place_in_order``).
A unit bound for a GPU is not allocated before the unit two before it is placed and its
``LayerPlaced`` delivered, so reads of the next layer overlap the copies and conversion of the
current one while memory readings stay exact; a unit bound for host memory only waits until
the unit two before it has been read, one the disk must fill into a host block until the unit
``COLD_WINDOW`` before it has (``_room_for``).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
from streamload.engine._destinations import Destinations, Layout, faults_ahead, layout
from streamload.engine._flight import Completion, InFlight, covered
from streamload.engine._loaded import LoadedModel
from streamload.engine._moves import Spills
from streamload.engine._reader import Files, PageCache, Reader, start_workers
from streamload.engine._units import Unit, units
from streamload.engine._verify import Verifier
from streamload.errors import location
from streamload.events import (
    DeviceReport,
    DirectIOFallback,
    Event,
    LayerPlaced,
    LayersMoved,
    LoadCancelled,
    LoadFailed,
    LoadFinished,
    LoadReport,
    LoadStarted,
    MaxSeqLenClamped,
    MemoryReadingFallback,
    Observers,
    PagedAttentionDisabled,
    PlanComputed,
    Replanned,
    emit,
    observers,
)
from streamload.model import ModelSpec
from streamload.params import LoadParams
from streamload.planner import Plan, conversion_scratch

__all__ = ["load"]


def _stamped(event: Event, path: str) -> Event:
    """``event`` with the load's ``path`` where the stage that made it left it out."""
    stamped = (
        Replanned
        | PagedAttentionDisabled
        | LayersMoved
        | MemoryReadingFallback
        | MaxSeqLenClamped
        | DirectIOFallback
    )
    if isinstance(event, stamped) and not event.path:
        return dataclasses.replace(event, path=path)
    return event


@dataclass(slots=True)
class _DeviceStats:
    """What one device received so far (for the report); ``spans``: each unit's allocation
    to completion, so the report's seconds count overlapping units once."""

    nbytes: int = 0
    tensors: int = 0
    layers: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list)


@dataclass(slots=True)
class _Parts:
    """The stages of one load, made once the spec and the devices are known."""

    spec: ModelSpec
    devices: list[Device]
    units: list[Unit]
    budget: Budget
    reader: Reader
    destinations: Destinations
    page_cache: PageCache
    scratch: int
    header_seconds: float
    total_bytes: int  # every unit's bytes in the target dtype
    verifier: Verifier | None


def _files(unit: Unit, root: Path) -> tuple[str, ...]:
    """The shard files ``unit`` is read from, relative to the checkpoint's root (an object's
    by its URL)."""
    paths = sorted({entry.path for entry in unit.entries})
    return tuple(
        location(p)
        if _is_object(p)
        else str(p.relative_to(root))
        if p.is_relative_to(root)
        else str(p)
        for p in paths
    )


def _is_object(path: Path) -> bool:
    return location(path) != str(path)


def _released(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True, slots=True)
class _Totals:
    """The running totals a ``LayerPlaced`` carries, its own unit included."""

    loaded_units: int
    total_units: int
    loaded_bytes: int
    total_bytes: int


def _load_started(path: str, parts: _Parts) -> LoadStarted:
    shards = parts.spec.checkpoint.shards
    return LoadStarted(
        path=path,
        files=len(shards),
        header_bytes=sum(shard.data_offset for shard in shards),
        tensors=len(parts.spec.checkpoint.tensors),
        stored_bytes=sum(unit.stored_bytes for unit in parts.units),
        seconds=parts.header_seconds,
    )


def _layer_placed(
    flight: InFlight, done: Completion, free_after: int, path: str, root: Path, totals: _Totals
) -> LayerPlaced:
    """The ``LayerPlaced`` for ``flight``, its seconds split by the times the stages passed
    back (the reader's per chunk, the completion's)."""
    unit = flight.unit
    # Allocation to the last read, plus waiting for the copies and converting; not the time
    # the finished unit waited for its turn to be reported.
    seconds = flight.filled - flight.started + done.converted - done.start
    reads = [(t.read_start, t.read_end) for t in flight.times]
    copies = [(t.read_end, t.copy_end) for t in flight.times if t.copy_end > t.read_end]
    copies.append((done.start, done.copied))
    allocating = (flight.started, flight.allocated)
    converting = (done.copied, done.converted)
    busy = covered([allocating, *reads, *copies, converting])
    return LayerPlaced(
        layer=unit.layer,
        device=flight.device.name,
        nbytes=unit.nbytes,
        seconds=seconds,
        free_before=flight.free_before,
        free_after=free_after,
        part=unit.part,
        stored_bytes=unit.stored_bytes,
        tensors=len(flight.final),
        path=path,
        files=_files(unit, root),
        allocate_seconds=flight.allocated - flight.started,
        read_seconds=covered(reads),
        copy_seconds=covered(copies),
        convert_seconds=done.converted - done.copied,
        wait_seconds=max(0.0, seconds - busy),
        loaded_units=totals.loaded_units,
        total_units=totals.total_units,
        loaded_bytes=totals.loaded_bytes,
        total_bytes=totals.total_bytes,
    )


def _cancelled(
    path: str, placed: tuple[int, int, int], released: tuple[int, int], started: float
) -> LoadCancelled:
    """What a cancelled load reports: ``placed`` (units, bytes, units in flight) and
    ``released`` (tensors, bytes)."""
    return LoadCancelled(
        path=path,
        placed_units=placed[0],
        placed_bytes=placed[1],
        inflight_units=placed[2],
        released_tensors=released[0],
        released_bytes=released[1],
        seconds=time.perf_counter() - started,
    )


class _Load:
    def __init__(
        self,
        path: str | os.PathLike[str],
        params: LoadParams,
        on_event: Observers,
        spec: ModelSpec | None,
    ) -> None:
        self.path = path
        self.params = params
        self.on_event = observers(on_event)
        self.given_spec = spec
        self.tensors: dict[str, torch.Tensor] = {}
        self.inflight: deque[InFlight] = deque()  # allocated, not yet placed, in plan order
        self.placed = 0  # units whose LayerPlaced was delivered
        self.placed_units = 0  # units whose tensors are placed (their event made)
        self.placed_bytes = 0  # their bytes, target dtype
        self.progress = anyio.Event()  # replaced each time a unit is read or placed
        self.device_stats: dict[str, _DeviceStats] = {}
        self.huge_bytes = 0
        self.spills: Spills | None = None
        self.emit_lock = anyio.Lock()
        self.parts: _Parts | None = None

    @property
    def _spills(self) -> Spills:
        assert self.spills is not None, "set up first"
        return self.spills

    @property
    def p(self) -> _Parts:
        assert self.parts is not None, "set up first"
        return self.parts

    async def _emit(self, *events: Event) -> None:
        # Placements are reported by a task of their own while the stream allocates (and may
        # re-plan): one event at a time, so a callback never runs alongside itself. Events the
        # stages made without the load's path get it here (every load event carries it). With
        # none to deliver, no wait: a GPU unit's recheck would otherwise wait for a slow
        # callback still holding the placement before it.
        if not events:
            return
        async with self.emit_lock:
            for event in events:
                await emit(_stamped(event, str(self.path)), self.on_event)

    async def run(self) -> LoadedModel:
        started = time.perf_counter()
        failed = False
        try:
            return await self._run(started)
        except BaseException as exc:
            failed = True
            inflight = len(self.inflight)
            released = self._release()
            _boundary.scrub(exc)
            error = _boundary.single(exc)
            outcome: Event = LoadFailed(error, path=str(self.path))
            if not isinstance(error, Exception):  # cancelled (or interrupted): no failure
                placed = (self.placed_units, self.placed_bytes, inflight)
                outcome = _cancelled(str(self.path), placed, released, started)
            with anyio.CancelScope(shield=True):
                await self._emit(outcome)
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
                    # Copies still in flight may write into the conversion scratch; dropping it
                    # is safe all the same: a device keeps what its queued work touches (CUDA:
                    # record_stream on the copy stream), and a wait could hang on a hung GPU.
                    await anyio.to_thread.run_sync(self.parts.reader.close)
                self.parts.destinations.release()
                if failed and self.params.empty_cache_on_failure:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(_release_caches, self.parts.devices)

    async def _run(self, started: float) -> LoadedModel:
        await start_workers(self.params.reader_threads + 3)  # + fault-ahead, own hops
        self.parts = await _setup(
            self.path, self.params, self.given_spec, lambda flight: self._progress()
        )
        p = self.p
        self.spills = Spills(p.budget, p.units, self.tensors, self._stats, self._emit, self._drain)
        await self._emit(_load_started(str(self.path), p))
        plan_seconds, fallbacks = await p.budget.first_plan()
        await self._emit(
            PlanComputed(p.budget.current, str(self.path), plan_seconds),
            *_clamps(self.params, p.budget.current),
            *fallbacks,
            *_notices(self.p.devices),
        )
        async with anyio.create_task_group() as group:
            await self._stream(group)
        # A cancellation requested by the last event callback still cancels the load.
        await anyio.lowlevel.checkpoint_if_cancelled()
        # A tenant may have taken what placed layers need after the last recheck: spill then.
        while await self._spills.spilled(len(p.spec.layers), 0):
            pass

        for alias, source in p.spec.tied.items():
            self.tensors[alias] = self.tensors[source]
        report = self._report(time.perf_counter() - started, plan_seconds)
        await self._emit(LoadFinished(report))
        model = LoadedModel(
            self.tensors,
            p.budget.current,
            report,
            p.spec,
            p.devices,
            read_bytes=p.reader.read_bytes,
        )
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
        """Whether unit ``index`` may be allocated now (``has_room``)."""
        return has_room(self.p, self.params, self.inflight, index - self.placed, unit)

    def _stats(self, device: str) -> _DeviceStats:
        return self.device_stats.setdefault(device, _DeviceStats())

    async def _drain(self) -> None:
        """Wait until every unit in flight is placed."""
        while self.inflight:
            await self.progress.wait()

    def _progress(self) -> None:
        """Wake ``_stream`` to look at its window again (a unit was read or placed)."""
        self.progress.set()
        self.progress = anyio.Event()

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
        # Under huge_pages="auto" and direct_io="auto" the layout probes the page cache: before
        # the read-ahead (none for a unit read with O_DIRECT).
        device = self.p.budget.device_for(unit)
        await anyio.to_thread.run_sync(
            self.p.reader.prefetch, unit, lambda: self._layout(unit, device).direct_io
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
                await self._emit(*_notices(self.p.devices))
                have = budget.have(device, live)
                if have < need:
                    reason = "under-delivered: live free memory is below what its plan still needs"
                    await self._spills.replan(unit, device.name, reason, need, have, parts_left)
                    continue
            if unit.layer is not None and await self._spills.spilled(next_layer, parts_left):
                continue
            try:
                return await anyio.to_thread.run_sync(
                    self._allocate_sync, unit, device, live, parts_left
                )
            except torch.OutOfMemoryError as exc:
                reason = f"allocation failed: {_boundary.refusal(exc)}"
                del exc
                if live is None:
                    live = await anyio.to_thread.run_sync(budget.live_free, device)
                # The device has less than its reading said: re-plan as if it could not hold
                # all it was given (at least one layer moves on; repeated failures move more).
                cap = (device.name, need - 1)
                await self._spills.replan(
                    unit, device.name, reason, need, live, parts_left, cap=cap
                )

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
        done, free_after = await anyio.to_thread.run_sync(self._complete, flight)
        stats = self.device_stats.setdefault(device.name, _DeviceStats())
        stats.nbytes += unit.nbytes
        stats.tensors += len(flight.final)
        stats.layers += 1 if unit.layer is not None else 0
        stats.spans.append((flight.started, done.converted))
        self.huge_bytes += flight.huge_bytes
        self.tensors.update(flight.final)
        self.placed_units += 1
        self.placed_bytes += unit.nbytes
        totals = _Totals(
            self.placed_units, len(self.p.units), self.placed_bytes, self.p.total_bytes
        )
        root = self.p.spec.checkpoint.root
        placed = _layer_placed(flight, done, free_after, str(self.path), root, totals)
        flight.drop()
        self.inflight.popleft()
        await self._emit(*self.p.reader.take_notices(), placed)

    def _complete(self, flight: InFlight) -> tuple[Completion, int]:
        """Complete the unit (copies waited, conversions done); returns when each step ended
        and the device's live free memory after it (one thread hop)."""
        done = self.p.destinations.complete(flight)
        return done, self.p.budget.live_free(flight.device)

    def _report(self, seconds: float, plan_seconds: float) -> LoadReport:
        p = self.p
        devices = tuple(
            DeviceReport(name, s.nbytes, s.tensors, s.layers, covered(s.spans))
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
            replans=tuple(dataclasses.replace(r, path=str(self.path)) for r in p.budget.replans),
            moves=tuple(dataclasses.replace(m, path=str(self.path)) for m in self._spills.moves),
            fallbacks=tuple(
                dataclasses.replace(f, path=str(self.path)) for f in p.budget.fallbacks
            ),
            staging_bytes=p.reader.staging_bytes,
            huge_page_bytes=self.huge_bytes,
            checks=() if p.verifier is None else p.verifier.checks(),
        )

    def _release(self) -> tuple[int, int]:
        """Drop every tensor this load placed or allocated (containers cleared in place);
        returns how many tensors that was and their bytes."""
        dropped = list(self.tensors.values())
        for flight in self.inflight:
            dropped.extend(flight.final.values())
            dropped.extend(flight.raw.values())
        count, nbytes = len(dropped), _released(dropped)
        dropped.clear()
        self.tensors.clear()
        while self.inflight:
            self.inflight.popleft().drop()
        return count, nbytes


def _notices(devices: list[Device]) -> list[Event]:
    """What the devices had to fall back on since last asked, as events."""
    return [
        MemoryReadingFallback(device.name, notice)
        for device in devices
        for notice in device.take_notices()
    ]


def _prepare(devices: list[Device]) -> None:
    for device in devices:
        device.prepare()


def _release_caches(devices: list[Device]) -> None:
    # Cycles first: a cancelled worker's exception keeps its frame, and the frame its staging
    # slot or destination, until the cycle collector runs; a cache cannot return what they hold.
    gc.collect()
    for device in devices:
        device.release_cache()


def _clamps(params: LoadParams, plan: Plan) -> tuple[MaxSeqLenClamped, ...]:
    """The warning that the plan sized KV and activations for fewer tokens than asked."""
    if plan.max_seq_len and plan.max_seq_len < params.max_seq_len:
        return (MaxSeqLenClamped(params.max_seq_len, plan.max_seq_len),)
    return ()


async def _setup(
    path: str | os.PathLike[str],
    params: LoadParams,
    given: ModelSpec | None,
    on_filled: Callable[[InFlight], None],
) -> _Parts:
    """The stages of one load, handed their collaborators: the source (a local checkpoint, a
    hub id, an object-store URL; its headers read), the spec (``given``, else from the
    headers), the devices (their contexts made before any capacity is read: a GPU's context
    takes memory when it is created), units, reader, destinations, budget, verifier."""
    reading = time.perf_counter()
    # A hub download in this thread checks the load's cancel scope as bytes arrive.
    source = await anyio.to_thread.run_sync(
        lambda: resolve_source(path, params, anyio.from_thread.check_cancelled)
    )
    spec = given or spec_of(source, params.target_code)
    header_seconds = time.perf_counter() - reading
    devices = await anyio.to_thread.run_sync(resolve_devices, params.devices)
    await anyio.to_thread.run_sync(_prepare, devices)
    unit_list = units(spec)
    scratch = conversion_scratch(spec)
    files = Files(spec) if source.objects is None else source.objects
    verifier = Verifier(spec, files, source.checksums) if params.verify else None
    feed = None if verifier is None else verifier.feed
    reader = Reader(spec, params, on_filled, files, feed)
    destinations = Destinations(spec, params, files, scratch)
    budget = Budget(spec, devices, params, transient=destinations.transient)
    return _Parts(
        spec,
        devices,
        unit_list,
        budget,
        reader,
        destinations,
        PageCache(files),
        scratch,
        header_seconds,
        sum(unit.nbytes for unit in unit_list),
        verifier,
    )


async def load(
    path: str | os.PathLike[str],
    params: LoadParams | None = None,
    *,
    on_event: Observers = None,
    spec: ModelSpec | None = None,
) -> LoadedModel:
    """Load the checkpoint at ``path`` onto the devices ``params`` names.

    ``path`` is a local checkpoint, a Hugging Face repo id ``org/name`` (at
    ``params.revision``, through huggingface_hub's cache) or an object-store URL
    (``s3://bucket/prefix``, ``gs://``, ``az://``); see ``streamload.sources``.

    Runs under asyncio or trio (anyio). Events go to ``on_event`` (a plain or coroutine
    function, or a sequence of them such as ``streamload.metrics.PrometheusObserver``, each
    called in order on the event loop) and to the log (``streamload.events``).

    Cancellation (a cancel scope, a cancelled task, a server shutting down): every tensor the
    load placed is released (and, with ``LoadParams.empty_cache_on_failure``, returned from
    torch's caches to the driver), reader threads finish, every file descriptor is closed, a
    ``LoadCancelled`` event says what was placed and released, and the cancellation
    propagates; waits for a GPU poll, so a GPU that stopped answering does not hold the
    cancellation up. Any other failure does the
    same and raises a ``StreamloadError`` naming the file, tensor, layer or device involved.

    ``spec``: stream exactly this model spec (a subset of the checkpoint's layers and parts,
    as ``streamload.distributed`` builds per pipeline stage) instead of inspecting ``path``;
    it must come from the same checkpoint and the same target dtype as ``params``.
    """
    return await _Load(path, params or LoadParams(), on_event, spec).run()


def has_room(
    p: _Parts, params: LoadParams, inflight: deque[InFlight], unplaced: int, unit: Unit
) -> bool:
    """``room_for`` the next unit, ``unit``, with ``unplaced`` units before it not yet placed
    and ``inflight`` allocated. Whether the disk must fill it (``COLD_WINDOW``) is the
    page-cache probe's kept answer (its read-ahead task asked two units before); not asked
    yet, the unit gets the page cache's window."""
    device = p.budget.device_for(unit)
    cold = faults_ahead(device, params, p.page_cache.known(unit))
    return room_for(
        unplaced=unplaced,
        to_gpu=device.is_gpu,
        reading=sum(1 for flight in inflight if not flight.done.is_set()),
        raw=sum(flight.raw_bytes for flight in inflight) + unit.raw_bytes,
        scratch=p.scratch,
        depth=COLD_WINDOW if cold else 2,
    )


# Units the disk must fill into host blocks that may be read at once: the fault-ahead worker
# faults in the later ones while the lanes wait on the disk for the earlier ones.
COLD_WINDOW = 4


def room_for(
    *, unplaced: int, to_gpu: bool, reading: int, raw: int, scratch: int, depth: int = 2
) -> bool:
    """Whether the next unit may be allocated, with ``unplaced`` units before it not yet
    placed (``reading`` of them still being read, their raw buffers and its own ``raw``
    bytes): at most ``depth`` units are being read.

    A unit bound for a GPU also waits until the unit two before it is placed and its
    ``LayerPlaced`` delivered, so the recheck before it sees that placement (and whatever a
    callback did about it). A unit bound for host memory is rechecked against nothing a
    placement changes: it is allocated as soon as the unit ``depth`` before it has been read,
    while that one's placement is still being reported (at most ``depth + 1`` units unplaced,
    their conversion buffers within the scratch the plan left), so the next unit's reads start
    before the current ones drain. ``depth`` is 2 for units read from the page cache, where
    three units read at once cost more system time than they save; ``COLD_WINDOW`` for units
    the disk must fill into a host block, which the fault-ahead worker (``engine/_faults``)
    faults in while the disk reads the units before them
    (``benchmarks/results/measurements.md``).
    """
    if unplaced < 2:
        return True
    if unplaced > depth or to_gpu:
        return False
    return reading < depth and raw <= scratch
