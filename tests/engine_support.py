"""Checkpoints and helpers for the engine's tests: small Llama-shaped models with mixed dtypes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import safetensors.torch
import torch

import streamload
from streamload.events import Event, LayerPlaced
from streamload.testing import SimulatedGPU

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTER = 128
VOCAB = 256


def llama_config(layers: int, *, dtype: str = "float32", tie: bool = False) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers,
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "intermediate_size": INTER,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "torch_dtype": dtype,
    }


def llama_tensors(layers: int, *, seed: int = 0, extras: bool = True) -> dict[str, torch.Tensor]:
    """Random F32 Llama weights in Hugging Face names; with ``extras``, each layer also carries
    non-float or non-F32 tensors (BF16, F16, I32, U8, BOOL, FP8) that a dtype change must keep
    or convert exactly."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = rand(HIDDEN)
        out[f"{p}.self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
        out[f"{p}.self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        out[f"{p}.self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        out[f"{p}.self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        out[f"{p}.post_attention_layernorm.weight"] = rand(HIDDEN)
        out[f"{p}.mlp.gate_proj.weight"] = rand(INTER, HIDDEN)
        out[f"{p}.mlp.up_proj.weight"] = rand(INTER, HIDDEN)
        out[f"{p}.mlp.down_proj.weight"] = rand(HIDDEN, INTER)
        if extras:
            out[f"{p}.mlp.down_proj.bias"] = rand(HIDDEN).to(torch.bfloat16)
            out[f"{p}.mlp.gate_proj.scales"] = rand(INTER).to(torch.float16)
            out[f"{p}.mlp.gate_proj.qweight"] = torch.randint(
                -(2**31), 2**31 - 1, (INTER // 8, HIDDEN), generator=gen, dtype=torch.int32
            )
            out[f"{p}.mlp.up_proj.packed"] = torch.randint(
                0, 255, (33,), generator=gen, dtype=torch.uint8
            )
            out[f"{p}.self_attn.mask"] = torch.randint(0, 2, (7, 3), generator=gen).bool()
            out[f"{p}.mlp.up_proj.fp8"] = rand(5, 8).to(torch.float8_e4m3fn)
            out[f"{p}.self_attn.scalar"] = torch.tensor(3.5)
    out["model.norm.weight"] = rand(HIDDEN)
    out["lm_head.weight"] = rand(VOCAB, HIDDEN)
    return out


def write_checkpoint(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    shards: int = 3,
) -> Path:
    """Write ``tensors`` in ``shards`` files with an index (shards cut in the middle of layers),
    plus ``config.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        if not part:
            continue
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        safetensors.torch.save_file({n: tensors[n].contiguous() for n in part}, directory / fname)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(dict(config)))
    return directory


def reference(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor as ``safetensors`` itself loads it."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(path))
    return out


def assert_identical(
    loaded: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> None:
    """``loaded`` holds exactly ``ref``'s tensors, bit for bit (floats in ``dtype`` if given,
    converted as torch converts them)."""
    assert sorted(ref) == sorted(loaded)
    for name, want in ref.items():
        got = loaded[name]
        if dtype is not None and want.dtype in (torch.float32, torch.float16, torch.bfloat16):
            want = want.to(dtype)
        assert (want.dtype, want.shape) == (got.dtype, got.shape), name
        expected = want.reshape(-1).view(torch.uint8)
        assert torch.equal(expected, got.reshape(-1).view(torch.uint8)), name


def params(devices: list[Any], **overrides: Any) -> streamload.LoadParams:
    """Load parameters for tiny models: short sequences, no reserves, small chunks (so the
    staging ring wraps many times), a small staging budget."""
    base: dict[str, Any] = {
        "devices": devices,
        "max_seq_len": 16,
        "attention_chunk": 16,
        "reserve_fraction": 0.0,
        "reserve_min_bytes": 0,
        "host_reserve_bytes": 0,
        "chunk_bytes": 4096,
        "staging_bytes": 4 * 4096,
        "reader_threads": 3,
    }
    base.update(overrides)
    return streamload.LoadParams(**base)


def sized_gpu(name: str, directory: Path, layers_held: float, *, primary: bool) -> SimulatedGPU:
    """A simulated GPU with room for about ``layers_held`` layers of the checkpoint at
    ``directory`` (plus the non-mapped parts if ``primary``), under ``params()`` settings."""
    probe = streamload.plan(directory, params([SimulatedGPU("probe", total_bytes=2**40)]))
    spec = streamload.inspect(directory)
    row = probe.devices[0]
    layer = spec.layers[0].nbytes + probe.layer_kv_bytes[0]
    base = row.activation_bytes + (spec.non_mapped_bytes if primary else 0)
    return SimulatedGPU(name, total_bytes=int(base + layers_held * layer))


# Seconds each copy to a simulated GPU takes where a test acts on ``LayerPlaced(L)`` and
# expects unit L + 1 already rechecked and allocated (a tenant's steal, a failed allocation's
# ``Replanned``): only unit L + 2 waits for L's placement, so whether L + 1's recheck and
# allocation come before L's placement is the scheduler's choice; slow copies make L's
# placement land after them on any machine.
SLOW_COPY = 0.005


def three_way(directory: Path, copy_delay: float = 0.0) -> list[Any]:
    """Two simulated GPUs sized for about 2.5 layers each of the 6-layer checkpoint at
    ``directory`` (the first with the non-mapped parts: it takes layers 0-1, the second 2-3),
    then the CPU (the rest); ``copy_delay``: each GPU's (``SLOW_COPY``)."""
    gpus = [
        sized_gpu("sim:0", directory, 2.5, primary=True),
        sized_gpu("sim:1", directory, 2.5, primary=False),
    ]
    for gpu in gpus:
        gpu.copy_delay = copy_delay
    return [*gpus, "cpu"]


def evict(directory: Path) -> None:
    """Drop the checkpoint's files from the page cache (written back first)."""
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def load_cancelled_after(
    directory: Path, load_params: streamload.LoadParams, after: int | None
) -> tuple[bool, list[Event]]:
    """Load ``directory``, cancelling a cancel scope around the load when ``LayerPlaced`` for
    layer ``after`` arrives (``None``: the non-mapped parts); whether the scope caught the
    cancellation, and every event delivered."""
    events: list[Event] = []
    with anyio.CancelScope() as scope:

        def on_event(event: Event) -> None:
            events.append(event)
            if isinstance(event, LayerPlaced) and event.layer == after:
                scope.cancel()

        await streamload.load(directory, load_params, on_event=on_event)
    return scope.cancelled_caught, events


def open_fds_under(directory: Path) -> list[str]:
    """Paths under ``directory`` this process holds open (Linux ``/proc/self/fd``)."""
    found = []
    root = str(directory.resolve())
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root):
            found.append(target)
    return found
