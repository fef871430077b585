"""Tensor names and shapes of real architectures, for sparse checkpoints in tests and benchmarks.

Each ``*_shapes(config, ...)`` function returns ``{name: (dtype code, shape)}`` in Hugging Face
naming and checkpoint order (embeddings, layers by index, final norm, head), for the config
dict its ``*_config(...)`` sibling builds; write them with ``write_sharded`` after wrapping each
value in ``TensorShape``. Presets hold the published sizes of real models; they are read-only
(``dict(LLAMA_3_8B)`` gives a copy to change or to dump as ``config.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeAlias

__all__ = [
    "DEEPSEEK_V3",
    "LLAMA_3_1_70B",
    "LLAMA_3_1_405B",
    "LLAMA_3_8B",
    "Shapes",
    "bert_config",
    "bert_shapes",
    "deepseek_v3_config",
    "deepseek_v3_shapes",
    "fp8_quantization_config",
    "gpt2_config",
    "gpt2_shapes",
    "llama_config",
    "llama_shapes",
    "llava_config",
    "llava_shapes",
    "mixtral_config",
    "mixtral_shapes",
    "tiny_llama_config",
]

Shapes: TypeAlias = dict[str, tuple[str, tuple[int, ...]]]

# FP8 checkpoints (DeepSeek-V3) store one f32 inverse scale per 128 x 128 weight block.
FP8_BLOCK = 128


# --------------------------------------------------------------------------- llama


def llama_config(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int = 8,
    vocab_size: int = 128256,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 131072,
    **extra: Any,
) -> dict[str, Any]:
    """A Llama ``config.json`` dict; ``extra`` adds or overrides fields (``model_type`` too)."""
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16",
    }
    config.update(extra)
    return config


LLAMA_3_8B: Mapping[str, Any] = MappingProxyType(
    llama_config(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=8192,
    )
)
LLAMA_3_1_70B: Mapping[str, Any] = MappingProxyType(
    llama_config(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
    )
)
LLAMA_3_1_405B: Mapping[str, Any] = MappingProxyType(
    llama_config(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128
    )
)


def tiny_llama_config(**overrides: Any) -> dict[str, Any]:
    """A 4-layer Llama small enough to build for real (hidden 64, GQA 4:2, vocab 256)."""
    sizes: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 512,
    }
    sizes.update(overrides)
    return llama_config(**sizes)


def llama_shapes(
    config: Mapping[str, Any],
    dtype: str = "BF16",
    *,
    prefix: str = "model.",
    lm_head: str = "lm_head",
) -> Shapes:
    """Llama-family tensors (also mistral, and qwen2 with ``attention_bias``).

    ``lm_head.weight`` is left out when the config ties embeddings, as ``save_pretrained`` does.
    ``prefix``/``lm_head`` move the text model (``"model.language_model."`` inside llava).
    """
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    shapes: Shapes = {f"{prefix}embed_tokens.weight": (dtype, (vocab, hidden))}
    for i in range(config["num_hidden_layers"]):
        shapes.update(_llama_layer(config, dtype, f"{prefix}layers.{i}."))
    shapes[f"{prefix}norm.weight"] = (dtype, (hidden,))
    if not config.get("tie_word_embeddings", False):
        shapes[f"{lm_head}.weight"] = (dtype, (vocab, hidden))
    return shapes


def _llama_layer(config: Mapping[str, Any], dtype: str, layer: str) -> Shapes:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes: Shapes = {
        f"{layer}input_layernorm.weight": (dtype, (hidden,)),
        f"{layer}mlp.down_proj.weight": (dtype, (hidden, inter)),
        f"{layer}mlp.gate_proj.weight": (dtype, (inter, hidden)),
        f"{layer}mlp.up_proj.weight": (dtype, (inter, hidden)),
        f"{layer}post_attention_layernorm.weight": (dtype, (hidden,)),
    }
    projections = {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
    }
    for name, shape in sorted(projections.items()):
        shapes[f"{layer}self_attn.{name}.weight"] = (dtype, shape)
        if config.get("attention_bias", False):
            shapes[f"{layer}self_attn.{name}.bias"] = (dtype, (shape[0],))
    return shapes


# --------------------------------------------------------------------------- mixtral


def mixtral_config(**overrides: Any) -> dict[str, Any]:
    """A small Mixtral (2 layers, 4 experts, 2 per token, sliding window 64)."""
    config = tiny_llama_config(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_hidden_layers=2,
        intermediate_size=96,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=64,
    )
    config.update(overrides)
    return config


def mixtral_shapes(config: Mapping[str, Any], dtype: str = "BF16") -> Shapes:
    """Mixtral tensors in the hub's per-expert naming (``block_sparse_moe.experts.E.w1``)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    dense = {**config, "intermediate_size": 0}
    shapes: Shapes = {"model.embed_tokens.weight": (dtype, (config["vocab_size"], hidden))}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        moe = f"{layer}block_sparse_moe."
        shapes[f"{moe}gate.weight"] = (dtype, (config["num_local_experts"], hidden))
        for e in range(config["num_local_experts"]):
            shapes[f"{moe}experts.{e}.w1.weight"] = (dtype, (inter, hidden))
            shapes[f"{moe}experts.{e}.w2.weight"] = (dtype, (hidden, inter))
            shapes[f"{moe}experts.{e}.w3.weight"] = (dtype, (inter, hidden))
        attention = _llama_layer(dense, dtype, layer)
        shapes.update({name: v for name, v in attention.items() if ".mlp." not in name})
    shapes["model.norm.weight"] = (dtype, (hidden,))
    shapes["lm_head.weight"] = (dtype, (config["vocab_size"], hidden))
    return shapes


