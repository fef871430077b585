"""Checkpoint inventory + ``config.json`` -> ``ModelSpec``: what the planner places.

A ``ModelSpec`` splits a checkpoint's tensors into repeating text layers (what the planner
maps across devices) and non-mapped parts (embeddings, final norm, lm_head, vision/audio
towers and projectors, extra layers with index >= ``num_hidden_layers`` such as MTP heads),
with every size in the *target* dtype, and carries the architecture facts the KV-cache and
activation estimators need. Pure logic over ``checkpoint`` entries plus one ``config.json`` read.

How tensors are grouped:

- A *tower* tensor has a path segment naming a vision/audio tower or projector
  (``vision_tower``, ``visual``, ``multi_modal_projector``, ``audio_tower``, ...); it belongs to the
  part named by the path up to that segment (``model.vision_tower``), with ``sub_model`` set.
- Among the other tensors, the *layer container* is the prefix before the first integer segment
  (``model.layers`` in ``model.layers.3.mlp.up_proj.weight``) whose indices cover
  ``0..num_hidden_layers-1`` of the text config. When several do (encoder-decoder checkpoints),
  the one holding the most bytes wins. Indices at or above ``num_hidden_layers`` (DeepSeek-V3's
  MTP layer ``model.layers.61``) become non-mapped parts named ``<container>.<index>``.
- Every other tensor belongs to the part named by its path up to the first segment where it
  leaves the container's path (``model.embed_tokens``, ``model.norm``, ``lm_head``,
  ``transformer.wte``, ``bert.embeddings``, ``cls``), usable as a Hugging Face ``device_map`` key.

Sizes: floating tensors (``FLOAT_CODES``) are counted at ``numel x size(target)``; integer,
bool and FP8 tensors at their stored size, and so are the float side tensors (scales, zero
points) of a checkpoint whose config declares a ``quantization_config`` (``placed_dtype``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Literal

from streamload.checkpoint import (
    DTYPE_SIZES,
    FLOAT_CODES,
    Checkpoint,
    TensorEntry,
    open_checkpoint,
)
from streamload.errors import ConfigError

__all__ = [
    "CONFIG_NAME",
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
    "is_quantized",
    "layer_kv_bytes",
    "load_config",
    "model_facts",
    "placed_dtype",
]

CONFIG_NAME = "config.json"

KvKind = Literal["standard", "mla", "none"]

F32_SIZE = 4


@dataclass(frozen=True, slots=True)
class VisionFacts:
    """What the vision activation estimate needs from a vision tower's config.

    ``image_size``: the side every image is resized to (``"fixed"``), or the side assumed when no
    image shape is given (``"dynamic"``). ``class_token``: the tower prepends a class token
    (CLIP), so it attends over one position more than it has patches.
    """

    kind: Literal["fixed", "dynamic"]  # llava: resized to image_size; qwen2_vl: native resolution
    image_size: int
    patch_size: int
    hidden_size: int
    num_heads: int
    spatial_merge_size: int = 1
    class_token: bool = False

    def num_patches(self, image_shape: tuple[int, int] | None = None) -> int:
        """Positions the tower attends over for one image.

        fixed: ``(image_size // patch_size)^2 (+ 1 with a class token)``, whatever the input;
        dynamic: ``sides(H) x sides(W)`` with ``sides(x) = ceil(x / (patch x merge)) x merge``
        (the processor resizes each side to a multiple of ``patch x merge``; rounding up is the
        conservative choice).
        """
        if self.kind == "fixed":
            return (self.image_size // self.patch_size) ** 2 + int(self.class_token)
        height, width = image_shape or (self.image_size, self.image_size)
        unit = self.patch_size * self.spatial_merge_size

        def side(pixels: int) -> int:
            return math.ceil(pixels / unit) * self.spatial_merge_size

        return side(height) * side(width)


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """Architecture facts read from ``config.json`` (text config for multimodal models).

    ``sliding_window`` is the window of the model's sliding-window layers (``None`` if it has
    none; which layers slide is in ``LayerSpec.sliding_window``). ``mlp_width`` is the
    intermediate width one token activates in the widest MLP: the dense ``intermediate_size``,
    or for mixture-of-experts ``expert width x experts per token`` (or the shared experts' width,
    whichever is larger). ``num_experts``/``num_experts_per_tok`` are ``None`` for dense models.
    """

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
    text_model_type: str | None = None
    mlp_width: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None

    @property
    def kv_elems_per_token(self) -> int:
        """K and V elements one token adds to one layer's cache.

        standard: ``kv_heads x (head_dim + v_head_dim)``; MLA: ``kv_lora_rank +
        qk_rope_head_dim`` (the compressed latent plus the shared rope key); none: 0.
        """
        if self.kv_kind == "none":
            return 0
        if self.kv_kind == "mla":
            assert self.kv_lora_rank is not None
            assert self.qk_rope_head_dim is not None
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.num_key_value_heads * (self.head_dim + self.v_head_dim)


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
    ``has_lm_head`` says whether the model computes logits over its vocabulary: always for
    decoders; for encoder-only models only when the checkpoint holds a head (such as BERT's
    ``cls.predictions``) with a dimension equal to the vocabulary size.
    """

    checkpoint: Checkpoint
    facts: ModelFacts
    config: Mapping[str, Any]
    target_dtype: str | None
    activation_dtype: str
    layers: tuple[LayerSpec, ...]
    non_mapped: tuple[PartSpec, ...]
    tied: Mapping[str, str]
    has_lm_head: bool = True

    @property
    def non_mapped_bytes(self) -> int:
        return sum(part.nbytes for part in self.non_mapped)

    @property
    def total_bytes(self) -> int:
        return self.non_mapped_bytes + sum(layer.nbytes for layer in self.layers)

    @property
    def stored_bytes(self) -> int:
        """Bytes read from disk for every streamed tensor (tied aliases excluded)."""
        return sum(part.stored_bytes for part in self.non_mapped) + sum(
            layer.stored_bytes for layer in self.layers
        )

    @property
    def quantized(self) -> bool:
        """Whether the config declares a quantization (see ``placed_dtype``)."""
        return is_quantized(self.config)

    def placed_dtype(self, name: str) -> str:
        """The dtype code tensor ``name`` has once placed (see ``placed_dtype``)."""
        entry = self.checkpoint.tensors[name]
        return placed_dtype(entry, self.target_dtype, quantized=self.quantized)


