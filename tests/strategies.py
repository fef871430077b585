"""Hypothesis strategies (and plain builders) for planner inputs.

Specs are built directly from ``LayerSpec``/``PartSpec`` so that planner tests depend on no
checkpoint on disk. Sizes are drawn in MiB-sized steps at scales where plans spill across devices
often: layers up to 256 MiB, GPUs of 0.5-4 GiB (often idle), non-mapped parts and
activations up to 128 MiB, a CPU (when present) of up to 16 GiB.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hypothesis import strategies as st

from streamload.checkpoint import Checkpoint
from streamload.model import Activations, LayerSpec, ModelFacts, ModelSpec, PartSpec
from streamload.params import (
    ContextSize,
    LoadParams,
    MbAmount,
    PagedAttention,
    PagedMemory,
    Utilization,
)
from streamload.planner import DeviceCapacity

MiB = 2**20
GiB = 2**30

FACTS = ModelFacts(
    model_type="llama",
    num_hidden_layers=0,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    v_head_dim=16,
    vocab_size=128,
    intermediate_size=128,
    kv_kind="standard",
    kv_lora_rank=None,
    qk_rope_head_dim=None,
    sliding_window=None,
    tie_word_embeddings=False,
    vision=None,
)


def layer(
    index: int,
    nbytes: int,
    *,
    converted: int = 0,
    kv_elems: int = 0,
    window: int | None = None,
    tensors: tuple[str, ...] = (),
) -> LayerSpec:
    """A layer of ``nbytes`` (stored as placed unless ``converted`` says otherwise)."""
    return LayerSpec(
        index=index,
        prefix=f"model.layers.{index}",
        tensors=tensors,
        nbytes=nbytes,
        stored_bytes=nbytes,
        converted_bytes=converted,
        kv_elems_per_token=kv_elems,
        sliding_window=window,
    )


def part(name: str, nbytes: int, *, converted: int = 0, tensors: tuple[str, ...] = ()) -> PartSpec:
    """A non-mapped part of ``nbytes``."""
    return PartSpec(
        name=name,
        tensors=tensors,
        nbytes=nbytes,
        stored_bytes=nbytes,
        converted_bytes=converted,
        sub_model=None,
    )


def spec(
    layers: Sequence[LayerSpec],
    non_mapped: Sequence[PartSpec] = (),
    *,
    activation_dtype: str = "BF16",
    facts: ModelFacts = FACTS,
) -> ModelSpec:
    """A ``ModelSpec`` over no real checkpoint (the planner reads sizes only)."""
    return ModelSpec(
        checkpoint=Checkpoint(root=Path("model"), shards=(), tensors={}),
        facts=facts,
        config={},
        target_dtype=None,
        activation_dtype=activation_dtype,
        layers=tuple(layers),
        non_mapped=tuple(non_mapped),
        tied={},
    )


def uniform_spec(count: int, nbytes: int, *, kv_elems: int = 0, non_mapped: int = 0) -> ModelSpec:
    """``count`` equal layers and one non-mapped part of ``non_mapped`` bytes."""
    layers = [layer(i, nbytes, kv_elems=kv_elems) for i in range(count)]
    return spec(layers, [part("model.embed_tokens", non_mapped)])


def gpu(name: str, total: int, free: int | None = None) -> DeviceCapacity:
    return DeviceCapacity(name, True, total, total if free is None else free)


def cpu(free: int) -> DeviceCapacity:
    return DeviceCapacity("cpu", False, free, free)


NO_ACTIVATIONS = Activations(mapped=0, non_mapped=0)

small = st.integers(min_value=0, max_value=128).map(lambda n: n * MiB)


@st.composite
def layer_specs(draw: st.DrawFn, index: int) -> LayerSpec:
    nbytes = draw(st.integers(min_value=1, max_value=256)) * MiB
    converted = draw(st.sampled_from([0, nbytes // 2, nbytes]))
    kv_elems = draw(st.sampled_from([0, 64, 256, 1024]))
    window = draw(st.none() | st.integers(min_value=1, max_value=4096))
    return layer(index, nbytes, converted=converted, kv_elems=kv_elems, window=window)


@st.composite
def model_specs(draw: st.DrawFn, *, max_layers: int = 12) -> ModelSpec:
    count = draw(st.integers(min_value=1, max_value=max_layers))
    layers = [draw(layer_specs(i)) for i in range(count)]
    parts = [
        part(name, draw(small), converted=0)
        for name in draw(st.sets(st.sampled_from(["model.embed_tokens", "model.norm", "lm_head"])))
    ]
    dtype = draw(st.sampled_from(["BF16", "F16", "F32"]))
    return spec(layers, parts, activation_dtype=dtype)


@st.composite
def gpu_capacities(draw: st.DrawFn, name: str) -> DeviceCapacity:
    total = draw(st.integers(min_value=512, max_value=4096)) * MiB
    busy = draw(st.one_of(st.just(0), st.integers(0, total // 2), st.integers(0, total)))
    return DeviceCapacity(name, True, total, total - busy)


@st.composite
def capacity_lists(draw: st.DrawFn, *, include_cpu: bool | None = None) -> list[DeviceCapacity]:
    """1-3 GPUs (the first is the primary), then a CPU with probability 3/4 (or as told)."""
    count = draw(st.integers(min_value=1, max_value=3))
    devices = [draw(gpu_capacities(f"sim:{i}")) for i in range(count)]
    coin = st.sampled_from([True, True, True, False])
    with_cpu = draw(coin) if include_cpu is None else include_cpu
    if with_cpu:
        free = draw(st.integers(min_value=0, max_value=16)) * GiB
        devices.append(DeviceCapacity("cpu", False, free, free))
    return devices


def paged_memories() -> st.SearchStrategy[PagedMemory | None]:
    return st.one_of(
        st.none(),
        st.integers(min_value=1, max_value=8192).map(ContextSize),
        st.integers(min_value=1, max_value=2048).map(MbAmount),
        st.floats(min_value=0.05, max_value=1.0).map(Utilization),
    )


@st.composite
def paged_attentions(draw: st.DrawFn) -> PagedAttention:
    return PagedAttention(
        memory=draw(paged_memories()),
        block_size=draw(st.sampled_from([16, 32, 64])),
        cache_dtype=draw(st.sampled_from([None, "fp8", "f32"])),
    )


@st.composite
def load_params(draw: st.DrawFn, *, paged: bool | None = None) -> LoadParams:
    """Any planner-relevant settings; ``paged`` forces paged attention on or off."""
    if paged is None:
        attention = draw(st.none() | paged_attentions())
    else:
        attention = draw(paged_attentions()) if paged else None
    return LoadParams(
        devices=[],
        max_seq_len=draw(st.integers(min_value=1, max_value=4096)),
        max_batch_size=draw(st.integers(min_value=1, max_value=4)),
        paged_attention=attention,
        reserve_fraction=draw(st.sampled_from([0.0, 0.02, 0.1])),
        reserve_min_bytes=draw(st.integers(min_value=0, max_value=128)) * MiB,
        cpu_policy=draw(st.sampled_from(["copy", "mmap"])),
        cpu_memory_bytes=draw(st.none() | st.integers(min_value=0, max_value=16).map(GiB.__mul__)),
        host_reserve_bytes=draw(st.integers(min_value=0, max_value=1024)) * MiB,
    )


def activations() -> st.SearchStrategy[Activations]:
    return st.builds(Activations, mapped=small, non_mapped=small)