# --------------------------------------------------------------------------- deepseek_v3


def deepseek_v3_config(**overrides: Any) -> dict[str, Any]:
    """A small DeepSeek-V3 (MLA, 1 dense + 2 MoE layers, one MTP layer stored after them)."""
    config: dict[str, Any] = {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 160,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 48,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "vocab_size": 256,
        "num_nextn_predict_layers": 1,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    return config


def fp8_quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` of DeepSeek-V3's released FP8 checkpoint."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }


DEEPSEEK_V3: Mapping[str, Any] = MappingProxyType(
    deepseek_v3_config(
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=129280,
        max_position_embeddings=163840,
        quantization_config=fp8_quantization_config(),
    )
)


def deepseek_v3_shapes(
    config: Mapping[str, Any], dtype: str = "BF16", *, fp8: bool = False
) -> Shapes:
    """DeepSeek-V3 tensors: MLA attention, dense then MoE MLPs, and the MTP layers
    (``model.layers.<num_hidden_layers + k>``) with their own embedding and head.

    With ``fp8`` the projection weights are ``F8_E4M3`` with an ``F32`` ``weight_scale_inv`` per
    128 x 128 block (as the released checkpoint; pair it with ``fp8_quantization_config()`` in
    the config); norms, router, embeddings and head use ``dtype``.
    """
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    layers = config["num_hidden_layers"]
    shapes: Shapes = {"model.embed_tokens.weight": (dtype, (vocab, hidden))}
    for i in range(layers + config.get("num_nextn_predict_layers", 0)):
        layer = f"model.layers.{i}."
        if i >= layers:  # MTP: combines the next token's embedding with the last hidden state
            shapes[f"{layer}embed_tokens.weight"] = (dtype, (vocab, hidden))
            shapes[f"{layer}enorm.weight"] = (dtype, (hidden,))
            shapes[f"{layer}hnorm.weight"] = (dtype, (hidden,))
            shapes.update(_linear(f"{layer}eh_proj", hidden, 2 * hidden, dtype, fp8))
        shapes.update(_mla_attention(config, layer, dtype, fp8))
        shapes.update(
            _deepseek_mlp(config, layer, dtype, fp8, dense=i < config["first_k_dense_replace"])
        )
        if i >= layers:
            shapes[f"{layer}shared_head.norm.weight"] = (dtype, (hidden,))
            shapes[f"{layer}shared_head.head.weight"] = (dtype, (vocab, hidden))
    shapes["model.norm.weight"] = (dtype, (hidden,))
    shapes["lm_head.weight"] = (dtype, (vocab, hidden))
    return shapes


def _linear(name: str, out: int, into: int, dtype: str, fp8: bool) -> Shapes:
    if not fp8:
        return {f"{name}.weight": (dtype, (out, into))}
    blocks = (math.ceil(out / FP8_BLOCK), math.ceil(into / FP8_BLOCK))
    return {f"{name}.weight": ("F8_E4M3", (out, into)), f"{name}.weight_scale_inv": ("F32", blocks)}


def _mla_attention(config: Mapping[str, Any], layer: str, dtype: str, fp8: bool) -> Shapes:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    q_rank, kv_rank = config["q_lora_rank"], config["kv_lora_rank"]
    nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    attn = f"{layer}self_attn."
    shapes: Shapes = {f"{layer}input_layernorm.weight": (dtype, (hidden,))}
    shapes.update(_linear(f"{attn}q_a_proj", q_rank, hidden, dtype, fp8))
    shapes[f"{attn}q_a_layernorm.weight"] = (dtype, (q_rank,))
    shapes.update(_linear(f"{attn}q_b_proj", heads * (nope + rope), q_rank, dtype, fp8))
    shapes.update(_linear(f"{attn}kv_a_proj_with_mqa", kv_rank + rope, hidden, dtype, fp8))
    shapes[f"{attn}kv_a_layernorm.weight"] = (dtype, (kv_rank,))
    shapes.update(_linear(f"{attn}kv_b_proj", heads * (nope + v), kv_rank, dtype, fp8))
    shapes.update(_linear(f"{attn}o_proj", hidden, heads * v, dtype, fp8))
    shapes[f"{layer}post_attention_layernorm.weight"] = (dtype, (hidden,))
    return shapes


def _deepseek_mlp(
    config: Mapping[str, Any], layer: str, dtype: str, fp8: bool, *, dense: bool
) -> Shapes:
    hidden = config["hidden_size"]
    if dense:
        return _gated_mlp(f"{layer}mlp.", hidden, config["intermediate_size"], dtype, fp8)
    experts, width = config["n_routed_experts"], config["moe_intermediate_size"]
    shapes: Shapes = {
        f"{layer}mlp.gate.weight": (dtype, (experts, hidden)),
        f"{layer}mlp.gate.e_score_correction_bias": ("F32", (experts,)),
    }
    for e in range(experts):
        shapes.update(_gated_mlp(f"{layer}mlp.experts.{e}.", hidden, width, dtype, fp8))
    shared = width * config["n_shared_experts"]
    shapes.update(_gated_mlp(f"{layer}mlp.shared_experts.", hidden, shared, dtype, fp8))
    return shapes


def _gated_mlp(prefix: str, hidden: int, width: int, dtype: str, fp8: bool) -> Shapes:
    return {
        **_linear(f"{prefix}down_proj", hidden, width, dtype, fp8),
        **_linear(f"{prefix}gate_proj", width, hidden, dtype, fp8),
        **_linear(f"{prefix}up_proj", width, hidden, dtype, fp8),
    }


# --------------------------------------------------------------------------- gpt2


def gpt2_config(**overrides: Any) -> dict[str, Any]:
    """A small GPT-2 (2 layers, ``n_embd`` 64, 4 heads, vocab 256) in gpt2's field names."""
    config: dict[str, Any] = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "n_inner": None,
        "n_positions": 128,
        "vocab_size": 256,
        "tie_word_embeddings": True,
    }
    config.update(overrides)
    return config


def gpt2_shapes(
    config: Mapping[str, Any], dtype: str = "F32", *, prefix: str = "", lm_head: bool = False
) -> Shapes:
    """GPT-2 tensors (``Conv1D`` weights are ``[in, out]``). The hub's ``gpt2`` stores them
    without a prefix; ``GPT2LMHeadModel.save_pretrained`` writes ``transformer.``. ``lm_head``
    also stores the (tied) head."""
    embd, vocab = config["n_embd"], config["vocab_size"]
    inner = config.get("n_inner") or 4 * embd
    shapes: Shapes = {
        f"{prefix}wte.weight": (dtype, (vocab, embd)),
        f"{prefix}wpe.weight": (dtype, (config["n_positions"], embd)),
    }
    for i in range(config["n_layer"]):
        layer = f"{prefix}h.{i}."
        for name, shape in (
            ("ln_1", (embd,)),
            ("attn.c_attn", (embd, 3 * embd)),
            ("attn.c_proj", (embd, embd)),
            ("ln_2", (embd,)),
            ("mlp.c_fc", (embd, inner)),
            ("mlp.c_proj", (inner, embd)),
        ):
            shapes[f"{layer}{name}.weight"] = (dtype, shape)
            shapes[f"{layer}{name}.bias"] = (dtype, (shape[-1],))
    shapes[f"{prefix}ln_f.weight"] = (dtype, (embd,))
    shapes[f"{prefix}ln_f.bias"] = (dtype, (embd,))
    if lm_head:
        shapes["lm_head.weight"] = (dtype, (vocab, embd))
    return shapes


# --------------------------------------------------------------------------- bert


def bert_config(**overrides: Any) -> dict[str, Any]:
    """A small BERT encoder (2 layers, hidden 64, 4 heads, vocab 1000)."""
    config: dict[str, Any] = {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 128,
        "type_vocab_size": 2,
    }
    config.update(overrides)
    return config


def bert_shapes(config: Mapping[str, Any], dtype: str = "F32", *, mlm_head: bool = True) -> Shapes:
    """BERT tensors (``bert.`` prefix); ``mlm_head`` adds ``cls.predictions`` (decoder tied)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    emb = "bert.embeddings."
    shapes: Shapes = {
        f"{emb}word_embeddings.weight": (dtype, (config["vocab_size"], hidden)),
        f"{emb}position_embeddings.weight": (dtype, (config["max_position_embeddings"], hidden)),
        f"{emb}token_type_embeddings.weight": (dtype, (config["type_vocab_size"], hidden)),
        f"{emb}LayerNorm.weight": (dtype, (hidden,)),
        f"{emb}LayerNorm.bias": (dtype, (hidden,)),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"bert.encoder.layer.{i}."
        for name, shape in (
            ("attention.self.query", (hidden, hidden)),
            ("attention.self.key", (hidden, hidden)),
            ("attention.self.value", (hidden, hidden)),
            ("attention.output.dense", (hidden, hidden)),
            ("attention.output.LayerNorm", (hidden,)),
            ("intermediate.dense", (inter, hidden)),
            ("output.dense", (hidden, inter)),
            ("output.LayerNorm", (hidden,)),
        ):
            shapes[f"{layer}{name}.weight"] = (dtype, shape)
            shapes[f"{layer}{name}.bias"] = (dtype, (shape[0],))
    shapes["bert.pooler.dense.weight"] = (dtype, (hidden, hidden))
    shapes["bert.pooler.dense.bias"] = (dtype, (hidden,))
    if mlm_head:
        shapes["cls.predictions.bias"] = (dtype, (config["vocab_size"],))
        shapes["cls.predictions.transform.dense.weight"] = (dtype, (hidden, hidden))
        shapes["cls.predictions.transform.dense.bias"] = (dtype, (hidden,))
        shapes["cls.predictions.transform.LayerNorm.weight"] = (dtype, (hidden,))
        shapes["cls.predictions.transform.LayerNorm.bias"] = (dtype, (hidden,))
    return shapes


# --------------------------------------------------------------------------- llava


def llava_config(**overrides: Any) -> dict[str, Any]:
    """A small LLaVA: the tiny Llama as ``text_config``, a 2-layer CLIP tower on 32 px images."""
    config: dict[str, Any] = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": tiny_llama_config(),
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
        },
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "image_token_index": 255,
        "tie_word_embeddings": False,
    }
    config.update(overrides)
    return config


def llava_shapes(
    config: Mapping[str, Any], dtype: str = "BF16", *, legacy_names: bool = False
) -> Shapes:
    """LLaVA tensors: CLIP tower, projector, Llama text model.

    transformers >= 4.52 names them ``model.vision_tower``, ``model.multi_modal_projector``,
    ``model.language_model.layers.N`` and ``lm_head``; ``legacy_names`` gives the older
    ``vision_tower``, ``multi_modal_projector``, ``language_model.model.layers.N`` and
    ``language_model.lm_head`` (most hub checkpoints).
    """
    text, vision = config["text_config"], config["vision_config"]
    root = "" if legacy_names else "model."
    shapes = _clip_tower(vision, dtype, f"{root}vision_tower.vision_model.")
    projector = f"{root}multi_modal_projector."
    hidden, vision_hidden = text["hidden_size"], vision["hidden_size"]
    shapes[f"{projector}linear_1.weight"] = (dtype, (hidden, vision_hidden))
    shapes[f"{projector}linear_1.bias"] = (dtype, (hidden,))
    shapes[f"{projector}linear_2.weight"] = (dtype, (hidden, hidden))
    shapes[f"{projector}linear_2.bias"] = (dtype, (hidden,))
    if legacy_names:
        shapes.update(
            llama_shapes(
                text, dtype, prefix="language_model.model.", lm_head="language_model.lm_head"
            )
        )
    else:
        shapes.update(llama_shapes(text, dtype, prefix="model.language_model."))
    return shapes


def _clip_tower(vision: Mapping[str, Any], dtype: str, prefix: str) -> Shapes:
    hidden, inter = vision["hidden_size"], vision["intermediate_size"]
    patch = vision["patch_size"]
    positions = (vision["image_size"] // patch) ** 2 + 1
    shapes: Shapes = {
        f"{prefix}embeddings.class_embedding": (dtype, (hidden,)),
        f"{prefix}embeddings.patch_embedding.weight": (dtype, (hidden, 3, patch, patch)),
        f"{prefix}embeddings.position_embedding.weight": (dtype, (positions, hidden)),
        f"{prefix}pre_layrnorm.weight": (dtype, (hidden,)),
        f"{prefix}pre_layrnorm.bias": (dtype, (hidden,)),
    }
    for i in range(vision["num_hidden_layers"]):
        layer = f"{prefix}encoder.layers.{i}."
        for name, shape in (
            ("layer_norm1", (hidden,)),
            ("self_attn.k_proj", (hidden, hidden)),
            ("self_attn.v_proj", (hidden, hidden)),
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.out_proj", (hidden, hidden)),
            ("layer_norm2", (hidden,)),
            ("mlp.fc1", (inter, hidden)),
            ("mlp.fc2", (hidden, inter)),
        ):
            shapes[f"{layer}{name}.weight"] = (dtype, shape)
            shapes[f"{layer}{name}.bias"] = (dtype, (shape[0],))
    shapes[f"{prefix}post_layernorm.weight"] = (dtype, (hidden,))
    shapes[f"{prefix}post_layernorm.bias"] = (dtype, (hidden,))
    return shapes