@dataclass(frozen=True, slots=True)
class Activations:
    """Peak transient activation bytes: ``mapped`` on every device holding layers,
    ``non_mapped`` for embeddings/logits/vision towers on the primary device (which is charged
    ``max(mapped, non_mapped)``)."""

    mapped: int
    non_mapped: int


# --------------------------------------------------------------------------- config.json


def load_config(root: Path) -> Mapping[str, Any]:
    """Read ``root / "config.json"``; ``ConfigError`` naming the file if missing or invalid."""
    path = Path(root) / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(path, "not found (a checkpoint needs its config.json)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot be read: {exc}") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(path, f"is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(path, f"must hold a JSON object, got {type(config).__name__}")
    return config


# Config keys tried, in order, for each fact (gpt2 ``n_layer``/``n_head``/``n_embd``, old falcon
# ``n_head_kv``, ...). The first present and non-null key wins.
_ALIASES: Mapping[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "n_embed", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
}

# Nested sub-configs are saved as a diff against their class's defaults (llava-1.5's
# ``text_config`` holds little more than ``vocab_size``), so the facts fall back to the
# defaults of the transformers config class named by the sub-config's ``model_type``.
_SUBCONFIG_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "llama": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "clip_vision_model": {
        "hidden_size": 768,
        "image_size": 224,
        "patch_size": 32,
        "num_attention_heads": 12,
    },
    "siglip_vision_model": {
        "hidden_size": 768,
        "image_size": 224,
        "patch_size": 16,
        "num_attention_heads": 12,
    },
    "qwen2_vl_vision": {"embed_dim": 1280, "num_heads": 16, "patch_size": 14},
}

_Window = Literal["none", "all", "max_window_layers", "alternate", "pattern"]


