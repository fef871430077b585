"""``streamload demo``'s checkpoint and load: a small random Llama-shaped checkpoint, two
simulated GPUs sized from it so that the plan needs both and the CPU, and another tenant that
takes memory mid-load and forces a re-plan."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamload
from streamload import events
from streamload.cli._live import LoadView, _run_load
from streamload.cli._render import Output, _show_report
from streamload.errors import format_bytes

if TYPE_CHECKING:
    import torch

    from streamload.testing import SimulatedGPU

__all__ = ["DemoSizes", "demo_sizes", "write_demo_checkpoint"]

MiB = 2**20
GiB = 2**30

_DEMO_LAYERS = 12

_DEMO_HIDDEN = 1024

_DEMO_SEQ = 256


def _demo_config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": _DEMO_HIDDEN,
        "intermediate_size": 2048,
        "num_hidden_layers": _DEMO_LAYERS,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "vocab_size": 8192,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


_DEMO_FILES = ("model.safetensors", "config.json")


def write_demo_checkpoint(directory: Path) -> int:
    """A dense, random, bf16 Llama-shaped checkpoint with transformers names (~220 MiB) and its
    ``config.json`` in ``directory`` (``_DEMO_FILES``); returns the bytes written."""
    import torch

    from streamload.testing import write_safetensors

    config = _demo_config()
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return torch.ones(hidden, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        tensors |= {
            f"{prefix}.input_layernorm.weight": norm(),
            f"{prefix}.self_attn.q_proj.weight": weight(hidden, hidden),
            f"{prefix}.self_attn.k_proj.weight": weight(kv, hidden),
            f"{prefix}.self_attn.v_proj.weight": weight(kv, hidden),
            f"{prefix}.self_attn.o_proj.weight": weight(hidden, hidden),
            f"{prefix}.post_attention_layernorm.weight": norm(),
            f"{prefix}.mlp.gate_proj.weight": weight(inter, hidden),
            f"{prefix}.mlp.up_proj.weight": weight(inter, hidden),
            f"{prefix}.mlp.down_proj.weight": weight(hidden, inter),
        }
    tensors["model.norm.weight"] = norm()
    weights_name, config_name = _DEMO_FILES
    weights = write_safetensors(directory / weights_name, tensors, {"format": "pt"})
    (directory / config_name).write_text(json.dumps(config, indent=2) + "\n")
    return weights.stat().st_size + (directory / config_name).stat().st_size


def _demo_params() -> streamload.LoadParams:
    """Small reserves and a short context suit the demo's small GPUs; a fixed host budget makes
    the plan the same on every machine."""
    return streamload.LoadParams(
        devices=["cpu"],
        max_seq_len=_DEMO_SEQ,
        reserve_fraction=0.0,
        reserve_min_bytes=16 * MiB,
        cpu_memory_bytes=4 * GiB,
        host_reserve_bytes=0,
        staging_bytes=64 * MiB,
        chunk_bytes=8 * MiB,
    )


@dataclass(frozen=True, slots=True)
class DemoSizes:
    """The demo's simulated GPUs and tenant: sized from the checkpoint so that the plan needs
    both GPUs and the CPU, and the tenant's grab forces a re-plan."""

    gpu0: int
    gpu1: int
    steal: int


def demo_sizes(path: Path, params: streamload.LoadParams) -> DemoSizes:
    """Measure one layer's cost and the activations with a single roomy simulated GPU, then give
    GPU 0 the non-mapped parts and 4.5 layers, GPU 1 5.5 layers, and the tenant 3 layers."""
    from streamload.testing import SimulatedGPU

    probe = SimulatedGPU("probe", total_bytes=64 * GiB)
    roomy = streamload.plan(path, dataclasses.replace(params, devices=[probe]))
    spec = streamload.inspect(path, params.dtype)
    row = roomy.devices[0]
    layer = max(layer.nbytes for layer in spec.layers) + max(roomy.layer_kv_bytes, default=0)
    fixed = row.reserve_bytes + row.activation_bytes
    return DemoSizes(
        gpu0=fixed + spec.non_mapped_bytes + int(4.5 * layer),
        gpu1=fixed + int(5.5 * layer),
        steal=3 * layer,
    )


def _tenant(gpu: SimulatedGPU, nbytes: int, after_layer: int) -> Callable[[Any, LoadView], None]:
    """An ``on_event`` that has another tenant take ``nbytes`` of ``gpu`` once ``after_layer``
    is placed, and says so."""
    taken = False

    def on_event(event: events.Event, view: LoadView) -> None:
        nonlocal taken
        if isinstance(event, events.LayerPlaced) and event.layer == after_layer and not taken:
            taken = True
            gpu.steal(nbytes)
            view.line(
                f"tenant: took {format_bytes(nbytes)} on {gpu.name} after layer {after_layer} "
                f"(live free now {format_bytes(gpu.free_bytes)})"
            )

    return on_event


def _demo_load(directory: Path, out: Output) -> None:
    """Plan over two simulated GPUs and the CPU, load with a tenant arriving on GPU 1 before its
    first layer, report."""
    from streamload.testing import SimulatedGPU

    base = _demo_params()
    sizes = demo_sizes(directory, base)
    gpu0 = SimulatedGPU("sim:0", total_bytes=sizes.gpu0)
    gpu1 = SimulatedGPU("sim:1", total_bytes=sizes.gpu1)
    params = dataclasses.replace(base, devices=[gpu0, gpu1, "cpu"])
    layer_devices = streamload.plan(directory, params).layer_devices
    first_on_gpu1 = next(
        (i for i, name in enumerate(layer_devices) if name == gpu1.name), len(layer_devices)
    )
    # A LayerPlaced for layer k arrives before layer k + 2 is allocated, so a tenant that
    # appears then is seen by the recheck before GPU 1's first layer.
    trigger = max(first_on_gpu1 - 2, 0)
    out.line(
        f"simulated GPUs: sim:0 {format_bytes(sizes.gpu0)}, sim:1 {format_bytes(sizes.gpu1)}; "
        f"another tenant will take {format_bytes(sizes.steal)} of sim:1 "
        f"once layer {trigger} is placed"
    )
    model = _run_load(directory, params, out, _tenant(gpu1, sizes.steal, trigger))
    try:
        _show_report(model, out)
    finally:
        model.release()
