"""Sizes the planner charges: activations, the KV cache (contiguous or a paged pool), weights
by CPU policy, and the conversion scratch a load keeps free on every GPU."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from streamload.checkpoint import DTYPE_SIZES
from streamload.errors import PlanError, format_bytes
from streamload.model import Activations, ModelSpec, activation_bytes, layer_kv_bytes
from streamload.params import (
    ContextSize,
    LoadParams,
    PagedAttention,
    Utilization,
    parse_dtype_code,
)

_MIB = 2**20


# --------------------------------------------------------------------------------------------
# Sizes: activations, KV cache, weights, conversion scratch


SCRATCH_ALIGN = 64  # each raw buffer in a device's conversion scratch starts on a cache line


def raw_bytes(spec: ModelSpec, tensors: Sequence[str]) -> int:
    """Bytes of raw buffers for those of ``tensors`` whose dtype changes when placed: a load
    reads them in their stored dtype into buffers on the device and converts them there. Each
    buffer is rounded up to ``SCRATCH_ALIGN`` bytes, as the engine lays them out."""
    entries = spec.checkpoint.tensors
    return sum(
        -(-entries[n].nbytes // SCRATCH_ALIGN) * SCRATCH_ALIGN
        for n in tensors
        if spec.placed_dtype(n) != entries[n].dtype
    )


def conversion_scratch(spec: ModelSpec) -> int:
    """What a load of ``spec`` takes on each GPU it places anything on, for conversion: room for
    the raw buffers of two units streamed one after the other (the most any two adjacent units'
    ``raw_bytes`` add up to), as at most two units are in flight on a GPU and a GPU's units are
    consecutive in the stream. 0 when nothing changes dtype."""
    if spec.target_dtype is None:
        return 0
    units = [part.tensors for part in spec.non_mapped] + [layer.tensors for layer in spec.layers]
    raw = [raw_bytes(spec, unit) for unit in units]
    pairs = [a + b for a, b in itertools.pairwise(raw)]
    return max([*raw, *pairs], default=0)


def max_positions(spec: ModelSpec) -> int | None:
    """The longest sequence the model was made for (``max_position_embeddings``, or GPT-2's
    ``n_positions``; a vision-language model's text config's), or ``None`` when unknown."""
    configs = [spec.config, spec.config.get("text_config") or {}]
    for config in configs:
        for key in ("max_position_embeddings", "n_positions"):
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def clamped(spec: ModelSpec, params: LoadParams) -> LoadParams:
    """``params`` with ``max_seq_len`` held to the model's ``max_positions``: no sequence can
    be longer, so KV cache and activations beyond it would be memory no request can use.
    (The load reports the clamp as a ``MaxSeqLenClamped`` event.)"""
    most = max_positions(spec)
    if most is None or params.max_seq_len <= most:
        return params
    return replace(params, max_seq_len=most)


def estimate_activations(spec: ModelSpec, params: LoadParams) -> Activations:
    """``model.activation_bytes`` with the sequence, batch, chunk and vision settings of
    ``params``: what ``plan`` charges unless given ``activations=``."""
    vision = params.vision
    return activation_bytes(
        spec,
        max_seq_len=params.max_seq_len,
        max_batch_size=params.max_batch_size,
        chunk=params.attention_chunk,
        image_shape=None if vision is None else vision.max_image_shape,
        num_images=1 if vision is None else vision.max_num_images,
    )


@dataclass(frozen=True, slots=True)
class _Kv:
    """KV sizing of one planning attempt: bytes per layer, cache dtype, pool blocks if paged."""

    layer_bytes: tuple[int, ...]
    dtype: str
    blocks: int | None
    block_size: int | None


def _contiguous_kv(spec: ModelSpec, params: LoadParams) -> _Kv:
    """Non-paged: ``max_batch_size x min(max_seq_len, window)`` tokens per layer."""
    itemsize = DTYPE_SIZES[spec.activation_dtype]
    sizes = tuple(
        layer_kv_bytes(
            layer,
            tokens=params.max_seq_len,
            batch=params.max_batch_size,
            itemsize=itemsize,
            apply_window=True,
        )
        for layer in spec.layers
    )
    return _Kv(sizes, spec.activation_dtype, None, None)


def _pool_kv(spec: ModelSpec, dtype: str, blocks: int, block_size: int) -> _Kv:
    """Paged: ``blocks x block_size`` tokens in every layer, no window cap."""
    itemsize = DTYPE_SIZES[dtype]
    sizes = tuple(
        layer_kv_bytes(
            layer, tokens=blocks * block_size, batch=1, itemsize=itemsize, apply_window=False
        )
        for layer in spec.layers
    )
    return _Kv(sizes, dtype, blocks, block_size)


def _block_bytes(spec: ModelSpec, dtype: str, block_size: int) -> tuple[int, ...]:
    """Bytes one paged block costs in each layer."""
    return _pool_kv(spec, dtype, 1, block_size).layer_bytes


def _cache_dtype(spec: ModelSpec, paged: PagedAttention) -> str:
    dtype = parse_dtype_code(paged.cache_dtype)
    return spec.activation_dtype if dtype is None else dtype


def _initial_blocks(spec: ModelSpec, params: LoadParams, paged: PagedAttention, dtype: str) -> int:
    """Blocks the paged pool starts with; for ``Utilization``, the default pool used to place."""
    memory = paged.memory
    bs = paged.block_size
    if isinstance(memory, ContextSize):
        return math.ceil(memory.tokens / bs)
    if memory is None:
        return math.ceil(params.max_seq_len * params.max_batch_size / bs)
    per_block = sum(_block_bytes(spec, dtype, bs))
    if per_block == 0:
        raise PlanError(
            f"paged attention with {memory} sizes a KV pool by memory, but this model caches no "
            "keys or values; use paged_attention=None or ContextSize"
        )
    if isinstance(memory, Utilization):
        return math.ceil(params.max_seq_len * params.max_batch_size / bs)
    blocks = memory.mib * _MIB // per_block
    if blocks == 0:
        raise PlanError(
            f"paged attention {memory} holds 0 blocks: one block of {bs} tokens costs "
            f"{format_bytes(per_block)} over all {len(spec.layers)} layers"
        )
    return blocks


def _charge(nbytes: int, converted: int, *, is_gpu: bool, policy: str) -> int:
    """Bytes a tensor group costs in the device's memory (CPU mmap: only converted bytes)."""
    return converted if not is_gpu and policy == "mmap" else nbytes
