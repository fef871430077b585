"""Events: what a load did, as frozen dataclasses, and the log sink that records them.

Every step of a load is an event delivered, in order and on the event loop, to the caller's
``on_event`` observers (a plain or coroutine function, or a sequence of them, called in the
order given), and logged as one key-value line whose keys are the event's field names.

Quiet unless asked (``log_event``): the library configures no logging. When the application
has configured structlog (``structlog.is_configured()``), the lines go through its pipeline;
when it has not, they go to the stdlib logger ``"streamload"``, which has a ``NullHandler``, so
a bare ``import streamload`` prints nothing and ``logging.basicConfig()`` shows them (each
record carries the fields as attributes too, for handlers that format them).

Every event of a load carries its ``path``. A ``LayerPlaced`` for layer k is delivered before
the device allocation of layer k + 2 begins.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeAlias

import structlog

if TYPE_CHECKING:
    from streamload.planner import Plan

__all__ = [
    "DeviceReport",
    "DirectIOFallback",
    "Event",
    "EventCallback",
    "ExpertsReplicated",
    "FileCheck",
    "LayerPlaced",
    "LayersMoved",
    "LoadCancelled",
    "LoadFailed",
    "LoadFinished",
    "LoadReport",
    "LoadStarted",
    "MaxSeqLenClamped",
    "MemoryReadingFallback",
    "Observers",
    "PagedAttentionDisabled",
    "PlanComputed",
    "Replanned",
    "emit",
    "event_fields",
    "event_name",
    "log_event",
    "observers",
]

logger = structlog.get_logger("streamload")
# The stdlib logger used while the application has not configured structlog; its NullHandler
# keeps an unconfigured application silent (the library's share of "configure no logging").
stdlib_logger = logging.getLogger("streamload")
stdlib_logger.addHandler(logging.NullHandler())


@dataclass(frozen=True, slots=True)
class LoadStarted:
    """The headers are read and parsed; planning comes next.

    ``files`` safetensors files, ``header_bytes`` read from them (length prefixes and JSON
    headers), ``seconds`` taken to read and parse them and ``config.json`` (0 when the caller
    passed a spec).
    """

    path: str
    files: int
    header_bytes: int
    tensors: int
    stored_bytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class PlanComputed:
    """The plan a load starts with (after any paged-attention fallback)."""

    plan: Plan
    path: str = ""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class LayerPlaced:
    """One layer (``layer=None``: one non-mapped part, named by ``part``) is on its device.

    ``nbytes`` are bytes placed (target dtype), ``stored_bytes`` bytes read from disk, from the
    shard ``files`` (names relative to the checkpoint; objects by URL);
    ``free_before``/``free_after`` the device's live free bytes around the placement.

    ``seconds`` runs from the allocation to the end of completion (copies waited for, dtypes
    converted). It is split by wall-clock spans measured by the stages themselves:
    ``allocate_seconds``; ``read_seconds``, while at least one of the unit's reads ran;
    ``copy_seconds``, while a copy to the device was submitted or waited for (staged devices);
    ``convert_seconds``, converting dtypes on the device; and ``wait_seconds``, the rest, when
    none of these ran (the unit waited for a staging slot, a reader thread or a lane busy with
    the unit before). Reads and copies overlap, so the parts may add to more than ``seconds``.

    Running totals: ``loaded_units`` of ``total_units`` units placed, ``loaded_bytes`` of
    ``total_bytes`` (target dtype), this unit included.
    """

    layer: int | None
    device: str
    nbytes: int
    seconds: float
    free_before: int
    free_after: int
    part: str | None = None
    stored_bytes: int = 0
    tensors: int = 0
    path: str = ""
    files: tuple[str, ...] = ()
    allocate_seconds: float = 0.0
    read_seconds: float = 0.0
    copy_seconds: float = 0.0
    convert_seconds: float = 0.0
    wait_seconds: float = 0.0
    loaded_units: int = 0
    total_units: int = 0
    loaded_bytes: int = 0
    total_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Replanned:
    """A device under-delivered (or an allocation failed); layers ``at_layer..`` were re-placed.

    ``expected_free`` is what the plan still needed on ``device``; ``live_free`` what it had.
    """

    device: str
    reason: str
    expected_free: int
    live_free: int
    old_layer_devices: tuple[str, ...]
    new_layer_devices: tuple[str, ...]
    at_layer: int | None = None
    path: str = ""


@dataclass(frozen=True, slots=True)
class LayersMoved:
    """Placed ``layers`` moved from ``from_device`` to ``to_device``: another tenant took what
    they still needed there (their KV cache, the device's activations or its reserve), so the
    device spilled its last placed layers to the devices after it (DESIGN §5).

    ``reason`` says what the device had against what it needed; ``seconds`` the copies took.
    """

    layers: tuple[int, ...]
    from_device: str
    to_device: str
    reason: str
    nbytes: int
    seconds: float
    path: str = ""


@dataclass(frozen=True, slots=True)
class PagedAttentionDisabled:
    """The plan needs the CPU, so the KV cache is sized non-paged."""

    reason: str
    path: str = ""


@dataclass(frozen=True, slots=True)
class MaxSeqLenClamped:
    """``LoadParams.max_seq_len`` (``requested``) is beyond the longest sequence the model was
    made for (its ``max_position_embeddings``): the plan sizes KV cache and activations for
    ``used`` tokens instead."""

    requested: int
    used: int
    path: str = ""


@dataclass(frozen=True, slots=True)
class ExpertsReplicated:
    """A tensor-parallel load found mixture-of-experts tensors no plan splits: every rank of a
    stage holds them whole (``tensors``: their names; ``tensor_parallel_size``: the ranks per
    stage). Pass ``tp_plan=`` to split them."""

    tensors: tuple[str, ...]
    reason: str
    tensor_parallel_size: int
    path: str = ""


@dataclass(frozen=True, slots=True)
class MemoryReadingFallback:
    """A device's live free memory is read another way from now on (a CUDA GPU whose NVML
    reading failed: ``cudaMemGetInfo`` instead); ``reason`` says what failed."""

    device: str
    reason: str
    path: str = ""


@dataclass(frozen=True, slots=True)
class DirectIOFallback:
    """``LoadParams.direct_io``: the filesystem holding ``file`` refused ``O_DIRECT``
    (``reason``: at open or at a read), so it and every other file of the load on that
    filesystem are read through the page cache from now on. Reported once per filesystem.
    ``requested``: ``direct_io=True`` asked for direct reads (logged as a warning); under
    ``"auto"``, the default, reading through the cache is only the other way it had (info)."""

    file: str
    reason: str
    path: str = ""
    requested: bool = True


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """Bytes placed on one device and the time spent placing them.

    ``seconds`` is wall-clock time during which at least one unit bound for the device was
    between its allocation and its placement (overlapping units counted once), so it never
    exceeds the load's and ``gb_per_s`` is the rate the device was actually filled at.
    """

    device: str
    nbytes: int
    tensors: int
    layers: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class FileCheck:
    """What ``LoadParams(verify=True)`` found for one file: ``verified`` when its bytes hashed to
    ``sha256``, the checksum its source records; else ``reason`` says why it was not checked
    (no checksum recorded, or not read in full)."""

    file: str
    verified: bool
    sha256: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a finished load did.

    ``nbytes`` placed (target dtype); ``stored_bytes`` read from disk; ``seconds`` the whole
    load (inventory, planning and streaming); ``gb_per_s`` is ``stored_bytes / seconds / 1e9``.
    ``replans`` holds every ``Replanned`` event, ``fallbacks`` every ``PagedAttentionDisabled``,
    ``moves`` every ``LayersMoved``.
    ``staging_bytes`` is the staging ring's size; ``huge_page_bytes`` the bytes of placed host
    tensors in memory advised into transparent huge pages (whole 2 MiB stretches,
    ``LoadParams.huge_pages``). ``checks`` holds one ``FileCheck`` per file under
    ``LoadParams(verify=True)`` (empty otherwise).
    """

    path: str
    nbytes: int
    stored_bytes: int
    tensors: int
    seconds: float
    plan_seconds: float
    devices: tuple[DeviceReport, ...]
    replans: tuple[Replanned, ...] = ()
    fallbacks: tuple[PagedAttentionDisabled, ...] = ()
    staging_bytes: int = 0
    huge_page_bytes: int = 0
    moves: tuple[LayersMoved, ...] = ()
    checks: tuple[FileCheck, ...] = ()

    @property
    def gb_per_s(self) -> float:
        return self.stored_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def unverified(self) -> tuple[FileCheck, ...]:
        """The files a verifying load could not check (``checks`` that are not verified)."""
        return tuple(check for check in self.checks if not check.verified)


