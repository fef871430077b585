"""Checkpoint inventory + ``config.json`` -> ``ModelSpec``: what the planner places.

A ``ModelSpec`` splits a checkpoint's tensors into repeating text layers (what the planner
maps across devices) and non-mapped parts (embeddings, final norm, lm_head, vision/audio
towers and projectors, extra layers with index >= ``num_hidden_layers`` such as MTP heads),
with every size in the *target* dtype, and carries the architecture facts the KV-cache and
activation estimators need. Pure logic over ``checkpoint`` entries plus one ``config.json`` read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from streamload.checkpoint import Checkpoint

__all__ = [
    "Activations",
    "KvKind",
    "LayerSpec",
    "ModelFacts",
    "ModelSpec",
    "PartSpec",
    "VisionFacts",
    "activation_bytes",
    "build_spec",
    "inspect",
    "layer_kv_bytes",
    "load_config",
]

KvKind = Literal["standard", "mla", "none"]


@dataclass(frozen=True, slots=True)
class VisionFacts:
    """What the vision activation estimate needs from a vision tower's config."""

    kind: Literal["fixed", "dynamic"]  # llava: resized to image_size; qwen2_vl: native resolution
    image_size: int
    patch_size: int
    hidden_size: int
    num_heads: int
    spatial_merge_size: int = 1


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """Architecture facts read from ``config.json`` (text config for multimodal models)."""

    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    v_head_dim: int
    vocab_size: int
    intermediate_size: int | None
    kv_kind: KvKind
    kv_lora_rank: int | None
    qk_rope_head_dim: int | None
    sliding_window: int | None
    tie_word_embeddings: bool
    vision: VisionFacts | None


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One repeating text layer.

    ``nbytes`` is the size once placed (floats in the target dtype, others as stored);
    ``stored_bytes`` what is read from disk; ``converted_bytes`` the part of ``nbytes`` whose dtype
    changes (so cannot be memory-mapped). ``kv_elems_per_token`` counts K and V elements one token
    adds to this layer's cache (MLA: the latent plus the rope key; encoder-only: 0).
    ``sliding_window`` caps the tokens this layer caches, if it is a sliding-window layer.
    """

    index: int
    prefix: str
    tensors: tuple[str, ...]
    nbytes: int
    stored_bytes: int
    converted_bytes: int
    kv_elems_per_token: int
    sliding_window: int | None


@dataclass(frozen=True, slots=True)
class PartSpec:
    """A non-mapped part: a module prefix in Hugging Face form (``"model.embed_tokens"``).

    ``sub_model`` is ``"vision"`` or ``"audio"`` for towers and projectors, else ``None``.
    """

    name: str
    tensors: tuple[str, ...]
    nbytes: int
    stored_bytes: int
    converted_bytes: int
    sub_model: str | None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The inventory the planner and engine work from.

    ``tied`` maps a tensor name to the tensor it is tied to when the checkpoint stores both
    (e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}``); the alias costs no bytes and is
    not streamed. ``activation_dtype`` is the dtype code of activations and (by default) the
    KV cache: the target dtype, else the checkpoint's dominant float dtype.
    """

    checkpoint: Checkpoint
    facts: ModelFacts
    config: Mapping[str, Any]
    target_dtype: str | None
    activation_dtype: str
    layers: tuple[LayerSpec, ...]
    non_mapped: tuple[PartSpec, ...]
    tied: Mapping[str, str]

    @property
    def non_mapped_bytes(self) -> int:
        return sum(part.nbytes for part in self.non_mapped)

    @property
    def total_bytes(self) -> int:
        return self.non_mapped_bytes + sum(layer.nbytes for layer in self.layers)


@dataclass(frozen=True, slots=True)
class Activations:
    """Peak transient activation bytes: ``mapped`` on every device holding layers,
    ``non_mapped`` for embeddings/logits/vision towers on the primary device (which is charged
    ``max(mapped, non_mapped)``)."""

    mapped: int
    non_mapped: int


def load_config(root: Path) -> Mapping[str, Any]:
    """Read ``root / "config.json"``; ``ConfigError`` naming the file if missing or invalid."""
    raise NotImplementedError


def build_spec(
    checkpoint: Checkpoint, config: Mapping[str, Any], *, target_dtype: str | None
) -> ModelSpec:
    """Group the checkpoint's tensors into layers and non-mapped parts and size them."""
    raise NotImplementedError


def inspect(path: str | Path, *, target_dtype: str | None = None) -> ModelSpec:
    """Open the checkpoint at ``path``, read its ``config.json`` and build the spec."""
    raise NotImplementedError


def layer_kv_bytes(
    layer: LayerSpec, *, tokens: int, batch: int, itemsize: int, apply_window: bool = True
) -> int:
    """KV-cache bytes of one layer: ``kv_elems_per_token x cached_tokens x batch x itemsize``,
    where ``cached_tokens = min(tokens, sliding_window)`` if ``apply_window`` and the layer has a
    window, else ``tokens``."""
    raise NotImplementedError


def activation_bytes(
    spec: ModelSpec,
    *,
    max_seq_len: int,
    max_batch_size: int,
    chunk: int,
    image_shape: tuple[int, int] | None = None,
    num_images: int = 1,
) -> Activations:
    """Peak activation estimate (formulas in the implementation's docstring)."""
    raise NotImplementedError
