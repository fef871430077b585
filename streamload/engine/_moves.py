"""Moving placed layers between devices, when a device spills (DESIGN §5).

A spill re-plans layers that are already placed (``Budget.spill``); each layer whose device
changed is copied to its new device through the ``Device`` protocol (``empty`` there, then
``receive``: a peer copy on CUDA, a host copy elsewhere), and its old tensors are dropped once
the copies are done, so a layer exists twice only while it moves. Layers move highest first:
a device that must make room for an earlier device's layers has passed its own on by then.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import torch

from streamload.devices import Device
from streamload.engine._boundary import refusal
from streamload.engine._budget import Budget
from streamload.engine._spill import placed_elsewhere, plan_spill, shortfalls
from streamload.engine._units import Unit
from streamload.errors import DoesNotFitError
from streamload.events import LayersMoved

__all__ = ["Spills", "move_unit"]


def move_unit(tensors: dict[str, torch.Tensor], unit: Unit, target: Device) -> tuple[float, int]:
    """Copy ``unit``'s placed tensors in ``tensors`` to ``target`` and put the copies in their
    place (blocking). Returns the seconds it took and the bytes moved. ``torch.OutOfMemoryError``
    from ``target`` leaves ``tensors`` as they were (the partial copies are dropped once the
    caller has scrubbed the error's frames, ``_boundary.refusal``)."""
    started = time.perf_counter()
    moved: dict[str, torch.Tensor] = {}
    fences = []
    for entry in unit.entries:
        old = tensors[entry.name]
        new = target.empty(tuple(old.shape), old.dtype)
        fences.append(target.receive(new, old))
        moved[entry.name] = new
    for fence in fences:
        fence.wait()
    tensors.update(moved)
    return time.perf_counter() - started, sum(t.nbytes for t in moved.values())


class Spills:
    """Re-plans and spills for one load, with the moves they take.

    Handed in by the orchestrator: the budget, the units, the placed tensors (moved layers
    replace theirs there), a callback per device for its report counters, ``emit`` (the
    orchestrator's, which stays the only emitter) and ``drain`` (waits until every unit in
    flight is placed: placed layers only move then)."""

    def __init__(
        self,
        budget: Budget,
        units: list[Unit],
        tensors: dict[str, torch.Tensor],
        stats: Callable[[str], Any],
        emit: Callable[..., Awaitable[None]],
        drain: Callable[[], Awaitable[None]],
    ) -> None:
        self._budget = budget
        self._units = units
        self._tensors = tensors
        self._stats = stats
        self._emit = emit
        self._drain = drain
        self.moves: list[LayersMoved] = []

    async def replan(
        self,
        unit: Unit,
        device: str,
        reason: str,
        need: int,
        have: int,
        parts_left: int,
        cap: tuple[str, int] | None = None,
    ) -> None:
        """Re-plan from ``unit`` on; when the layers already placed on a device no longer fit
        there, spill them instead (``_spill``)."""
        budget = self._budget
        if unit.layer is None:
            await self._emit(
                *await budget.replan(unit, device, reason, need, have, parts_left, cap)
            )
            return
        await self.spill(unit.layer, parts_left, device, reason, need, have, cap)

    async def spilled(self, next_layer: int, parts_left: int) -> bool:
        """Whether a GPU other than the next unit's fell short of what its placed layers still
        need (a tenant took it after their placement) and spilled."""
        budget = self._budget
        if not any(
            row.is_gpu and (row.layers or row.holds_non_mapped) for row in budget.current.devices
        ):
            return False  # nothing on a GPU to watch: no worker-thread round trip per unit
        short = await anyio.to_thread.run_sync(shortfalls, budget, next_layer, parts_left)
        if not short:
            return False
        device, need, have = short[0]
        reason = "under-delivered: live free memory is below what its placed layers still need"
        await self.spill(next_layer, parts_left, device.name, reason, need, have, None)
        return True

    async def spill(
        self,
        next_layer: int,
        parts_left: int,
        device: str,
        reason: str,
        need: int,
        have: int,
        cap: tuple[str, int] | None,
    ) -> None:
        """Re-plan layers ``next_layer..`` and, where that alone cannot fit, the fewest placed
        layers before them; then move every placed layer whose device changed. Placed layers
        only move once every unit in flight is placed (a plain re-plan does not wait)."""
        budget = self._budget
        for move in (False, True):
            if move:
                await self._drain()
            try:
                spill = await plan_spill(
                    budget,
                    next_layer,
                    parts_left,
                    device=device,
                    reason=reason,
                    expected=need,
                    live=have,
                    cap=cap,
                    move=move,
                )
                break
            except DoesNotFitError:
                if move:
                    raise
        await self._emit(*spill.events)
        if spill.moves:
            await self._move(spill.moves, next_layer, parts_left, reason)

    async def _move(
        self, moves: tuple[tuple[int, str, str], ...], next_layer: int, parts_left: int, why: str
    ) -> None:
        """Move placed layers (highest first, see ``_moves``) and report each run of layers
        that went from one device to another as one ``LayersMoved``."""
        budget = self._budget
        first = len(budget.spec.non_mapped)
        done: dict[tuple[str, str], list[tuple[int, float, int]]] = {}
        pending = {layer: source for layer, source, _ in moves}
        for layer, source, target in reversed(moves):
            unit = self._units[first + layer]
            try:
                seconds, nbytes = await anyio.to_thread.run_sync(
                    self._move_sync, unit, budget.device(source), budget.device(target)
                )
            except torch.OutOfMemoryError as exc:
                reason = f"moving layer {layer} failed: {refusal(exc)}"
                del exc
                # The layers not moved yet are still where they were; the target has less than
                # its reading said: re-plan with it holding one layer less than it offers now.
                placed_elsewhere(budget, pending)
                device = budget.device(target)
                have = budget.have(device, await anyio.to_thread.run_sync(budget.live_free, device))
                cap = (target, have - unit.nbytes - 1)
                await self.spill(next_layer, parts_left, target, reason, unit.nbytes, have, cap)
                break
            del pending[layer]
            done.setdefault((source, target), []).append((layer, seconds, nbytes))
        for (source, target), runs in sorted(done.items(), key=lambda item: min(item[1])[0]):
            event = LayersMoved(
                layers=tuple(sorted(layer for layer, _, _ in runs)),
                from_device=source,
                to_device=target,
                reason=why,
                nbytes=sum(nbytes for _, _, nbytes in runs),
                seconds=sum(seconds for _, seconds, _ in runs),
            )
            self.moves.append(event)
            await self._emit(event)

    def _move_sync(self, unit: Unit, source: Device, target: Device) -> tuple[float, int]:
        budget = self._budget
        with budget.allocating(target):
            seconds, nbytes = move_unit(self._tensors, unit, target)
            budget.allocated(target, nbytes)
            budget.allocated(source, -nbytes)
        for name, sign in ((source.name, -1), (target.name, 1)):
            stats = self._stats(name)
            stats.nbytes += sign * unit.nbytes
            stats.tensors += sign * len(unit.entries)
            stats.layers += sign
        return seconds, nbytes
