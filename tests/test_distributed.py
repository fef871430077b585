"""Distributed loading: the stage split (pure), and loads over 2 and 4 gloo ranks on 127.0.0.1
with simulated GPUs: exact union of the ranks' tensors, local re-plans, failures that reach
every rank with nothing left placed, the event loop free during collectives, the command."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import streamload
from streamload.distributed import (
    CollectiveError,
    DistributedError,
    RankCapacity,
    RankFailedError,
    StageAssigned,
    is_input_part,
    load_distributed,
    main,
    split_stages,
    stage_spec,
)
from streamload.events import Event, LayerPlaced
from streamload.model import ModelSpec, PartSpec
from streamload.planner import DeviceCapacity
from streamload.testing import SimulatedGPU
from tests.engine_support import llama_config, llama_tensors, params, reference, write_checkpoint

LAYERS = 8
GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent
RANKS_LIMIT = 40.0  # seconds a group of rank processes may take before the test fails
PEER_TIMEOUT = 10.0  # seconds the ranks wait for each other in failure scenarios
HUNG_TIMEOUT = 2.0  # the same, where a rank hangs on purpose


def tied_checkpoint(directory: Path) -> Path:
    """8 Llama layers, ``lm_head`` tied to the input embedding (stored as an equal copy)."""
    tensors = llama_tensors(LAYERS)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    return write_checkpoint(directory, tensors, llama_config(LAYERS, tie=True))


def untied_checkpoint(directory: Path) -> Path:
    return write_checkpoint(directory, llama_tensors(LAYERS, seed=1), llama_config(LAYERS))


def gpu_rank(rank: int, free: int, host: str | None = None) -> RankCapacity:
    return RankCapacity(rank, host or f"node{rank}", (DeviceCapacity("sim:0", True, free, free),))


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tied_checkpoint(tmp_path_factory.mktemp("tied"))


@pytest.fixture(scope="module")
def tied_spec(tied: Path) -> ModelSpec:
    return streamload.inspect(tied)


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untied_checkpoint(tmp_path_factory.mktemp("untied"))


# --------------------------------------------------------------------------------------------
# The split (pure)


def test_equal_ranks_get_equal_contiguous_stages(tied_spec: ModelSpec) -> None:
    """Four equal ranks split 8 layers 2-2-2-2, contiguous and in rank order."""
    plan = split_stages(tied_spec, [gpu_rank(r, GiB) for r in range(4)], params([]))
    assert [(0, 2), (2, 4), (4, 6), (6, 8)] == [(s.start, s.stop) for s in plan.stages]
    assert (0, 0, 1, 1, 2, 2, 3, 3) == plan.layer_ranks


def test_stages_follow_the_ranks_capacities(tied_spec: ModelSpec) -> None:
    """A rank with three times the GPU memory takes the most layers (1-1-1-5 minimises the
    fullest rank's share), and every rank keeps at least one layer."""
    ranks = [gpu_rank(0, GiB), gpu_rank(1, GiB), gpu_rank(2, GiB), gpu_rank(3, 3 * GiB)]
    plan = split_stages(tied_spec, ranks, params([]))
    assert [1, 1, 1, 5] == [s.stop - s.start for s in plan.stages]
    two = split_stages(tied_spec, [gpu_rank(0, 3 * GiB), gpu_rank(1, GiB)], params([]))
    assert [6, 2] == [s.stop - s.start for s in two.stages]


def test_first_stage_holds_inputs_last_holds_outputs_and_the_tied_embedding(
    tied_spec: ModelSpec,
) -> None:
    """The embedding goes to the first stage, the final norm to the last, and the tied head
    makes the last stage load the embedding tensor too; middle stages hold no parts."""
    plan = split_stages(tied_spec, [gpu_rank(r, GiB) for r in range(3)], params([]))
    expected = [
        (("model.embed_tokens",), ()),
        ((), ()),
        (("model.norm",), ("model.embed_tokens.weight",)),
    ]
    assert expected == [(s.parts, s.tied_sources) for s in plan.stages]


def test_one_rank_holds_the_whole_model(tied_spec: ModelSpec) -> None:
    """With one rank there is one stage: every layer and part, no extra tied copy."""
    (stage,) = split_stages(tied_spec, [gpu_rank(0, GiB)], params([])).stages
    expected = (0, LAYERS, ("model.embed_tokens", "model.norm"), ())
    assert expected == (stage.start, stage.stop, stage.parts, stage.tied_sources)
    sub = stage_spec(tied_spec, stage)
    assert set(tied_spec.checkpoint.tensors) == set(sub.checkpoint.tensors)


def test_stage_spec_renumbers_layers_and_keeps_names_and_ties(tied_spec: ModelSpec) -> None:
    """The last stage's spec numbers its layers from 0 under their checkpoint names, holds the
    norm and the embedding tensor, keeps the tie, and lists only its own tensors."""
    plan = split_stages(tied_spec, [gpu_rank(0, GiB), gpu_rank(1, GiB)], params([]))
    sub = stage_spec(tied_spec, plan.stage(1))
    assert [(i, f"model.layers.{4 + i}") for i in range(4)] == [
        (layer.index, layer.prefix) for layer in sub.layers
    ]
    assert ["model.embed_tokens", "model.norm"] == [part.name for part in sub.non_mapped]
    assert {"lm_head.weight": "model.embed_tokens.weight"} == dict(sub.tied)
    own = {n for layer in tied_spec.layers[4:] for n in layer.tensors}
    own |= {"model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"}
    assert own == set(sub.checkpoint.tensors)
    first = stage_spec(tied_spec, plan.stage(0))
    assert ({}, False) == (dict(first.tied), first.has_lm_head)


def test_stage_that_cannot_fit_fails_naming_rank_and_device(tied_spec: ModelSpec) -> None:
    """A rank whose GPU is too small for its stage (and no CPU) is named, with its device."""
    ranks = [gpu_rank(0, GiB), gpu_rank(1, 4096)]
    with pytest.raises(RankFailedError) as caught:
        split_stages(tied_spec, ranks, params([]))
    assert (1, "node1", "sim:0") == (caught.value.rank, caught.value.host, caught.value.device)
    assert str(caught.value).startswith("rank 1 (node1), device sim:0: planning layer 7: ")


def test_more_ranks_than_layers_is_a_plan_error(tied_spec: ModelSpec) -> None:
    """Every rank needs a layer: 9 ranks cannot share 8 layers."""
    with pytest.raises(streamload.PlanError, match="8 layers cannot be split into 9 stages"):
        split_stages(tied_spec, [gpu_rank(r, GiB) for r in range(9)], params([]))


def test_ranks_on_one_host_share_its_memory(tied_spec: ModelSpec) -> None:
    """Two CPU-only ranks on one host each get half its available memory as their budget;
    a rank alone on its host keeps the host's own reading."""
    cpu = (DeviceCapacity("cpu", False, 8 * GiB, 6 * GiB),)
    ranks = [RankCapacity(0, "a", cpu), RankCapacity(1, "a", cpu), RankCapacity(2, "b", cpu)]
    plan = split_stages(tied_spec, ranks, params([]))
    assert [3 * GiB, 3 * GiB, None] == [s.cpu_memory_bytes for s in plan.stages]


@pytest.mark.parametrize(
    ("name", "sub_model", "expected"),
    [
        ("model.embed_tokens", None, True),
        ("transformer.wte", None, True),
        ("transformer.wpe", None, True),
        ("bert.embeddings", None, True),
        ("model.vision_tower", "vision", True),
        ("model.norm", None, False),
        ("lm_head", None, False),
        ("embed_out", None, False),
        ("transformer.ln_f", None, False),
        ("model.layers.61", None, False),
    ],
)
def test_input_parts(name: str, sub_model: str | None, expected: bool) -> None:
    """Embeddings and towers feed the first layer; norms, heads and extra layers the last."""
    assert expected == is_input_part(PartSpec(name, (), 0, 0, 0, sub_model))


@pytest.mark.anyio
async def test_a_load_needs_an_initialised_process_group(tied: Path) -> None:
    """Without ``init_process_group`` the load says so before touching anything."""
    with pytest.raises(DistributedError, match="not initialised"):
        await load_distributed(tied, params(["cpu"]))


# --------------------------------------------------------------------------------------------
# Rank processes: each runs one scenario and writes what it saw as JSON


def digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes, with its dtype and shape."""
    data = bytes(tensor.contiguous().reshape(-1).view(torch.uint8).tolist())
    return f"{tensor.dtype}|{tuple(tensor.shape)}|{hashlib.sha256(data).hexdigest()}"


def layer_bytes(path: Path) -> int:
    return streamload.inspect(path).layers[0].nbytes


class Scenario:
    """One rank's part in a scenario: its devices, callback, and what happens before loading."""

    def __init__(self, name: str, rank: int, ckpt: Path) -> None:
        self.name = name
        self.rank = rank
        self.ckpt = ckpt
        self.gpus = [SimulatedGPU("sim:0", total_bytes=GiB)]
        self.delay = 0.0
        self.peer_timeout = PEER_TIMEOUT
        self.on_event: Callable[[Event | StageAssigned], None] | None = None
        getattr(self, name)()

    def tied2(self) -> None:
        self.delay = 2.0 if self.rank == 1 else 0.0  # rank 0 waits on the survey meanwhile

    def balanced4(self) -> None:
        self.gpus = [SimulatedGPU("sim:0", total_bytes=(3 if self.rank == 3 else 1) * GiB)]

    def replan2(self) -> None:
        if self.rank == 1:
            self.gpus.append(SimulatedGPU("sim:1", total_bytes=GiB))
            self.on_event = self.at_first_layer(self.leave(1.5))

    def nofit2(self) -> None:
        if self.rank == 1:
            self.on_event = self.at_first_layer(self.leave(0.5))

    def raise4(self) -> None:
        if self.rank == 2:
            self.on_event = self.at_first_layer(self.raise_injected)

    def exit4(self) -> None:
        if self.rank == 1:
            self.on_event = self.at_first_layer(lambda: os._exit(3))

    def hang2(self) -> None:
        self.peer_timeout = HUNG_TIMEOUT
        if self.rank == 1:  # stuck (its whole process) for twice the peer timeout
            self.on_event = self.at_first_layer(lambda: time.sleep(2 * HUNG_TIMEOUT))

    def leave(self, layers: float) -> Callable[[], None]:
        """Another tenant takes all of the first GPU but room for ``layers`` layers."""
        gpu, keep = self.gpus[0], int(layers * layer_bytes(self.ckpt))
        return lambda: gpu.steal(gpu.free_bytes - keep)

    @staticmethod
    def at_first_layer(act: Callable[[], None]) -> Callable[[Event | StageAssigned], None]:
        """A callback that runs ``act`` once, when the rank's first layer is placed."""

        def callback(event: Event | StageAssigned) -> None:
            if isinstance(event, LayerPlaced) and event.layer == 0:
                act()

        return callback

    def raise_injected(self) -> None:
        raise RuntimeError(f"injected failure on rank {self.rank}")


async def run_rank(scenario: Scenario) -> dict[str, Any]:
    """Load with a heartbeat task running; report tensors, errors, ledgers and loop gaps."""
    gaps: list[float] = []
    result: dict[str, Any] = {"rank": scenario.rank, "error": None, "tensors": {}}

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    await anyio.sleep(scenario.delay)
    started = time.monotonic()
    async with anyio.create_task_group() as group:
        group.start_soon(heartbeat)
        try:
            model = await load_distributed(
                scenario.ckpt,
                params(scenario.gpus),
                on_event=scenario.on_event,
                peer_timeout=scenario.peer_timeout,
            )
        except DistributedError as exc:
            result["error"] = {"type": type(exc).__name__, "message": str(exc)}
            result["error"].update(rank=exc.rank, device=exc.device)
        else:
            result["stage"] = [model.stage.start, model.stage.stop]
            result["tensors"] = {name: digest(t) for name, t in model.tensors.items()}
            result["replans"] = len(model.local.report.replans)
            result["layer_devices"] = list(model.local.plan.layer_devices)
            result["ranks"] = [summary.to_dict() for summary in model.ranks]
            model.release()
            del model
        group.cancel_scope.cancel()
    result["seconds"] = time.monotonic() - started
    result["max_gap"] = max(gaps, default=0.0)
    result["ledgers"] = {gpu.name: gpu.allocated_bytes for gpu in scenario.gpus}
    return result


def rank_main(rank: int, world: int, port: int, name: str, ckpt: str, out: str) -> None:
    """A rank process: join the group as torchrun would set it up, run, write the result."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=RANKS_LIMIT))
    result = anyio.run(run_rank, Scenario(name, rank, Path(ckpt)))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if result["error"] is None:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def reaped(processes: list[Any]) -> Iterator[None]:
    """Kill any rank process still alive on the way out."""
    try:
        yield
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def run_ranks(
    world: int, name: str, ckpt: Path, out: Path, target: Callable[..., None] | None = None
) -> list[dict[str, Any] | None]:
    """Run scenario ``name`` on ``world`` rank processes (``target``, a module-level function
    taking ``(rank, world, port, name, ckpt, out)``; this module's ``rank_main`` by default);
    each rank's result (``None`` for a rank that wrote none). Fails if the group is not done
    within ``RANKS_LIMIT`` seconds."""
    out.mkdir()
    main = rank_main if target is None else target
    # Rank processes fork from a server that has imported the target's module (torch included)
    # once.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([main.__module__])
    port = free_port()
    processes = [
        context.Process(target=main, args=(r, world, port, name, str(ckpt), str(out)))
        for r in range(world)
    ]
    deadline = time.monotonic() + RANKS_LIMIT
    with reaped(processes):
        for process in processes:
            process.start()
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.1))
        stuck = [r for r, p in enumerate(processes) if p.is_alive()]
        assert [] == stuck, f"ranks still running after {RANKS_LIMIT} s"
    results: list[dict[str, Any] | None] = []
    for r in range(world):
        path = out / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return results


def loaded(results: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


def union_and_overlap(results: list[dict[str, Any]]) -> tuple[dict[str, str], set[str]]:
    union: dict[str, str] = {}
    overlap: set[str] = set()
    for result in results:
        for name, value in result["tensors"].items():
            if name in union:
                overlap.add(name)
                assert union[name] == value, name
            union[name] = value
    return union, overlap


def expected_digests(ckpt: Path) -> dict[str, str]:
    return {name: digest(tensor) for name, tensor in reference(ckpt).items()}


# --------------------------------------------------------------------------------------------
# Two ranks, tied head


@pytest.fixture(scope="module")
def two_tied(tied: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return loaded(run_ranks(2, "tied2", tied, tmp_path_factory.mktemp("run") / "out"))


def test_two_ranks_union_is_the_checkpoint_bit_for_bit(
    tied: Path, two_tied: list[dict[str, Any]]
) -> None:
    """Every checkpoint tensor is on some rank, byte for byte as safetensors reads it."""
    union, _ = union_and_overlap(two_tied)
    assert expected_digests(tied) == union


def test_two_ranks_share_only_the_tied_embedding(two_tied: list[dict[str, Any]]) -> None:
    """Only the embedding the tied head reads is on both ranks; the head is on the last."""
    _, overlap = union_and_overlap(two_tied)
    assert {"model.embed_tokens.weight"} == overlap
    assert [False, True] == ["lm_head.weight" in result["tensors"] for result in two_tied]
    assert [[0, 4], [4, 8]] == [result["stage"] for result in two_tied]


def test_two_ranks_release_everything(two_tied: list[dict[str, Any]]) -> None:
    """After ``release()`` every simulated GPU's ledger is back at zero."""
    assert [{"sim:0": 0}, {"sim:0": 0}] == [result["ledgers"] for result in two_tied]


def test_event_loop_runs_while_a_rank_waits_for_its_peers(
    two_tied: list[dict[str, Any]],
) -> None:
    """Rank 0 waits about 2 s for rank 1 to join the survey, yet its event loop keeps
    ticking every 10 ms: the collectives run in worker threads."""
    rank0 = two_tied[0]
    assert rank0["seconds"] > 1.0
    assert rank0["max_gap"] < 0.5


def test_every_rank_learns_every_rank_summary(two_tied: list[dict[str, Any]]) -> None:
    """Both ranks hold the same per-rank report, matching what each loaded."""
    assert two_tied[0]["ranks"] == two_tied[1]["ranks"]
    expected = [(0, 4, ["model.embed_tokens"]), (4, 8, ["model.norm"])]
    assert expected == [(s["start"], s["stop"], s["parts"]) for s in two_tied[0]["ranks"]]


# --------------------------------------------------------------------------------------------
# Four ranks, unequal capacities


def test_four_ranks_balance_by_capacity_and_union_is_the_checkpoint(
    untied: Path, tmp_path: Path
) -> None:
    """Rank 3 has three times the memory and takes 5 of 8 layers; the ranks' tensors are
    disjoint and together equal the checkpoint bit for bit; every ledger ends at zero."""
    results = loaded(run_ranks(4, "balanced4", untied, tmp_path / "out"))
    assert [[0, 1], [1, 2], [2, 3], [3, 8]] == [result["stage"] for result in results]
    union, overlap = union_and_overlap(results)
    assert set() == overlap
    assert expected_digests(untied) == union
    assert [{"sim:0": 0}] * 4 == [result["ledgers"] for result in results]


# --------------------------------------------------------------------------------------------
# Under-delivery and failures


def test_under_delivery_is_replanned_on_that_rank_only(untied: Path, tmp_path: Path) -> None:
    """Another tenant takes most of rank 1's first GPU mid-load: rank 1 re-plans its own
    layers onto its second GPU, rank 0 is untouched, and the union is still exact."""
    results = loaded(run_ranks(2, "replan2", untied, tmp_path / "out"))
    assert [None, None] == [result["error"] for result in results]
    assert [0, 1] == [min(result["replans"], 1) for result in results]
    assert {"sim:0", "sim:1"} == set(results[1]["layer_devices"])
    union, _ = union_and_overlap(results)
    assert expected_digests(untied) == union


def test_a_stage_that_no_longer_fits_fails_every_rank_alike(untied: Path, tmp_path: Path) -> None:
    """Rank 1's only GPU is taken after its first layer and the rest of its stage fits
    nowhere: both ranks raise the same error naming rank 1 and sim:0, and both ledgers are
    back at zero."""
    results = loaded(run_ranks(2, "nofit2", untied, tmp_path / "out"))
    errors = [result["error"] for result in results]
    assert errors[0] == errors[1]
    assert ("RankFailedError", 1, "sim:0") == (
        errors[0]["type"],
        errors[0]["rank"],
        errors[0]["device"],
    )
    assert errors[0]["message"].startswith(f"rank 1 ({socket.gethostname()}), device sim:0: ")
    assert [{"sim:0": 0}, {"sim:0": 0}] == [result["ledgers"] for result in results]


def test_a_rank_that_raises_fails_every_rank_alike(untied: Path, tmp_path: Path) -> None:
    """Rank 2's callback raises at its first layer: all four ranks raise the same error
    naming rank 2 and the injected failure, and nothing stays placed anywhere."""
    results = loaded(run_ranks(4, "raise4", untied, tmp_path / "out"))
    errors = [result["error"] for result in results]
    assert [errors[0]] * 4 == errors
    assert ("RankFailedError", 2) == (errors[0]["type"], errors[0]["rank"])
    assert "injected failure on rank 2" in errors[0]["message"]
    assert [{"sim:0": 0}] * 4 == [result["ledgers"] for result in results]


def test_a_rank_that_dies_fails_the_others_in_bounded_time(untied: Path, tmp_path: Path) -> None:
    """Rank 1 exits mid-load: ranks 0, 2 and 3 fail with a ``CollectiveError`` well within
    the peer timeout, and release everything they placed."""
    results = run_ranks(4, "exit4", untied, tmp_path / "out")
    assert None is results[1]
    survivors = [result for result in results if result is not None]
    assert [CollectiveError.__name__] * 3 == [result["error"]["type"] for result in survivors]
    assert all(result["seconds"] < PEER_TIMEOUT for result in survivors)
    assert [{"sim:0": 0}] * 3 == [result["ledgers"] for result in survivors]


def test_a_rank_that_hangs_fails_the_others_after_the_peer_timeout(
    untied: Path, tmp_path: Path
) -> None:
    """Rank 1 stops responding mid-load for twice the peer timeout: rank 0 gives up with a
    ``CollectiveError`` once the timeout has passed (not before, and well before rank 1
    wakes), having released everything."""
    results = loaded(run_ranks(2, "hang2", untied, tmp_path / "out"))
    rank0 = results[0]
    assert CollectiveError.__name__ == rank0["error"]["type"]
    assert "the exchange of outcomes failed" in rank0["error"]["message"]
    assert HUNG_TIMEOUT <= rank0["seconds"] < 2 * HUNG_TIMEOUT
    assert {"sim:0": 0} == rank0["ledgers"]


# --------------------------------------------------------------------------------------------
# The command


def run_command(ckpt: Path, per_rank: list[list[str]]) -> list[tuple[int, str, str]]:
    """Run ``python -m streamload.distributed load`` once per rank with the environment
    torchrun sets (rank r gets ``per_rank[r]`` as extra arguments); (status, stdout, stderr)."""
    port = free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    base["PYTHONPATH"] = str(ROOT)
    world = str(len(per_rank))
    command = [sys.executable, "-m", "streamload.distributed", "load", str(ckpt)]
    command += ["--device", "sim:0=2GiB", "--no-cpu", "--peer-timeout", str(PEER_TIMEOUT)]
    runs = [
        subprocess.Popen(
            command + extra,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": world},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, extra in enumerate(per_rank)
    ]
    try:
        outputs = [run.communicate(timeout=RANKS_LIMIT) for run in runs]
    finally:
        for run in runs:
            run.kill()
    return [(run.returncode, out, err) for run, (out, err) in zip(runs, outputs, strict=True)]


def test_command_prints_progress_per_rank_and_the_report_on_rank_0(tied: Path) -> None:
    """``python -m streamload.distributed load`` on two ranks: each rank prints a line per
    placed layer or part prefixed with its rank, rank 0 prints one report row per rank (the
    tied embedding listed on rank 1), both exit 0."""
    runs = run_command(tied, [["--max-seq-len", "64"]] * 2)
    assert [0, 0] == [status for status, _, _ in runs], [err for _, _, err in runs]
    (_, rank0, _), (_, rank1, _) = runs
    assert "[rank 0] layer 3 -> sim:0" in rank0
    assert "[rank 1] layer 4 -> sim:0" in rank1
    assert "[rank 1] model.embed_tokens -> sim:0" in rank1
    host = socket.gethostname()
    rows = [line.split("  ") for line in rank0.splitlines() if not line.startswith("[rank")]
    cells = [[cell.strip() for cell in row if cell.strip()][:4] for row in rows]
    expected = [
        ["rank", "host", "layers", "parts"],
        ["0", host, "0-3", "model.embed_tokens"],
        ["1", host, "4-7", "model.norm, model.embed_tokens.weight (tied)"],
    ]
    assert expected == cells
    assert all(line.startswith("[rank 1] ") for line in rank1.splitlines())


def test_command_fails_on_every_rank_with_one_message(tied: Path) -> None:
    """Ranks started with different settings stop before loading anything: both exit 2 with
    the same one-line error naming rank 1 and the setting that differs."""
    runs = run_command(tied, [["--max-seq-len", "64"], ["--max-seq-len", "128"]])
    assert [2, 2] == [status for status, _, _ in runs]
    errors = [err.strip().split("] ", 1) for _, _, err in runs]
    assert ["streamload.distributed: error: [rank 0", "streamload.distributed: error: [rank 1"] == [
        prefix for prefix, _ in errors
    ]
    assert errors[0][1] == errors[1][1]
    host = socket.gethostname()
    expected = (
        f"rank 1 ({host}): agreeing on the load: its load parameters differ from rank 0's: "
        "max_seq_len"
    )
    assert expected == errors[0][1]


def test_command_reports_a_bad_argument_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad argument stops the rank before it joins the group: exit status 2, nothing on
    stdout, one ``streamload.distributed: error: [rank R] ...`` line naming the argument and
    where help is (the same form as every other failure of the command)."""
    monkeypatch.delenv("RANK", raising=False)
    code = main(["load", "nowhere", "--device", "sim:0=lots"])
    out, err = capsys.readouterr()
    assert (2, "") == (code, out)
    expected = (
        "streamload.distributed: error: [rank 0] argument --device: bad size 'lots': expected "
        "a number and a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 24GiB "
        "(see 'python -m streamload.distributed load --help')"
    )
    assert [expected] == err.splitlines()
