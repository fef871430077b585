"""The async load: plan, stream tensors layer by layer, recheck live memory, re-plan, report.

``load`` runs on the caller's event loop and never blocks it: header parsing, device probes,
allocations, file reads, copies and dtype conversions all run in worker threads
(``anyio.to_thread.run_sync``; reads under a ``CapacityLimiter`` of ``params.reader_threads``).

Pipeline. Units are streamed in plan order: the non-mapped parts (on the primary device), then
layers 0..n-1. Units are allocated and read ahead of their placement, which is reported in
order by a task of its own. A unit bound for a GPU is not allocated before the unit two before
it is finished and its ``LayerPlaced`` delivered, so reads of the next layer overlap the copies
and conversion of the current one while memory readings stay exact; a unit bound for host
memory only waits until the unit two before it has been read (``_Load._room_for``). For each
unit:

1. *Recheck* (GPUs): live free bytes (minus what other loads in this process hold) plus this
   load's transient buffers must cover what the device's plan still needs: remaining planned
   weights + KV of all its layers + its activations + its reserve. Otherwise re-plan the layers
   not yet placed (``planner.replan``) and emit ``Replanned``; placed layers never move.
2. *Allocate* final tensors (target dtype) and, for tensors whose dtype changes, a raw buffer in the
   stored dtype. On the CPU, a unit's tensors are laid out in one mapping and its raw buffers in
   another (``_Load._host_tensors``). ``torch.OutOfMemoryError`` frees the unit's buffers and
   re-plans too.
3. *Read*: runs of adjacent tensors are cut into chunks of ``params.chunk_bytes``. Staged devices
   (CUDA, ``SimulatedGPU``) read each chunk into a slot of a host staging ring (pinned on CUDA;
   ``params.staging_bytes`` in all, independent of the model's size), at its file offset's position
   modulo 64 bytes (chunks 64 bytes shorter make room), and copy it to the device; a slot is
   refilled only after its copy's fence completes. Unstaged devices (the CPU) are read into directly
   with ``os.preadv`` (CPU tensors start at their file bytes' position modulo 64, so that copy runs
   co-aligned too), by up to ``reader_threads // 2`` reader lanes for the whole load, each a worker
   thread taking chunk after chunk from one queue in plan order, across unit boundaries, until it is
   empty (``_ReadQueue``; cancellation is checked between chunks). CPU layers under
   ``cpu_policy="mmap"`` that keep their stored dtype are memory-mapped from the checkpoint instead
   (copy-on-write, zero copy).
4. *Finish*: wait the unit's fences, convert raw buffers into the final tensors on the
   destination device, free the raw buffers, emit ``LayerPlaced``.

Cancellation and failure: every tensor the load placed is released (a simulated GPU's ledger
returns to where it was), reader threads finish (they are not abandoned), every file descriptor
is closed, reservations are dropped; a ``LoadFailed`` event is emitted; cancellation propagates
unchanged and any other error surfaces as a ``StreamloadError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import mmap
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import torch

from streamload import _hostmem, planner
from streamload.checkpoint import TensorEntry
from streamload.devices import (
    RESERVATIONS,
    CpuDevice,
    Device,
    Fence,
    ledger_key,
    resolve_devices,
)
from streamload.errors import (
    CheckpointError,
    LoadError,
    ReplanLimitError,
    StreamloadError,
    TruncatedDataError,
)
from streamload.events import (
    DeviceReport,
    Event,
    EventCallback,
    LayerPlaced,
    LoadFailed,
    LoadFinished,
    LoadReport,
    PagedAttentionDisabled,
    PlanComputed,
    Replanned,
    emit,
)
from streamload.model import ModelSpec, inspect
from streamload.params import LoadParams, torch_dtype
from streamload.planner import DeviceCapacity, Plan

__all__ = ["LoadedModel", "capacities", "load"]


_MAX_PIECES_PER_CHUNK = 512  # well under IOV_MAX (1024) for one preadv
# A chunk is read into its staging slot at the file offset's position modulo a cache line, so
# the kernel's copy out of the page cache runs with source and destination co-aligned (measured
# +26% read rate into a reused slot for a tensor 8 bytes past a cache line, as safetensors
# headers leave them). Staged chunks are cut this much short of ``chunk_bytes`` to make room.
_STAGING_ALIGN = 64


def capacities(
    devices: Sequence[Device], params: LoadParams, *, scratch: int = 0
) -> list[DeviceCapacity]:
    """Live capacities of ``devices`` as the planner takes them (blocking: probes devices).

    Bytes other loads in this process hold on a device are subtracted from its free bytes, and
    so is ``scratch`` on GPUs (the load's dtype-conversion buffers, see ``load``).
    """
    rows = []
    for device in devices:
        free = device.live_free_bytes() - RESERVATIONS.held_by_others(None, ledger_key(device))
        if device.is_gpu:
            free -= scratch
        rows.append(
            DeviceCapacity(
                name=device.name,
                is_gpu=device.is_gpu,
                total_bytes=device.total_bytes(),
                free_bytes=max(free, 0),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Units, chunks and the staging ring


@dataclass(frozen=True, slots=True)
class _Unit:
    """A layer (``layer`` set) or a non-mapped part (``part`` set) streamed as one step."""

    layer: int | None
    part: str | None
    entries: tuple[TensorEntry, ...]
    nbytes: int
    stored_bytes: int


@dataclass(slots=True)
class _Piece:
    dst: torch.Tensor  # uint8 view of the destination (raw) bytes
    at: int  # offset inside the chunk
    tensor: str
    # Fault the host destination's bytes from here on in before the read/copy (``len(dst)``:
    # none). Those in 4 KiB pages only: ``_hostmem.prefault`` says why not huge pages.
    fault_from: int = 0


@dataclass(slots=True)
class _Chunk:
    path: Path
    offset: int
    nbytes: int = 0
    pieces: list[_Piece] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's bytes."""
    return tensor.reshape(-1).view(torch.uint8)


def _host_memory(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous host tensor's bytes (no numpy needed).

    The caller keeps ``tensor`` alive while the view is in use.
    """
    assert tensor.device.type == "cpu"
    assert tensor.is_contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    array = (ctypes.c_uint8 * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


# A read destination: the entry, a uint8 view of its bytes, and where in them its 4 KiB pages
# start (those before are in huge pages, left to the copy to fault in).
_Destination = tuple[TensorEntry, torch.Tensor, int]
# A unit's final tensors, raw conversion buffers, read destinations and bytes in huge pages.
_Tensors = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[_Destination], int]


def _cut_chunks(items: Sequence[_Destination], chunk_bytes: int) -> list[_Chunk]:
    """Cut file-adjacent tensors into reads of at most ``chunk_bytes``."""
    chunks: list[_Chunk] = []
    current: _Chunk | None = None
    for entry, dst, small in sorted(items, key=lambda item: (str(item[0].path), item[0].offset)):
        pos = 0
        while pos < entry.nbytes:
            start = entry.offset + pos
            if (
                current is None
                or current.path != entry.path
                or current.end != start
                or current.nbytes >= chunk_bytes
                or len(current.pieces) >= _MAX_PIECES_PER_CHUNK
            ):
                current = _Chunk(entry.path, start)
                chunks.append(current)
            take = min(entry.nbytes - pos, chunk_bytes - current.nbytes)
            fault_from = min(max(small - pos, 0), take)
            current.pieces.append(
                _Piece(dst[pos : pos + take], current.nbytes, entry.name, fault_from)
            )
            current.nbytes += take
            pos += take
    return chunks


@dataclass(slots=True)
class _Slot:
    buffer: torch.Tensor  # uint8 host buffer (pinned on CUDA)
    view: memoryview  # writable view of the same bytes, for preadv
    fence: Fence | None = None


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # pragma: no cover - platforms without affinity


def _ring_slots(params: LoadParams, cpus: int) -> int:
    """How many ``chunk_bytes`` slots the staging ring gets.

    A staged read is a copy by the CPU (page cache to the slot) and, on a simulated GPU,
    another (slot to device memory). Slots beyond what the CPUs can keep busy only add host
    memory that has to be faulted in and falls out of cache; one slot fewer than that leaves
    the disk idle on a cold load. Measured on 2 CPUs with a 3 GB checkpoint to a simulated GPU
    (medians of 4-6 loads in one process): warm 1.10 s with 16 slots, 1.01 s with 4, 0.95 s
    with 3, 0.92 s with 2; cold 1.82 s with 8, 1.84 s with 4, 1.83 s with 3, 2.72 s with 2.
    So: the usable CPUs + 1, at most ``staging_bytes // chunk_bytes`` (the budget), at most
    ``reader_threads`` (no more reads run at once), and at least 2 (one slot fills while the
    other's copy runs).
    """
    return max(2, min(params.staging_bytes // params.chunk_bytes, params.reader_threads, cpus + 1))


class _StagingRing:
    """Fixed host buffers reused in turn; a slot is refilled only after its copy's fence.

    Free slots are handed out oldest-released first: on CUDA the copy out of the slot released
    longest ago is the likeliest to have finished already.
    """

    def __init__(self, slots: list[_Slot], slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self._slots = list(slots)
        self._free = deque(slots)
        self._available = anyio.Semaphore(len(slots))

    @staticmethod
    def make_slots(device: Device, count: int, slot_bytes: int) -> list[_Slot]:
        """``count`` host buffers from ``device`` (pinned on CUDA; blocking)."""
        slots = []
        for _ in range(count):
            buffer = device.host_buffer(slot_bytes)
            slots.append(_Slot(buffer, _host_memory(buffer)))
        return slots

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * len(self._slots)

    async def acquire(self) -> _Slot:
        await self._available.acquire()
        return self._free.popleft()

    def release(self, slot: _Slot) -> None:
        self._free.append(slot)
        self._available.release()

    def close(self) -> None:
        """Wait for outstanding copies (blocking) and drop the buffers."""
        for slot in self._slots:
            if slot.fence is not None:
                slot.fence.wait()
            slot.view.release()
        self._slots.clear()
        self._free.clear()


class _Files:
    """One read-only descriptor per shard for the whole load, checked against the headers."""

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

    def close(self) -> None:
        with self._lock:
            while self._fds:
                _, fd = self._fds.popitem()
                os.close(fd)


def _read_into(fd: int, views: list[memoryview], offset: int, path: Path, tensor: str) -> None:
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


# --------------------------------------------------------------------------------------------
# One unit in flight


@dataclass(slots=True)
class _InFlight:
    unit: _Unit
    device: Device
    final: dict[str, torch.Tensor]  # name -> tensor on the device, target dtype
    raw: dict[str, torch.Tensor]  # name -> stored-dtype buffer on the device (converted only)
    chunks: list[_Chunk]
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


class _ReadQueue:
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
        self._work: deque[tuple[_InFlight, _Chunk]] = deque()
        self._running = 0

    def put(self, flight: _InFlight) -> int:
        """Queue ``flight``'s chunks; returns how many lanes to start for them."""
        with self._lock:
            flight.pending = len(flight.chunks)
            self._work.extend((flight, chunk) for chunk in flight.chunks)
            start = max(0, min(self.lanes, len(self._work)) - self._running)
            self._running += start
            return start

    def take(self) -> tuple[_InFlight, _Chunk] | None:
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

    def read(self, flight: _InFlight, error: BaseException | None) -> bool:
        """Count one of ``flight``'s chunks as read (``error``: failed; the first is kept and
        its unit's other chunks are skipped). True when it was the unit's last one."""
        with self._lock:
            if error is not None and flight.error is None:
                flight.error = error
            flight.pending -= 1
            return flight.pending == 0


@dataclass(slots=True)
class _DeviceStats:
    """What one device received so far (for the report)."""

    nbytes: int = 0
    tensors: int = 0
    layers: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# The load


class LoadedModel:
    """A loaded checkpoint: ``tensors`` by checkpoint name, each on its final device.

    ``plan`` is the plan actually used (after any re-plan), ``report`` what the load did.
    ``device_map`` is the placement in Hugging Face form, module prefix -> *torch* device
    (``{"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", ..., "lm_head": "cuda:0"}``),
    accepted as-is by ``accelerate.dispatch_model`` and ``from_pretrained(device_map=...)``.
    Tensors on a ``SimulatedGPU`` live in host memory, so their modules map to ``"cpu"`` there;
    ``placement`` gives the same keys with streamload's device names (``"sim:0"``).

    ``release()`` drops every reference the library holds; device memory returns once the
    caller's own references to the tensors are gone too. ``async with await load(...) as m:``
    releases on exit.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        plan: Plan,
        report: LoadReport,
        spec: ModelSpec,
    ) -> None:
        self.tensors = tensors
        self.plan = plan
        self.report = report
        self.spec = spec
        self.placement = _placement(spec, plan)
        self.device_map = _torch_device_map(spec, self.placement, tensors)

    def release(self) -> None:
        """Drop every tensor reference the library holds (idempotent)."""
        self.tensors.clear()

    async def __aenter__(self) -> LoadedModel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"LoadedModel({self.report.path!r}, tensors={len(self.tensors)}, "
            f"devices={[d.device for d in self.report.devices]})"
        )


def _placement(spec: ModelSpec, plan: Plan) -> dict[str, str]:
    mapping = {part.name: plan.primary for part in spec.non_mapped}
    for layer in spec.layers:
        mapping[layer.prefix] = plan.layer_devices[layer.index]
    return mapping


def _torch_device_map(
    spec: ModelSpec, placement: dict[str, str], tensors: dict[str, torch.Tensor]
) -> dict[str, str]:
    """Module -> the torch device its tensors are on (``"cuda:0"``, ``"cpu"``)."""
    first: dict[str, str] = {}
    for part in spec.non_mapped:
        if part.tensors:
            first[part.name] = part.tensors[0]
    for layer in spec.layers:
        if layer.tensors:
            first[layer.prefix] = layer.tensors[0]
    mapping = {}
    for module, device in placement.items():
        name = first.get(module)
        mapping[module] = str(tensors[name].device) if name in tensors else device
    return mapping


def _runs(unit: _Unit) -> list[tuple[Path, int, int]]:
    """The byte ranges ``unit``'s tensors fill in its files (path, start, end), adjacent
    tensors merged; other units' tensors stored between them are left out."""
    runs: list[tuple[Path, int, int]] = []
    for entry in sorted(unit.entries, key=lambda e: (str(e.path), e.offset)):
        if runs and runs[-1][0] == entry.path and runs[-1][2] == entry.offset:
            runs[-1] = (entry.path, runs[-1][1], entry.end)
        elif entry.nbytes:
            runs.append((entry.path, entry.offset, entry.end))
    return runs


def _units(spec: ModelSpec) -> list[_Unit]:
    entries = spec.checkpoint.tensors
    units = []
    for part in spec.non_mapped:
        got = tuple(entries[name] for name in part.tensors)
        units.append(_Unit(None, part.name, got, part.nbytes, part.stored_bytes))
    for layer in spec.layers:
        got = tuple(entries[name] for name in layer.tensors)
        units.append(_Unit(layer.index, None, got, layer.nbytes, layer.stored_bytes))
    return units


class _Load:
    def __init__(
        self,
        path: str | Path,
        params: LoadParams,
        on_event: EventCallback | None,
        spec: ModelSpec | None = None,
    ):
        self.path = Path(path)
        self.given_spec = spec
        self.params = params
        self.on_event = on_event
        self.tensors: dict[str, torch.Tensor] = {}
        self.inflight: deque[_InFlight] = deque()  # allocated, not yet placed, in plan order
        self.placed = 0  # units whose LayerPlaced was delivered
        self.progress = anyio.Event()  # replaced each time a unit is read or placed
        self.replans: list[Replanned] = []
        self.fallbacks: list[PagedAttentionDisabled] = []
        self.transient: dict[str, int] = {}
        self.device_stats: dict[str, _DeviceStats] = {}
        self.files: _Files | None = None
        self.ring: _StagingRing | None = None
        self.ring_lock = anyio.Lock()
        self.emit_lock = anyio.Lock()
        self.limiter = anyio.CapacityLimiter(params.reader_threads)
        self.reads = _ReadQueue(max(1, params.reader_threads // 2))
        self.target = params.target_code
        self.scratch = 0
        self.units: list[_Unit] = []
        # "auto" huge pages: whether each unit (by id) was mostly in the page cache when first
        # looked at, before the load's own read-ahead of it.
        self.warm: dict[int, bool] = {}
        self.huge_bytes = 0

    # -- helpers ------------------------------------------------------------------------------

    async def _emit(self, event: Event) -> None:
        # Placements are reported by a task of their own while the stream allocates (and may
        # re-plan): one event at a time, so a callback never runs alongside itself.
        async with self.emit_lock:
            await emit(event, self.on_event)

    def _placed(self, entry: TensorEntry) -> str:
        """The dtype code ``entry`` has once placed (the spec decides: floats take the target
        dtype; integer, FP8 and quantization side tensors keep theirs)."""
        return self.spec.placed_dtype(entry.name)

    def _converts(self, entry: TensorEntry) -> bool:
        return self.target is not None and self._placed(entry) != entry.dtype

    def _live_free(self, device: Device) -> int:
        return device.live_free_bytes() - RESERVATIONS.held_by_others(self, ledger_key(device))

    def _need_rest(self, device: str, next_layer: int, parts_left: int) -> int:
        """What ``device``'s plan still needs: unplaced weights + KV + activations + reserve."""
        plan = self.plan
        row = plan.device(device)
        weights = sum(
            self.spec.layers[i].nbytes
            for i in range(next_layer, len(plan.layer_devices))
            if plan.layer_devices[i] == device
        )
        if device == plan.primary:
            weights += parts_left
        kv = sum(
            kv for d, kv in zip(plan.layer_devices, plan.layer_kv_bytes, strict=True) if d == device
        )
        return weights + kv + row.activation_bytes + row.reserve_bytes

    def _reserve(self, next_layer: int, parts_left: int) -> None:
        """Hold, for other loads in this process, what this load still needs per device."""
        RESERVATIONS.release_all(self)
        for row in self.plan.devices:
            if not row.is_gpu:
                continue
            held = self._need_rest(row.device, next_layer, parts_left) - row.reserve_bytes
            if held > 0:
                RESERVATIONS.reserve(self, ledger_key(self.devices[row.device]), held)

    def _slack(self, device: Device) -> int:
        """Bytes to add to a live reading to compare it with the plan: this load's raw
        conversion buffers (freed soon) minus the conversion scratch the plan must leave."""
        if not device.is_gpu:
            return 0
        return self.transient.get(device.name, 0) - self.scratch

    def _live_capacities(self) -> list[DeviceCapacity]:
        rows = []
        for row in self.plan.devices:
            device = self.devices[row.device]
            rows.append(
                DeviceCapacity(
                    name=device.name,
                    is_gpu=device.is_gpu,
                    total_bytes=device.total_bytes(),
                    free_bytes=max(self._live_free(device) + self._slack(device), 0),
                )
            )
        return rows

    # -- the steps ----------------------------------------------------------------------------

    async def run(self) -> LoadedModel:
        started = time.perf_counter()
        try:
            return await self._run(started)
        except BaseException as exc:
            self._release()
            _scrub(exc)
            error = _single(exc)
            with anyio.CancelScope(shield=True):
                await self._emit(LoadFailed(error))
            if isinstance(error, anyio.get_cancelled_exc_class()) or not isinstance(
                error, Exception
            ):
                raise
            if isinstance(error, StreamloadError):
                raise error  # noqa: B904 - keeps the cause it was raised with
            raise LoadError(f"{type(error).__name__}: {error}") from error
        finally:
            RESERVATIONS.release_all(self)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close)

    async def _run(self, started: float) -> LoadedModel:
        params = self.params
        await _start_workers(params.reader_threads + 2)
        if self.given_spec is not None:
            self.spec = self.given_spec
        else:
            self.spec = await anyio.to_thread.run_sync(
                lambda: inspect(self.path, target_dtype=self.target)
            )
        devices = await anyio.to_thread.run_sync(resolve_devices, params.devices)
        self.devices = {device.name: device for device in devices}
        self.units = _units(self.spec)
        self.scratch = 2 * max((self._raw_bytes(unit) for unit in self.units), default=0)
        caps = await anyio.to_thread.run_sync(
            lambda: capacities(devices, params, scratch=self.scratch)
        )
        plan_started = time.perf_counter()
        self.plan = await anyio.to_thread.run_sync(planner.plan, self.spec, caps, params)
        plan_seconds = time.perf_counter() - plan_started
        self._reserve(0, self.spec.non_mapped_bytes)
        await self._emit(PlanComputed(self.plan, str(self.path), plan_seconds))
        if self.plan.paged_attention_reason is not None:
            await self._fallback(self.plan.paged_attention_reason)
        self.files = _Files(self.spec)

        async with anyio.create_task_group() as group:
            await self._stream(group)
        # A cancellation requested by the last event callback still cancels the load.
        await anyio.lowlevel.checkpoint_if_cancelled()

        for alias, source in self.spec.tied.items():
            self.tensors[alias] = self.tensors[source]
        report = self._report(time.perf_counter() - started, plan_seconds)
        await self._emit(LoadFinished(report))
        model = LoadedModel(self.tensors, self.plan, report, self.spec)
        self.tensors = {}
        return model

    async def _fallback(self, reason: str) -> None:
        event = PagedAttentionDisabled(reason)
        self.fallbacks.append(event)
        await self._emit(event)

    def _raw_bytes(self, unit: _Unit) -> int:
        return sum(entry.nbytes for entry in unit.entries if self._converts(entry))

    async def _stream(self, group: anyio.abc.TaskGroup) -> None:
        parts_left = self.spec.non_mapped_bytes
        group.start_soon(self._place_in_order)
        for index, unit in enumerate(self.units):
            while not self._room_for(index, unit):
                await self.progress.wait()
            ahead = self.units[index + 2] if index + 2 < len(self.units) else None
            if ahead is not None and not self.mmap_only(ahead):
                group.start_soon(self._prefetch, ahead)
            flight = await self._allocate(unit, parts_left)
            if unit.layer is None:
                parts_left -= unit.nbytes
            self._reserve(unit.layer + 1 if unit.layer is not None else 0, parts_left)
            self.inflight.append(flight)
            if flight.device.staged:
                group.start_soon(self._fill, flight)
            elif not flight.chunks:
                self._filled(flight)
            else:
                for _ in range(self.reads.put(flight)):
                    group.start_soon(self._lane)

    def _room_for(self, index: int, unit: _Unit) -> bool:
        """Whether unit ``index`` may be allocated now: at most two units are being read.

        A unit bound for a GPU also waits until the unit two before it is placed and its
        ``LayerPlaced`` delivered, so the recheck before it sees that placement (and whatever a
        callback did about it). A unit bound for host memory (the CPU) is rechecked against
        nothing a placement changes: it is allocated as soon as the unit two before it has been
        read, while that one's placement is still being reported (at most three units
        unplaced, their conversion buffers within the scratch the plan left). The next unit's
        reads then start before the current ones drain: waiting for the placement left both
        CPUs without a read for 35 ms of a 0.75 s warm 3 GB load, in 2-5 ms stretches at layer
        ends (16 ms after). Three units read at once measured slower (more system time).
        """
        unplaced = index - self.placed
        if unplaced < 2:
            return True
        if unplaced > 2 or self._device_for(unit).is_gpu:
            return False
        reading = sum(1 for flight in self.inflight if not flight.done.is_set())
        raw = sum(flight.raw_bytes for flight in self.inflight) + self._raw_bytes(unit)
        return reading < 2 and raw <= self.scratch

    def _progress(self) -> None:
        """Wake ``_stream`` to look at its window again (a unit was read or placed)."""
        self.progress.set()
        self.progress = anyio.Event()

    async def _place_in_order(self) -> None:
        """Finish and report every unit in plan order as its reads complete."""
        for _ in self.units:
            while not self.inflight:
                await self.progress.wait()
            await self._finish(self.inflight[0])
            self.placed += 1
            self._progress()

    def mmap_only(self, unit: _Unit) -> bool:
        """Whether ``unit`` will be memory-mapped rather than read (nothing to prefetch)."""
        return self.params.cpu_policy == "mmap" and not self._device_for(unit).is_gpu

    async def _prefetch(self, unit: _Unit) -> None:
        """Ask the kernel to start reading ``unit``'s bytes into the page cache now, so the disk
        works ahead of the allocation window (no process memory is used)."""
        await anyio.to_thread.run_sync(self._advise, unit)

    def _advise(self, unit: _Unit) -> None:
        if not hasattr(os, "posix_fadvise") or self.files is None:
            return
        # Probe the page cache (under "auto") before the read-ahead below fills it. Best effort
        # like the advice: a file that cannot be opened is reported by the read, in context.
        with contextlib.suppress(OSError, StreamloadError):
            self._huge_pages(unit, self._device_for(unit))
        for path, start, end in _runs(unit):
            with contextlib.suppress(OSError, StreamloadError):
                os.posix_fadvise(self.files.fd(path), start, end - start, os.POSIX_FADV_WILLNEED)

    def _is_warm(self, unit: _Unit) -> bool:
        """Whether more than half of ``unit``'s bytes were in the page cache when first asked
        (sampled, ``_hostmem.cached_fraction``); unknown counts as cold."""
        warm = self.warm.get(id(unit))
        if warm is None:
            files = self.files
            assert files is not None
            ranges = [(files.fd(path), start, end - start) for path, start, end in _runs(unit)]
            fraction = _hostmem.cached_fraction(ranges)
            warm = self.warm[id(unit)] = fraction is not None and fraction > 0.5
        return warm

    def _huge_pages(self, unit: _Unit, device: Device) -> bool:
        """Whether ``unit``'s destinations on ``device`` get huge pages
        (``LoadParams.huge_pages``): only devices whose memory is host memory and whose
        ``empty`` takes ``huge_pages`` (they say so with ``host_memory = True``: the CPU, a
        simulated GPU)."""
        if self.params.huge_pages is False or not getattr(device, "host_memory", False):
            return False
        if not _hostmem.huge_pages_available():
            return False
        if self.params.huge_pages == "auto":
            return self._is_warm(unit)
        return True

    def _device_for(self, unit: _Unit) -> Device:
        name = self.plan.primary if unit.layer is None else self.plan.layer_devices[unit.layer]
        return self.devices[name]

    async def _allocate(self, unit: _Unit, parts_left: int) -> _InFlight:
        next_layer = 0 if unit.layer is None else unit.layer
        while True:
            device = self._device_for(unit)
            need = self._need_rest(device.name, next_layer, parts_left)
            live: int | None = None  # host memory: read in the allocating call (one hop less)
            if device.is_gpu:
                live = await anyio.to_thread.run_sync(self._live_free, device)
                have = live + self._slack(device)
                if have < need:
                    reason = "under-delivered: live free memory is below what its plan still needs"
                    await self._replan(unit, device.name, reason, need, have, parts_left)
                    continue
            try:
                return await anyio.to_thread.run_sync(self._allocate_sync, unit, device, live)
            except torch.OutOfMemoryError as exc:
                reason = f"allocation failed: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                del exc
                if live is None:
                    live = await anyio.to_thread.run_sync(self._live_free, device)
                # The device has less than its reading said: re-plan as if it could not hold
                # all it was given (at least one layer moves on; repeated failures move more).
                await self._replan(
                    unit, device.name, reason, need, live, parts_left, cap=(device.name, need - 1)
                )

    def _allocate_sync(self, unit: _Unit, device: Device, live: int | None) -> _InFlight:
        """Allocate ``unit``'s tensors on ``device`` (blocking); ``live``: the free memory read
        before, or ``None`` to read it here first."""
        if live is None:
            live = self._live_free(device)
        huge = self._huge_pages(unit, device)
        if isinstance(device, CpuDevice):
            final, raw, items, huge_bytes = self._host_tensors(unit, huge)
        else:
            final, raw, items, huge_bytes = self._device_tensors(unit, device, huge)
        raw_bytes = sum(t.nbytes for t in raw.values())
        self.transient[device.name] = self.transient.get(device.name, 0) + raw_bytes
        chunk_bytes = self.params.chunk_bytes
        if device.staged and chunk_bytes >= 2 * _STAGING_ALIGN:
            chunk_bytes -= _STAGING_ALIGN  # room to co-align the read in its slot
        chunks = _cut_chunks(items, chunk_bytes)
        items.clear()
        return _InFlight(
            unit, device, final, raw, chunks, raw_bytes, time.perf_counter(), live, huge_bytes
        )

    def _mmap_ok(self, device: Device) -> bool:
        return not device.is_gpu and not device.staged and self.params.cpu_policy == "mmap"

    def _device_tensors(self, unit: _Unit, device: Device, huge: bool) -> _Tensors:
        """``unit``'s tensors from ``device.empty``, one allocation each (a GPU's allocator
        places them)."""
        final: dict[str, torch.Tensor] = {}
        raw: dict[str, torch.Tensor] = {}
        items: list[_Destination] = []
        mmap_ok = self._mmap_ok(device)
        empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = device.empty
        if huge:
            host_empty: Callable[..., torch.Tensor] = device.empty  # takes huge_pages
            empty = functools.partial(host_empty, huge_pages=True)
        huge_bytes = 0
        try:
            for entry in unit.entries:
                stored = torch_dtype(entry.dtype)
                if self._converts(entry):
                    final[entry.name] = empty(entry.shape, torch_dtype(self._placed(entry)))
                    raw[entry.name] = dst = empty(entry.shape, stored)
                elif mmap_ok:
                    final[entry.name] = self._mmap(entry, stored)
                    continue
                else:
                    final[entry.name] = dst = empty(entry.shape, stored)
                # Asked for huge pages, a tensor of 2 MiB or more has its whole 2 MiB stretches
                # in them (``_hostmem.huge_mapping``): left to the copy to fault in.
                small = _hostmem.huge_stretches(dst.nbytes) if huge else 0
                items.append((entry, _byte_view(dst), small))
                if huge:
                    huge_bytes += _hostmem.huge_stretches(final[entry.name].nbytes)
        except BaseException:
            final.clear()
            raw.clear()
            items.clear()
            raise
        return final, raw, items, huge_bytes

    def _host_tensors(self, unit: _Unit, huge: bool) -> _Tensors:
        """``unit``'s CPU tensors, laid out in one mapping (``_hostmem.HostBlock`` says why)
        and its raw conversion buffers in another (freed once converted).

        Tensors that are read into come first, in file order, each starting at its file bytes'
        position in a cache line (``_hostmem.lead``): the kernel's copy out of the page cache
        then runs co-aligned, measured 8.4-8.7 GB/s misaligned against 10.6-11.1 GB/s
        co-aligned (one thread, 16 MiB ``preadv`` into pre-faulted memory, safetensors data
        56 bytes past a cache line). Converted tensors follow, cache-line aligned.
        """
        mmap_ok = self.params.cpu_policy == "mmap"
        order = sorted(unit.entries, key=lambda entry: (str(entry.path), entry.offset))
        kept: list[tuple[TensorEntry, torch.dtype, int]] = []  # (entry, dtype, lead)
        converted: list[tuple[TensorEntry, torch.dtype, int]] = []
        scratch: list[tuple[TensorEntry, torch.dtype, int]] = []
        final: dict[str, torch.Tensor] = {}
        for entry in order:
            stored = torch_dtype(entry.dtype)
            if self._converts(entry):
                converted.append((entry, torch_dtype(self._placed(entry)), 0))
                scratch.append((entry, stored, _hostmem.lead(entry.offset, stored)))
            elif mmap_ok:
                final[entry.name] = self._mmap(entry, stored)
            else:
                kept.append((entry, stored, _hostmem.lead(entry.offset, stored)))
        kept += converted
        items: list[_Destination] = []
        placed, huge_bytes = self._carve(kept, huge, items)
        final.update(placed)
        raw, _ = self._carve(scratch, huge, items)
        final = {entry.name: final[entry.name] for entry in unit.entries}
        return final, raw, items, huge_bytes

    @staticmethod
    def _carve(
        layout: list[tuple[TensorEntry, torch.dtype, int]],
        huge: bool,
        items: list[_Destination],
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Tensors for ``layout`` in one new ``HostBlock``; those in the stored dtype are read
        destinations (added to ``items``). Returns them and their bytes in huge pages."""
        sizes = [(math.prod(entry.shape) * dtype.itemsize, lead) for entry, dtype, lead in layout]
        positions, total = _hostmem.pack(sizes)
        block = _hostmem.HostBlock(total, huge_pages=huge)
        tensors: dict[str, torch.Tensor] = {}
        huge_bytes = 0
        for (entry, dtype, _), at, (nbytes, _) in zip(layout, positions, sizes, strict=True):
            tensor = tensors[entry.name] = block.tensor(at, entry.shape, dtype)
            huge_bytes += max(0, min(at + nbytes, block.huge_bytes) - at)
            if dtype == torch_dtype(entry.dtype):
                # Bytes from ``small`` on are in 4 KiB pages: pre-faulted before the read.
                small = min(max(block.huge_bytes - at, 0), nbytes)
                items.append((entry, _byte_view(tensor), small))
        return tensors, huge_bytes

    def _mmap(self, entry: TensorEntry, dtype: torch.dtype) -> torch.Tensor:
        """A copy-on-write memory map of ``entry``'s bytes (zero copy; page cache backed)."""
        assert self.files is not None
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        fd = self.files.fd(entry.path)
        page = mmap.ALLOCATIONGRANULARITY
        start = entry.offset - entry.offset % page
        mapping = mmap.mmap(fd, entry.end - start, access=mmap.ACCESS_COPY, offset=start)
        flat = torch.frombuffer(
            mapping, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset - start
        )
        return flat.view(dtype).view(entry.shape)

    async def _replan(
        self,
        unit: _Unit,
        device: str,
        reason: str,
        expected: int,
        live: int,
        parts_left: int,
        cap: tuple[str, int] | None = None,
    ) -> None:
        if len(self.replans) >= self.params.max_replans:
            raise ReplanLimitError(
                f"still under-delivering after {len(self.replans)} re-plans ({reason})",
                layer=unit.layer,
                device=device,
            )
        old = self.plan
        caps = await anyio.to_thread.run_sync(self._live_capacities)
        if cap is not None:
            name, most = cap
            caps = [
                c if c.name != name else dataclasses.replace(c, free_bytes=min(c.free_bytes, most))
                for c in caps
            ]
        if unit.layer is None:
            # Nothing but (some) non-mapped parts is placed: plan afresh, counting the parts
            # already placed on the primary as free again (the planner charges all of them).
            placed = self.spec.non_mapped_bytes - parts_left
            caps = [
                cap
                if cap.name != old.primary
                else dataclasses.replace(cap, free_bytes=cap.free_bytes + placed)
                for cap in caps
            ]
            new = await anyio.to_thread.run_sync(planner.plan, self.spec, caps, self.params)
        else:
            new = await anyio.to_thread.run_sync(
                lambda: planner.replan(
                    self.spec, old, placed=unit.layer or 0, capacities=caps, params=self.params
                )
            )
        self.plan = new
        event = Replanned(
            device=device,
            reason=reason,
            expected_free=expected,
            live_free=live,
            old_layer_devices=old.layer_devices,
            new_layer_devices=new.layer_devices,
            at_layer=unit.layer,
        )
        self.replans.append(event)
        await self._emit(event)
        if old.paged_attention and not new.paged_attention:
            await self._fallback(new.paged_attention_reason or "the re-plan needs the CPU")
        self._reserve(unit.layer or 0, parts_left)

    async def _fill(self, flight: _InFlight) -> None:
        """Read and copy every chunk of one unit bound for a staged device; errors are kept for
        ``_finish``."""
        try:
            async with anyio.create_task_group() as group:
                for chunk in flight.chunks:
                    group.start_soon(self._staged_chunk, flight, chunk)
        except Exception as exc:
            flight.error = _single(exc)
        finally:
            self._filled(flight)

    def _filled(self, flight: _InFlight) -> None:
        """``flight``'s reads are over (on the event loop)."""
        flight.filled = time.perf_counter()
        flight.done.set()
        self._progress()

    async def _staged_chunk(self, flight: _InFlight, chunk: _Chunk) -> None:
        files = self.files
        assert files is not None
        ring = await self._ring(flight.device)
        slot = await ring.acquire()
        try:
            fence = await anyio.to_thread.run_sync(
                self._read_staged, files, flight.device, chunk, slot, limiter=self.limiter
            )
            flight.fences.append(fence)
        finally:
            ring.release(slot)

    async def _lane(self) -> None:
        await anyio.to_thread.run_sync(self._read_lane, limiter=self.limiter)

    def _read_lane(self) -> None:
        """One reader lane (a worker thread): chunk after chunk from the queue until it is
        empty. Cancellation is checked between chunks; a read error is kept for its unit."""
        files = self.files
        assert files is not None
        reads = self.reads
        try:
            anyio.from_thread.check_cancelled()
        except BaseException:
            reads.leave()
            raise
        while (item := reads.take()) is not None:
            flight, chunk = item
            error: BaseException | None = None
            try:
                if flight.error is None:
                    self._read_direct(files, chunk)
            except Exception as exc:
                error = exc
            if reads.read(flight, error):
                anyio.from_thread.run_sync(self._filled, flight)
            try:
                anyio.from_thread.check_cancelled()
            except BaseException:
                reads.leave()
                raise

    async def _ring(self, device: Device) -> _StagingRing:
        """The load's staging ring, made on first use in a worker thread (pinning host memory
        can take tens of milliseconds, too long for the event loop)."""
        async with self.ring_lock:
            if self.ring is None:
                params = self.params
                count = _ring_slots(params, _usable_cpus())
                slots = await anyio.to_thread.run_sync(
                    _StagingRing.make_slots, device, count, params.chunk_bytes
                )
                self.ring = _StagingRing(slots, params.chunk_bytes)
        return self.ring

    @staticmethod
    def _read_direct(files: _Files, chunk: _Chunk) -> None:
        for piece in chunk.pieces:
            if piece.fault_from < len(piece.dst):
                _hostmem.prefault(piece.dst[piece.fault_from :])
        views = [_host_memory(piece.dst) for piece in chunk.pieces]
        try:
            _read_into(
                files.fd(chunk.path), views, chunk.offset, chunk.path, chunk.pieces[0].tensor
            )
        finally:
            for view in views:
                view.release()

    @staticmethod
    def _read_staged(files: _Files, device: Device, chunk: _Chunk, slot: _Slot) -> Fence:
        if slot.fence is not None:
            slot.fence.wait()  # the previous copy out of this slot has finished
            slot.fence = None
        tensor = chunk.pieces[0].tensor
        lead = chunk.offset % _STAGING_ALIGN  # co-align with the page cache (_STAGING_ALIGN)
        if lead + chunk.nbytes > len(slot.view):
            lead = 0
        view = slot.view[lead : lead + chunk.nbytes]
        _read_into(files.fd(chunk.path), [view], chunk.offset, chunk.path, tensor)
        fence: Fence | None = None
        for piece in chunk.pieces:
            if piece.fault_from < len(piece.dst) and piece.dst.device.type == "cpu":
                _hostmem.prefault(piece.dst[piece.fault_from :])
            at = lead + piece.at
            fence = device.copy_from_host(piece.dst, slot.buffer[at : at + piece.dst.numel()])
        assert fence is not None
        slot.fence = fence
        return fence

    async def _finish(self, flight: _InFlight) -> None:
        await flight.done.wait()
        if flight.error is not None:
            error = flight.error
            flight.error = None
            unit = flight.unit
            flight.drop()
            raise _translate(error, unit, flight.device.name) from error
        completing = time.perf_counter()
        completed, free_after = await anyio.to_thread.run_sync(self._complete, flight)
        unit = flight.unit
        device = flight.device
        # Allocation to the last read, plus waiting for the copies and converting; not the time
        # the finished unit waited for its turn to be reported.
        seconds = flight.filled - flight.started + completed - completing
        stats = self.device_stats.setdefault(device.name, _DeviceStats())
        stats.nbytes += unit.nbytes
        stats.tensors += len(flight.final)
        self.huge_bytes += flight.huge_bytes
        stats.layers += 1 if unit.layer is not None else 0
        stats.seconds += seconds
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
            )
        )

    def _complete(self, flight: _InFlight) -> tuple[float, int]:
        """Wait for the unit's copies, then convert raw buffers into the final tensors. Returns
        when that was done (``perf_counter``) and the device's live free memory after it."""
        for fence in flight.fences:
            fence.wait()
        for name in list(flight.raw):
            flight.final[name].copy_(flight.raw.pop(name))
        device = flight.device.name
        self.transient[device] = self.transient.get(device, 0) - flight.raw_bytes
        return time.perf_counter(), self._live_free(flight.device)

    def _report(self, seconds: float, plan_seconds: float) -> LoadReport:
        devices = tuple(
            DeviceReport(name, s.nbytes, s.tensors, s.layers, s.seconds)
            for name, s in self.device_stats.items()
        )
        return LoadReport(
            path=str(self.path),
            nbytes=sum(d.nbytes for d in devices),
            stored_bytes=self.spec.checkpoint.total_bytes,
            tensors=len(self.tensors),
            seconds=seconds,
            plan_seconds=plan_seconds,
            devices=devices,
            replans=tuple(self.replans),
            fallbacks=tuple(self.fallbacks),
            staging_bytes=0 if self.ring is None else self.ring.nbytes,
            huge_page_bytes=self.huge_bytes,
        )

    def _release(self) -> None:
        """Drop every tensor this load placed or allocated (containers cleared in place)."""
        self.tensors.clear()
        while self.inflight:
            self.inflight.popleft().drop()

    def _close(self) -> None:
        if self.ring is not None:
            with contextlib.suppress(Exception):
                self.ring.close()
            self.ring = None
        if self.files is not None:
            self.files.close()


def _no_op() -> None:
    pass


async def _start_workers(count: int) -> None:
    """Make sure the loop's worker-thread pool holds ``count`` threads before reads start.

    anyio starts a worker thread the first time every existing one is busy, and
    ``Thread.start`` holds the event loop until the new thread runs. Started mid-load, with
    the CPUs busy copying, that took 4-16 ms per thread on 2 CPUs (37-53 ms per warm 3 GB
    load, in which the loop dispatched no reads); started here, on idle CPUs, 0.2-0.3 ms.
    ``count`` calls that are all in flight at once need ``count`` threads; threads already
    idle in the pool are used as they are (anyio retires a thread after 10 s idle).
    """
    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(anyio.to_thread.run_sync, _no_op)


def _scrub(exc: BaseException) -> None:
    """Clear the locals of finished frames in ``exc``'s tracebacks (chained and grouped ones
    too), so a caller holding the exception does not keep device tensors alive through them."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _single(exc: BaseException) -> BaseException:
    """The one error an exception (group) stands for: a real error before cancellations."""
    leaves = list(_leaves(exc))
    cancelled = anyio.get_cancelled_exc_class()
    for leaf in leaves:
        if not isinstance(leaf, cancelled):
            return leaf
    return leaves[0] if leaves else exc


def _translate(error: BaseException, unit: _Unit, device: str) -> BaseException:
    if isinstance(error, StreamloadError) or not isinstance(error, Exception):
        return error
    where = unit.part if unit.layer is None else f"layer {unit.layer}"
    if isinstance(error, OSError):
        path = error.filename or (unit.entries[0].path if unit.entries else None)
        return LoadError(
            f"reading {where} failed: {error.strerror or error}",
            path=path,
            layer=unit.layer,
            device=device,
        )
    return LoadError(
        f"placing {where} failed: {type(error).__name__}: {error}", layer=unit.layer, device=device
    )


async def load(
    path: str | Path,
    params: LoadParams | None = None,
    *,
    on_event: EventCallback | None = None,
    spec: ModelSpec | None = None,
) -> LoadedModel:
    """Load the checkpoint at ``path`` onto the devices ``params`` names.

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
