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
import safetensors.torch
import torch
import transformers

import streamload
from streamload.integrations.transformers import build_model, load_model
from streamload.testing import SimulatedGPU
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


# --------------------------------------------------------------------------------------------
# Encoders, vision-language models, and key sets checked before streaming


def save_minilm(directory: Path) -> Path:
    """A MiniLM-shaped ``BertModel`` written by ``save_pretrained``, plus the
    ``embeddings.position_ids`` tensor that published checkpoints (all-MiniLM-L6-v2) carry and
    current BERT holds as a non-persistent buffer."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=64,
        architectures=["BertModel"],
    )
    transformers.BertModel(config).save_pretrained(directory)
    file = directory / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    tensors["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    return directory


async def test_encoder_last_hidden_state_equals_from_pretrained(tmp_path: Path) -> None:
    """A BERT encoder with ``embeddings.position_ids`` in its checkpoint loads through
    ``AutoModel`` (the buffer ignored as ``from_pretrained`` ignores it) and gives the same
    ``last_hidden_state``."""
    path = save_minilm(tmp_path / "minilm")
    reference = transformers.AutoModel.from_pretrained(path).eval()
    model = await load_model(path, params(three_way(path)))
    assert "BertModel" == type(model).__name__
    mask = torch.ones_like(INPUT)
    with torch.no_grad():
        want = reference(input_ids=INPUT, attention_mask=mask).last_hidden_state
        got = model(input_ids=INPUT, attention_mask=mask).last_hidden_state
    assert torch.equal(want, got)


def save_tiny_llava(directory: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        ),
        image_token_index=255,
    )
    transformers.LlavaForConditionalGeneration(config).save_pretrained(directory)
    return directory


async def test_vision_language_model_logits_equal_from_pretrained(tmp_path: Path) -> None:
    """A llava-shaped model (CLIP tower, projector, Llama) loads with its tower on the primary
    device and gives ``from_pretrained``'s logits."""
    path = save_tiny_llava(tmp_path / "llava")
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    loaded_devices = [sized_gpu("sim:0", path, 1.5, primary=True), "cpu"]
    model = await load_model(path, params(loaded_devices))
    assert "LlavaForConditionalGeneration" == type(model).__name__
    with torch.no_grad():
        want = reference(input_ids=INPUT).logits
        got = model(input_ids=INPUT).logits
    assert torch.equal(want, got)


async def test_a_key_mismatch_fails_before_any_tensor_is_read(tmp_path: Path) -> None:
    """A checkpoint the model cannot take fails in ``load_model`` with the names, before the
    load starts: no event is delivered, nothing is placed."""
    path = save_tiny("llama", tmp_path / "l")
    file = path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    seen: list[Any] = []
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    with pytest.raises(streamload.LoadError) as caught:
        await load_model(path, params([gpu, "cpu"]), on_event=seen.append)
    message = str(caught.value)
    assert "missing from the checkpoint: [model.layers.1.mlp.up_proj.weight]" in message
    assert "unknown to LlamaForCausalLM: [model.layers.1.mlp.extra.weight]" in message
    assert ([], 0) == (seen, gpu.peak_allocated_bytes)
