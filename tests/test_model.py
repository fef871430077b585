"""Tests for ``streamload.model``: grouping, sizes, architecture facts and estimators.

Checkpoints come from two sources: tiny real ``transformers`` models written with
``save_pretrained`` (real tensor names) and sparse files from ``streamload.testing._shapes``
(real names and published sizes of large models, no data on disk).
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
)

import streamload.model
from streamload.checkpoint import Checkpoint, TensorEntry, open_checkpoint
from streamload.errors import ConfigError
from streamload.model import (
    LayerSpec,
    ModelSpec,
    VisionFacts,
    activation_bytes,
    build_spec,
    inspect,
    is_quantized,
    layer_kv_bytes,
    load_config,
    model_facts,
    placed_dtype,
)
from streamload.model._spec import _FIRST_INDEX, _indexed
from streamload.testing import TensorShape, write_sharded
from streamload.testing import _shapes as shapes


def write_checkpoint(
    root: Path, tensors: shapes.Shapes, config: Mapping[str, Any], *, num_shards: int = 1
) -> Path:
    """A sparse checkpoint directory for ``tensors`` with ``config`` as its config.json."""
    described = {name: TensorShape(dtype, shape) for name, (dtype, shape) in tensors.items()}
    return write_sharded(root, described, num_shards=num_shards, sparse=True, config=dict(config))


def sparse_spec(
    root: Path,
    tensors: shapes.Shapes,
    config: Mapping[str, Any],
    *,
    target_dtype: str | None = None,
    num_shards: int = 1,
) -> ModelSpec:
    return inspect(
        write_checkpoint(root, tensors, config, num_shards=num_shards), target_dtype=target_dtype
    )


# Text dimensions of every tiny real model: head_dim 8, GQA 4:2.
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
BERT = {key: value for key, value in TEXT.items() if key != "num_key_value_heads"}
MLA = {
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "first_k_dense_replace": 1,
    "n_shared_experts": 1,
}
VISION_TEXT = {**TEXT, "vocab_size": 300}
QWEN2_VL = {
    "text_config": {
        "model_type": "qwen2_vl_text",
        **VISION_TEXT,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "vision_config": {
        "depth": 2,
        "embed_dim": 16,
        "hidden_size": 32,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
    },
    "image_token_id": 299,
    "video_token_id": 298,
    "vision_start_token_id": 297,
    "vision_end_token_id": 296,
}
CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def save_tiny(root: Path, model_type: str, fields: Mapping[str, Any]) -> Path:
    """Build a randomly initialised tiny ``transformers`` model and ``save_pretrained`` it."""
    config = AutoConfig.for_model(model_type, **fields)
    if model_type == "bert":
        auto: Any = AutoModelForMaskedLM
    elif hasattr(config, "vision_config"):
        auto = AutoModelForImageTextToText
    else:
        auto = AutoModelForCausalLM
    torch.manual_seed(0)
    auto.from_config(config).save_pretrained(root)
    return root


@dataclass(frozen=True)
class RealCase:
    """What a tiny real checkpoint of one architecture must split into."""

    model_type: str
    fields: Mapping[str, Any]
    per_layer: tuple[int, ...]  # tensors in each layer
    parts: Set[tuple[str, str | None]]  # (non-mapped part, sub_model)
    kv_elems: int  # K+V elements per token in each layer
    windows: tuple[int | None, ...] = (None, None, None)


HEADED = {("lm_head", None), ("model.embed_tokens", None), ("model.norm", None)}
TIED = {("model.embed_tokens", None), ("model.norm", None)}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
REAL_CASES = [
    RealCase("llama", TEXT, (9, 9, 9), HEADED, 32),
    RealCase("mistral", {**TEXT, "sliding_window": 16}, (9, 9, 9), HEADED, 32, (16, 16, 16)),
    RealCase("mixtral", {**TEXT, "num_local_experts": 4, "num_experts_per_tok": 2}, (19,) * 3,
             HEADED, 32),
    RealCase("qwen2", {**TEXT, "tie_word_embeddings": True}, (12, 12, 12), TIED, 32),
    RealCase("qwen2_moe", {**TEXT, **MOE, "shared_expert_intermediate_size": 32}, (26,) * 3,
             HEADED, 32),
    RealCase("qwen3", {**TEXT, "head_dim": 8}, (11, 11, 11), HEADED, 32),
    RealCase("qwen3_moe", {**TEXT, **MOE, "head_dim": 8}, (21, 21, 21), HEADED, 32),
    RealCase("gemma", {**TEXT, "head_dim": 8}, (9, 9, 9), TIED, 32),
    RealCase("gemma2", {**TEXT, "head_dim": 8, "sliding_window": 16}, (11, 11, 11), TIED, 32,
             (16, None, 16)),
    RealCase("gemma3_text", {**TEXT, "head_dim": 8, "sliding_window": 16,
             "num_hidden_layers": 7}, (13,) * 7, TIED, 32, (16, 16, 16, 16, 16, None, 16)),
    RealCase("phi3", {**TEXT, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
             (6, 6, 6), HEADED, 32),
    RealCase("gpt2", {"n_layer": 3, "n_embd": 32, "n_head": 4, "vocab_size": 128,
             "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}, (12, 12, 12),
             {("transformer.wte", None), ("transformer.wpe", None), ("transformer.ln_f", None)},
             64),
    RealCase("gpt_neox", {**TEXT, "num_key_value_heads": None}, (12, 12, 12),
             {("gpt_neox.embed_in", None), ("gpt_neox.final_layer_norm", None),
              ("embed_out", None)}, 64),
    RealCase("falcon", {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
             "vocab_size": 128}, (6, 6, 6),
             {("transformer.word_embeddings", None), ("transformer.ln_f", None)}, 16),
    RealCase("deepseek_v2", {**TEXT, **MLA}, (12, 25, 25), HEADED, 16 + 4),
    RealCase("deepseek_v3", {**TEXT, **MLA, "n_group": 1, "topk_group": 1}, (12, 26, 26),
             HEADED, 16 + 4),
    RealCase("bert", BERT, (16, 16, 16),
             {("bert.embeddings", None), ("cls", None)}, 0),
    RealCase("llava", {"text_config": {"model_type": "llama", **VISION_TEXT},
             "vision_config": CLIP, "image_token_index": 299}, (9, 9, 9),
             {("language_model.lm_head", None), ("language_model.model.embed_tokens", None),
              ("language_model.model.norm", None), ("multi_modal_projector", "vision"),
              ("vision_tower", "vision")}, 32),
    RealCase("qwen2_vl", QWEN2_VL, (12, 12, 12), HEADED | {("visual", "vision")}, 32),
    RealCase("gemma3", {"text_config": {"model_type": "gemma3_text", **VISION_TEXT,
             "head_dim": 8, "sliding_window": 16},
             "vision_config": {**CLIP, "model_type": "siglip_vision_model"},
             "mm_tokens_per_image": 4, "image_token_index": 299, "boi_token_index": 297,
             "eoi_token_index": 298}, (13, 13, 13),
             {("language_model.model.embed_tokens", None), ("language_model.model.norm", None),
              ("multi_modal_projector", "vision"), ("vision_tower", "vision")}, 32, (16, 16, 16)),
]  # fmt: skip


@pytest.mark.parametrize("case", REAL_CASES, ids=[case.model_type for case in REAL_CASES])
def test_real_checkpoint_splits_into_layers_and_parts(tmp_path: Path, case: RealCase) -> None:
    """Each architecture's real save_pretrained checkpoint yields its layers, parts, KV and windows,
    and every stored tensor lands in exactly one of them."""
    spec = inspect(save_tiny(tmp_path, case.model_type, case.fields))

    assert case.per_layer == tuple(len(layer.tensors) for layer in spec.layers)
    assert case.parts == {(part.name, part.sub_model) for part in spec.non_mapped}
    kv = tuple(layer.kv_elems_per_token for layer in spec.layers)
    assert (case.kv_elems,) * len(case.per_layer) == kv
    assert case.windows == tuple(layer.sliding_window for layer in spec.layers)
    grouped = [name for layer in spec.layers for name in layer.tensors]
    grouped += [name for part in spec.non_mapped for name in part.tensors]
    assert sorted(spec.checkpoint.tensors) == sorted([*grouped, *spec.tied])


def test_real_llama_sizes_in_target_dtype(tmp_path: Path) -> None:
    """A float32 llama loaded as bf16 costs half its stored bytes, all of them converted."""
    root = save_tiny(tmp_path, "llama", TEXT)

    as_stored = inspect(root)
    as_bf16 = inspect(root, target_dtype="BF16")

    # q, o: 32x32; k, v: 16x32 (2 KV heads x head_dim 8); gate, up, down: 64x32; 2 norms of 32.
    layer_elems = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32 + 2 * 32
    assert (layer_elems * 4, layer_elems * 4, 0) == (
        as_stored.layers[0].nbytes,
        as_stored.layers[0].stored_bytes,
        as_stored.layers[0].converted_bytes,
    )
    assert (layer_elems * 2, layer_elems * 4, layer_elems * 2) == (
        as_bf16.layers[0].nbytes,
        as_bf16.layers[0].stored_bytes,
        as_bf16.layers[0].converted_bytes,
    )
    # embed_tokens and lm_head 128x32, final norm 32.
    assert (2 * 128 * 32 + 32) * 2 == as_bf16.non_mapped_bytes
    assert ("F32", "BF16") == (as_stored.activation_dtype, as_bf16.activation_dtype)
    assert "model.layers.2" == as_bf16.layers[2].prefix


def test_real_qwen2_tied_stores_embedding_once(tmp_path: Path) -> None:
    """A tied qwen2 saves no lm_head: the spec has no head part and no alias to stream."""
    spec = inspect(save_tiny(tmp_path, "qwen2", {**TEXT, "tie_word_embeddings": True}))

    assert spec.facts.tie_word_embeddings
    assert {} == dict(spec.tied)
    assert "lm_head.weight" not in spec.checkpoint.tensors
    assert (128 * 32 + 32) * 4 == spec.non_mapped_bytes


def test_real_bert_has_no_kv_cache(tmp_path: Path) -> None:
    """An encoder charges no KV cache but still has its MLM head's logits."""
    spec = inspect(save_tiny(tmp_path, "bert", BERT))

    assert "none" == spec.facts.kv_kind
    assert 0 == layer_kv_bytes(spec.layers[0], tokens=4096, batch=8, itemsize=2)
    assert spec.has_lm_head
    assert "bert.encoder.layer.1" == spec.layers[1].prefix


