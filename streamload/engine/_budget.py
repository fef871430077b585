"""The budget: what each device's plan still needs, live rechecks, reservations, re-plans.

Before a unit is allocated on a GPU its device's live free memory (minus what other loads in
this process reserved there, plus the conversion scratch this load already holds there) must
cover what the device's plan still needs: its unplaced weights, the KV cache of all its layers,
its activations, its conversion scratch and its reserve (``need_rest``). Otherwise, or when an
allocation fails, the layers not yet placed are re-planned over live capacities (``replan``).
The budget returns the events this causes; the orchestrator emits them.

A load reserves its whole plan when it plans, under one process-wide lock with reading the
capacities, so loads that start together plan around each other; the reservation shrinks as
units are allocated and goes when the load ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import anyio
import anyio.to_thread

from streamload import planner
from streamload._state import STATE
from streamload.devices import Device, capacities
from streamload.engine._destinations import Transient
from streamload.engine._units import Unit
from streamload.errors import ReplanLimitError
from streamload.events import Event, PagedAttentionDisabled, Replanned
from streamload.model import ModelSpec
from streamload.params import LoadParams
from streamload.planner import DeviceCapacity, Plan

__all__ = ["Budget"]


class Budget:
    """One load's plan and what it holds in the process-wide ledger (``STATE.reservations``,
    under this object as owner). ``transient`` counts the conversion scratch the load holds
    per device (what the plan's ``scratch_bytes`` stand for, once allocated)."""

    def __init__(
        self,
        spec: ModelSpec,
        devices: list[Device],
        params: LoadParams,
        *,
        transient: Transient,
    ) -> None:
        self._spec = spec
        self._devices = {device.name: device for device in devices}
        self._params = params
        self._transient = transient
        self._caps = params.memory_caps
        self._used: dict[str, int] = {}  # weights this load allocated per device (for caps)
        self.plan: Plan | None = None
        self.replans: list[Replanned] = []
        self.fallbacks: list[PagedAttentionDisabled] = []

    @property
    def current(self) -> Plan:
        assert self.plan is not None, "planned first"
        return self.plan

    async def first_plan(self) -> tuple[float, list[Event]]:
        """Plan over live capacities and reserve the plan; returns the planner's seconds and
        the fallback event if the plan had to give up paged attention."""
        seconds = await anyio.to_thread.run_sync(self._plan_and_reserve)
        assert self.plan is not None
        events: list[Event] = []
        if self.plan.paged_attention_reason is not None:
            events.append(self._fallback(self.plan.paged_attention_reason))
        return seconds, events

    def _plan_and_reserve(self) -> float:
        """Read capacities, plan and reserve the whole plan under ``STATE.planning``: a load
        that starts at the same moment reads capacities only once this one's plan is held
        (blocking; returns the planner's seconds)."""
        devices = list(self._devices.values())
        with STATE.planning:
            with STATE.ledger:
                caps = capacities(devices, owner=self, caps=self._caps)
            started = time.perf_counter()
            self.plan = planner.plan(self._spec, caps, self._params)
            seconds = time.perf_counter() - started
            with STATE.ledger:
                self.reserve(0, self._spec.non_mapped_bytes)
        return seconds

    def device_for(self, unit: Unit) -> Device:
        plan = self.current
        name = plan.primary if unit.layer is None else plan.layer_devices[unit.layer]
        return self._devices[name]

    def live_free(self, device: Device) -> int:
        """``device``'s live free bytes less what other loads hold there (blocking). Read
        under ``STATE.ledger``: never between another load's allocation and the update of its
        reservation, which would count the same bytes twice."""
        with STATE.ledger:
            held = STATE.reservations.held_by_others(self, device.ledger_key)
            return device.live_free_bytes() - held

    @contextlib.contextmanager
    def allocating(self, device: Device) -> Iterator[None]:
        """Hold ``STATE.ledger`` while allocating on a GPU and updating the reservation
        (nothing to hold for the host, which is not reserved)."""
        if not device.is_gpu:
            yield
            return
        with STATE.ledger:
            yield

    def allocated(self, device: Device, nbytes: int) -> None:
        """This load now holds ``nbytes`` more weights on ``device`` (negative: fewer)."""
        self._used[device.name] = self._used.get(device.name, 0) + nbytes

    def have(self, device: Device, live: int) -> int:
        """What ``device`` offers the rest of its plan: the live reading (``live_free``) plus
        the scratch this load holds there, within its ``max_memory`` cap less what the load's
        weights already take there."""
        have = live + self.slack(device)
        cap = self._caps.get(device.name)
        return have if cap is None else min(have, cap - self._used.get(device.name, 0))

    def need_rest(self, device: str, next_layer: int, parts_left: int) -> int:
        """What ``device``'s plan still needs: unplaced weights + KV + activations + reserve."""
        plan = self.current
        row = plan.device(device)
        weights = sum(
            self._spec.layers[i].nbytes
            for i in range(next_layer, len(plan.layer_devices))
            if plan.layer_devices[i] == device
        )
        if device == plan.primary:
            weights += parts_left
        kv = sum(
            kv for d, kv in zip(plan.layer_devices, plan.layer_kv_bytes, strict=True) if d == device
        )
        return weights + kv + row.activation_bytes + row.scratch_bytes + row.reserve_bytes

    def slack(self, device: Device) -> int:
        """Bytes to add to a live reading to compare it with the plan: the conversion scratch
        this load already holds there (the plan's ``scratch_bytes`` count it as still needed)."""
        if not device.is_gpu:
            return 0
        return self._transient.get(device.name)

    def reserve(self, next_layer: int, parts_left: int) -> None:
        """Hold, for other loads in this process, what this load still needs per GPU and has not
        allocated yet (one step: the ledger never shows this load between its old and new
        reservations)."""
        held: dict[str, int] = {}
        for row in self.current.devices:
            if not row.is_gpu:
                continue
            nbytes = self.need_rest(row.device, next_layer, parts_left) - row.reserve_bytes
            nbytes -= self._transient.get(row.device)
            if nbytes > 0:
                key = self._devices[row.device].ledger_key
                held[key] = held.get(key, 0) + nbytes
        STATE.reservations.replace(self, held)

    def release(self) -> None:
        """Drop every reservation of this load."""
        STATE.reservations.release_all(self)

    def _live_capacities(self) -> list[DeviceCapacity]:
        rows = []
        for row in self.current.devices:
            device = self._devices[row.device]
            rows.append(
                DeviceCapacity(
                    name=device.name,
                    is_gpu=device.is_gpu,
                    total_bytes=device.total_bytes(),
                    free_bytes=max(self.have(device, self.live_free(device)), 0),
                )
            )
        return rows

    async def replan(
        self,
        unit: Unit,
        device: str,
        reason: str,
        expected: int,
        live: int,
        parts_left: int,
        cap: tuple[str, int] | None = None,
    ) -> list[Event]:
        """Re-plan from ``unit`` on over live capacities (``cap``: at most this many bytes on
        that device, after a failed allocation); returns ``Replanned`` and, if the new plan
        gave up paged attention, ``PagedAttentionDisabled``. ``ReplanLimitError`` past
        ``LoadParams.max_replans``."""
        if len(self.replans) >= self._params.max_replans:
            raise ReplanLimitError(
                f"still under-delivering after {len(self.replans)} re-plans ({reason})",
                layer=unit.layer,
                device=device,
            )
        old = self.current
        caps = await anyio.to_thread.run_sync(self._live_capacities)
        if cap is not None:
            name, most = cap
            caps = [
                c if c.name != name else dataclasses.replace(c, free_bytes=min(c.free_bytes, most))
                for c in caps
            ]
        new = await anyio.to_thread.run_sync(self._solve, unit, caps, parts_left)
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
        events: list[Event] = [event]
        if old.paged_attention and not new.paged_attention:
            events.append(self._fallback(new.paged_attention_reason or "the re-plan needs the CPU"))
        self.reserve(unit.layer or 0, parts_left)
        return events

    def _solve(self, unit: Unit, caps: list[DeviceCapacity], parts_left: int) -> Plan:
        old = self.current
        if unit.layer is not None:
            return planner.replan(
                self._spec, old, placed=unit.layer, capacities=caps, params=self._params
            )
        # Nothing but (some) non-mapped parts is placed: plan afresh, counting the parts
        # already placed on the primary as free again (the planner charges all of them).
        placed = self._spec.non_mapped_bytes - parts_left
        caps = [
            c if c.name != old.primary else dataclasses.replace(c, free_bytes=c.free_bytes + placed)
            for c in caps
        ]
        return planner.plan(self._spec, caps, self._params)

    def _fallback(self, reason: str) -> PagedAttentionDisabled:
        event = PagedAttentionDisabled(reason)
        self.fallbacks.append(event)
        return event
