"""Memory estimators over a ``ModelSpec``: one layer's KV cache and the peak activations.

Each estimator's formula is in its docstring; the planner charges what they return.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamload.checkpoint import DTYPE_SIZES
from streamload.model._spec import LayerSpec, ModelSpec

F32_SIZE = 4


@dataclass(frozen=True, slots=True)
class Activations:
    """Peak transient activation bytes: ``mapped`` on every device holding layers,
    ``non_mapped`` for embeddings/logits/vision towers on the primary device (which is charged
    ``max(mapped, non_mapped)``)."""

    mapped: int
    non_mapped: int


def layer_kv_bytes(
    layer: LayerSpec, *, tokens: int, batch: int, itemsize: int, apply_window: bool = True
) -> int:
    """KV-cache bytes of one layer: ``kv_elems_per_token x cached_tokens x batch x itemsize``,
    where ``cached_tokens = min(tokens, sliding_window)`` if ``apply_window`` and the layer has a
    window, else ``tokens``."""
    cached = tokens
    if apply_window and layer.sliding_window is not None:
        cached = min(tokens, layer.sliding_window)
    return layer.kv_elems_per_token * cached * batch * itemsize


def activation_bytes(
    spec: ModelSpec,
    *,
    max_seq_len: int,
    max_batch_size: int,
    chunk: int,
    image_shape: tuple[int, int] | None = None,
    num_images: int = 1,
) -> Activations:
    """Peak activation estimate, with ``rows = min(max_seq_len, chunk)`` (prefill is chunked)
    and ``itemsize`` the size of ``spec.activation_dtype``:

    - ``mapped = max(scores, mlp)``, the larger transient of one layer:
      ``scores = batch x heads x rows x max_seq_len x 4`` (one chunk's attention scores in f32);
      ``mlp = batch x rows x facts.mlp_width x itemsize x 2`` (the two projections of a gated
      MLP; for MoE ``mlp_width = expert width x experts per token``, the grouped-GEMM buffer of
      all routed copies of a chunk, which also bounds the per-expert loop of eager kernels;
      ``4 x hidden`` when the config gives no width).
    - ``non_mapped = logits + vision``:
      ``logits = batch x rows x vocab x 4`` (f32 logits of one chunk; 0 for encoder-only models
      without a vocabulary head, see ``ModelSpec.has_lm_head``);
      ``vision = num_images x batch x vision_heads x P^2 x 4`` (one tower layer's attention
      scores in f32, ``P = VisionFacts.num_patches(image_shape)``), 0 for text-only models.
      The two are summed although the tower runs before the logits: the safe side.
    """
    facts = spec.facts
    batch = max_batch_size
    rows = min(max_seq_len, chunk)
    itemsize = DTYPE_SIZES[spec.activation_dtype]
    scores = batch * facts.num_attention_heads * rows * max_seq_len * F32_SIZE
    width = facts.mlp_width or facts.intermediate_size or 4 * facts.hidden_size
    mlp = batch * rows * width * itemsize * 2
    logits = batch * rows * facts.vocab_size * F32_SIZE if spec.has_lm_head else 0
    vision = 0
    if facts.vision is not None:
        patches = facts.vision.num_patches(image_shape)
        vision = num_images * batch * facts.vision.num_heads * patches * patches * F32_SIZE
    return Activations(mapped=max(scores, mlp), non_mapped=logits + vision)
