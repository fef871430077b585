"""End to end: real transformers checkpoints streamed over simulated GPUs and the CPU, then run.

Each tiny model is written by ``transformers`` itself (``save_pretrained``), loaded through
streamload over two simulated GPUs and the CPU, assigned into the same architecture built on
the meta device, and compared with ``from_pretrained``: logits and greedy generation equal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import streamload
from streamload.integrations.transformers import build_model, load_model
from tests.engine_support import params, sized_gpu

pytestmark = pytest.mark.anyio

TINY: dict[str, Callable[[], Any]] = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    ),
    "qwen2-tied": lambda: transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=True,
    ),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        sliding_window=8,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=64, n_layer=5, n_head=4, vocab_size=256, n_positions=64
    ),
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def save_tiny(kind: str, directory: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TINY[kind]())
    model.save_pretrained(directory)
    return directory


def three_way(path: Path) -> list[Any]:
    return [
        sized_gpu("sim:0", path, 1.5, primary=True),
        sized_gpu("sim:1", path, 2.5, primary=False),
        "cpu",
    ]


INPUT = torch.tensor([[3, 17, 42, 99, 5, 200, 7, 1, 64, 128, 11, 2]])


@pytest.mark.parametrize("kind", sorted(TINY))
async def test_logits_equal_from_pretrained(tmp_path: Path, kind: str) -> None:
    """Streamed into a meta-built model, logits equal ``from_pretrained``'s exactly."""
    path = save_tiny(kind, tmp_path / kind)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    loaded = await streamload.load(path, params(three_way(path)))
    assert {"sim:0", "sim:1", "cpu"} == set(loaded.plan.layer_devices)
    model = build_model(loaded)
    with torch.no_grad():
        want = reference(INPUT).logits
        got = model(INPUT).logits
    assert torch.equal(want, got)


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied", "mistral"])
async def test_greedy_generation_equals_from_pretrained(tmp_path: Path, kind: str) -> None:
    """``load_model`` returns a model whose greedy generation equals ``from_pretrained``'s."""
    path = save_tiny(kind, tmp_path / kind)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = await load_model(path, params(three_way(path)))
    with torch.no_grad():
        want = reference.generate(INPUT, max_new_tokens=8, do_sample=False)
        got = model.generate(INPUT, max_new_tokens=8, do_sample=False)
    assert want.tolist() == got.tolist()
    assert model.hf_device_map == model.streamload.device_map


async def test_tied_embedding_is_one_tensor(tmp_path: Path) -> None:
    """With tied embeddings the model's head and embedding share the streamed tensor."""
    path = save_tiny("qwen2-tied", tmp_path / "q")
    model = await load_model(path, params(three_way(path)))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


async def test_device_map_is_accepted_by_from_pretrained_and_dispatch_model(
    tmp_path: Path,
) -> None:
    """``LoadedModel.device_map`` is taken as-is by ``from_pretrained(device_map=...)`` and by
    ``accelerate.dispatch_model``."""
    import accelerate

    path = save_tiny("llama", tmp_path / "l")
    loaded = await streamload.load(path, params(three_way(path)))
    via_hf = transformers.AutoModelForCausalLM.from_pretrained(path, device_map=loaded.device_map)
    for name, param in via_hf.named_parameters():
        module = next(m for m in loaded.device_map if name.startswith(m + "."))
        assert torch.device(loaded.device_map[module]) == param.device, name
    plain = transformers.AutoModelForCausalLM.from_pretrained(path)
    dispatched = accelerate.dispatch_model(plain, device_map=loaded.device_map)
    with torch.no_grad():
        assert torch.equal(via_hf(INPUT).logits, dispatched(INPUT).logits)


async def test_buffers_follow_their_module_to_a_single_device(tmp_path: Path) -> None:
    """A model whose map names one device for everything is not dispatched; its buffers (built
    on the CPU, such as rotary tables) still move to that device. ``meta`` stands in for
    ``cuda:0`` here."""
    path = save_tiny("llama", tmp_path / "llama")
    loaded = await streamload.load(path, params(["cpu"]))
    loaded.device_map = dict.fromkeys(loaded.device_map, "meta")
    model = build_model(loaded)
    buffers = dict(model.named_buffers())
    assert buffers
    assert {"meta"} == {buffer.device.type for buffer in buffers.values()}
