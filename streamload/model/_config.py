"""``config.json`` -> ``ModelFacts``: the architecture facts the estimators and the grouping need.

Reads the text config (``text_config`` for multimodal models, filled with its class defaults)
and the vision config through the aliases and per-architecture rules of ``_archs``; a missing
or malformed field is a ``ConfigError`` naming the file and the dotted field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from streamload.errors import ConfigError
from streamload.model._archs import _ALIASES, _ARCHS, _GENERIC, _SUBCONFIG_DEFAULTS, KvKind, _Arch

CONFIG_NAME = "config.json"


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


def _layers_field(text: _Fields) -> str:
    """The dotted name of the layer-count field this config uses (for error messages)."""
    names = _ALIASES["num_hidden_layers"]
    used = next((key for key in names if text.values.get(key) is not None), names[0])
    return text.prefix + used