@dataclass(frozen=True, slots=True)
class LoadFinished:
    """The load completed; ``report`` says what it did."""

    report: LoadReport


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """The load failed; everything it placed has been released. A cancelled load is
    ``LoadCancelled`` instead."""

    error: BaseException
    path: str = ""


@dataclass(frozen=True, slots=True)
class LoadCancelled:
    """The load was cancelled (a cancel scope, a cancelled task, a server shutting down).

    ``placed_units`` units (``placed_bytes``, target dtype) had been placed and
    ``inflight_units`` were allocated but not yet placed; every one of their
    ``released_tensors`` tensors (``released_bytes``) has been released.
    """

    path: str
    placed_units: int
    placed_bytes: int
    inflight_units: int
    released_tensors: int
    released_bytes: int
    seconds: float


Event: TypeAlias = (
    LoadStarted
    | PlanComputed
    | LayerPlaced
    | Replanned
    | LayersMoved
    | PagedAttentionDisabled
    | MemoryReadingFallback
    | DirectIOFallback
    | MaxSeqLenClamped
    | ExpertsReplicated
    | LoadFinished
    | LoadFailed
    | LoadCancelled
)
EventCallback: TypeAlias = Callable[[Event], "Awaitable[None] | None"]
# What ``on_event`` accepts: one observer, a sequence of them (called in order), or none.
Observers: TypeAlias = EventCallback | Sequence[EventCallback] | None