@dataclass(frozen=True, slots=True)
class _Arch:
    """What differs between architectures beyond field names.

    ``window``: which layers slide when the config has no ``layer_types``: ``all`` (mistral),
    ``max_window_layers`` (qwen: layers ``>= max_window_layers`` when ``use_sliding_window``),
    ``alternate`` (gemma2: even layers), ``pattern`` (gemma3: all but every
    ``sliding_window_pattern``-th). ``tie_default``: transformers' default for
    ``tie_word_embeddings`` in this config class.
    """

    window: _Window = "none"
    kv_kind: KvKind = "standard"
    tie_default: bool = False


_QWEN = _Arch(window="max_window_layers")
_ENCODER = _Arch(kv_kind="none", tie_default=True)

_ARCHS: Mapping[str, _Arch] = {
    "llama": _Arch(),
    "mistral": _Arch(window="all"),
    "mixtral": _Arch(window="all"),
    "phi3": _Arch(window="all"),
    "starcoder2": _Arch(window="all"),
    "qwen2": _QWEN,
    "qwen2_moe": _QWEN,
    "qwen3": _QWEN,
    "qwen3_moe": _QWEN,
    "qwen2_vl": _QWEN,
    "qwen2_vl_text": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen2_5_vl_text": _QWEN,
    "gemma": _Arch(tie_default=True),
    "gemma2": _Arch(window="alternate", tie_default=True),
    "gemma3_text": _Arch(window="pattern", tie_default=True),
    "gemma3": _Arch(window="pattern", tie_default=True),
    "gpt2": _Arch(tie_default=True),
    "gpt_neox": _Arch(),
    "falcon": _Arch(tie_default=True),
    "deepseek_v2": _Arch(kv_kind="mla"),
    "deepseek_v3": _Arch(kv_kind="mla"),
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
    "camembert": _ENCODER,
    "electra": _ENCODER,
    "llava": _Arch(),
}

# Unknown model types: transformers' base-class default ties embeddings (as 4.x did).
_GENERIC = _Arch(tie_default=True)


@dataclass(frozen=True, slots=True)
class _Fields:
    """A config mapping read with aliases; errors name the file and the dotted field."""

    values: Mapping[str, Any]
    path: Path
    prefix: str = ""

    def raw(self, key: str) -> Any:
        for name in _ALIASES.get(key, (key,)):
            value = self.values.get(name)
            if value is not None:
                return value
        return None

    def optional(self, key: str) -> int | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                self.path,
                f"expected a non-negative integer, got {value!r}",
                field=self.prefix + key,
            )
        return value

    def positive(self, key: str) -> int | None:
        """Like ``optional`` but 0 reads as absent (``sliding_window: 0`` means none)."""
        value = self.optional(key)
        return value or None

    def require(self, key: str) -> int:
        value = self.optional(key)
        if value is None:
            names = _ALIASES.get(key, (key,))
            also = f" (also tried: {', '.join(names[1:])})" if len(names) > 1 else ""
            problem = f"missing; needed for the memory estimate{also}"
            raise ConfigError(self.path, problem, field=self.prefix + key)
        if value == 0:
            raise ConfigError(self.path, "must be positive, got 0", field=self.prefix + key)
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.values.get(key)
        return default if value is None else bool(value)


def _text_fields(config: Mapping[str, Any], path: Path) -> _Fields:
    """The text model's config: ``text_config`` (filled with its class defaults) or the root."""
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        return _Fields(config, path)
    defaults = _SUBCONFIG_DEFAULTS.get(str(text.get("model_type")), {})
    return _Fields({**defaults, **text}, path, "text_config.")


def model_facts(config: Mapping[str, Any], *, path: Path | None = None) -> ModelFacts:
    """Read the architecture facts from a ``config.json`` mapping.

    Text facts come from ``text_config`` when present. Unknown model types fall back to the
    generic decoder reading (``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``;
    KV heads default to attention heads, ``head_dim`` to ``hidden / heads``); a missing field is
    a ``ConfigError`` naming it and ``path`` (default: ``config.json``).
    """
    facts, _ = _read_facts(config, Path(CONFIG_NAME) if path is None else path)
    return facts


