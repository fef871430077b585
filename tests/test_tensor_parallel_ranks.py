"""Tensor-parallel loads over gloo ranks on 127.0.0.1, simulated GPUs per rank: the ranks'
slices concatenate to the checkpoint bit for bit, replicated tensors are equal everywhere,
a real tensor-parallel forward (column- and row-parallel matmuls, all-reduce over gloo) gives
the unsplit model's logits, pipeline x tensor parallelism (2 x 2 over 4 ranks), a failure on
one rank releases everything on all, a plan that cannot split fails every rank before any
read, and the command."""

from __future__ import annotations

import datetime
import gc
import json
import os
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import transformers

import streamload
from streamload.distributed import DistributedModel, load_distributed
from streamload.errors import StreamloadError
from streamload.events import Event, LayerPlaced
from streamload.testing import SimulatedGPU
from tests.engine_support import llama_config, llama_tensors, params, reference, write_checkpoint
from tests.test_distributed import PEER_TIMEOUT, RANKS_LIMIT, loaded, run_command
from tests.test_distributed import run_ranks as distributed_ranks

LAYERS = 4
GiB = 2**30
TOKENS = [[3, 17, 250, 9, 64, 128, 1, 77]]

# Scenario -> (tensor_parallel_size, tp_plan)
SCENARIOS: dict[str, tuple[int, dict[str, str] | None]] = {
    "tp2": (2, None),
    "pp2tp2": (2, None),
    "fail4": (2, None),
    "badplan2": (2, {"layers.*.self_attn.qkv_proj": "colwise"}),
}


def tensor_parallel_forward(model: DistributedModel, config: dict[str, Any]) -> torch.Tensor:
    """The rank's slices in a Llama whose attention and MLP hold this rank's share of heads
    and width: the row-parallel outputs (``o_proj``, ``down_proj``) are summed over the ranks
    with an all-reduce, the column-parallel head's logits gathered along the vocabulary."""
    size = model.stage.tp_size
    share: dict[str, Any] = {
        **config,
        "num_attention_heads": config["num_attention_heads"] // size,
        "num_key_value_heads": config["num_key_value_heads"] // size,
        "intermediate_size": config["intermediate_size"] // size,
        "attn_implementation": "eager",
    }
    local = transformers.LlamaConfig(**share)
    with torch.device("meta"):
        llama = transformers.LlamaForCausalLM(local)
        llama.lm_head = torch.nn.Linear(config["hidden_size"], config["vocab_size"] // size, False)
    llama.load_state_dict(model.tensors, assign=True, strict=True)
    llama.model.rotary_emb = type(llama.model.rotary_emb)(local)  # buffers off the meta device

    def all_reduce(_: Any, __: Any, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output)
        return output

    def gather(_: Any, __: Any, output: torch.Tensor) -> torch.Tensor:
        pieces = [torch.empty_like(output) for _ in range(size)]
        dist.all_gather(pieces, output.contiguous())
        return torch.cat(pieces, -1)

    for layer in llama.model.layers:
        layer.self_attn.o_proj.register_forward_hook(all_reduce)
        layer.mlp.down_proj.register_forward_hook(all_reduce)
    llama.lm_head.register_forward_hook(gather)
    with torch.no_grad():
        logits: torch.Tensor = llama(torch.tensor(TOKENS)).logits
    return logits


async def run_rank(name: str, rank: int, ckpt: Path, out: Path) -> dict[str, Any]:
    """Load (with ``fail4``: rank 3 raises at its first layer), save what the rank holds."""
    gpu = SimulatedGPU("sim:0", total_bytes=GiB)
    size, plan = SCENARIOS[name]
    seen: list[str] = []

    def on_event(event: Event | object) -> None:
        seen.append(type(event).__name__)
        if name == "fail4" and rank == 3 and isinstance(event, LayerPlaced):
            raise RuntimeError("injected failure on rank 3")

    result: dict[str, Any] = {"rank": rank, "error": None}
    try:
        model = await load_distributed(
            ckpt,
            params([gpu]),
            tensor_parallel_size=size,
            tp_plan=plan,
            on_event=on_event,
            peer_timeout=PEER_TIMEOUT,
        )
    except StreamloadError as exc:
        result["error"] = {"type": type(exc).__name__, "message": str(exc)}
    else:
        tensors = {n: t.contiguous() for n, t in model.tensors.items()}
        safetensors.torch.save_file(tensors, out / f"rank{rank}.safetensors")
        result["shards"] = {n: [s.dim, s.index, s.count] for n, s in model.shards.items()}
        result["stage"] = [model.stage.start, model.stage.stop, model.stage.tp_rank]
        result["ranks"] = [summary.to_dict() for summary in model.ranks]
        if name == "tp2":
            config = json.loads((ckpt / "config.json").read_text())
            torch.save(tensor_parallel_forward(model, config), out / f"logits{rank}.pt")
        model.release()
        del model, tensors
        gc.collect()  # the forward's modules hold the tensors in reference cycles
    result["events"] = seen
    result["ledger"] = gpu.allocated_bytes
    return result


def rank_main(rank: int, world: int, port: int, name: str, ckpt: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=RANKS_LIMIT))
    result = anyio.run(run_rank, name, rank, Path(ckpt), Path(out))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_ranks(world: int, name: str, ckpt: Path, out: Path) -> list[dict[str, Any]]:
    """Run scenario ``name`` on ``world`` rank processes; every rank's result."""
    return loaded(distributed_ranks(world, name, ckpt, out, rank_main))