_EVENT_NAMES: Mapping[type[Any], str] = {
    LoadStarted: "load_started",
    PlanComputed: "plan_computed",
    LayerPlaced: "layer_placed",
    Replanned: "replanned",
    LayersMoved: "layers_moved",
    PagedAttentionDisabled: "paged_attention_disabled",
    MemoryReadingFallback: "memory_reading_fallback",
    DirectIOFallback: "direct_io_fallback",
    MaxSeqLenClamped: "max_seq_len_clamped",
    ExpertsReplicated: "experts_replicated",
    LoadFinished: "load_finished",
    LoadFailed: "load_failed",
    LoadCancelled: "load_cancelled",
}


def _plan_rows(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for row in plan.devices:
        first_last = f"{row.layers[0]}-{row.layers[-1]}" if row.layers else "-"
        rows.append(
            {
                "device": row.device,
                "layers": first_last,
                "num_layers": len(row.layers),
                "non_mapped": row.holds_non_mapped,
                "weights": row.weight_bytes,
                "kv": row.kv_bytes,
                "activations": row.activation_bytes,
                "reserve": row.reserve_bytes,
                "headroom": row.headroom_bytes,
            }
        )
    return rows


def event_fields(event: Event) -> dict[str, Any]:
    """The key-value pairs logged for ``event``: its field names, flattened for log shippers."""
    if isinstance(event, PlanComputed):
        plan = event.plan
        return {
            "path": event.path,
            "seconds": round(event.seconds, 6),
            "primary": plan.primary,
            "paged_attention": plan.paged_attention,
            "paged_attention_reason": plan.paged_attention_reason,
            "layer_devices": list(plan.layer_devices),
            "devices": _plan_rows(plan),
        }
    if isinstance(event, LoadFinished):
        report = event.report
        return {
            "path": report.path,
            "nbytes": report.nbytes,
            "stored_bytes": report.stored_bytes,
            "tensors": report.tensors,
            "seconds": round(report.seconds, 6),
            "gb_per_s": round(report.gb_per_s, 3),
            "replans": len(report.replans),
            "moves": len(report.moves),
            "fallbacks": [f.reason for f in report.fallbacks],
            "staging_bytes": report.staging_bytes,
            "huge_page_bytes": report.huge_page_bytes,
            "verified": [c.file for c in report.checks if c.verified],
            "unverified": [f"{c.file}: {c.reason}" for c in report.unverified],
            "devices": [
                {
                    "device": d.device,
                    "nbytes": d.nbytes,
                    "layers": d.layers,
                    "seconds": round(d.seconds, 6),
                    "gb_per_s": round(d.gb_per_s, 3),
                }
                for d in report.devices
            ],
        }
    if isinstance(event, LoadFailed):
        return {
            "path": event.path,
            "error": str(event.error),
            "error_type": type(event.error).__name__,
        }
    values = {f.name: getattr(event, f.name) for f in fields(event)}
    return {
        k: list(v) if isinstance(v, tuple) else round(v, 6) if isinstance(v, float) else v
        for k, v in values.items()
    }


def event_name(event: Event) -> str:
    """The log message for ``event`` (``"layer_placed"``, ...)."""
    return _EVENT_NAMES[type(event)]


# LogRecord attributes an event field must not overwrite (``logging`` refuses them in ``extra``).
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _stdlib_log(level: int, name: str, values: Mapping[str, Any]) -> None:
    if not stdlib_logger.isEnabledFor(level):
        return
    text = " ".join([name, *(f"{key}={value!r}" for key, value in values.items())])
    extra = {
        (f"streamload_{key}" if key in _RECORD_ATTRS else key): value
        for key, value in values.items()
    }
    stdlib_logger.log(level, "%s", text, extra={"event": name, **extra})


def log_event(event: Event, log: Any = None) -> None:
    """Log one event as a key-value line (the library's only logging).

    ``log`` (a structlog logger) when given; else the ``streamload`` structlog logger when the
    application has configured structlog; else the stdlib ``streamload`` logger (silent unless
    the application configured ``logging``). Re-plans and failures are warnings, the rest info.
    """
    warning = isinstance(
        event,
        LoadFailed
        | Replanned
        | LayersMoved
        | MemoryReadingFallback
        | MaxSeqLenClamped
        | ExpertsReplicated,
    ) or (isinstance(event, DirectIOFallback) and event.requested)
    if log is None and not structlog.is_configured():
        level = logging.WARNING if warning else logging.INFO
        _stdlib_log(level, event_name(event), event_fields(event))
        return
    target = logger if log is None else log
    method = target.warning if warning else target.info
    method(event_name(event), **event_fields(event))


def observers(on_event: Observers) -> tuple[EventCallback, ...]:
    """``on_event`` as a tuple of callables (``None`` -> none; one callable -> itself)."""
    if on_event is None:
        return ()
    if callable(on_event):
        return (on_event,)
    found = tuple(on_event)
    for item in found:
        if not callable(item):
            raise TypeError(f"on_event: {item!r} is not callable")
    return found


async def emit(event: Event, callback: Observers, log: Any = None) -> None:
    """Log ``event`` and deliver it to each observer in ``callback``, in order (awaited where
    an observer returns an awaitable)."""
    log_event(event, log)
    for observer in observers(callback):
        result = observer(event)
        if inspect.isawaitable(result):
            await result