def _read_facts(config: Mapping[str, Any], path: Path) -> tuple[ModelFacts, tuple[int | None, ...]]:
    """The facts and each layer's sliding window."""
    model_type = str(config.get("model_type") or "unknown")
    text = _text_fields(config, path)
    text_type = str(text.values.get("model_type") or model_type)
    arch = _ARCHS.get(text_type, _ARCHS.get(model_type, _GENERIC))

    layers = text.require("num_hidden_layers")
    hidden = text.require("hidden_size")
    heads = text.require("num_attention_heads")
    vocab = text.require("vocab_size")
    kv_heads = _kv_heads(text, text_type, heads)
    head_dim = text.positive("head_dim") or hidden // heads
    v_head_dim = text.positive("v_head_dim") or head_dim

    kv_kind = arch.kv_kind
    kv_lora_rank = text.positive("kv_lora_rank")
    rope_dim: int | None = None
    if kv_lora_rank is not None and kv_kind == "standard":
        kv_kind = "mla"  # any config with a compressed KV latent (DeepSeek derivatives)
    if kv_kind == "mla":
        kv_lora_rank = text.require("kv_lora_rank")
        rope_dim = text.require("qk_rope_head_dim")
        nope_dim = text.positive("qk_nope_head_dim")
        head_dim = rope_dim + nope_dim if nope_dim is not None else head_dim

    intermediate = _intermediate(text, text_type, hidden)
    experts = text.positive("num_experts")
    per_token = text.positive("num_experts_per_tok") if experts else None
    windows = _layer_windows(text, arch, layers)
    window = next((w for w in windows if w is not None), None)
    facts = ModelFacts(
        model_type=model_type,
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        vocab_size=vocab,
        intermediate_size=intermediate,
        kv_kind=kv_kind,
        kv_lora_rank=kv_lora_rank if kv_kind == "mla" else None,
        qk_rope_head_dim=rope_dim,
        sliding_window=window,
        tie_word_embeddings=_tie(config, text, model_type, text_type),
        vision=_vision_facts(config, path),
        text_model_type=text_type if text_type != model_type else None,
        mlp_width=_mlp_width(text, intermediate, experts, per_token),
        num_experts=experts if per_token else None,
        num_experts_per_tok=per_token,
    )
    return facts, windows


def _kv_heads(text: _Fields, model_type: str, heads: int) -> int:
    if model_type == "falcon":
        # Falcon: grouped KV only with the new decoder architecture; multi-query means one head.
        if text.flag("new_decoder_architecture", False):
            return text.positive("num_key_value_heads") or heads
        return 1 if text.flag("multi_query", True) else heads
    return text.positive("num_key_value_heads") or heads


def _intermediate(text: _Fields, model_type: str, hidden: int) -> int | None:
    """The dense MLP width; gpt2 (``n_inner``) and falcon (``ffn_hidden_size``) default to 4h."""
    value = text.positive("intermediate_size")
    if value is None and model_type in ("gpt2", "falcon"):
        return 4 * hidden
    return value


def _mlp_width(
    text: _Fields, intermediate: int | None, experts: int | None, per_token: int | None
) -> int | None:
    """Widest intermediate one token activates: dense, routed (``width x k``) or shared."""
    if not experts or not per_token:
        return intermediate
    expert_width = text.positive("moe_intermediate_size")
    routed = (expert_width or intermediate or 0) * per_token
    shared = text.positive("shared_expert_intermediate_size") or 0
    if expert_width is not None:
        shared = max(shared, expert_width * (text.positive("n_shared_experts") or 0))
    # With a separate expert width, intermediate_size is the dense layers' width (DeepSeek's
    # first_k_dense_replace, qwen's mlp_only_layers); counting it always is the safe side.
    dense = (intermediate or 0) if expert_width is not None else 0
    return max(routed, shared, dense) or None


def _tie(config: Mapping[str, Any], text: _Fields, model_type: str, text_type: str) -> bool:
    """``tie_word_embeddings`` as transformers resolves it: the root value (or its class default),
    or'ed with the text config's for multimodal models (llava and qwen2_vl do this)."""
    root_default = _ARCHS.get(model_type, _GENERIC).tie_default
    tie = _Fields(config, text.path).flag("tie_word_embeddings", root_default)
    if text.prefix:
        text_default = _ARCHS.get(text_type, _GENERIC).tie_default
        tie = tie or text.flag("tie_word_embeddings", text_default)
    return tie


