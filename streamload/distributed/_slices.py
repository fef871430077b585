"""A rank's slices (pure): where the bytes of each tensor's part lie in the checkpoint, and the
rank's share of the model as a ``ModelSpec`` the engine loads and the planner charges.

A tensor of shape ``(d0, ..., dn)`` split into ``count`` parts along ``dim`` is, for part
``index``, ``prod(d0..d[dim-1])`` runs of ``d[dim] / count x prod(d[dim+1]..dn)`` elements,
one per index of the dimensions before ``dim``: along dim 0 one contiguous range, along a later
dimension a strided entry (``TensorEntry.rows`` runs, ``row_stride`` apart) that the engine
reads run by run. The bytes placed are exactly the part's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from streamload.checkpoint import DTYPE_SIZES, TensorEntry
from streamload.distributed._tp import TensorParallel
from streamload.model import LayerSpec, ModelFacts, ModelSpec, PartSpec

__all__ = ["shard_spec", "slice_entry"]


def slice_entry(entry: TensorEntry, dim: int, index: int, count: int) -> TensorEntry:
    """Part ``index`` of ``count`` of ``entry`` along ``dim`` (which ``count`` divides)."""
    shape = entry.shape
    part = shape[dim] // count
    inner = math.prod(shape[dim + 1 :]) * DTYPE_SIZES[entry.dtype]
    outer = math.prod(shape[:dim])
    sliced = (*shape[:dim], part, *shape[dim + 1 :])
    offset = entry.offset + index * part * inner
    if outer <= 1:
        return dataclasses.replace(entry, shape=sliced, offset=offset, nbytes=part * inner)
    return dataclasses.replace(
        entry,
        shape=sliced,
        offset=offset,
        nbytes=outer * part * inner,
        rows=outer,
        row_stride=shape[dim] * inner,
    )


def shard_spec(spec: ModelSpec, tp: TensorParallel, index: int) -> ModelSpec:
    """``spec`` as rank ``index`` of a stage holds it: split tensors replaced by their parts,
    layer and part sizes from those parts, each layer's KV cache and the activations for the
    rank's share of the heads and MLP width. ``spec`` itself when nothing splits.

    Per rank, a layer caches ``max(1, kv_heads / size)`` KV heads (with fewer KV heads than
    ranks, K and V are replicated and each rank caches the one its query heads use, as vLLM
    does); attention scores count ``heads / size`` heads, the MLP ``width / size``; logits
    count the whole vocabulary (a split head's output is gathered on every rank).
    """
    if tp.size == 1 or not tp.dims:
        return spec
    entries = dict(spec.checkpoint.tensors)
    for name, dim in tp.dims.items():
        entries[name] = slice_entry(entries[name], dim, index, tp.size)
    for alias, source in tp.ties.items():
        if alias in entries and source in tp.dims:
            entries[alias] = slice_entry(entries[alias], tp.dims[source], index, tp.size)
    sliced = dataclasses.replace(
        spec, checkpoint=dataclasses.replace(spec.checkpoint, tensors=entries)
    )
    attention = any(_in_attention(name) for name in tp.dims)
    heads = _kv_heads_per_rank(spec, tp.size) if attention else spec.facts.num_key_value_heads
    layers = tuple(_layer(sliced, layer, heads) for layer in spec.layers)
    parts = tuple(_part(sliced, part) for part in spec.non_mapped)
    return dataclasses.replace(
        sliced, facts=_facts(spec, tp, attention), layers=layers, non_mapped=parts
    )


def _in_attention(name: str) -> bool:
    return ".q_proj." in name or ".o_proj." in name


def _kv_heads_per_rank(spec: ModelSpec, size: int) -> int:
    return max(1, spec.facts.num_key_value_heads // size)


def _sizes(spec: ModelSpec, names: tuple[str, ...]) -> tuple[int, int, int]:
    """Placed, stored and not-mappable bytes of ``names`` (a strided part cannot be a zero-copy
    map of the checkpoint, so it counts with the bytes that change dtype)."""
    entries: Mapping[str, TensorEntry] = spec.checkpoint.tensors
    nbytes = stored = unmapped = 0
    for name in names:
        entry = entries[name]
        placed = spec.placed_dtype(name)
        size = entry.nbytes if placed == entry.dtype else entry.numel * DTYPE_SIZES[placed]
        nbytes += size
        stored += entry.nbytes
        if placed != entry.dtype or not entry.contiguous:
            unmapped += size
    return nbytes, stored, unmapped


def _layer(spec: ModelSpec, layer: LayerSpec, kv_heads: int) -> LayerSpec:
    nbytes, stored, unmapped = _sizes(spec, layer.tensors)
    full = spec.facts.num_key_value_heads
    kv = layer.kv_elems_per_token
    if spec.facts.kv_kind == "standard" and full > 0:
        kv = kv * kv_heads // full
    return dataclasses.replace(
        layer, nbytes=nbytes, stored_bytes=stored, converted_bytes=unmapped, kv_elems_per_token=kv
    )


def _part(spec: ModelSpec, part: PartSpec) -> PartSpec:
    nbytes, stored, unmapped = _sizes(spec, part.tensors)
    return dataclasses.replace(part, nbytes=nbytes, stored_bytes=stored, converted_bytes=unmapped)


def _facts(spec: ModelSpec, tp: TensorParallel, attention: bool) -> ModelFacts:
    facts = spec.facts
    size = tp.size
    heads = facts.num_attention_heads
    if attention and heads % size == 0:
        facts = dataclasses.replace(facts, num_attention_heads=heads // size)
    if any(".mlp." in name or "block_sparse_moe" in name for name in tp.dims):
        width, inter = facts.mlp_width, facts.intermediate_size
        if width and width % size == 0:
            facts = dataclasses.replace(facts, mlp_width=width // size)
        if inter and inter % size == 0:
            facts = dataclasses.replace(facts, intermediate_size=inter // size)
    return facts
