"""What differs between architectures beyond the formulas: config key aliases, the defaults of
nested sub-config classes, and per-``model_type`` rules (which layers slide, the KV kind, whether
embeddings are tied by default). Data only, read by ``_config``; a new architecture usually
needs a row here and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

KvKind = Literal["standard", "mla", "none"]


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