def _layer_windows(text: _Fields, arch: _Arch, layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window: ``layer_types`` when the config has it, else the arch's rule."""
    window = text.positive("sliding_window")
    if arch.window == "max_window_layers" and not text.flag("use_sliding_window", False):
        window = None  # qwen configs carry a sliding_window value they do not use
    if window is None:
        return (None,) * layers
    types = text.values.get("layer_types")
    if isinstance(types, list):
        if len(types) != layers:
            raise ConfigError(
                text.path,
                f"has {len(types)} entries for {layers} layers",
                field=text.prefix + "layer_types",
            )
        return tuple(window if kind == "sliding_attention" else None for kind in types)
    if arch.window == "all":
        return (window,) * layers
    if arch.window == "max_window_layers":
        first = text.optional("max_window_layers")
        first = 28 if first is None else first  # transformers' default
        return tuple(window if i >= first else None for i in range(layers))
    if arch.window == "alternate":
        return tuple(window if i % 2 == 0 else None for i in range(layers))
    if arch.window == "pattern":
        every = text.positive("sliding_window_pattern") or text.positive("_sliding_window_pattern")
        every = every or 6  # transformers' default
        return tuple(window if (i + 1) % every else None for i in range(layers))
    # Unknown architectures: only layer_types says which layers slide; charge full otherwise.
    return (None,) * layers


# Side assumed for native-resolution towers when no image shape is given (mistral.rs default).
_DEFAULT_IMAGE_SIDE = 1024


def _vision_facts(config: Mapping[str, Any], path: Path) -> VisionFacts | None:
    raw = config.get("vision_config")
    if not isinstance(raw, Mapping):
        return None
    vision_type = str(raw.get("model_type") or "")
    defaults = _SUBCONFIG_DEFAULTS.get(vision_type, {})
    fields = _Fields({**defaults, **raw}, path, "vision_config.")
    if "spatial_merge_size" in raw or vision_type.startswith(("qwen2_vl", "qwen2_5_vl")):
        # Native resolution (qwen2_vl): embed_dim is the tower width there, hidden_size the
        # merger's output; qwen2_5_vl names the tower width hidden_size.
        width = fields.positive("embed_dim") or fields.require("hidden_size")
        return VisionFacts(
            kind="dynamic",
            image_size=_DEFAULT_IMAGE_SIDE,
            patch_size=fields.require("patch_size"),
            hidden_size=width,
            num_heads=fields.positive("num_heads") or fields.require("num_attention_heads"),
            spatial_merge_size=fields.positive("spatial_merge_size") or 2,
        )
    return VisionFacts(
        kind="fixed",
        image_size=fields.require("image_size"),
        patch_size=fields.require("patch_size"),
        hidden_size=fields.require("hidden_size"),
        num_heads=fields.positive("num_heads") or fields.require("num_attention_heads"),
        class_token=vision_type.startswith("clip"),
    )


# --------------------------------------------------------------------------- tensor grouping

# Path segments that root a tower or projector; None: the model's own modality (a projector).
_TOWER_SEGMENTS: Mapping[str, str | None] = {
    "vision_tower": "vision",
    "vision_model": "vision",
    "visual": "vision",
    "vision_encoder": "vision",
    "embed_vision": "vision",
    "audio_tower": "audio",
    "audio_model": "audio",
    "audio_encoder": "audio",
    "embed_audio": "audio",
    "multi_modal_projector": None,
    "mm_projector": None,
}

# Quantization side tensors: stored in a float dtype but never converted.
_QUANT_AUX = frozenset(
    {
        "weight_scale_inv",
        "weight_scale",
        "weight_global_scale",
        "weight_zero_point",
        "input_scale",
        "input_global_scale",
        "output_scale",
        "k_scale",
        "v_scale",
        "scales",
        "qzeros",
        "g_idx",
        "absmax",
        "nested_absmax",
        "quant_map",
        "nested_quant_map",
    }
)

# Output heads and the input embeddings they may be tied to.
_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "cls.predictions.decoder.weight")
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")