# model_type, (layers, hidden, heads, KV heads, head_dim, kv kind, K+V elems, mlp width, tie,
# sliding window) from transformers' own default config of that type.
DEFAULT_FACTS: list[tuple[str, tuple[Any, ...]]] = [
    ("llama", (32, 4096, 32, 32, 128, "standard", 32 * 256, 11008, False, None)),
    ("mistral", (32, 4096, 32, 8, 128, "standard", 8 * 256, 14336, False, 4096)),
    ("mixtral", (32, 4096, 32, 8, 128, "standard", 8 * 256, 14336 * 2, False, None)),
    ("qwen2", (32, 4096, 32, 32, 128, "standard", 32 * 256, 22016, False, None)),
    ("qwen2_moe", (24, 2048, 16, 16, 128, "standard", 16 * 256, 1408 * 4, False, None)),
    ("qwen3", (32, 4096, 32, 32, 128, "standard", 32 * 256, 22016, False, None)),
    ("qwen3_moe", (24, 2048, 32, 4, 64, "standard", 4 * 128, 768 * 8, False, None)),
    ("gemma", (28, 3072, 16, 16, 256, "standard", 16 * 512, 24576, True, None)),
    ("gemma2", (26, 2304, 8, 4, 256, "standard", 4 * 512, 9216, True, 4096)),
    ("gemma3_text", (26, 2304, 8, 4, 256, "standard", 4 * 512, 9216, True, 4096)),
    ("gemma3", (26, 2304, 8, 4, 256, "standard", 4 * 512, 9216, True, 4096)),
    ("phi3", (32, 3072, 32, 32, 96, "standard", 32 * 192, 8192, False, None)),
    ("gpt2", (12, 768, 12, 12, 64, "standard", 12 * 128, 4 * 768, True, None)),
    ("gpt_neox", (44, 6144, 64, 64, 96, "standard", 64 * 192, 24576, False, None)),
    ("falcon", (32, 4544, 71, 1, 64, "standard", 1 * 128, 18176, True, None)),
    ("deepseek_v2", (32, 4096, 32, 32, 192, "mla", 512 + 64, 11008, False, None)),
    ("deepseek_v3", (61, 7168, 128, 128, 192, "mla", 512 + 64, 18432, False, None)),
    ("bert", (12, 768, 12, 12, 64, "none", 0, 3072, True, None)),
    ("llava", (32, 4096, 32, 32, 128, "standard", 32 * 256, 11008, False, None)),
    ("qwen2_vl", (80, 8192, 64, 8, 128, "standard", 8 * 256, 29568, False, None)),
]


