"""The fill: plan and re-plan a model over devices, the paged-attention fallback, the errors
that name each device's need (the rules are in ``streamload.planner``'s docstring)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate

from streamload.errors import DeviceNeed, DoesNotFitError, format_bytes
from streamload.model import Activations, ModelSpec
from streamload.params import LoadParams, PagedAttention, Utilization
from streamload.planner._sizes import (
    _block_bytes,
    _cache_dtype,
    _charge,
    _contiguous_kv,
    _initial_blocks,
    _Kv,
    _pool_kv,
    clamped,
    conversion_scratch,
    estimate_activations,
)
from streamload.planner._types import DeviceCapacity, DevicePlan, Plan

# --------------------------------------------------------------------------------------------
# Public entry points


def plan(
    spec: ModelSpec,
    capacities: Sequence[DeviceCapacity],
    params: LoadParams,
    *,
    activations: Activations | None = None,
) -> Plan:
    """Place every layer; ``DoesNotFitError`` (per-device breakdown) if impossible.

    ``activations`` overrides the estimate from ``model.activation_bytes`` (for callers that
    measured their peak, and for tests). The rules are in the module docstring.
    """
    _check_capacities(capacities)
    params = clamped(spec, params)
    acts = estimate_activations(spec, params) if activations is None else activations
    slots = tuple(
        _slot(spec, cap, params, primary=i == 0, loaded=(), already_loaded=False, eligible=True)
        for i, cap in enumerate(capacities)
    )
    return _solve(spec, slots, params, acts, start=0, paged=params.paged_attention, reason=None)


def replan(
    spec: ModelSpec,
    previous: Plan,
    *,
    placed: int,
    capacities: Sequence[DeviceCapacity],
    params: LoadParams,
    activations: Activations | None = None,
) -> Plan:
    """Re-place layers ``placed..`` on live capacities; layers ``< placed`` and the non-mapped
    parts stay where ``previous`` put them (already loaded).

    - ``capacities`` are live readings for every device of ``previous``, in the same order
      (else ``ValueError``). Weights already loaded are *not* in the live free bytes, so they
      are not subtracted again; each row's ``capacity_bytes`` is live free plus them (for the
      CPU with ``cpu_memory_bytes`` set: that budget, which the loaded weights count against).
    - KV caches and activations are not allocated yet: a device's room for new layers is live
      free - reserve - activations (if it is the primary or holds or will hold layers) - the KV
      of its already-placed layers. If those fixed charges alone no longer fit a device,
      ``DoesNotFitError`` names it.
    - Eligible for new layers: the device holding layer ``placed - 1`` (the primary when
      ``placed == 0``) and every device after it; earlier devices get nothing new.
    - Paged attention: if ``previous`` used it, the same mode is tried again (``Utilization``
      recomputes the block count on live numbers); if the new plan needs the CPU, it falls back
      to non-paged sizing for *all* layers, placed ones included. A plan that already fell back
      stays non-paged and keeps its reason.
    - ``params`` (and ``activations``) must be those ``previous`` was made with.
    - With live capacities equal to the ones ``previous`` was planned on minus the weights
      already loaded, the result equals ``previous`` except for ``loaded_layers`` and the rows'
      ``loaded_bytes`` and notes (tested).

    ``DoesNotFitError`` if the remaining layers fit nowhere.
    """
    _check_replan(spec, previous, placed, capacities)
    params = clamped(spec, params)
    acts = estimate_activations(spec, params) if activations is None else activations
    names = [row.device for row in previous.devices]
    first = names.index(previous.layer_devices[placed - 1]) if placed else 0
    slots = tuple(
        _slot(
            spec,
            cap,
            params,
            primary=i == 0,
            loaded=tuple(j for j in range(placed) if previous.layer_devices[j] == cap.name),
            already_loaded=True,
            eligible=i >= first,
        )
        for i, cap in enumerate(capacities)
    )
    paged = params.paged_attention if previous.paged_attention else None
    return _solve(
        spec,
        slots,
        params,
        acts,
        start=placed,
        paged=paged,
        reason=previous.paged_attention_reason,
    )


# --------------------------------------------------------------------------------------------
# Input checks


def _check_capacities(capacities: Sequence[DeviceCapacity]) -> None:
    if not capacities:
        raise ValueError("no devices to plan on")
    names = [cap.name for cap in capacities]
    if len(set(names)) != len(names):
        raise ValueError(f"device names repeat: {names}")
    for cap in capacities:
        if cap.free_bytes < 0 or cap.total_bytes < 0:
            raise ValueError(f"device {cap.name}: negative bytes ({cap})")
    cpus = [i for i, cap in enumerate(capacities) if not cap.is_gpu]
    if len(cpus) > 1 or (cpus and cpus[0] != len(capacities) - 1):
        raise ValueError(f"the CPU may appear once and only last; devices in order: {names}")


def _check_replan(
    spec: ModelSpec, previous: Plan, placed: int, capacities: Sequence[DeviceCapacity]
) -> None:
    _check_capacities(capacities)
    names = [cap.name for cap in capacities]
    expected = [row.device for row in previous.devices]
    if names != expected:
        raise ValueError(f"re-plan needs live capacities for {expected} in that order, got {names}")
    if len(previous.layer_devices) != len(spec.layers):
        raise ValueError(
            f"previous plan has {len(previous.layer_devices)} layers, the spec {len(spec.layers)}"
        )
    if not 0 <= placed <= len(spec.layers):
        raise ValueError(f"placed must be in 0..{len(spec.layers)}, got {placed}")


# --------------------------------------------------------------------------------------------
# Slots: a device as the fill sees it


@dataclass(frozen=True, slots=True)
class _Slot:
    """One device's budget and what it holds before the fill.

    ``limit`` is what weights + KV + activations may total (``capacity - reserve``, capped by a
    ``Utilization`` fraction). ``fixed_weight`` is weight there whatever the fill does (the
    non-mapped parts on the primary, layers placed before a re-plan); ``loaded_bytes`` the part
    of it already allocated (re-plan), which ``capacity`` includes.
    """

    name: str
    is_gpu: bool
    primary: bool
    total: int
    capacity: int
    reserve: int
    limit: int
    policy: str
    fixed_weight: int
    loaded_bytes: int
    loaded: tuple[int, ...]
    eligible: bool
    budget_text: str


def _slot(
    spec: ModelSpec,
    cap: DeviceCapacity,
    params: LoadParams,
    *,
    primary: bool,
    loaded: tuple[int, ...],
    already_loaded: bool,
    eligible: bool,
) -> _Slot:
    policy = params.cpu_policy
    parts = spec.non_mapped if primary else ()
    fixed = sum(
        _charge(p.nbytes, p.converted_bytes, is_gpu=cap.is_gpu, policy=policy) for p in parts
    ) + sum(
        _charge(
            spec.layers[i].nbytes, spec.layers[i].converted_bytes, is_gpu=cap.is_gpu, policy=policy
        )
        for i in loaded
    )
    loaded_bytes = fixed if already_loaded else 0
    live = cap.free_bytes + loaded_bytes
    if cap.is_gpu:
        capacity = live
        reserve = params.reserve_for(cap.total_bytes)
        text = (
            f"free {format_bytes(cap.free_bytes)}, reserve {format_bytes(reserve)} "
            f"(max({params.reserve_fraction} x total {format_bytes(cap.total_bytes)}, "
            f"{format_bytes(params.reserve_min_bytes)}))"
        )
        if _min_reserve_dominates(params, cap.total_bytes, reserve):
            text += (
                f"; the minimum reserve is {100 * reserve // max(cap.total_bytes, 1)}% of this "
                "GPU: lower reserve_min_bytes (--gpu-reserve) for a small GPU"
            )
    else:
        own = params.cpu_memory_bytes
        capacity = live if own is None else own
        reserve = params.host_reserve_bytes
        source = "available" if own is None else "cpu_memory_bytes"
        text = (
            f"host budget: {source} {format_bytes(capacity)} - host reserve "
            f"{format_bytes(reserve)}, cpu_policy={policy}"
        )
    if loaded_bytes:
        text += f", {format_bytes(loaded_bytes)} already loaded"
    return _Slot(
        name=cap.name,
        is_gpu=cap.is_gpu,
        primary=primary,
        total=cap.total_bytes,
        capacity=capacity,
        reserve=reserve,
        limit=capacity - reserve,
        policy=policy,
        fixed_weight=fixed,
        loaded_bytes=loaded_bytes,
        loaded=loaded,
        eligible=eligible,
        budget_text=text,
    )


def _min_reserve_dominates(params: LoadParams, total: int, reserve: int) -> bool:
    """Whether a GPU's reserve is its minimum (not the fraction of its total) and a tenth of
    it or more: the knob to name when such a GPU falls short is ``reserve_min_bytes``."""
    return params.reserve_min_bytes > params.reserve_fraction * total and 10 * reserve >= total


def _paged_slot(slot: _Slot, paged: PagedAttention) -> _Slot:
    """The slot under paged attention: the CPU takes no layers; ``Utilization`` caps GPUs."""
    if not slot.is_gpu:
        return replace(slot, eligible=False)
    memory = paged.memory
    if not isinstance(memory, Utilization):
        return slot
    cap = int(memory.fraction * slot.total)
    if cap >= slot.limit:
        return slot
    text = f"{slot.budget_text}; capped at {memory.fraction} x total = {format_bytes(cap)}"
    return replace(slot, limit=cap, budget_text=text)


# --------------------------------------------------------------------------------------------
# Costs of one attempt


@dataclass(frozen=True, slots=True)
class _Problem:
    """What one planning attempt charges: the spec, activations and KV sizing."""

    spec: ModelSpec
    acts: Activations
    kv: _Kv
    scratch: int  # conversion scratch per GPU that holds anything (``conversion_scratch``)
    seq_len: int  # the sequence length KV and activations are sized for (``clamped``)


def _layer_weight(p: _Problem, slot: _Slot, i: int) -> int:
    layer = p.spec.layers[i]
    return _charge(layer.nbytes, layer.converted_bytes, is_gpu=slot.is_gpu, policy=slot.policy)


def _layer_cost(p: _Problem, slot: _Slot, i: int) -> int:
    return _layer_weight(p, slot, i) + p.kv.layer_bytes[i]


def _activation(p: _Problem, slot: _Slot, holds_layers: bool) -> int:
    if slot.primary:
        return max(p.acts.mapped, p.acts.non_mapped)
    return p.acts.mapped if holds_layers else 0


def _scratch(p: _Problem, slot: _Slot, holds_layers: bool) -> int:
    """The conversion scratch, on a GPU that holds anything (the primary always does)."""
    return p.scratch if slot.is_gpu and (slot.primary or holds_layers) else 0


def _fixed(p: _Problem, slot: _Slot, holds_layers: bool) -> int:
    """Charges before any new layer: fixed weights, KV of placed layers, activations,
    conversion scratch."""
    kv = sum(p.kv.layer_bytes[i] for i in slot.loaded)
    holds = holds_layers or bool(slot.loaded)
    return slot.fixed_weight + kv + _activation(p, slot, holds) + _scratch(p, slot, holds)


def _room(p: _Problem, slot: _Slot) -> int:
    """What is left for new layers once the slot holds at least one layer."""
    return slot.limit - _fixed(p, slot, True)


def _take(p: _Problem, slot: _Slot, start: int) -> int:
    """How many of layers ``start..`` fit on the slot, in order (greedy prefix)."""
    n = len(p.spec.layers)
    room = _room(p, slot)
    if not slot.eligible or start >= n or room < 0:
        return 0
    prefix = list(accumulate((_layer_cost(p, slot, i) for i in range(start, n)), initial=0))
    return bisect_right(prefix, room) - 1


def _fill(p: _Problem, slots: Sequence[_Slot], start: int) -> tuple[tuple[int, ...], ...]:
    """New layers per slot: each slot in order takes the longest run that fits."""
    taken: list[tuple[int, ...]] = []
    cursor = start
    for slot in slots:
        count = _take(p, slot, cursor)
        taken.append(tuple(range(cursor, cursor + count)))
        cursor += count
    return tuple(taken)


def _end(new: Sequence[tuple[int, ...]], start: int) -> int:
    return start + sum(len(layers) for layers in new)


# --------------------------------------------------------------------------------------------
# Solving: paged attempt, fallback, contiguous plan


@dataclass(frozen=True, slots=True)
class _Fallback:
    """The paged attempt needs the CPU: plan non-paged, for this reason."""

    reason: str


def _solve(
    spec: ModelSpec,
    slots: tuple[_Slot, ...],
    params: LoadParams,
    acts: Activations,
    *,
    start: int,
    paged: PagedAttention | None,
    reason: str | None,
) -> Plan:
    if paged is not None:
        attempt = _solve_paged(spec, slots, params, acts, start=start, paged=paged)
        if isinstance(attempt, Plan):
            return attempt
        reason = attempt.reason
    p = _Problem(
        spec, acts, _contiguous_kv(spec, params), conversion_scratch(spec), params.max_seq_len
    )
    _check_fixed(p, slots)
    new = _fill(p, slots, start)
    if _end(new, start) < len(spec.layers):
        raise _unplaced_error(p, slots, new, start)
    return _build(p, slots, new, start=start, reason=reason)


def _solve_paged(
    spec: ModelSpec,
    slots: tuple[_Slot, ...],
    params: LoadParams,
    acts: Activations,
    *,
    start: int,
    paged: PagedAttention,
) -> Plan | _Fallback:
    if not slots[0].is_gpu:
        return _Fallback(
            f"paged attention disabled: the primary device {slots[0].name} is the CPU, where "
            "paged attention does not run; planned with non-paged KV sizing"
        )
    dtype = _cache_dtype(spec, paged)
    blocks = _initial_blocks(spec, params, paged, dtype)
    p = _Problem(
        spec,
        acts,
        _pool_kv(spec, dtype, blocks, paged.block_size),
        conversion_scratch(spec),
        params.max_seq_len,
    )
    gpu_slots = tuple(_paged_slot(slot, paged) for slot in slots)
    _check_fixed(p, gpu_slots)
    new = _fill(p, gpu_slots, start)
    end = _end(new, start)
    if end < len(spec.layers):
        cpu = next((slot.name for slot in slots if not slot.is_gpu), None)
        if cpu is None:
            raise _unplaced_error(p, gpu_slots, new, start)
        return _Fallback(
            f"paged attention disabled: with a paged KV pool of {blocks} blocks x "
            f"{paged.block_size} tokens, layers {_span(range(end, len(spec.layers)))} do not fit "
            f"on the GPUs and would go to {cpu}, where paged attention does not run; "
            f"planned with non-paged KV sizing ({params.max_batch_size} x {params.max_seq_len} "
            "tokens per layer, capped by sliding windows)"
        )
    if isinstance(paged.memory, Utilization):
        blocks = _utilization_blocks(p, gpu_slots, new, paged.block_size)
        p = replace(p, kv=_pool_kv(spec, dtype, blocks, paged.block_size))
    return _build(p, gpu_slots, new, start=start, reason=None)


def _utilization_blocks(
    p: _Problem, slots: Sequence[_Slot], new: Sequence[tuple[int, ...]], block_size: int
) -> int:
    """The largest block count every GPU holding layers can afford within its budget."""
    per_block = _block_bytes(p.spec, p.kv.dtype, block_size)
    affordable = []
    for slot, extra in zip(slots, new, strict=True):
        layers = slot.loaded + extra
        block = sum(per_block[i] for i in layers)
        if not layers or block == 0:
            continue
        weights = slot.fixed_weight + sum(_layer_weight(p, slot, i) for i in extra)
        spare = slot.limit - weights - _activation(p, slot, True) - _scratch(p, slot, True)
        affordable.append(spare // block)
    blocks = min(affordable)
    assert p.kv.blocks is not None
    assert blocks >= p.kv.blocks, "placement reserved the default pool"
    return blocks


# --------------------------------------------------------------------------------------------
# Results and errors


def _build(
    p: _Problem,
    slots: Sequence[_Slot],
    new: Sequence[tuple[int, ...]],
    *,
    start: int,
    reason: str | None,
) -> Plan:
    cursors = list(accumulate((len(layers) for layers in new), initial=start))
    rows = tuple(
        _row(p, slot, extra, cursor)
        for slot, extra, cursor in zip(slots, new, cursors, strict=False)
    )
    owner = {i: row.device for row in rows for i in row.layers}
    return Plan(
        layer_devices=tuple(owner[i] for i in range(len(p.spec.layers))),
        primary=slots[0].name,
        paged_attention=p.kv.blocks is not None,
        paged_attention_reason=reason,
        devices=rows,
        layer_kv_bytes=p.kv.layer_bytes,
        kv_cache_dtype=p.kv.dtype,
        paged_blocks=p.kv.blocks,
        cpu_policy=slots[0].policy,
        loaded_layers=start,
        max_seq_len=p.seq_len,
    )


def _row(p: _Problem, slot: _Slot, extra: tuple[int, ...], cursor: int) -> DevicePlan:
    layers = slot.loaded + extra
    holds = bool(layers)
    parts = p.spec.non_mapped if slot.primary else ()
    mmap = 0
    if not slot.is_gpu and slot.policy == "mmap":
        mmap = sum(p.spec.layers[i].nbytes - p.spec.layers[i].converted_bytes for i in layers)
        mmap += sum(part.nbytes - part.converted_bytes for part in parts)
    return DevicePlan(
        device=slot.name,
        is_gpu=slot.is_gpu,
        layers=layers,
        holds_non_mapped=slot.primary,
        weight_bytes=slot.fixed_weight + sum(_layer_weight(p, slot, i) for i in extra),
        kv_bytes=sum(p.kv.layer_bytes[i] for i in layers),
        activation_bytes=_activation(p, slot, holds),
        scratch_bytes=_scratch(p, slot, holds),
        reserve_bytes=slot.reserve if holds or slot.primary else 0,
        capacity_bytes=slot.capacity,
        note=_note(p, slot, extra, cursor),
        mmap_bytes=mmap,
        loaded_bytes=slot.loaded_bytes,
    )


def _note(p: _Problem, slot: _Slot, extra: tuple[int, ...], cursor: int) -> str | None:
    """Why a device holds no (further) layers; ``None`` when it took some."""
    if extra:
        return None
    what = "no further layers" if slot.loaded else "0 layers"
    if cursor >= len(p.spec.layers):
        return (
            None if slot.loaded or slot.primary else "unused: every layer is on an earlier device"
        )
    if not slot.eligible:
        return f"takes {what}: it comes before the device being loaded when re-planning"
    room = _room(p, slot)
    layer = p.kv.layer_bytes[cursor]
    return (
        f"fits {what}: layer {cursor} costs {format_bytes(_layer_weight(p, slot, cursor))} "
        f"weights + {format_bytes(layer)} KV, but {format_bytes(max(room, 0))} is left of "
        f"{format_bytes(max(slot.limit, 0))} after fixed charges "
        f"({format_bytes(_fixed(p, slot, True))}: non-mapped parts, placed layers, "
        f"activations, conversion scratch {format_bytes(_scratch(p, slot, True))}); "
        f"{slot.budget_text}"
    )


def _span(layers: Sequence[int]) -> str:
    if not layers:
        return "none"
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _kv_text(kv: _Kv) -> str:
    if kv.blocks is None:
        return f"non-paged KV cache in {kv.dtype}"
    return f"paged KV pool of {kv.blocks} blocks x {kv.block_size} tokens in {kv.dtype}"


def _breakdown(
    p: _Problem, slots: Sequence[_Slot], new: Sequence[tuple[int, ...]], start: int
) -> list[DeviceNeed]:
    cursors = list(accumulate((len(layers) for layers in new), initial=start))
    rows = [_row(p, s, x, c) for s, x, c in zip(slots, new, cursors, strict=False)]
    return [
        DeviceNeed(
            device=row.device,
            capacity=row.capacity_bytes,
            need=row.need_bytes,
            detail=(
                f"layers {_span(row.layers)}; weights {format_bytes(row.weight_bytes)}, "
                f"KV {format_bytes(row.kv_bytes)}, activations "
                f"{format_bytes(row.activation_bytes)}, conversion scratch "
                f"{format_bytes(row.scratch_bytes)}, reserve {format_bytes(row.reserve_bytes)}"
                f"; {slot.budget_text}"
            ),
        )
        for slot, row in zip(slots, rows, strict=True)
    ]


def _unplaced_error(
    p: _Problem, slots: Sequence[_Slot], new: Sequence[tuple[int, ...]], start: int
) -> DoesNotFitError:
    n = len(p.spec.layers)
    left = range(_end(new, start), n)
    weights = sum(p.spec.layers[i].nbytes for i in left)
    kv = sum(p.kv.layer_bytes[i] for i in left)
    reason = (
        f"the model does not fit: layers {_span(left)} ({len(left)} of {n}; weights "
        f"{format_bytes(weights)} + KV {format_bytes(kv)}) fit on no device, with "
        f"{_kv_text(p.kv)}"
    )
    return DoesNotFitError(reason, _breakdown(p, slots, new, start))


def _check_fixed(p: _Problem, slots: Sequence[_Slot]) -> None:
    """The primary's non-mapped parts, and placed layers' KV + activations, must fit."""
    for slot in slots:
        if not (slot.primary or slot.loaded):
            continue
        fixed = _fixed(p, slot, bool(slot.loaded))
        if fixed <= slot.limit:
            continue
        if slot.loaded:
            what = (
                f"device {slot.name} already holds layers {_span(slot.loaded)}, and their KV "
                "cache and the activations no longer fit"
            )
        else:
            what = (
                f"the primary device {slot.name} cannot hold the non-mapped parts: weights "
                f"{format_bytes(slot.fixed_weight)} + activations "
                f"{format_bytes(_activation(p, slot, False))} + conversion scratch "
                f"{format_bytes(_scratch(p, slot, False))} exceed its budget of "
                f"{format_bytes(slot.limit)} (free {format_bytes(slot.capacity)} - reserve "
                f"{format_bytes(slot.reserve)}); put a device with more free memory first"
            )
        row = DeviceNeed(
            device=slot.name,
            capacity=slot.capacity,
            need=fixed + slot.reserve,
            detail=f"{slot.budget_text}; {_kv_text(p.kv)}",
        )
        raise DoesNotFitError(what, [row])