# Any tower segment, dot-delimited, in the names joined by dots (see ``_towers``).
_ANY_TOWER = re.compile(r"\.(?:" + "|".join(map(re.escape, _TOWER_SEGMENTS)) + r")\.")
_FIRST_INDEX = re.compile(r"^(.+?)\.(\d+)(?=\.|$)")


def placed_dtype(entry: TensorEntry, target_dtype: str | None, *, quantized: bool = False) -> str:
    """The dtype code a tensor has once placed: ``target_dtype`` for floating tensors
    (``FLOAT_CODES``), the stored code for everything else (integers, bool, FP8, packed
    quantized weights). In a ``quantized`` checkpoint (its config has a
    ``quantization_config``), float side tensors of the quantization (``*.weight_scale_inv``,
    ``*.scales``, ``*.qzeros``, ...) also keep their stored dtype, the precision their kernels
    expect."""
    if target_dtype is None or entry.dtype not in FLOAT_CODES:
        return entry.dtype
    if quantized and entry.name.rsplit(".", 1)[-1] in _QUANT_AUX:
        return entry.dtype
    return target_dtype


def is_quantized(config: Mapping[str, Any]) -> bool:
    """Whether ``config.json`` declares a quantization (root or ``text_config``)."""
    text = config.get("text_config")
    return "quantization_config" in config or (
        isinstance(text, Mapping) and "quantization_config" in text
    )


@dataclass(frozen=True, slots=True)
class _Sizes:
    """Bytes of a group of tensors: once placed, as stored, and placed bytes that change dtype."""

    nbytes: int = 0
    stored: int = 0
    converted: int = 0

    @classmethod
    def of(
        cls,
        names: Iterable[str],
        tensors: Mapping[str, TensorEntry],
        target_dtype: str | None,
        quantized: bool,
    ) -> _Sizes:
        if target_dtype is None:
            stored = sum(tensors[name].nbytes for name in names)
            return cls(stored, stored, 0)
        stored = replaced = converted = 0
        for name in names:
            entry = tensors[name]
            stored += entry.nbytes
            dtype = entry.dtype
            if dtype == target_dtype or dtype not in FLOAT_CODES:
                continue  # placed as stored, whatever ``placed_dtype`` would add
            placed = placed_dtype(entry, target_dtype, quantized=quantized)
            if placed != dtype:
                replaced += entry.nbytes
                converted += entry.numel * DTYPE_SIZES[placed]
        return cls(stored - replaced + converted, stored, converted)


@dataclass(slots=True)
class _Group:
    """Tensors gathered under one name while grouping (mutable only inside ``build_spec``)."""

    tensors: list[str] = field(default_factory=list)
    sizes: _Sizes = _Sizes()  # frozen: one shared zero until the group is sized
    sub_model: str | None = None


def _towers(names: Collection[str]) -> dict[str, tuple[str, str | None]]:
    """``{tensor: (part, sub_model)}`` for the tensors under a tower segment."""
    if _ANY_TOWER.search(f".{'.'.join(names)}.") is None:
        return {}  # no segment of any name is a tower's (text-only models): no per-name walk
    return {name: root for name in names if (root := _tower_root(name))}


def _tower_root(name: str) -> tuple[str, str | None] | None:
    segments = name.split(".")
    for i, segment in enumerate(segments[:-1]):
        if segment in _TOWER_SEGMENTS:
            return ".".join(segments[: i + 1]), _TOWER_SEGMENTS[segment]
    return None


def _indexed(names: Iterable[str]) -> dict[str, dict[int, list[str]]]:
    """``{container: {index: [tensor, ...]}}`` for the names with an integer segment: the prefix
    before the first one, and its value (``model.layers.3.mlp.up_proj.weight``:
    ``model.layers``, 3); names in the order given.

    A name that starts with the last match's ``container.index.`` has that container and index
    (the text the pattern looks at is the same), so of each layer's tensors, which lie together
    in checkpoint order, only the first is matched.
    """
    found: dict[str, dict[int, list[str]]] = {}
    members: list[str] = []
    run = ""  # "<container>.<index>." of the last match, if a dot followed its index
    for name in names:
        if run and name.startswith(run):
            members.append(name)
            continue
        match = _FIRST_INDEX.match(name)
        if match is None:
            continue
        container, digits = match.groups()
        members = found.setdefault(container, {}).setdefault(int(digits), [])
        members.append(name)
        end = match.end()
        run = name[: end + 1] if name[end : end + 1] == "." else ""
    return found


