"""Spills: re-placing layers that are already placed when a tenant took what they need.

``plan_spill`` finds the fewest last placed layers (counting back from the next unit) whose
re-plan makes every device's plan fit live memory again: each layer whose device changed is
then moved by the orchestrator (``_moves``). Placed layers move on to later devices, never
back; only when the primary cannot keep its non-mapped parts does the load fail, with every
device's numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import anyio
import anyio.to_thread

from streamload import planner
from streamload.devices import Device
from streamload.engine._budget import Budget, capped
from streamload.errors import DeviceNeed, DoesNotFitError, format_bytes
from streamload.events import Event
from streamload.planner import DeviceCapacity, Plan

__all__ = ["Spill", "placed_elsewhere", "plan_spill", "shortfalls"]


@dataclass(frozen=True, slots=True)
class Spill:
    """A plan after a spill and the moves it takes: ``(layer, from_device, to_device)``, in
    layer order, and the events to emit (``Replanned``, a paged-attention fallback)."""

    plan: Plan
    moves: tuple[tuple[int, str, str], ...]
    events: tuple[Event, ...]


def shortfalls(budget: Budget, next_layer: int, parts_left: int) -> list[tuple[Device, int, int]]:
    """GPUs whose live memory no longer covers what their plan still needs, as
    ``(device, need, have)`` (blocking: reads each GPU of the plan)."""
    short = []
    for row in budget.current.devices:
        device = budget.device(row.device)
        if not device.is_gpu or not (row.layers or row.holds_non_mapped):
            continue
        need = budget.need_rest(row.device, next_layer, parts_left)
        have = budget.have(device, budget.live_free(device))
        if have < need:
            short.append((device, need, have))
    return short


async def plan_spill(
    budget: Budget,
    next_layer: int,
    parts_left: int,
    *,
    device: str,
    reason: str,
    expected: int,
    live: int,
    cap: tuple[str, int] | None = None,
    move: bool = True,
) -> Spill:
    """Re-place the fewest last placed layers (those before ``next_layer``) that make every
    device's plan fit live memory again, layers ``next_layer..`` with them: the layers a
    tenant left without room move to the devices after theirs. ``DoesNotFitError`` (with
    every device's numbers) when even moving every placed layer does not help: the primary
    cannot keep its non-mapped parts. The caller moves the layers (``Spill.moves``).
    ``move=False`` tries only to re-plan layers ``next_layer..`` (no placed layer moves)."""
    budget.check_limit(reason, next_layer, device)
    old = budget.current
    caps = capped(await anyio.to_thread.run_sync(budget.live_capacities), cap)
    error: DoesNotFitError | None = None
    for start in range(next_layer, -1 if move else next_layer - 1, -1):
        freed = dict.fromkeys(old.layer_devices, 0)
        for i in range(start, next_layer):
            freed[old.layer_devices[i]] += budget.spec.layers[i].nbytes
        room = [
            dataclasses.replace(c, free_bytes=c.free_bytes + freed.get(c.name, 0)) for c in caps
        ]
        try:
            new = planner.replan(
                budget.spec, old, placed=start, capacities=room, params=budget.params
            )
        except DoesNotFitError as exc:
            error = exc
            continue
        moves = tuple(
            (i, old.layer_devices[i], new.layer_devices[i])
            for i in range(start, next_layer)
            if new.layer_devices[i] != old.layer_devices[i]
        )
        order = [row.device for row in old.devices]
        if any(order.index(to) < order.index(at) for _, at, to in moves):
            continue  # placed layers move on to later devices, never back
        budget.plan = new
        budget.reserve(next_layer, parts_left)
        events = budget.replanned(
            old, new, device=device, reason=reason, expected=expected, live=live, at=start
        )
        return Spill(new, moves, tuple(events))
    assert error is not None
    raise _spill_failed(budget, error, caps, next_layer, parts_left) if move else error


def _spill_failed(
    budget: Budget, error: DoesNotFitError, caps: list[DeviceCapacity], next_layer: int, parts: int
) -> DoesNotFitError:
    """``error`` (the primary cannot keep its non-mapped parts) with every device's live
    numbers beside the failing device's own row."""
    own = {row.device: row for row in error.devices}
    rows = [
        own.get(
            cap.name,
            DeviceNeed(
                device=cap.name,
                capacity=cap.free_bytes,
                need=budget.need_rest(cap.name, next_layer, parts),
                detail=f"live free {format_bytes(cap.free_bytes)}, layers "
                f"{_span(budget.current, cap.name)} planned there",
            ),
        )
        for cap in caps
    ]
    reason = f"{error.reason} (even with every placed layer moved off it)"
    return DoesNotFitError(reason, rows)


def placed_elsewhere(budget: Budget, layers: dict[int, str]) -> None:
    """Layers whose move failed are still on the device given here (not where the plan
    says): the plan records them there before the next re-plan reads it."""
    devices = list(budget.current.layer_devices)
    for layer, device in layers.items():
        devices[layer] = device
    budget.plan = dataclasses.replace(budget.current, layer_devices=tuple(devices))


def _span(plan: Plan, device: str) -> str:
    layers = [i for i, d in enumerate(plan.layer_devices) if d == device]
    return "none" if not layers else f"{layers[0]}-{layers[-1]}"
