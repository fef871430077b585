"""The planner: budgets, greedy fill, paged-attention modes and fallback, re-plan, and its
invariants under Hypothesis."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from streamload import planner
from streamload.errors import DoesNotFitError, PlanError
from streamload.model import Activations, ModelFacts, ModelSpec, activation_bytes
from streamload.params import (
    ContextSize,
    LoadParams,
    MbAmount,
    PagedAttention,
    Utilization,
    VisionParams,
)
from streamload.planner import DeviceCapacity, Plan, plan, replan
from tests.strategies import (
    NO_ACTIVATIONS,
    GiB,
    MiB,
    activations,
    capacity_lists,
    cpu,
    gpu,
    layer,
    load_params,
    model_specs,
    part,
    spec,
    uniform_spec,
)

# No reserve, so budgets are round numbers in the hand-computed cases below.
BARE = LoadParams(devices=[], reserve_fraction=0.0, reserve_min_bytes=0, host_reserve_bytes=0)


def _try_plan(
    model: ModelSpec, caps: Sequence[DeviceCapacity], params: LoadParams, acts: Activations
) -> Plan | None:
    try:
        return plan(model, caps, params, activations=acts)
    except PlanError:
        return None


def _assert_well_formed(result: Plan, model: ModelSpec, caps: Sequence[DeviceCapacity]) -> None:
    """Every layer once, contiguous runs in device order, rows consistent and within budget."""
    names = [cap.name for cap in caps]
    assert names == [row.device for row in result.devices]
    assert [i for row in result.devices for i in row.layers] == list(range(len(model.layers)))
    order = [names.index(device) for device in result.layer_devices]
    assert sorted(order) == order
    for row in result.devices:
        assert row.layers == tuple(i for i, d in enumerate(result.layer_devices) if d == row.device)
        assert sum(result.layer_kv_bytes[i] for i in row.layers) == row.kv_bytes
        assert row.need_bytes <= row.capacity_bytes
        assert row.holds_non_mapped == (row.device == result.primary)
    assert result.primary == names[0]


def _charged(model: ModelSpec, layers: Sequence[int], cap: DeviceCapacity, policy: str) -> int:
    def cost(nbytes: int, converted: int) -> int:
        return converted if not cap.is_gpu and policy == "mmap" else nbytes

    return sum(cost(model.layers[i].nbytes, model.layers[i].converted_bytes) for i in layers)


def _without_bookkeeping(result: Plan) -> Plan:
    rows = tuple(replace(row, note=None, loaded_bytes=0) for row in result.devices)
    return replace(result, devices=rows, loaded_layers=0)


# --------------------------------------------------------------------------------------------
# The seed's worked case: Llama-3-8B on a 12 GiB and a 24 GiB card

HIDDEN, INTERMEDIATE, VOCAB, KV_WIDTH = 4096, 14336, 128256, 8 * 128
LLAMA3_8B_FACTS = ModelFacts(
    model_type="llama",
    num_hidden_layers=32,
    hidden_size=HIDDEN,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    v_head_dim=128,
    vocab_size=VOCAB,
    intermediate_size=INTERMEDIATE,
    kv_kind="standard",
    kv_lora_rank=None,
    qk_rope_head_dim=None,
    sliding_window=None,
    tie_word_embeddings=False,
    vision=None,
)


def llama3_8b() -> ModelSpec:
    """Llama-3-8B in bf16 with its exact tensor sizes (untied embeddings)."""
    shapes = {
        "self_attn.q_proj.weight": HIDDEN * HIDDEN,
        "self_attn.k_proj.weight": KV_WIDTH * HIDDEN,
        "self_attn.v_proj.weight": KV_WIDTH * HIDDEN,
        "self_attn.o_proj.weight": HIDDEN * HIDDEN,
        "mlp.gate_proj.weight": INTERMEDIATE * HIDDEN,
        "mlp.up_proj.weight": INTERMEDIATE * HIDDEN,
        "mlp.down_proj.weight": HIDDEN * INTERMEDIATE,
        "input_layernorm.weight": HIDDEN,
        "post_attention_layernorm.weight": HIDDEN,
    }
    layers = [
        layer(
            i,
            2 * sum(shapes.values()),
            kv_elems=2 * KV_WIDTH,
            tensors=tuple(f"model.layers.{i}.{name}" for name in shapes),
        )
        for i in range(32)
    ]
    parts = [
        part("model.embed_tokens", 2 * VOCAB * HIDDEN, tensors=("model.embed_tokens.weight",)),
        part("model.norm", 2 * HIDDEN, tensors=("model.norm.weight",)),
        part("lm_head", 2 * VOCAB * HIDDEN, tensors=("lm_head.weight",)),
    ]
    return spec(layers, parts, facts=LLAMA3_8B_FACTS)


# Activations by DESIGN §4.5 for seq 4096, batch 1, chunk 1024 (f32):
#   mapped = attention scores = batch x heads x min(seq, chunk) x seq x 4
#          = 1 x 32 x 1024 x 4096 x 4 = 536,870,912 (512 MiB)
#   non_mapped = logits = batch x min(seq, chunk) x vocab x 4
#              = 1 x 1024 x 128,256 x 4 = 525,336,576 (501 MiB)
LLAMA3_8B_ACTIVATIONS = Activations(mapped=536_870_912, non_mapped=525_336_576)


def test_llama3_8b_splits_21_11_over_12_then_24_gib() -> None:
    """The worked case: 21 layers fit next to the embeddings on 12 GiB, 11 go to the 24 GiB card."""
    # Per layer, elements: q 4096x4096 = 16,777,216; k, v 1024x4096 = 4,194,304 each;
    #   o 16,777,216; gate, up, down 14336x4096 = 58,720,256 each; two norms 4,096 each
    #   = 218,103,808 matrix elements + 8,192 norm elements = 218,112,000; x 2 bytes (bf16)
    #   = 436,224,000 weight bytes.
    # KV per layer = 2 (K, V) x 8 heads x 128 x 4096 tokens x 1 batch x 2 bytes
    #   = 16,777,216 (16 MiB).  Cost per layer = 453,001,216.
    # Non-mapped: embed 128,256 x 4096 x 2 = 1,050,673,152; lm_head the same; norm 8,192
    #   = 2,101,354,496.  Whole model 2,101,354,496 + 32 x 436,224,000 = 16,060,522,496.
    # Reserve: max(0.02 x total, 512 MiB) = 536,870,912 on both cards (2% of 24 GiB is
    #   515,396,075).
    # cuda:0: 12,884,901,888 - 536,870,912 reserve = 12,348,030,976 budget;
    #   - 2,101,354,496 non-mapped - max(536,870,912, 525,336,576) activations
    #   = 9,709,805,568 for layers; / 453,001,216 = 21.43 -> 21 layers (0-20).
    # cuda:1: 25,769,803,776 - 536,870,912 reserve - 536,870,912 activations
    #   = 24,696,061,952 >= 11 x 453,001,216 = 4,983,013,376 -> layers 21-31.
    # (The seed charges 32 x 1024^2 x 2 bytes = 64 MiB of activations and gets 22 + 10.)
    params = LoadParams(devices=[], max_seq_len=4096, max_batch_size=1)
    caps = [gpu("cuda:0", 12 * GiB), gpu("cuda:1", 24 * GiB)]

    result = plan(llama3_8b(), caps, params, activations=LLAMA3_8B_ACTIVATIONS)

    assert ("cuda:0",) * 21 + ("cuda:1",) * 11 == result.layer_devices
    first, second = result.devices
    assert 2_101_354_496 + 21 * 436_224_000 == first.weight_bytes
    assert 21 * 16 * MiB == first.kv_bytes
    assert (536_870_912, 536_870_912) == (first.activation_bytes, first.reserve_bytes)
    assert 9_709_805_568 - 21 * 453_001_216 == first.headroom_bytes  # 196,780,032 < a layer
    assert 11 * 436_224_000 == second.weight_bytes
    assert 11 * 16 * MiB == second.kv_bytes
    assert (16 * MiB,) * 32 == result.layer_kv_bytes
    assert ("BF16", False, None) == (
        result.kv_cache_dtype,
        result.paged_attention,
        result.paged_blocks,
    )


def test_llama3_8b_split_uses_the_model_activation_estimate() -> None:
    """The model estimator gives the figures above for Llama-3-8B, hence the same 21 + 11 split."""
    # mapped = max(scores 536,870,912, MLP 1 x 1024 x 14336 x 2 B x 2 = 58,720,256);
    # non_mapped = logits 525,336,576 (no vision tower).
    params = LoadParams(devices=[], max_seq_len=4096, max_batch_size=1)
    caps = [gpu("cuda:0", 12 * GiB), gpu("cuda:1", 24 * GiB)]

    estimated = activation_bytes(llama3_8b(), max_seq_len=4096, max_batch_size=1, chunk=1024)
    result = plan(llama3_8b(), caps, params)

    assert LLAMA3_8B_ACTIVATIONS == estimated
    assert ("cuda:0",) * 21 + ("cuda:1",) * 11 == result.layer_devices


def test_llama3_8b_fits_on_the_24_gib_card_alone() -> None:
    """With the 24 GiB card first, the whole model lands there and the 12 GiB card stays unused."""
    # 2,101,354,496 + 32 x 453,001,216 + 536,870,912 activations + 536,870,912 reserve
    #   = 17,671,135,232 <= 25,769,803,776.
    params = LoadParams(devices=[], max_seq_len=4096, max_batch_size=1)
    caps = [gpu("cuda:1", 24 * GiB), gpu("cuda:0", 12 * GiB)]

    result = plan(llama3_8b(), caps, params, activations=LLAMA3_8B_ACTIVATIONS)

    assert ("cuda:1",) * 32 == result.layer_devices
    assert 17_671_135_232 == result.devices[0].need_bytes
    idle = result.devices[1]
    assert ((), 0, "unused: every layer is on an earlier device") == (
        idle.layers,
        idle.need_bytes,
        idle.note,
    )


# --------------------------------------------------------------------------------------------
# Budgets


def test_reserve_is_a_fraction_of_total_with_a_minimum() -> None:
    """A busy 80 GiB card reserves 2% of its total, not of its free memory; a small one 512 MiB."""
    params = LoadParams(devices=[])
    model = uniform_spec(2, GiB)
    caps = [gpu("big", 80 * GiB, free=GiB + 2 * GiB), gpu("small", 8 * GiB)]

    result = plan(model, caps, params, activations=NO_ACTIVATIONS)

    assert (int(0.02 * 80 * GiB), 512 * MiB) == tuple(r.reserve_bytes for r in result.devices)
    assert ("big", "small") == result.layer_devices


@pytest.mark.parametrize(
    "caps",
    [
        [cpu(GiB), gpu("sim:0", GiB)],
        [gpu("sim:0", GiB), cpu(GiB), gpu("sim:1", GiB)],
        [gpu("sim:0", GiB), cpu(GiB), cpu(GiB)],
        [gpu("sim:0", GiB), gpu("sim:0", GiB)],
        [],
        [DeviceCapacity("sim:0", True, GiB, -1)],
    ],
    ids=["cpu-first", "cpu-middle", "two-cpus", "repeated-name", "empty", "negative"],
)
def test_malformed_device_lists_are_value_errors(caps: list[DeviceCapacity]) -> None:
    """The CPU only last, at most once; names unique; at least one device; no negative bytes."""
    with pytest.raises(ValueError):
        plan(uniform_spec(1, MiB), caps, BARE, activations=NO_ACTIVATIONS)


def test_primary_too_small_for_non_mapped_parts() -> None:
    """A primary that cannot hold the non-mapped parts and activations is a DoesNotFitError."""
    model = uniform_spec(2, MiB, non_mapped=3 * GiB)
    caps = [gpu("small", 4 * GiB), gpu("large", 40 * GiB)]
    acts = Activations(mapped=GiB, non_mapped=2 * GiB)

    with pytest.raises(DoesNotFitError) as caught:
        plan(model, caps, BARE, activations=acts)

    message = str(caught.value)
    assert "primary device small cannot hold the non-mapped parts" in message
    assert [("small", 4 * GiB, 5 * GiB)] == [
        (row.device, row.capacity, row.need) for row in caught.value.devices
    ]


def test_does_not_fit_lists_every_device_and_the_host_budget() -> None:
    """Layers that fit nowhere name every device's capacity and need, the CPU's host budget too."""
    model = uniform_spec(6, GiB)
    params = replace(BARE, host_reserve_bytes=GiB)
    caps = [gpu("sim:0", 2 * GiB), gpu("sim:1", GiB // 2), cpu(3 * GiB)]

    with pytest.raises(DoesNotFitError) as caught:
        plan(model, caps, params, activations=NO_ACTIVATIONS)

    error = caught.value
    assert "layers 4-5 (2 of 6;" in error.reason
    assert [
        ("sim:0", 2 * GiB, 2 * GiB),
        ("sim:1", GiB // 2, 0),
        ("cpu", 3 * GiB, 3 * GiB),
    ] == [(row.device, row.capacity, row.need) for row in error.devices]
    assert "host budget: available 3.00 GiB - host reserve 1.00 GiB" in str(error)
    for name in ("sim:0", "sim:1", "cpu"):
        assert f"\n  - {name}: capacity" in str(error)


def test_device_fitting_zero_layers_gets_a_note_and_no_charges() -> None:
    """A card too small for one layer plus activations holds nothing, costs nothing, says why."""
    model = uniform_spec(4, GiB)
    acts = Activations(mapped=GiB // 2, non_mapped=0)
    caps = [gpu("sim:0", 3 * GiB), gpu("sim:1", GiB), gpu("sim:2", 8 * GiB)]

    result = plan(model, caps, BARE, activations=acts)

    assert ("sim:0",) * 2 + ("sim:2",) * 2 == result.layer_devices
    skipped = result.device("sim:1")
    assert ((), 0, 0, 0, 0) == (
        skipped.layers,
        skipped.weight_bytes,
        skipped.kv_bytes,
        skipped.activation_bytes,
        skipped.reserve_bytes,
    )
    assert skipped.note is not None
    assert skipped.note.startswith("fits 0 layers: layer 2 costs 1.00 GiB weights + 0 B KV")


def test_cpu_copy_counts_weights_mmap_only_converted_bytes() -> None:
    """Under copy, CPU layers must fit the host budget; under mmap only converted bytes count."""
    layers = [layer(i, GiB, converted=GiB // 2 if i == 3 else 0) for i in range(4)]
    model = spec(layers)
    caps = [gpu("sim:0", GiB), cpu(3 * GiB)]
    params = replace(BARE, host_reserve_bytes=GiB)

    with pytest.raises(DoesNotFitError, match="host budget"):
        plan(model, caps, params, activations=NO_ACTIVATIONS)
    result = plan(model, caps, replace(params, cpu_policy="mmap"), activations=NO_ACTIVATIONS)

    host = result.device("cpu")
    assert ((1, 2, 3), GiB // 2, 2 * GiB + GiB // 2, GiB) == (
        host.layers,
        host.weight_bytes,
        host.mmap_bytes,
        host.reserve_bytes,
    )
    assert "mmap" == result.cpu_policy


def test_cpu_memory_bytes_replaces_available_memory() -> None:
    """``cpu_memory_bytes`` is the host budget base, whatever the host reports as available."""
    model = uniform_spec(4, GiB)
    caps = [gpu("sim:0", GiB), cpu(100 * GiB)]

    with pytest.raises(DoesNotFitError) as caught:
        plan(model, caps, replace(BARE, cpu_memory_bytes=2 * GiB), activations=NO_ACTIVATIONS)

    assert ("cpu", 2 * GiB) == (caught.value.devices[-1].device, caught.value.devices[-1].capacity)
    assert "cpu_memory_bytes 2.00 GiB" in str(caught.value)


# --------------------------------------------------------------------------------------------
# KV cache sizing


def test_cache_dtype_changes_kv_bytes() -> None:
    """The paged cache in fp8 costs half of bf16 and f32 twice; the plan names the cache dtype."""
    model = uniform_spec(2, MiB, kv_elems=2048)
    caps = [gpu("sim:0", 8 * GiB)]

    def kv(cache_dtype: str | None) -> tuple[str, int]:
        paged = PagedAttention(memory=ContextSize(4096), cache_dtype=cache_dtype)
        result = plan(model, caps, replace(BARE, paged_attention=paged), activations=NO_ACTIVATIONS)
        return result.kv_cache_dtype, result.layer_kv_bytes[0]

    assert [("BF16", 16 * MiB), ("F8_E4M3", 8 * MiB), ("F32", 32 * MiB)] == [
        kv(None),
        kv("fp8"),
        kv("f32"),
    ]


def test_sliding_window_caps_non_paged_kv_but_not_the_paged_pool() -> None:
    """Non-paged, a 1024-token window caches 1024 of 4096 tokens; the paged pool ignores it."""
    model = spec([layer(0, MiB, kv_elems=1000, window=1024), layer(1, MiB, kv_elems=1000)])
    params = replace(BARE, max_seq_len=4096, max_batch_size=2)
    caps = [gpu("sim:0", 8 * GiB)]

    contiguous = plan(model, caps, params, activations=NO_ACTIVATIONS)
    pooled = plan(
        model,
        caps,
        replace(params, paged_attention=PagedAttention()),
        activations=NO_ACTIVATIONS,
    )

    assert (1000 * 1024 * 2 * 2, 1000 * 4096 * 2 * 2) == contiguous.layer_kv_bytes
    assert (1000 * 8192 * 2, 1000 * 8192 * 2) == pooled.layer_kv_bytes


# --------------------------------------------------------------------------------------------
# Paged attention modes


def test_paged_default_pool_holds_seq_times_batch_tokens() -> None:
    """``PagedAttention()`` means ContextSize(max_seq_len x max_batch_size), blocks rounded up."""
    model = uniform_spec(2, MiB, kv_elems=100)
    params = replace(BARE, max_seq_len=1000, max_batch_size=3)
    caps = [gpu("sim:0", 8 * GiB)]

    default = plan(
        model, caps, replace(params, paged_attention=PagedAttention()), activations=NO_ACTIVATIONS
    )
    explicit = plan(
        model,
        caps,
        replace(params, paged_attention=PagedAttention(memory=ContextSize(3000))),
        activations=NO_ACTIVATIONS,
    )

    assert (True, 94) == (default.paged_attention, default.paged_blocks)  # ceil(3000 / 32)
    assert (100 * 94 * 32 * 2,) * 2 == default.layer_kv_bytes
    assert default == explicit


def test_mb_amount_pool_is_shared_by_all_layers() -> None:
    """MbAmount(100): a block costs 32 tokens x 4096 B x 2 layers = 256 KiB -> 400 blocks."""
    model = uniform_spec(2, MiB, kv_elems=2048)
    paged = PagedAttention(memory=MbAmount(100))

    result = plan(
        model,
        [gpu("sim:0", 8 * GiB)],
        replace(BARE, paged_attention=paged),
        activations=NO_ACTIVATIONS,
    )

    assert (400, (50 * MiB, 50 * MiB)) == (result.paged_blocks, result.layer_kv_bytes)


def test_mb_amount_too_small_for_one_block_is_an_error() -> None:
    """A pool smaller than one block (2 MiB here) is an error, never a silent zero-block cache."""
    model = uniform_spec(4, MiB, kv_elems=8192)
    paged = PagedAttention(memory=MbAmount(1))

    with pytest.raises(PlanError, match="holds 0 blocks"):
        plan(model, [gpu("sim:0", 8 * GiB)], replace(BARE, paged_attention=paged))


@pytest.mark.parametrize("memory", [MbAmount(100), Utilization(0.9)])
def test_pool_sized_by_memory_needs_a_kv_cache(memory: MbAmount | Utilization) -> None:
    """A model that caches nothing (encoder-only) cannot size a pool by memory: PlanError."""
    paged = PagedAttention(memory=memory)

    with pytest.raises(PlanError, match="caches no keys or values"):
        plan(uniform_spec(2, MiB), [gpu("sim:0", 8 * GiB)], replace(BARE, paged_attention=paged))


def test_utilization_fills_the_tightest_gpu() -> None:
    """Utilization(0.5) places layers in half of each card, then sizes blocks by the tightest."""
    # Each layer: 512 MiB weights; one 32-token block costs 32 x 2048 x 2 B = 128 KiB per layer;
    # the default pool is ceil(1024 / 32) = 32 blocks = 4 MiB per layer, so a layer costs 516 MiB.
    # sim:0: budget min(4 GiB free, 0.5 x 4 GiB) = 2048 MiB: 3 layers (1548 MiB), the 4th
    #   would make 2064 MiB; blocks <= (2048 - 1536) MiB / (3 x 128 KiB) = 1365.3.
    # sim:1: budget 4096 MiB: layer 3; blocks <= (4096 - 512) MiB / 128 KiB = 28672.
    model = uniform_spec(4, 512 * MiB, kv_elems=2048)
    paged = PagedAttention(memory=Utilization(0.5))
    params = replace(BARE, max_seq_len=1024, paged_attention=paged)
    caps = [gpu("sim:0", 4 * GiB), gpu("sim:1", 8 * GiB)]

    result = plan(model, caps, params, activations=NO_ACTIVATIONS)

    assert ("sim:0",) * 3 + ("sim:1",) == result.layer_devices
    assert (1365, (1365 * 128 * 1024,) * 4) == (result.paged_blocks, result.layer_kv_bytes)
    assert result.devices[0].need_bytes <= 2 * GiB


def test_paged_plan_that_needs_the_cpu_falls_back_to_non_paged() -> None:
    """Layers that would go to the CPU turn paged attention off, with the layers named."""
    model = uniform_spec(4, GiB, kv_elems=2048)
    paged = PagedAttention(memory=ContextSize(4096), cache_dtype="fp8")
    caps = [gpu("sim:0", 2 * GiB + 64 * MiB), cpu(100 * GiB)]

    result = plan(model, caps, replace(BARE, paged_attention=paged), activations=NO_ACTIVATIONS)

    assert (False, None, "BF16") == (
        result.paged_attention,
        result.paged_blocks,
        result.kv_cache_dtype,
    )
    assert result.paged_attention_reason is not None
    assert "layers 2-3 do not fit on the GPUs and would go to cpu" in result.paged_attention_reason
    assert ("sim:0",) * 2 + ("cpu",) * 2 == result.layer_devices
    assert (16 * MiB,) * 4 == result.layer_kv_bytes


def test_paged_plan_without_a_cpu_does_not_fall_back() -> None:
    """Without a CPU, a paged plan that does not fit is an error under paged sizing."""
    model = uniform_spec(4, GiB, kv_elems=2048)
    caps = [gpu("sim:0", 2 * GiB + 64 * MiB)]

    with pytest.raises(DoesNotFitError, match="paged KV pool of 128 blocks x 32 tokens"):
        plan(
            model, caps, replace(BARE, paged_attention=PagedAttention()), activations=NO_ACTIVATIONS
        )


def test_paged_plan_on_a_cpu_primary_falls_back() -> None:
    """Paged attention does not run on the CPU, so a CPU-only plan is non-paged, and says why."""
    result = plan(
        uniform_spec(2, GiB),
        [cpu(100 * GiB)],
        replace(BARE, paged_attention=PagedAttention()),
        activations=NO_ACTIVATIONS,
    )

    assert (False, ("cpu", "cpu")) == (result.paged_attention, result.layer_devices)
    assert "the primary device cpu is the CPU" in str(result.paged_attention_reason)


# --------------------------------------------------------------------------------------------
# Plumbing


def test_plan_round_trips_through_json() -> None:
    """``to_dict`` is JSON-ready and ``from_dict`` rebuilds the same plan."""
    model = uniform_spec(4, GiB, kv_elems=64)
    caps = [gpu("sim:0", 2 * GiB), gpu("sim:1", 64 * MiB), cpu(100 * GiB)]
    result = plan(model, caps, replace(BARE, cpu_policy="mmap"), activations=NO_ACTIVATIONS)

    assert result == Plan.from_dict(json.loads(json.dumps(result.to_dict())))


def test_plan_asks_the_model_for_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Activations come from ``model.activation_bytes`` (chunk, vision); primary pays the max."""
    calls: list[dict[str, Any]] = []

    def fake(model: ModelSpec, **kwargs: Any) -> Activations:
        calls.append(kwargs)
        return Activations(mapped=3 * MiB, non_mapped=5 * MiB)

    monkeypatch.setattr(planner._sizes, "activation_bytes", fake)
    params = replace(
        BARE,
        attention_chunk=512,
        vision=VisionParams(max_image_shape=(336, 448), max_num_images=2),
    )

    result = plan(
        uniform_spec(2, GiB), [gpu("sim:0", GiB + 10 * MiB), gpu("sim:1", 2 * GiB)], params
    )

    assert [
        {
            "max_seq_len": 4096,
            "max_batch_size": 1,
            "chunk": 512,
            "image_shape": (336, 448),
            "num_images": 2,
        }
    ] == calls
    assert (5 * MiB, 3 * MiB) == tuple(row.activation_bytes for row in result.devices)