def _find_container(
    indexed: Mapping[str, Mapping[int, list[str]]],
    tensors: Mapping[str, TensorEntry],
    layers: int,
    path: Path,
    field_name: str,
) -> str:
    """The prefix before the first integer segment whose indices cover ``0..layers-1``."""
    wanted = set(range(layers))
    covering = [name for name, by_index in indexed.items() if wanted.issubset(by_index)]
    if not covering:
        found = ", ".join(f"{name} ({len(by_index)} indices)" for name, by_index in indexed.items())
        raise ConfigError(
            path,
            f"{layers} layers, but no tensor container in the checkpoint holds layers "
            f"0..{layers - 1} (found: {found or 'no indexed tensors'})",
            field=field_name,
        )
    if len(covering) == 1:
        return covering[0]

    def weight(container: str) -> int:
        return sum(tensors[n].nbytes for names in indexed[container].values() for n in names)

    return max(covering, key=weight)  # first wins a tie (dict order)


def _part_name(name: str, container: list[str]) -> str:
    """The prefix of ``name`` up to the first segment that leaves ``container``'s path."""
    segments = name.split(".")
    depth = 0
    while depth < len(container) and depth < len(segments) and segments[depth] == container[depth]:
        depth += 1
    return ".".join(segments[: depth + 1])


def _find_ties(
    entries: Mapping[str, TensorEntry], candidates: Iterable[str], tie: bool
) -> dict[str, str]:
    """``{head: embedding}`` for output heads stored next to a same-shaped input embedding."""
    if not tie:
        return {}
    names = list(candidates)
    embeddings = [n for n in names if n.endswith(_EMBED_SUFFIXES)]
    tied: dict[str, str] = {}
    for head in names:
        if not any(head == h or head.endswith("." + h) for h in _HEAD_NAMES):
            continue
        for embedding in embeddings:
            if entries[embedding].shape == entries[head].shape:
                tied[head] = embedding
                break
    return tied


def _activation_dtype(checkpoint: Checkpoint, target_dtype: str | None) -> str:
    """The target when it is a float code, else the float code holding the most stored bytes."""
    if target_dtype in FLOAT_CODES:
        assert target_dtype is not None
        return target_dtype
    codes = {entry.dtype for entry in checkpoint.tensors.values()} & FLOAT_CODES
    if len(codes) < 2:  # the one float code; none (fully packed): the common compute type
        return min(codes, default="BF16")
    totals: dict[str, int] = {}
    for entry in checkpoint.tensors.values():
        if entry.dtype in FLOAT_CODES:
            totals[entry.dtype] = totals.get(entry.dtype, 0) + entry.nbytes
    return max(sorted(totals), key=lambda code: totals[code])