@pytest.mark.parametrize(
    ("model_type", "expected"), DEFAULT_FACTS, ids=[c[0] for c in DEFAULT_FACTS]
)
def test_facts_read_transformers_field_names(model_type: str, expected: tuple[Any, ...]) -> None:
    """The facts of each architecture's default transformers config match its published sizes."""
    facts = model_facts(AutoConfig.for_model(model_type).to_dict())

    actual = (
        facts.num_hidden_layers,
        facts.hidden_size,
        facts.num_attention_heads,
        facts.num_key_value_heads,
        facts.head_dim,
        facts.kv_kind,
        facts.kv_elems_per_token,
        facts.mlp_width,
        facts.tie_word_embeddings,
        facts.sliding_window,
    )
    assert expected == actual


def test_vision_facts_from_transformers_configs() -> None:
    """llava's CLIP tower is fixed-size with a class token; qwen2_vl's is native-resolution."""
    llava = model_facts(AutoConfig.for_model("llava").to_dict()).vision
    qwen = model_facts(AutoConfig.for_model("qwen2_vl").to_dict()).vision

    assert VisionFacts("fixed", 336, 14, 1024, 16, class_token=True) == llava
    assert VisionFacts("dynamic", 1024, 14, 1280, 16, spatial_merge_size=2) == qwen
    assert (336 // 14) ** 2 + 1 == llava.num_patches((4000, 3000))
    # Each side rounds up to a multiple of patch x merge = 28 px: 1024 -> 37 x 2, 768 -> 28 x 2.
    assert (37 * 2) * (28 * 2) == qwen.num_patches((1024, 768))


def test_llava_hub_config_with_diffed_text_config() -> None:
    """llava-1.5's hub config omits text fields equal to LlamaConfig's defaults; they are filled."""
    config = {
        "model_type": "llava",
        "text_config": {
            "model_type": "llama",
            "vocab_size": 32064,
            "max_position_embeddings": 4096,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "image_size": 336,
            "num_attention_heads": 16,
            "patch_size": 14,
        },
    }
    facts = model_facts(config)

    assert (32, 4096, 32, 32064, False) == (
        facts.num_hidden_layers,
        facts.hidden_size,
        facts.num_key_value_heads,
        facts.vocab_size,
        facts.tie_word_embeddings,
    )


# ----------------------------------------------------------------------------- sparse, large


def llama_layer_elems(config: Mapping[str, Any]) -> int:
    hidden: int = config["hidden_size"]
    inter: int = config["intermediate_size"]
    kv: int = config["num_key_value_heads"] * config["head_dim"]
    return 2 * hidden * hidden + 2 * kv * hidden + 3 * inter * hidden + 2 * hidden


def test_llama_3_8b_sizes_across_shards(tmp_path: Path) -> None:
    """Llama 3 8B in 4 shards: 32 layers of 436,224,000 bf16 bytes, 16.06 GB in all, and a
    layer split across two shards is still one layer."""
    spec = sparse_spec(
        tmp_path, shapes.llama_shapes(shapes.LLAMA_3_8B), shapes.LLAMA_3_8B, num_shards=4
    )

    # q, o 4096x4096; k, v 1024x4096; gate, up, down 14336x4096; two norms; x 2 bytes.
    assert (4096 * 8192 + 1024 * 8192 + 3 * 14336 * 4096 + 2 * 4096) * 2 == 436_224_000
    assert (436_224_000,) * 32 == tuple(layer.nbytes for layer in spec.layers)
    # embed_tokens and lm_head 128256x4096, final norm 4096.
    assert (2 * 128256 * 4096 + 4096) * 2 == spec.non_mapped_bytes
    assert 16_060_522_496 == spec.total_bytes
    files = {
        i: {spec.checkpoint.tensors[name].path for name in layer.tensors}
        for i, layer in enumerate(spec.layers)
    }
    assert 3 == sum(1 for paths in files.values() if len(paths) == 2)


@pytest.mark.parametrize(
    ("preset", "layers"),
    [(shapes.LLAMA_3_1_70B, 80), (shapes.LLAMA_3_1_405B, 126)],
    ids=["70b", "405b"],
)
def test_llama_3_1_presets(tmp_path: Path, preset: Mapping[str, Any], layers: int) -> None:
    """The 70B and 405B presets give their layer count and bf16 bytes from real dimensions."""
    spec = sparse_spec(tmp_path, shapes.llama_shapes(preset), preset, num_shards=8)

    per_layer = llama_layer_elems(preset) * 2
    embeddings = 2 * 128256 * preset["hidden_size"] * 2
    assert layers == len(spec.layers)
    assert layers * per_layer + embeddings + preset["hidden_size"] * 2 == spec.total_bytes


def test_f32_checkpoint_planned_as_bf16(tmp_path: Path) -> None:
    """Float32 tensors cost half as bf16 and count as converted; as stored nothing converts."""
    config = shapes.tiny_llama_config()
    tensors = shapes.llama_shapes(config, "F32")
    root = write_checkpoint(tmp_path, tensors, config)

    as_stored, as_bf16 = inspect(root), inspect(root, target_dtype="BF16")

    elems = llama_layer_elems(config)
    assert (elems * 4, 0) == (as_stored.layers[0].nbytes, as_stored.layers[0].converted_bytes)
    assert (elems * 2, elems * 2) == (as_bf16.layers[0].nbytes, as_bf16.layers[0].converted_bytes)
    assert as_stored.total_bytes == 2 * as_bf16.total_bytes


def test_packed_int_weights_and_scales_keep_their_size(tmp_path: Path) -> None:
    """GPTQ-style I32 packed weights, zero points, g_idx and F16 scales are never converted;
    only the float16 norms change dtype (same size)."""
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    config = shapes.tiny_llama_config(
        num_hidden_layers=1, intermediate_size=128, quantization_config=gptq
    )
    tensors: shapes.Shapes = {"model.embed_tokens.weight": ("F16", (256, 64))}
    layer = "model.layers.0."
    for name, (inputs, outputs) in {
        "mlp.down_proj": (128, 64),
        "mlp.gate_proj": (64, 128),
        "mlp.up_proj": (64, 128),
        "self_attn.q_proj": (64, 64),
        "self_attn.k_proj": (64, 32),
        "self_attn.v_proj": (64, 32),
        "self_attn.o_proj": (64, 64),
    }.items():
        tensors[f"{layer}{name}.qweight"] = ("I32", (inputs // 8, outputs))
        tensors[f"{layer}{name}.qzeros"] = ("I32", (inputs // 32, outputs // 8))
        tensors[f"{layer}{name}.scales"] = ("F16", (inputs // 32, outputs))
        tensors[f"{layer}{name}.g_idx"] = ("I32", (inputs,))
    tensors[f"{layer}input_layernorm.weight"] = ("F16", (64,))
    tensors[f"{layer}post_attention_layernorm.weight"] = ("F16", (64,))
    tensors["model.norm.weight"] = ("F16", (64,))
    tensors["lm_head.weight"] = ("F16", (256, 64))

    spec = sparse_spec(tmp_path, tensors, config, target_dtype="BF16")

    stored = spec.layers[0].stored_bytes
    assert (stored, 2 * 64 * 2) == (spec.layers[0].nbytes, spec.layers[0].converted_bytes)
    assert "F16" == spec.placed_dtype(f"{layer}mlp.up_proj.scales")
    assert "BF16" == spec.placed_dtype(f"{layer}input_layernorm.weight")


def test_scales_convert_without_a_quantization_config() -> None:
    """Only a config with quantization_config keeps float scales; elsewhere they are floats."""
    entry = TensorEntry("model.layers.0.mlp.up_proj.scales", Path("x"), "F32", (4, 8), 0, 128)

    assert ("F32", "BF16") == (
        placed_dtype(entry, "BF16", quantized=True),
        placed_dtype(entry, "BF16", quantized=False),
    )
    assert is_quantized({"text_config": {"quantization_config": {"quant_method": "awq"}}})


def test_deepseek_v3_fp8_mla_and_mtp(tmp_path: Path) -> None:
    """FP8 weights and their F32 block scales keep their size; the MTP layer (index 3 of 3) is
    a non-mapped part; each layer caches the MLA latent plus the rope key."""
    config = shapes.deepseek_v3_config(quantization_config=shapes.fp8_quantization_config())
    tensors = shapes.deepseek_v3_shapes(config, fp8=True)
    spec = sparse_spec(tmp_path, tensors, config, target_dtype="BF16")

    assert 3 == len(spec.layers)
    mtp = {part.name: part for part in spec.non_mapped}["model.layers.3"]
    assert sum(1 for name in tensors if name.startswith("model.layers.3.")) == len(mtp.tensors)
    assert (32 + 8,) * 3 == tuple(layer.kv_elems_per_token for layer in spec.layers)
    # tokens x batch x itemsize x (kv_lora_rank + qk_rope_head_dim)
    assert 100 * 2 * 2 * 40 == layer_kv_bytes(spec.layers[0], tokens=100, batch=2, itemsize=2)
    stored = sum(
        TensorShape(dtype, shape).nbytes
        for name, (dtype, shape) in tensors.items()
        if name.startswith("model.layers.1.")
    )
    # Only the router's F32 e_score_correction_bias (4 experts) becomes bf16.
    assert (stored - 4 * 2, 4 * 2) == (spec.layers[1].nbytes, spec.layers[1].converted_bytes)
    assert "BF16" == spec.activation_dtype


def test_tied_head_stored_twice_is_aliased(tmp_path: Path) -> None:
    """With tie_word_embeddings and both tensors stored, lm_head is an alias: no bytes, no part."""
    config = shapes.tiny_llama_config(tie_word_embeddings=True)
    tensors = shapes.llama_shapes(config)
    tensors["lm_head.weight"] = ("BF16", (256, 64))

    spec = sparse_spec(tmp_path, tensors, config)

    assert {"lm_head.weight": "model.embed_tokens.weight"} == dict(spec.tied)
    assert ["model.embed_tokens", "model.norm"] == [part.name for part in spec.non_mapped]
    assert (256 * 64 + 64) * 2 == spec.non_mapped_bytes


def test_untied_head_stored_twice_is_its_own_part(tmp_path: Path) -> None:
    """Without tying, a stored lm_head is streamed and counted."""
    config = shapes.tiny_llama_config()
    spec = sparse_spec(tmp_path, shapes.llama_shapes(config), config)

    assert {} == dict(spec.tied)
    assert (2 * 256 * 64 + 64) * 2 == spec.non_mapped_bytes


def test_gpt2_hub_names_tie_by_default(tmp_path: Path) -> None:
    """The hub's unprefixed gpt2 names group as h.N, wte, wpe, ln_f; a config without
    tie_word_embeddings ties by gpt2's default."""
    config = shapes.gpt2_config()
    del config["tie_word_embeddings"]
    spec = sparse_spec(tmp_path, shapes.gpt2_shapes(config, lm_head=True), config)

    assert ("h.0", "h.1") == tuple(layer.prefix for layer in spec.layers)
    assert ["wte", "wpe", "ln_f"] == [part.name for part in spec.non_mapped]
    assert {"lm_head.weight": "wte.weight"} == dict(spec.tied)


def test_bert_without_head_has_no_logits(tmp_path: Path) -> None:
    """A headless encoder charges no vocabulary logits; the MLM head brings them back."""
    config = shapes.bert_config()
    headless = sparse_spec(tmp_path / "a", shapes.bert_shapes(config, mlm_head=False), config)
    masked_lm = sparse_spec(tmp_path / "b", shapes.bert_shapes(config), config)

    kwargs: dict[str, Any] = {"max_seq_len": 128, "max_batch_size": 1, "chunk": 1024}
    assert 0 == activation_bytes(headless, **kwargs).non_mapped
    # batch x rows x vocab x 4
    assert 1 * 128 * 1000 * 4 == activation_bytes(masked_lm, **kwargs).non_mapped
    assert ["bert.embeddings", "bert.pooler"] == [part.name for part in headless.non_mapped]


@pytest.mark.parametrize("legacy_names", [False, True], ids=["v5-names", "hub-names"])
def test_llava_tower_and_projector_are_vision_parts(tmp_path: Path, legacy_names: bool) -> None:
    """LLaVA's CLIP tower and projector are whole vision parts in both naming schemes; the CLIP
    encoder's own layers are not mistaken for text layers."""
    config = shapes.llava_config()
    tensors = shapes.llava_shapes(config, legacy_names=legacy_names)
    spec = sparse_spec(tmp_path, tensors, config)

    root = "" if legacy_names else "model."
    text = "language_model.model." if legacy_names else "model.language_model."
    head = "language_model.lm_head" if legacy_names else "lm_head"
    expected = {
        f"{root}vision_tower": "vision",
        f"{root}multi_modal_projector": "vision",
        f"{text}embed_tokens": None,
        f"{text}norm": None,
        head: None,
    }
    assert expected == {part.name: part.sub_model for part in spec.non_mapped}
    assert 4 == len(spec.layers)
    assert f"{text}layers.3" == spec.layers[3].prefix
    tower = sum(
        TensorShape(d, s).nbytes for n, (d, s) in tensors.items() if ".vision_tower." in f".{n}"
    )
    assert tower == {part.name: part for part in spec.non_mapped}[f"{root}vision_tower"].nbytes


# ----------------------------------------------------------------------------- sliding windows

W = 64
QWEN_SWA = {"sliding_window": W, "max_window_layers": 2}
SLIDING = "sliding_attention"


@pytest.mark.parametrize(
    ("model_type", "fields", "windows"),
    [
        ("mistral", {"sliding_window": W}, (W, W, W, W)),
        ("mistral", {"sliding_window": None}, (None, None, None, None)),
        ("qwen2", {**QWEN_SWA, "use_sliding_window": True}, (None, None, W, W)),
        ("qwen2", {**QWEN_SWA, "use_sliding_window": False}, (None,) * 4),
        ("gemma2", {"sliding_window": W}, (W, None, W, None)),
        ("gemma3_text", {"sliding_window": W, "sliding_window_pattern": 3}, (W, W, None, W)),
        ("gemma3_text", {"sliding_window": W, "layer_types": ["full_attention", SLIDING] * 2},
         (None, W, None, W)),
        ("some_new_decoder", {"sliding_window": W}, (None,) * 4),
        ("some_new_decoder", {"sliding_window": W, "layer_types": [SLIDING] * 4}, (W,) * 4),
    ],
    ids=["mistral", "mistral-off", "qwen2", "qwen2-off", "gemma2", "gemma3-pattern",
         "layer_types", "unknown", "unknown-layer_types"],
)  # fmt: skip
def test_sliding_windows_per_layer(
    tmp_path: Path, model_type: str, fields: dict[str, Any], windows: tuple[int | None, ...]
) -> None:
    """Which layers slide follows layer_types when given, else each architecture's own rule."""
    config = shapes.tiny_llama_config(model_type=model_type, **fields)
    spec = sparse_spec(tmp_path, shapes.llama_shapes(config), config)

    assert windows == tuple(layer.sliding_window for layer in spec.layers)


def test_layer_kv_bytes_caps_sliding_layers() -> None:
    """A sliding layer caches min(tokens, window) tokens unless the window is not applied."""
    layer = LayerSpec(
        0, "model.layers.0", (), 0, 0, 0, kv_elems_per_token=2048, sliding_window=4096
    )

    # kv_elems x tokens x batch x itemsize
    assert 2048 * 4096 * 2 * 2 == layer_kv_bytes(layer, tokens=32768, batch=2, itemsize=2)
    assert 2048 * 32768 * 2 * 2 == layer_kv_bytes(
        layer, tokens=32768, batch=2, itemsize=2, apply_window=False
    )
    assert 2048 * 1000 * 2 * 2 == layer_kv_bytes(layer, tokens=1000, batch=2, itemsize=2)


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize(
    ("seq", "batch", "mapped"),
    [
        # scores win: batch x heads x min(seq, chunk) x seq x 4 = 2 x 32 x 1024 x 4096 x 4
        (4096, 2, 2 * 32 * 1024 * 4096 * 4),
        # MLP wins: batch x seq x intermediate x 2 bytes x 2 = 1 x 128 x 14336 x 2 x 2
        (128, 1, 1 * 128 * 14336 * 2 * 2),
    ],
    ids=["scores", "mlp"],
)
def test_llama_activation_arithmetic(tmp_path: Path, seq: int, batch: int, mapped: int) -> None:
    """Llama 3 8B's activations match the docstring formulas worked by hand (chunk 1024)."""
    preset = shapes.LLAMA_3_8B
    spec = sparse_spec(tmp_path, shapes.llama_shapes(preset), preset)

    actual = activation_bytes(spec, max_seq_len=seq, max_batch_size=batch, chunk=1024)

    # logits: batch x min(seq, chunk) x vocab x 4
    assert (mapped, batch * min(seq, 1024) * 128256 * 4) == (actual.mapped, actual.non_mapped)


def test_moe_activation_uses_routed_width(tmp_path: Path) -> None:
    """Mixtral's MLP term is expert width x experts per token (96 x 2)."""
    config = shapes.mixtral_config()
    spec = sparse_spec(tmp_path, shapes.mixtral_shapes(config), config)

    actual = activation_bytes(spec, max_seq_len=16, max_batch_size=1, chunk=1024)

    # MLP: 1 x 16 x (96 x 2) x 2 bytes x 2 beats scores: 1 x 4 x 16 x 16 x 4
    assert 16 * 192 * 2 * 2 == actual.mapped
    assert (W,) * 2 == tuple(layer.sliding_window for layer in spec.layers)


def test_vision_activation_adds_tower_scores(tmp_path: Path) -> None:
    """LLaVA's primary device holds logits plus the tower's attention scores for every image."""
    config = shapes.llava_config()
    spec = sparse_spec(tmp_path, shapes.llava_shapes(config), config)

    actual = activation_bytes(spec, max_seq_len=64, max_batch_size=1, chunk=1024, num_images=2)

    patches = (32 // 8) ** 2 + 1  # 4 x 4 patches and the class token
    logits = 1 * 64 * 256 * 4
    tower = 2 * 1 * 4 * patches * patches * 4  # images x batch x heads x P^2 x 4
    assert logits + tower == actual.non_mapped


def test_dynamic_vision_activation_follows_image_shape(tmp_path: Path) -> None:
    """A native-resolution tower's estimate grows with the image shape asked for."""
    spec = inspect(save_tiny(tmp_path, "qwen2_vl", QWEN2_VL))
    assert spec.facts.vision is not None

    small = activation_bytes(spec, max_seq_len=8, max_batch_size=1, chunk=8, image_shape=(56, 56))
    large = activation_bytes(spec, max_seq_len=8, max_batch_size=1, chunk=8, image_shape=(560, 560))

    logits = 8 * 300 * 4
    # (56 / 28 x 2)^2 = 16 patches, (560 / 28 x 2)^2 = 1600; x 2 heads x 4 bytes
    assert (logits + 2 * 16**2 * 4, logits + 2 * 1600**2 * 4) == (
        small.non_mapped,
        large.non_mapped,
    )


def test_activation_dtype_is_dominant_stored_float(tmp_path: Path) -> None:
    """Without a target, activations take the float dtype holding the most stored bytes."""
    config = shapes.tiny_llama_config()
    tensors = shapes.llama_shapes(config, "F16")
    tensors["model.norm.weight"] = ("F32", (64,))

    assert "F16" == sparse_spec(tmp_path, tensors, config).activation_dtype


# ----------------------------------------------------------------------------- config errors


def test_missing_field_names_it_and_the_file(tmp_path: Path) -> None:
    """A config without num_attention_heads fails with a ConfigError naming field and file."""
    config = shapes.tiny_llama_config()
    del config["num_attention_heads"]
    root = write_checkpoint(tmp_path, shapes.llama_shapes(shapes.tiny_llama_config()), config)

    with pytest.raises(ConfigError) as caught:
        inspect(root)

    assert ("num_attention_heads", root / "config.json") == (caught.value.field, caught.value.path)
    assert "num_attention_heads" in str(caught.value)


def test_missing_nested_text_field_is_dotted() -> None:
    """A field missing from text_config is reported with its text_config. prefix."""
    text = {k: v for k, v in TEXT.items() if k != "hidden_size"}
    config = {"model_type": "llava", "text_config": {"model_type": "mistral", **text}}

    with pytest.raises(ConfigError) as caught:
        model_facts(config)

    assert "text_config.hidden_size" == caught.value.field


def test_generic_decoder_defaults_kv_heads_and_head_dim() -> None:
    """An unknown decoder reads the three generic fields; KV heads and head_dim get defaults."""
    facts = model_facts(
        {
            "model_type": "acme",
            "num_hidden_layers": 2,
            "hidden_size": 96,
            "num_attention_heads": 3,
            "vocab_size": 50,
        }
    )

    assert (3, 32, 3 * 64, "standard") == (
        facts.num_key_value_heads,
        facts.head_dim,
        facts.kv_elems_per_token,
        facts.kv_kind,
    )


def test_falcon_kv_head_variants() -> None:
    """Falcon: multi-query caches one head; the new decoder architecture its n_head_kv groups."""
    base = {"model_type": "falcon", "n_layer": 2, "hidden_size": 64, "n_head": 4, "vocab_size": 8}

    assert 1 == model_facts(base).num_key_value_heads
    assert 4 == model_facts({**base, "multi_query": False}).num_key_value_heads
    new = {**base, "new_decoder_architecture": True, "n_head_kv": 2}
    assert 2 == model_facts(new).num_key_value_heads


def test_checkpoint_with_fewer_layers_than_config(tmp_path: Path) -> None:
    """num_hidden_layers beyond what the checkpoint holds is a ConfigError naming that field."""
    tensors = shapes.llama_shapes(shapes.tiny_llama_config())
    config = shapes.tiny_llama_config(num_hidden_layers=5)

    with pytest.raises(ConfigError) as caught:
        sparse_spec(tmp_path, tensors, config)

    assert "num_hidden_layers" == caught.value.field
    assert "model.layers" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "not found"), ("{oops", "not valid JSON"), ("[1, 2]", "JSON object")],
    ids=["missing", "invalid", "not-an-object"],
)
def test_load_config_errors_name_the_file(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    """A missing, malformed or non-object config.json is a ConfigError naming the file."""
    if content is not None:
        (tmp_path / "config.json").write_text(content, encoding="utf-8")

    with pytest.raises(ConfigError, match=problem) as caught:
        load_config(tmp_path)

    assert tmp_path / "config.json" == caught.value.path


def test_build_spec_from_an_open_checkpoint(tmp_path: Path) -> None:
    """build_spec works on an already opened checkpoint and a config mapping, and sizes the
    same as inspect."""
    config = shapes.tiny_llama_config()
    root = write_checkpoint(tmp_path, shapes.llama_shapes(config), config)

    spec = build_spec(
        open_checkpoint(root), json.loads((root / "config.json").read_text()), target_dtype="F32"
    )

    assert inspect(root, target_dtype="F32").total_bytes == spec.total_bytes
    assert 2 * inspect(root).total_bytes == spec.total_bytes


# ----------------------------------------------------------------------------- grouping edges


def test_tower_names_only_as_whole_inner_segments(tmp_path: Path) -> None:
    """Only a whole path segment before the last names a tower: ``model.extra.visual`` (last
    segment) and ``model.visual_adapter`` are text parts, ``model.visual.proj`` a vision part."""
    config = shapes.tiny_llama_config()
    tensors = shapes.llama_shapes(config)
    tensors["model.extra.visual"] = ("BF16", (4,))
    tensors["model.visual_adapter.weight"] = ("BF16", (8,))
    tensors["model.visual.proj.weight"] = ("BF16", (16,))

    spec = sparse_spec(tmp_path, tensors, config)

    parts = {part.name: (part.sub_model, part.tensors) for part in spec.non_mapped}
    assert (None, ("model.extra.visual",)) == parts["model.extra"]
    assert (None, ("model.visual_adapter.weight",)) == parts["model.visual_adapter"]
    assert ("vision", ("model.visual.proj.weight",)) == parts["model.visual"]
    assert 4 == len(spec.layers)


def test_heavier_of_two_covering_containers_holds_the_layers(tmp_path: Path) -> None:
    """When two containers both cover 0..N-1, the one with more bytes is the layer container;
    the other's tensors go to the part its path names."""
    config = shapes.tiny_llama_config()
    tensors = shapes.llama_shapes(config)
    side = {f"model.adapters.{i}.weight": ("BF16", (4,)) for i in range(4)}
    spec = sparse_spec(tmp_path, {**side, **tensors}, config)

    assert tuple(f"model.layers.{i}" for i in range(4)) == tuple(
        layer.prefix for layer in spec.layers
    )
    adapters = {part.name: part for part in spec.non_mapped}["model.adapters"]
    assert tuple(side) == adapters.tensors
    assert 4 * 4 * 2 == adapters.nbytes


def test_equal_containers_first_in_checkpoint_order_wins(tmp_path: Path) -> None:
    """Two covering containers of equal bytes: the one met first in the checkpoint wins."""
    config = shapes.tiny_llama_config(num_hidden_layers=2)
    tensors: shapes.Shapes = {
        **{f"b.blocks.{i}.weight": ("BF16", (4,)) for i in range(2)},
        **{f"a.blocks.{i}.weight": ("BF16", (4,)) for i in range(2)},
    }

    spec = sparse_spec(tmp_path, tensors, config)

    assert ("b.blocks.0", "b.blocks.1") == tuple(layer.prefix for layer in spec.layers)
    assert ["a"] == [part.name for part in spec.non_mapped]


def test_no_covering_container_lists_what_was_found(tmp_path: Path) -> None:
    """The error names each indexed container and how many distinct indices it holds."""
    config = shapes.tiny_llama_config(num_hidden_layers=3)
    tensors: shapes.Shapes = {
        "model.layers.0.weight": ("BF16", (4,)),
        "model.layers.0.bias": ("BF16", (4,)),
        "model.layers.1.weight": ("BF16", (4,)),
        "extra.5.weight": ("BF16", (4,)),
    }

    with pytest.raises(ConfigError) as caught:
        sparse_spec(tmp_path, tensors, config)

    assert "found: model.layers (2 indices), extra (1 indices)" in str(caught.value)


# Path segments that exercise the first-integer-segment rule: digits (leading zero, Arabic-Indic),
# empty segments, a trailing newline (which ``$`` matches before).
NAME_SEGMENTS = ["model", "layers", "0", "1", "12", "01", "\u0663", "w", "", "3\n", "x\n"]
tensor_names = st.lists(
    st.lists(st.sampled_from(NAME_SEGMENTS), min_size=1, max_size=6).map(".".join),
    max_size=40,
    unique=True,
)


def matched_one_by_one(names: list[str]) -> dict[str, dict[int, list[str]]]:
    found: dict[str, dict[int, list[str]]] = {}
    for name in names:
        match = _FIRST_INDEX.match(name)
        if match is not None:
            found.setdefault(match[1], {}).setdefault(int(match[2]), []).append(name)
    return found


@settings(max_examples=500, deadline=None)
@given(tensor_names)
def test_indexed_agrees_with_matching_every_name(names: list[str]) -> None:
    """Reusing the last match for names that share its ``container.index.`` prefix gives what
    matching each name on its own gives, in the same order."""
    expected = matched_one_by_one(names)

    actual = _indexed(names)

    assert expected == actual
    assert [list(m) for m in expected.values()] == [list(m) for m in actual.values()]
    assert list(expected) == list(actual)


def test_indexed_reuses_a_run_only_after_a_dot() -> None:
    """``layers.1`` at the end of a name starts no run: ``layers.10.w`` is index 10."""
    names = ["model.layers.1", "model.layers.10.w", "model.layers.10.b", "model.layers.1.w"]

    expected = {"model.layers": {1: [names[0], names[3]], 10: names[1:3]}}

    assert expected == _indexed(names)


# dtype -> (shape, bytes) of a small tensor: F16 holds the most bytes, BF16 and F32 tie.
SMALL = {
    "F32": ((4,), 16),
    "F16": ((16,), 32),
    "BF16": ((8,), 16),
    "I8": ((8,), 8),
    "U8": ((8,), 8),
}


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        (("I8", "U8"), "BF16"),
        (("I8", "F32"), "F32"),
        (("F16", "F16"), "F16"),
        (("F32", "F16"), "F16"),
        (("F32", "BF16"), "BF16"),
    ],
    ids=["packed", "one-float", "same-float", "more-f16-bytes", "tie-to-first-code"],
)
def test_activation_dtype_without_target(dtypes: tuple[str, str], expected: str) -> None:
    """No float tensor: BF16; one float code: that code; several: the one with most stored
    bytes, a tie to the code that sorts first."""
    names = ("model.layers.0.a", "model.layers.0.b")
    tensors = {
        name: TensorEntry(name, Path("x"), dtype, SMALL[dtype][0], 0, SMALL[dtype][1])
        for name, dtype in zip(names, dtypes, strict=True)
    }
    checkpoint = Checkpoint(Path("x"), (), tensors)
    config = shapes.tiny_llama_config(num_hidden_layers=1)

    assert expected == build_spec(checkpoint, config, target_dtype=None).activation_dtype


def test_model_imports_only_checkpoint_errors_and_the_stdlib() -> None:
    """DESIGN's layering: ``streamload.model`` reads headers and ``config.json`` only, so it
    imports ``streamload.checkpoint``, ``streamload.errors``, its own submodules and the
    standard library (no torch: ``streamload inspect`` and the planner work without it)."""
    allowed = ("streamload.checkpoint", "streamload.errors", "streamload.model.")
    package = Path(streamload.model.__file__).parent
    foreign: dict[str, set[str]] = {}
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # level 1 is a sibling in the package; deeper relative imports leave it
                prefix = "streamload.model." if node.level == 1 else "." * node.level
                names = [prefix + (node.module or "")]
            else:
                continue
            for name in names:
                if (
                    not name.startswith(allowed)
                    and name.split(".")[0] not in sys.stdlib_module_names
                ):
                    foreign.setdefault(source.name, set()).add(name)
    assert {} == foreign
