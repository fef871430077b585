"""Tensor parallelism within one process: the plan (defaults, GQA, errors naming the tensor),
slices as byte ranges and strided reads (holes read through or skipped, IOV_MAX batches), the
rank's share as a spec the planner charges, and every rank's slices loaded by the engine over
the CPU, staged and unstaged simulated GPUs and an S3 server on 127.0.0.1, concatenating to
the checkpoint bit for bit. Loads over gloo ranks are in ``test_tensor_parallel_ranks``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import streamload
from streamload.checkpoint import TensorEntry
from streamload.distributed import (
    BUILTIN_PLANS,
    Shard,
    TensorParallel,
    default_tp_plan,
    resolve_tp,
    shard_spec,
    slice_entry,
    split_stages,
)
from streamload.distributed._load import _deliver_replicated
from streamload.engine._units import (
    MAX_IOVECS,
    Destination,
    FileRead,
    cut_chunks,
    file_reads,
    runs,
    units,
)
from streamload.events import ExpertsReplicated
from streamload.model import ModelSpec
from streamload.testing import SimulatedGPU
from tests.engine_support import (
    HIDDEN,
    INTER,
    KV_HEADS,
    VOCAB,
    llama_config,
    llama_tensors,
    params,
    reference,
    write_checkpoint,
)
from tests.sources_support import moto_s3, s3_env, upload
from tests.test_distributed import gpu_rank

LAYERS = 4
GiB = 2**30
BUCKET = "tensor-parallel"


def tp_checkpoint(directory: Path, *, tie: bool = False) -> Path:
    tensors = llama_tensors(LAYERS, extras=False)
    if tie:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    return write_checkpoint(directory, tensors, llama_config(LAYERS, tie=tie))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tp_checkpoint(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def spec(ckpt: Path) -> ModelSpec:
    return streamload.inspect(ckpt)


def concatenated(parts: list[dict[str, torch.Tensor]], tp: TensorParallel) -> dict[str, Any]:
    """Each tensor as the ranks' parts put back together (a whole tensor: rank 0's, after
    checking every rank holds the same bytes)."""
    out: dict[str, torch.Tensor] = {}
    for name in parts[0]:
        shard = tp.shard(name, 0)
        if shard.dim is None:
            for other in parts[1:]:
                assert torch.equal(parts[0][name], other[name]), name
            out[name] = parts[0][name]
        else:
            out[name] = torch.cat([part[name] for part in parts], shard.dim)
    return out


# --------------------------------------------------------------------------------------------
# The plan


def test_builtin_plans_equal_the_transformers_config_classes() -> None:
    """The table used without transformers holds what transformers' config classes say (style
    names mapped), plus ``lm_head`` colwise as its causal-LM classes add."""
    mapped = {"replicated_with_grad_allreduce": "replicate"}
    for model_type, plan in BUILTIN_PLANS.items():
        config = transformers.AutoConfig.for_model(model_type)
        stated = type(config).base_model_tp_plan or {}
        expected = {k: mapped.get(v, v) for k, v in stated.items()}
        dense = {k: v for k, v in expected.items() if ".experts" not in k}
        assert {**dense, "lm_head": "colwise"} == dict(plan), model_type


def test_default_plan_splits_attention_and_mlp_of_a_llama(spec: ModelSpec) -> None:
    """Two ranks: q/k/v, gate/up and lm_head split along dim 0, o/down along dim 1; norms and
    the embedding whole."""
    tp = resolve_tp(spec, 2)
    layer = "model.layers.1"
    expected = {
        f"{layer}.self_attn.q_proj.weight": 0,
        f"{layer}.self_attn.k_proj.weight": 0,
        f"{layer}.self_attn.v_proj.weight": 0,
        f"{layer}.self_attn.o_proj.weight": 1,
        f"{layer}.mlp.gate_proj.weight": 0,
        f"{layer}.mlp.up_proj.weight": 0,
        f"{layer}.mlp.down_proj.weight": 1,
    }
    assert expected == {k: v for k, v in tp.dims.items() if k.startswith(layer + ".")}
    assert 0 == tp.dims["lm_head.weight"]
    assert Shard(None, 0, 1) == tp.shard("model.embed_tokens.weight", 1)
    assert Shard(1, 1, 2) == tp.shard(f"{layer}.mlp.down_proj.weight", 1)
    assert default_tp_plan(spec)["layers.*.mlp.down_proj"] == "rowwise"


def test_fewer_kv_heads_than_ranks_replicates_k_and_v(spec: ModelSpec) -> None:
    """Four ranks over 2 KV heads: K and V are held whole on every rank (with the reason),
    Q still splits by head, and each rank's KV cache is one head's."""
    tp = resolve_tp(spec, 4)
    assert "model.layers.0.self_attn.k_proj.weight" not in tp.dims
    assert 0 == tp.dims["model.layers.0.self_attn.q_proj.weight"]
    reasons = dict(tp.replicated)
    assert "2 key/value heads < 4" in reasons["model.layers.0.self_attn.v_proj.weight"]
    rank = shard_spec(spec, tp, 3)
    assert spec.layers[0].kv_elems_per_token // KV_HEADS == rank.layers[0].kv_elems_per_token


@pytest.mark.parametrize(
    ("plan", "size", "words"),
    [
        (
            {"layers.*.self_attn.q_proj": "colwise"},
            3,
            "model.layers.0.self_attn.q_proj.weight: 4 attention heads do not divide among 3",
        ),
        (None, 3, "dimension 1 of shape [64, 128] does not divide into 3 tensor-parallel parts"),
        ({"layers.*.mlp.nothing": "colwise"}, 2, "'layers.*.mlp.nothing', which matches no"),
        ({"layers.*.mlp.up_proj": "diagonal"}, 2, "expected one of colwise, rowwise"),
        ({"embed_tokens": "vocab"}, 3, "model.embed_tokens.weight: dimension 0 of shape [256"),
    ],
)
def test_a_plan_that_cannot_split_names_the_tensor(
    spec: ModelSpec, plan: dict[str, str] | None, size: int, words: str
) -> None:
    with pytest.raises(streamload.PlanError, match=re.escape(words)):
        resolve_tp(spec, size, plan)


def test_a_split_module_with_a_quantized_side_tensor_is_a_plan_error(tmp_path: Path) -> None:
    """Only a module's weight and bias split: a packed quantized tensor is named."""
    tensors = llama_tensors(1)
    ckpt = write_checkpoint(tmp_path, tensors, llama_config(1), shards=1)
    with pytest.raises(
        streamload.PlanError,
        match=r"^model.layers.0.mlp.gate_proj.(qweight|scales): .* splits only a module.s weight",
    ):
        resolve_tp(streamload.inspect(ckpt), 2)


