"""Events: what a load did, as frozen dataclasses, and the structlog sink that logs them.

Every step of a load is an event delivered, in order and on the event loop, to the caller's
``on_event`` callback (plain or coroutine function), and logged through ``structlog`` as one
key-value line whose keys are the event's field names. The library configures no logging: the
lines go wherever the application's structlog configuration sends them.

A ``LayerPlaced`` for layer k is delivered before the device allocation of layer k + 2 begins.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeAlias

import structlog

if TYPE_CHECKING:
    from streamload.planner import Plan

__all__ = [
    "DeviceReport",
    "Event",
    "EventCallback",
    "FileCheck",
    "LayerPlaced",
    "LoadFailed",
    "LoadFinished",
    "LoadReport",
    "PagedAttentionDisabled",
    "PlanComputed",
    "Replanned",
    "emit",
    "event_fields",
    "event_name",
    "log_event",
]

logger = structlog.get_logger("streamload")


@dataclass(frozen=True, slots=True)
class PlanComputed:
    """The plan a load starts with (after any paged-attention fallback)."""

    plan: Plan
    path: str = ""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class LayerPlaced:
    """One layer (``layer=None``: one non-mapped part, named by ``part``) is on its device.

    ``nbytes`` are bytes placed (target dtype), ``stored_bytes`` bytes read from disk;
    ``seconds`` from allocation to the last copy; ``free_before``/``free_after`` the device's
    live free bytes around the placement. ``files`` names the files (or objects, by URL) its
    bytes were read from.
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
    files: tuple[str, ...] = ()


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


@dataclass(frozen=True, slots=True)
class PagedAttentionDisabled:
    """The plan needs the CPU, so the KV cache is sized non-paged."""

    reason: str


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """Bytes placed on one device and the time spent placing them."""

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
    ``replans`` holds every ``Replanned`` event, ``fallbacks`` every ``PagedAttentionDisabled``.
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
    """The load failed (or was cancelled); everything it placed has been released."""

    error: BaseException


Event: TypeAlias = (
    PlanComputed | LayerPlaced | Replanned | PagedAttentionDisabled | LoadFinished | LoadFailed
)
EventCallback: TypeAlias = Callable[[Event], "Awaitable[None] | None"]

_EVENT_NAMES: Mapping[type[Any], str] = {
    PlanComputed: "plan_computed",
    LayerPlaced: "layer_placed",
    Replanned: "replanned",
    PagedAttentionDisabled: "paged_attention_disabled",
    LoadFinished: "load_finished",
    LoadFailed: "load_failed",
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
        return {"error": str(event.error), "error_type": type(event.error).__name__}
    values = {f.name: getattr(event, f.name) for f in fields(event)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def event_name(event: Event) -> str:
    """The log message for ``event`` (``"layer_placed"``, ...)."""
    return _EVENT_NAMES[type(event)]


def log_event(event: Event, log: Any = None) -> None:
    """Log one event as a structlog key-value line (the library's only logging)."""
    target = logger if log is None else log
    method = target.warning if isinstance(event, (LoadFailed, Replanned)) else target.info
    method(event_name(event), **event_fields(event))


async def emit(event: Event, callback: EventCallback | None, log: Any = None) -> None:
    """Log ``event`` and deliver it to ``callback`` (awaited if it is a coroutine function)."""
    log_event(event, log)
    if callback is None:
        return
    result = callback(event)
    if inspect.isawaitable(result):
        await result