# --------------------------------------------------------------------------------------------
# Re-plan


def _six_layer_plan() -> tuple[ModelSpec, list[DeviceCapacity], Plan]:
    model = uniform_spec(6, GiB)
    caps = [gpu("sim:0", 3 * GiB), gpu("sim:1", 3 * GiB), cpu(10 * GiB)]
    return model, caps, plan(model, caps, BARE, activations=NO_ACTIVATIONS)


def test_replan_moves_the_suffix_off_an_under_delivering_gpu() -> None:
    """sim:1 loses memory after loading layer 3: layers 4-5 go to the CPU, not back to sim:0."""
    model, _, before = _six_layer_plan()
    assert ("sim:0",) * 3 + ("sim:1",) * 3 == before.layer_devices
    live = [
        gpu("sim:0", 3 * GiB, free=3 * GiB),
        gpu("sim:1", 3 * GiB, free=GiB // 2),
        cpu(10 * GiB),
    ]

    after = replan(
        model, before, placed=4, capacities=live, params=BARE, activations=NO_ACTIVATIONS
    )

    assert ("sim:0",) * 3 + ("sim:1", "cpu", "cpu") == after.layer_devices
    sim1 = after.device("sim:1")
    assert (GiB, GiB, GiB // 2 + GiB, 4) == (
        sim1.loaded_bytes,
        sim1.weight_bytes,
        sim1.capacity_bytes,
        after.loaded_layers,
    )
    assert "comes before the device being loaded" in str(after.device("sim:0").note)
    assert str(sim1.note).startswith("fits no further layers: layer 4")


def test_replan_that_needs_the_cpu_drops_paged_attention_for_placed_layers_too() -> None:
    """A paged plan re-planned onto the CPU becomes non-paged, and placed layers' KV is resized."""
    model = spec([layer(i, GiB, kv_elems=1000, window=512) for i in range(4)])
    params = replace(BARE, max_seq_len=4096, paged_attention=PagedAttention())
    caps = [gpu("sim:0", 8 * GiB), cpu(10 * GiB)]
    before = plan(model, caps, params, activations=NO_ACTIVATIONS)
    assert (True, (1000 * 4096 * 2,) * 4) == (before.paged_attention, before.layer_kv_bytes)
    live = [gpu("sim:0", 8 * GiB, free=GiB), cpu(10 * GiB)]

    after = replan(
        model, before, placed=2, capacities=live, params=params, activations=NO_ACTIVATIONS
    )

    assert ("sim:0", "sim:0", "cpu", "cpu") == after.layer_devices
    assert (False, (1000 * 512 * 2,) * 4) == (after.paged_attention, after.layer_kv_bytes)
    assert "layers 2-3 do not fit on the GPUs" in str(after.paged_attention_reason)


def test_replan_needs_live_capacities_for_the_same_devices() -> None:
    """Live readings must name the previous plan's devices in order."""
    model, caps, before = _six_layer_plan()

    with pytest.raises(ValueError, match="in that order"):
        replan(model, before, placed=1, capacities=caps[::-1][1:] + caps[-1:], params=BARE)


def test_replan_that_fits_nowhere_lists_every_device() -> None:
    """If the remaining layers fit nowhere, the error lists every device with live numbers."""
    model, _, before = _six_layer_plan()
    live = [gpu("sim:0", 3 * GiB, free=0), gpu("sim:1", 3 * GiB, free=0), cpu(GiB)]

    with pytest.raises(DoesNotFitError) as caught:
        replan(model, before, placed=3, capacities=live, params=BARE, activations=NO_ACTIVATIONS)

    assert "layers 4-5 (2 of 6;" in caught.value.reason
    assert ["sim:0", "sim:1", "cpu"] == [row.device for row in caught.value.devices]


def test_replan_when_placed_layers_lose_their_kv_room() -> None:
    """A device whose placed layers' KV cache no longer fits its live memory is named."""
    model = uniform_spec(4, GiB, kv_elems=2048)
    caps = [gpu("sim:0", 3 * GiB), gpu("sim:1", 8 * GiB)]
    before = plan(model, caps, BARE, activations=NO_ACTIVATIONS)
    live = [gpu("sim:0", 3 * GiB, free=0), gpu("sim:1", 8 * GiB)]

    with pytest.raises(DoesNotFitError, match="sim:0 already holds layers 0-1"):
        replan(model, before, placed=3, capacities=live, params=BARE, activations=NO_ACTIVATIONS)


# --------------------------------------------------------------------------------------------
# Properties

PROPERTY = settings(deadline=None, max_examples=200)


@PROPERTY
@given(model_specs(), capacity_lists(), load_params(), activations())
def test_plans_are_well_formed(
    model: ModelSpec, caps: list[DeviceCapacity], params: LoadParams, acts: Activations
) -> None:
    """Every layer placed once, in device order with the CPU last, no row over its capacity."""
    result = _try_plan(model, caps, params, acts)
    if result is not None:
        _assert_well_formed(result, model, caps)


@PROPERTY
@given(model_specs(), capacity_lists(), load_params(paged=True), activations())
def test_fallback_iff_the_paged_plan_needs_the_cpu(
    model: ModelSpec, caps: list[DeviceCapacity], params: LoadParams, acts: Activations
) -> None:
    """With paged attention, the plan falls back exactly when the GPUs alone cannot hold it."""
    result = _try_plan(model, caps, params, acts)
    gpus = [cap for cap in caps if cap.is_gpu]
    gpus_only = _try_plan(model, gpus, params, acts)
    has_cpu = len(gpus) < len(caps)
    if result is None:
        assert gpus_only is None
        return
    if result.paged_attention:
        assert result.paged_attention_reason is None
        assert gpus_only is not None
        assert gpus_only.layer_devices == result.layer_devices
        assert "cpu" not in result.layer_devices
    else:
        assert has_cpu
        assert result.paged_attention_reason is not None
        assert gpus_only is None


@PROPERTY
@given(model_specs(), capacity_lists(), load_params(paged=False), activations())
def test_non_paged_plans_never_report_a_fallback(
    model: ModelSpec, caps: list[DeviceCapacity], params: LoadParams, acts: Activations
) -> None:
    """Without paged attention there is nothing to fall back from."""
    result = _try_plan(model, caps, params, acts)
    if result is not None:
        assert (False, None, None) == (
            result.paged_attention,
            result.paged_attention_reason,
            result.paged_blocks,
        )


@PROPERTY
@given(model_specs(), capacity_lists(), load_params(), activations(), st.data())
def test_more_free_memory_never_means_fewer_gpu_layers(
    model: ModelSpec,
    caps: list[DeviceCapacity],
    params: LoadParams,
    acts: Activations,
    data: st.DataObject,
) -> None:
    """More free memory on one GPU keeps a fit, never lowers GPU layers, keeps earlier devices."""
    # Exactly: raising GPU j's free_bytes (total unchanged) keeps a plan that fit fitting and
    # never lowers the number of layers on GPUs; when both plans use the same KV sizing (same
    # paged_attention), devices before j hold the same layers and j holds at least as many.
    before = _try_plan(model, caps, params, acts)
    if before is None:
        return
    j = data.draw(st.integers(min_value=0, max_value=sum(cap.is_gpu for cap in caps) - 1))
    extra = data.draw(st.integers(min_value=0, max_value=caps[j].total_bytes - caps[j].free_bytes))
    richer = list(caps)
    richer[j] = replace(caps[j], free_bytes=caps[j].free_bytes + extra)

    after = _try_plan(model, richer, params, acts)

    assert after is not None
    on_gpu_before = sum(device != "cpu" for device in before.layer_devices)
    on_gpu_after = sum(device != "cpu" for device in after.layer_devices)
    assert on_gpu_before <= on_gpu_after
    if before.paged_attention == after.paged_attention:
        assert len(before.devices[j].layers) <= len(after.devices[j].layers)
        assert [r.layers for r in before.devices[:j]] == [r.layers for r in after.devices[:j]]


@st.composite
def replan_cases(
    draw: st.DrawFn,
) -> tuple[ModelSpec, Plan, int, list[DeviceCapacity], LoadParams, Activations]:
    model = draw(model_specs())
    caps = draw(capacity_lists())
    params = draw(load_params())
    acts = draw(activations())
    before = _try_plan(model, caps, params, acts)
    if before is None:
        caps = [gpu("sim:0", 64 * GiB), cpu(64 * GiB)]
        before = _try_plan(model, caps, params, acts)
    assume(before is not None)
    assert before is not None
    placed = draw(st.integers(min_value=0, max_value=len(model.layers)))
    live = [
        replace(cap, free_bytes=draw(st.integers(min_value=0, max_value=cap.total_bytes)))
        for cap in caps
    ]
    return model, before, placed, live, params, acts


@PROPERTY
@given(replan_cases())
def test_replan_never_moves_placed_layers(
    case: tuple[ModelSpec, Plan, int, list[DeviceCapacity], LoadParams, Activations],
) -> None:
    """Layers below ``placed`` stay put; new layers go to the loading device or later ones."""
    model, before, placed, live, params, acts = case
    try:
        after = replan(
            model, before, placed=placed, capacities=live, params=params, activations=acts
        )
    except PlanError:
        return
    assert before.layer_devices[:placed] == after.layer_devices[:placed]
    names = [cap.name for cap in live]
    first = names.index(before.layer_devices[placed - 1]) if placed else 0
    assert all(names.index(d) >= first for d in after.layer_devices[placed:])
    assert (before.primary, placed) == (after.primary, after.loaded_layers)
    _assert_well_formed(after, model, live)


@PROPERTY
@given(model_specs(), capacity_lists(), load_params(), activations(), st.data())
def test_replan_on_unchanged_capacities_reproduces_the_plan(
    model: ModelSpec,
    caps: list[DeviceCapacity],
    params: LoadParams,
    acts: Activations,
    data: st.DataObject,
) -> None:
    """Live free = planned free minus the weights already loaded gives back the same plan."""
    before = _try_plan(model, caps, params, acts)
    if before is None:
        return
    placed = data.draw(st.integers(min_value=0, max_value=len(model.layers)))
    live = []
    for i, cap in enumerate(caps):
        row = before.devices[i]
        loaded = _charged(model, [j for j in row.layers if j < placed], cap, params.cpu_policy)
        if row.holds_non_mapped:
            loaded += row.weight_bytes - _charged(model, row.layers, cap, params.cpu_policy)
        live.append(replace(cap, free_bytes=max(cap.free_bytes - loaded, 0)))

    after = replan(model, before, placed=placed, capacities=live, params=params, activations=acts)

    assert _without_bookkeeping(before) == _without_bookkeeping(after)