@pytest.mark.anyio
async def test_experts_split_per_expert_or_are_replicated_with_a_warning(tmp_path: Path) -> None:
    """Mixtral's per-expert w1/w3 split colwise, w2 rowwise; with an explicit plan that does
    not name them, they are replicated, and the load warns with an ``ExpertsReplicated``."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen)}
    for e in range(2):
        p = f"model.layers.0.block_sparse_moe.experts.{e}"
        tensors[f"{p}.w1.weight"] = torch.randn(INTER, HIDDEN, generator=gen)
        tensors[f"{p}.w3.weight"] = torch.randn(INTER, HIDDEN, generator=gen)
        tensors[f"{p}.w2.weight"] = torch.randn(HIDDEN, INTER, generator=gen)
    config = {**llama_config(1), "model_type": "mixtral", "num_local_experts": 2}
    config["num_experts_per_tok"] = 1
    spec = streamload.inspect(write_checkpoint(tmp_path, tensors, config, shards=1))
    tp = resolve_tp(spec, 2)
    expert = "model.layers.0.block_sparse_moe.experts.1"
    assert (0, 0, 1) == tuple(tp.dims[f"{expert}.{w}.weight"] for w in ("w1", "w3", "w2"))
    explicit = resolve_tp(spec, 2, {"embed_tokens": "vocab"})
    assert 6 == len(explicit.replicated)
    assert {"model.embed_tokens.weight": 0} == dict(explicit.dims)
    seen: list[object] = []
    await _deliver_replicated(seen.append, explicit, "ckpt")
    (event,) = seen
    assert isinstance(event, ExpertsReplicated)
    assert (6, 2, "ckpt") == (len(event.tensors), event.tensor_parallel_size, event.path)
    await _deliver_replicated(seen.append, tp, "ckpt")
    assert 1 == len(seen)  # split experts: no warning


# --------------------------------------------------------------------------------------------
# Slices and strided reads


def test_a_dim_0_slice_is_one_byte_range() -> None:
    entry = TensorEntry("w", Path("f"), "BF16", (8, 6), 100, 96)
    part = slice_entry(entry, 0, 3, 4)
    assert (2, 6) == part.shape
    assert (100 + 3 * 24, 24, 1, True) == (part.offset, part.nbytes, part.rows, part.contiguous)


def test_a_dim_1_slice_is_a_run_per_row() -> None:
    entry = TensorEntry("w", Path("f"), "F32", (3, 8), 0, 96)
    part = slice_entry(entry, 1, 1, 4)
    expected = ((3, 2), 8, 24, 3, 32, 8)
    assert expected == (
        part.shape,
        part.offset,
        part.nbytes,
        part.rows,
        part.row_stride,
        part.row_bytes,
    )
    assert 8 + 2 * 32 + 8 == part.end


def strided_chunks(rows: int, row: int, piece: int, chunk_bytes: int) -> tuple[Any, torch.Tensor]:
    entry = TensorEntry("w", Path("f"), "U8", (rows, row), 1000, rows * row)
    part = slice_entry(entry, 1, 1, row // piece)
    dst = torch.empty(part.nbytes, dtype=torch.uint8)
    return cut_chunks([Destination(part, dst, part.nbytes)], chunk_bytes), dst


def test_rows_of_a_strided_slice_share_a_chunk_across_holes() -> None:
    """Ten rows of 100-byte pieces, 300 bytes of other ranks' between them: chunks of at most
    512 data bytes (the sixth row cut between the two), each one piece (the destination's
    bytes in order) with its holes."""
    chunks, dst = strided_chunks(10, 400, 100, 512)
    assert [512, 488] == [c.nbytes for c in chunks]
    first, second = chunks
    assert [(100 * i, 300) for i in range(1, 6)] == first.holes
    assert (1100, 1100 + 512 + 5 * 300) == (first.offset, first.end)
    assert (3112, [(88 + 100 * i, 300) for i in range(4)]) == (second.offset, second.holes)
    assert [1, 1] == [len(c.pieces) for c in chunks]
    assert (dst.data_ptr() + 512, 488) == (second.pieces[0].dst.data_ptr(), second.nbytes)


def test_short_holes_are_read_through_long_ones_start_a_read() -> None:
    chunks, _ = strided_chunks(4, 400, 100, 4096)
    (chunk,) = chunks
    through = file_reads(chunk, read_through=300)
    parts = ((0, 100), (None, 300), (100, 100), (None, 300), (200, 100), (None, 300), (300, 100))
    assert [FileRead(1100, parts)] == through
    skipped = file_reads(chunk, read_through=299)
    assert [(1100 + 400 * i, ((100 * i, 100),)) for i in range(4)] == [
        (r.offset, r.parts) for r in skipped
    ]


def test_a_read_takes_at_most_iov_max_buffers() -> None:
    """2000 rows read through their holes: each read within ``MAX_IOVECS`` buffers, together
    covering every row in order."""
    chunks, _ = strided_chunks(2000, 8, 4, 2**20)
    (chunk,) = chunks
    reads = file_reads(chunk, read_through=64)
    assert all(len(r.parts) <= MAX_IOVECS for r in reads)
    data = [part for r in reads for part in r.parts if part[0] is not None]
    assert [(4 * i, 4) for i in range(2000)] == data
    assert len(reads) > 1
    first_rows = [next(at for at, _ in r.parts if at is not None) // 4 for r in reads]
    assert [1004 + 8 * row for row in first_rows] == [r.offset for r in reads]


def test_prefetch_ranges_cover_what_the_reads_cover(spec: ModelSpec) -> None:
    """A rank's read-ahead asks for its slices' ranges only: dim-0 slices as they are."""
    tp = resolve_tp(spec, 2)
    rank = shard_spec(spec, tp, 1)
    layer = next(u for u in units(rank) if u.layer == 0)
    q = rank.checkpoint.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert any(start <= q.offset and q.end <= end for _, start, end in runs(layer))
    whole = streamload.inspect(spec.checkpoint.root).checkpoint.tensors[q.name]
    assert not any(start <= whole.offset and whole.end <= end for _, start, end in runs(layer))


# --------------------------------------------------------------------------------------------
# A rank's share: sizes the planner charges


def test_a_rank_is_charged_its_slices_and_its_heads(spec: ModelSpec) -> None:
    """Two ranks' layer weights add up to the whole layer's split tensors plus each holding
    the norms; the KV cache and the attention scores count half the heads."""
    tp = resolve_tp(spec, 2)
    ranks = [shard_spec(spec, tp, i) for i in range(2)]
    entries = spec.checkpoint.tensors
    layer = spec.layers[0]
    whole = sum(entries[n].nbytes for n in layer.tensors if n not in tp.dims)
    split = layer.nbytes - whole
    assert [whole + split // 2] * 2 == [r.layers[0].nbytes for r in ranks]
    assert [layer.kv_elems_per_token // 2] * 2 == [r.layers[0].kv_elems_per_token for r in ranks]
    assert spec.facts.num_attention_heads // 2 == ranks[0].facts.num_attention_heads
    caps = list(gpu_rank(0, GiB).devices)
    whole_plan = streamload.planner.plan(spec, caps, params([]))
    half = streamload.planner.plan(ranks[0], caps, params([]))
    assert ranks[0].total_bytes == half.devices[0].weight_bytes < whole_plan.devices[0].weight_bytes
    assert whole_plan.devices[0].kv_bytes == 2 * half.devices[0].kv_bytes


def test_stages_are_groups_of_consecutive_ranks(spec: ModelSpec) -> None:
    """Four ranks at tensor_parallel_size=2: two stages of two layers, ranks 0-1 and 2-3, the
    embedding with the first, the head with the last; a world that is not a multiple fails."""
    tp = resolve_tp(spec, 2)
    ranks = [gpu_rank(r, GiB) for r in range(4)]
    plan = split_stages(spec, ranks, params([]), tensor_parallel=tp)
    got = [(s.rank, s.pp_rank, s.tp_rank, s.start, s.stop, s.parts) for s in plan.stages]
    embed, tail = ("model.embed_tokens",), ("lm_head", "model.norm")
    assert [
        (0, 0, 0, 0, 2, embed),
        (1, 0, 1, 0, 2, embed),
        (2, 1, 0, 2, 4, tail),
        (3, 1, 1, 2, 4, tail),
    ] == got
    assert (0, 0, 2, 2) == plan.layer_ranks
    with pytest.raises(streamload.PlanError, match="3 ranks do not form stages"):
        split_stages(spec, ranks[:3], params([]), tensor_parallel=tp)


# --------------------------------------------------------------------------------------------
# The engine loads a rank's slices


@pytest.mark.anyio
@pytest.mark.parametrize("direct_io", [False, True])
@pytest.mark.parametrize("device", ["cpu", "staged", "unstaged"])
@pytest.mark.parametrize("size", [2, 4])
async def test_every_path_loads_slices_that_concatenate_to_the_checkpoint(
    ckpt: Path, spec: ModelSpec, device: str, size: int, direct_io: bool
) -> None:
    """Each rank's slices through the CPU, a staged and an unstaged simulated GPU: put back
    together they equal safetensors' load bit for bit; a dim-0 split reads its slice's bytes
    only (the whole rank reads its slices plus the holes of dim-1 rows it reads through).
    Under ``direct_io`` too (strided slices are read through the page cache)."""
    tp = resolve_tp(spec, size)
    parts = []
    for index in range(size):
        devices: list[Any] = ["cpu"]
        if device != "cpu":
            devices = [SimulatedGPU("sim:0", total_bytes=GiB, staged=device == "staged")]
        rank = shard_spec(spec, tp, index)
        model = await streamload.load(ckpt, params(devices, direct_io=direct_io), spec=rank)
        parts.append(dict(model.tensors))
        assert rank.stored_bytes <= model.read_bytes < spec.stored_bytes
        model.release()
    expected = reference(ckpt)
    got = concatenated(parts, tp)
    assert sorted(expected) == sorted(got)
    for name, tensor in expected.items():
        assert torch.equal(tensor.view(torch.uint8), got[name].contiguous().view(torch.uint8)), name


@pytest.mark.anyio
async def test_a_dim_0_split_reads_only_its_slice(tmp_path: Path) -> None:
    """Only colwise splits: each rank reads its slices' bytes and the whole norms, nothing
    more."""
    ckpt = tp_checkpoint(tmp_path)
    spec = streamload.inspect(ckpt)
    plan = {"layers.*.self_attn.q_proj": "colwise", "layers.*.mlp.up_proj": "colwise"}
    plan["lm_head"] = "colwise"
    tp = resolve_tp(spec, 2, plan)
    for index in range(2):
        rank = shard_spec(spec, tp, index)
        model = await streamload.load(ckpt, params(["cpu"]), spec=rank)
        assert rank.stored_bytes == model.read_bytes
        assert rank.stored_bytes == model.report.stored_bytes


# --------------------------------------------------------------------------------------------
# Objects


@pytest.fixture(scope="module")
def bucket(ckpt: Path) -> Iterator[str]:
    with moto_s3(BUCKET) as (endpoint, client):
        upload(client, BUCKET, "llama", ckpt)
        yield endpoint


@pytest.mark.anyio
async def test_slices_from_an_object_store_are_ranged_reads(
    bucket: str, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From ``s3://``: the two ranks' slices concatenate to the checkpoint, and each rank
    reads less than the whole model (its dim-0 slices by range, dim-1 rows read through)."""
    for key, value in s3_env(bucket).items():
        monkeypatch.setenv(key, value)
    url = f"s3://{BUCKET}/llama"
    spec = streamload.inspect(url)
    tp = resolve_tp(spec, 2)
    parts = []
    for index in range(2):
        rank = shard_spec(spec, tp, index)
        devices = [SimulatedGPU("sim:0", total_bytes=GiB)]
        model = await streamload.load(url, params(devices), spec=rank)
        parts.append(dict(model.tensors))
        assert rank.stored_bytes <= model.read_bytes < spec.stored_bytes
    got = concatenated(parts, tp)
    for name, tensor in reference(ckpt).items():
        assert torch.equal(tensor, got[name]), name