def held(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(out / f"rank{rank}.safetensors")


def assemble(out: Path, results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Each tensor put back together from the ranks of each stage (whole tensors checked
    equal on every rank of a stage holding them)."""
    by_stage: dict[int, list[int]] = {}
    for result in results:
        by_stage.setdefault(result["stage"][0], []).append(result["rank"])
    whole: dict[str, torch.Tensor] = {}
    for ranks in by_stage.values():
        tensors = [held(out, r) for r in ranks]
        shards = results[ranks[0]]["shards"]
        for name, (dim, _, _) in shards.items():
            assert [i for _, i, _ in (results[r]["shards"][name] for r in ranks)] == (
                list(range(len(ranks))) if dim is not None else [0] * len(ranks)
            )
            if dim is None:
                for other in tensors[1:]:
                    assert torch.equal(tensors[0][name], other[name]), name
                whole[name] = tensors[0][name]
            else:
                whole[name] = torch.cat([t[name] for t in tensors], dim)
    return whole


def assert_bit_exact(ckpt: Path, got: dict[str, torch.Tensor]) -> None:
    expected = reference(ckpt)
    assert sorted(expected) == sorted(got)
    for name, tensor in expected.items():
        assert torch.equal(tensor.view(torch.uint8), got[name].view(torch.uint8)), name


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    return write_checkpoint(directory, llama_tensors(LAYERS, extras=False), llama_config(LAYERS))


@pytest.fixture(scope="module")
def two(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("tp2") / "out"
    return out, run_ranks(2, "tp2", ckpt, out)


def test_two_ranks_slices_concatenate_to_the_checkpoint(
    ckpt: Path, two: tuple[Path, list[dict[str, Any]]]
) -> None:
    """Two ranks, one stage: every tensor is the concatenation of the ranks' parts along its
    split dimension, bit for bit; whole tensors are equal on both; the ledgers end at 0."""
    out, results = two
    assert [None, None] == [r["error"] for r in results]
    assert_bit_exact(ckpt, assemble(out, results))
    assert [0, 0] == [r["ledger"] for r in results]
    q = "model.layers.2.self_attn.q_proj.weight"
    assert [[0, 0, 2], [0, 1, 2]] == [r["shards"][q] for r in results]


def test_each_rank_reads_far_less_than_the_model(
    ckpt: Path, two: tuple[Path, list[dict[str, Any]]]
) -> None:
    """Each rank's stored bytes are its slices; what it reads from storage is those plus the
    holes of the row-parallel rows it reads through (rows of a few hundred bytes here), less
    than the whole model, and what it places equals its slices (no conversion here)."""
    _, results = two
    summaries = results[0]["ranks"]
    total = streamload.inspect(ckpt).stored_bytes
    for s in summaries:
        assert s["nbytes"] == s["stored_bytes"]
        assert s["stored_bytes"] <= s["read_bytes"] < 0.8 * total
    assert [0, 1] == [s["tp_rank"] for s in summaries]


def test_a_tensor_parallel_forward_gives_the_unsplit_logits(
    ckpt: Path, two: tuple[Path, list[dict[str, Any]]]
) -> None:
    """Both ranks' forward passes over their slices, with all-reduces and a gather over gloo,
    give the logits of the whole model as transformers loads it."""
    out, _ = two
    whole = transformers.LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="eager")
    with torch.no_grad():
        expected = whole(torch.tensor(TOKENS)).logits
    for rank in range(2):
        got = torch.load(out / f"logits{rank}.pt")
        # Float32 sums in another order (two halves, then the all-reduce): equal to rounding.
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pipeline_by_tensor_parallel_2x2(ckpt: Path, tmp_path: Path) -> None:
    """Four ranks at tensor_parallel_size=2: ranks 0-1 hold layers 0-1 and the embedding,
    ranks 2-3 layers 2-3 and the head; put together they are the checkpoint bit for bit."""
    results = run_ranks(4, "pp2tp2", ckpt, tmp_path / "out")
    assert [None] * 4 == [r["error"] for r in results]
    assert [[0, 2, 0], [0, 2, 1], [2, 4, 0], [2, 4, 1]] == [r["stage"] for r in results]
    assert "model.embed_tokens.weight" in held(tmp_path / "out", 1)
    assert "lm_head.weight" not in held(tmp_path / "out", 1)
    assert_bit_exact(ckpt, assemble(tmp_path / "out", results))
    assert [0] * 4 == [r["ledger"] for r in results]


def test_a_failure_on_one_rank_releases_everything_on_all(ckpt: Path, tmp_path: Path) -> None:
    """Rank 3 (second stage, second TP rank) raises at its first layer: all four ranks raise
    the same error naming rank 3, and every simulated GPU's ledger is back at zero."""
    results = run_ranks(4, "fail4", ckpt, tmp_path / "out")
    errors = [r["error"] for r in results]
    assert [errors[0]] * 4 == errors
    assert "RankFailedError" == errors[0]["type"]
    assert errors[0]["message"].startswith(f"rank 3 ({socket.gethostname()})")
    assert "injected failure on rank 3" in errors[0]["message"]
    assert [0] * 4 == [r["ledger"] for r in results]


def test_a_plan_that_cannot_split_fails_every_rank_before_reading(
    ckpt: Path, tmp_path: Path
) -> None:
    """A plan naming a module the model lacks: both ranks raise the same ``PlanError`` naming
    it, before any stage is assigned or any layer read."""
    results = run_ranks(2, "badplan2", ckpt, tmp_path / "out")
    errors = [r["error"] for r in results]
    assert [errors[0]] * 2 == errors
    assert "PlanError" == errors[0]["type"]
    assert "'layers.*.self_attn.qkv_proj', which matches no tensor" in errors[0]["message"]
    assert [[], []] == [r["events"] for r in results]


def test_command_loads_with_tensor_parallel_size(ckpt: Path) -> None:
    """``python -m streamload.distributed load PATH --tensor-parallel-size 2`` on two ranks:
    each says its place in the stage, rank 0 prints a row per rank with bytes placed and
    read and its TP place."""
    runs = run_command(ckpt, [["--max-seq-len", "16", "--tensor-parallel-size", "2"]] * 2)
    assert [0, 0] == [status for status, _, _ in runs], [err for _, _, err in runs]
    (_, rank0, _), (_, rank1, _) = runs
    assert "[rank 1] stage: layers 0-3 (tensor-parallel 1/2)" in rank1
    rows = [line.split() for line in rank0.splitlines() if not line.startswith("[rank")]
    assert ["rank", "host", "layers"] == rows[0][:3]
    assert ["tp"] == rows[0][-1:]
    assert [["0/2"], ["1/2"]] == [row[-1:] for row in rows[1:]]