def build_spec(
    checkpoint: Checkpoint, config: Mapping[str, Any], *, target_dtype: str | None
) -> ModelSpec:
    """Group the checkpoint's tensors into layers and non-mapped parts and size them.

    ``target_dtype`` is a dtype code (``"BF16"``) or ``None`` for as stored (``ValueError`` for
    an unknown code). ``ConfigError`` if the config lacks a needed field or no tensor container
    holds the config's layers.
    """
    if target_dtype is not None and target_dtype not in DTYPE_SIZES:
        raise ValueError(f"unknown target dtype code {target_dtype!r}")
    path = checkpoint.root / CONFIG_NAME
    facts, windows = _read_facts(config, path)
    towers = _towers(checkpoint.tensors)
    text = [name for name in checkpoint.tensors if name not in towers]
    indexed = _indexed(text)
    container = _find_container(
        indexed,
        checkpoint.tensors,
        facts.num_hidden_layers,
        path,
        _layers_field(_text_fields(config, path)),
    )
    outside = (name for name in text if not name.startswith(container + "."))
    tied = _find_ties(checkpoint.tensors, outside, facts.tie_word_embeddings)

    grouping = _Grouping(
        container=container,
        layers=[indexed[container][i] for i in range(len(windows))],
        towers=towers,
        modality="audio"
        if "audio_config" in config and "vision_config" not in config
        else "vision",
        target_dtype=target_dtype,
        quantized=is_quantized(config),
    )
    layer_groups, parts = grouping.run(checkpoint, skip=tied)
    kv_elems_per_token = facts.kv_elems_per_token
    layers = tuple(
        LayerSpec(
            index=i,
            prefix=f"{container}.{i}",
            tensors=tuple(group.tensors),
            nbytes=group.sizes.nbytes,
            stored_bytes=group.sizes.stored,
            converted_bytes=group.sizes.converted,
            kv_elems_per_token=kv_elems_per_token,
            sliding_window=windows[i],
        )
        for i, group in enumerate(layer_groups)
    )
    non_mapped = tuple(
        PartSpec(
            name=name,
            tensors=tuple(group.tensors),
            nbytes=group.sizes.nbytes,
            stored_bytes=group.sizes.stored,
            converted_bytes=group.sizes.converted,
            sub_model=group.sub_model,
        )
        for name, group in parts.items()
    )
    return ModelSpec(
        checkpoint=checkpoint,
        facts=facts,
        config=config,
        target_dtype=target_dtype,
        activation_dtype=_activation_dtype(checkpoint, target_dtype),
        layers=layers,
        non_mapped=non_mapped,
        tied=tied,
        has_lm_head=_has_lm_head(facts, checkpoint, non_mapped, tied),
    )


def _layers_field(text: _Fields) -> str:
    """The dotted name of the layer-count field this config uses (for error messages)."""
    names = _ALIASES["num_hidden_layers"]
    used = next((key for key in names if text.values.get(key) is not None), names[0])
    return text.prefix + used


@dataclass(frozen=True, slots=True)
class _Grouping:
    """Where each tensor goes: a layer, a tower part, or the part its path names."""

    container: str
    layers: Sequence[list[str]]  # the tensors of each layer
    towers: Mapping[str, tuple[str, str | None]]
    modality: str
    target_dtype: str | None
    quantized: bool

    def run(
        self, checkpoint: Checkpoint, *, skip: Mapping[str, str]
    ) -> tuple[list[_Group], dict[str, _Group]]:
        layer_groups = [_Group(names) for names in self.layers]  # never tied: ties lie outside
        in_layers = set(chain.from_iterable(self.layers))
        container_path = self.container.split(".")
        parts: dict[str, _Group] = {}
        rest = [n for n in checkpoint.tensors if n not in in_layers and n not in skip]
        for name in rest:
            if name in self.towers:
                root, sub_model = self.towers[name]
                group = parts.setdefault(root, _Group(sub_model=sub_model or self.modality))
            else:
                group = parts.setdefault(_part_name(name, container_path), _Group())
            group.tensors.append(name)
        for group in (*layer_groups, *parts.values()):
            group.sizes = _Sizes.of(
                group.tensors, checkpoint.tensors, self.target_dtype, self.quantized
            )
        return layer_groups, parts


def _has_lm_head(
    facts: ModelFacts,
    checkpoint: Checkpoint,
    non_mapped: Iterable[PartSpec],
    tied: Mapping[str, str],
) -> bool:
    """Decoders always produce logits; encoders only with a vocabulary-sized head tensor
    (other than the input word embedding)."""
    if facts.kv_kind != "none" or tied:
        return True
    for part in non_mapped:
        for name in part.tensors:
            head = part.sub_model is None and not name.endswith(_EMBED_SUFFIXES)
            if head and facts.vocab_size in checkpoint.tensors[name].shape:
                return True
    return False


def inspect(path: str | Path, *, target_dtype: str | None = None) -> ModelSpec:
    """Open the checkpoint at ``path``, read its ``config.json`` and build the spec."""
    checkpoint = open_checkpoint(path)
    return build_spec(checkpoint, load_config(checkpoint.root), target_dtype=target_dtype)


# --------------------------------------------------------------------------- estimators


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
