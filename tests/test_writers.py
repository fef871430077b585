"""Tests for ``streamload.testing._writers``: sparse files are sparse and valid, sharded
checkpoints round-trip through ``safetensors.safe_open`` and ``open_checkpoint``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from streamload.checkpoint import INDEX_NAME, TensorEntry, open_checkpoint, read_shard_header
from streamload.testing._writers import (
    TensorShape,
    dtype_code,
    write_safetensors,
    write_sharded,
    write_sparse_safetensors,
)

GiB = 2**30


def disk_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def llama_405b_shapes() -> dict[str, TensorShape]:
    """The tensors of a Llama-3.1-405B checkpoint (126 layers, hidden 16384), in BF16."""
    hidden, inter, kv, vocab = 16384, 53248, 8 * 128, 128256
    shapes = {"model.embed_tokens.weight": TensorShape("BF16", (vocab, hidden))}
    for i in range(126):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = TensorShape("BF16", (hidden,))
        shapes[p + "self_attn.q_proj.weight"] = TensorShape("BF16", (hidden, hidden))
        shapes[p + "self_attn.k_proj.weight"] = TensorShape("BF16", (kv, hidden))
        shapes[p + "self_attn.v_proj.weight"] = TensorShape("BF16", (kv, hidden))
        shapes[p + "self_attn.o_proj.weight"] = TensorShape("BF16", (hidden, hidden))
        shapes[p + "post_attention_layernorm.weight"] = TensorShape("BF16", (hidden,))
        shapes[p + "mlp.gate_proj.weight"] = TensorShape("BF16", (inter, hidden))
        shapes[p + "mlp.up_proj.weight"] = TensorShape("BF16", (inter, hidden))
        shapes[p + "mlp.down_proj.weight"] = TensorShape("BF16", (hidden, inter))
    shapes["model.norm.weight"] = TensorShape("BF16", (hidden,))
    shapes["lm_head.weight"] = TensorShape("BF16", (vocab, hidden))
    return shapes


def test_sparse_file_is_sparse_and_parses_back(tmp_path: Path) -> None:
    """A 64 GiB-shaped file takes almost no disk, and its header reads back in given order."""
    shapes = {
        "b": TensorShape("BF16", (65536, 262144)),
        "a": TensorShape("F32", (2**30,)),
        "c": TensorShape("U8", ()),
    }
    path = write_sparse_safetensors(tmp_path / "big.safetensors", shapes, {"format": "pt"})

    header = read_shard_header(path)

    data = header.data_offset
    expected = (
        TensorEntry("b", path.resolve(), "BF16", (65536, 262144), data, 32 * GiB),
        TensorEntry("a", path.resolve(), "F32", (2**30,), data + 32 * GiB, 4 * GiB),
        TensorEntry("c", path.resolve(), "U8", (), data + 36 * GiB, 1),
    )
    assert expected == header.tensors
    assert {"format": "pt"} == header.metadata
    assert 0 == data % 8
    assert data + 36 * GiB + 1 == path.stat().st_size
    assert disk_bytes(path) < 1024 * 1024


def test_sparse_file_reads_as_zeros_through_safe_open(tmp_path: Path) -> None:
    """safetensors itself accepts a sparse file, and its tensors read back as zeros."""
    shapes = {"w": TensorShape("F16", (3, 5)), "i": TensorShape("I32", (4,))}
    path = write_sparse_safetensors(tmp_path / "s.safetensors", shapes)

    with safe_open(str(path), framework="pt") as handle:
        actual = {name: handle.get_tensor(name) for name in ("w", "i")}

    assert torch.equal(torch.zeros(3, 5, dtype=torch.float16), actual["w"])
    assert torch.equal(torch.zeros(4, dtype=torch.int32), actual["i"])


def test_sharded_sparse_405b_is_free_and_opens(tmp_path: Path) -> None:
    """A 405B-shaped checkpoint in ~5 GB shards costs no disk and opens with every tensor."""
    shapes = llama_405b_shapes()
    config = {"model_type": "llama", "num_hidden_layers": 126}

    root = write_sharded(tmp_path, shapes, max_shard_bytes=5 * 10**9, sparse=True, config=config)

    checkpoint = open_checkpoint(root)
    files = sorted(root.iterdir())
    assert list(shapes) == list(checkpoint.tensors)
    assert [(s.dtype, s.shape) for s in shapes.values()] == [
        (e.dtype, e.shape) for e in checkpoint.tensors.values()
    ]
    assert sum(s.nbytes for s in shapes.values()) == checkpoint.total_bytes
    assert checkpoint.total_bytes > 800 * 10**9
    assert sum(disk_bytes(f) for f in files) < 64 * 1024 * 1024
    assert config == json.loads((root / "config.json").read_text())
    assert all(s.file_size - s.data_offset <= 5 * 10**9 for s in checkpoint.shards)


def test_sharded_dense_round_trips_through_safe_open(tmp_path: Path) -> None:
    """Dense shards hold the exact tensors, the index maps each to its shard, order is kept."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "embed": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
        "layer.0.w": torch.randn(8, 8, generator=generator),
        "layer.0.b": torch.arange(8, dtype=torch.int64),
        "layer.1.w": torch.randn(8, 8, generator=generator),
        "layer.1.mask": torch.tensor([True, False]),
        "head": torch.randn(16, 8, generator=generator).to(torch.float16),
    }

    root = write_sharded(tmp_path, tensors, max_shard_bytes=300, sparse=False)

    index = json.loads((root / INDEX_NAME).read_text())
    shard = "model-{:05d}-of-00005.safetensors".format
    expected = {
        "embed": shard(1),
        "layer.0.w": shard(2),
        "layer.0.b": shard(3),
        "layer.1.w": shard(4),
        "layer.1.mask": shard(4),
        "head": shard(5),
    }
    assert expected == index["weight_map"]
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total == index["metadata"]["total_size"]
    for name, tensor in tensors.items():
        with safe_open(str(root / index["weight_map"][name]), framework="pt") as handle:
            assert torch.equal(tensor, handle.get_tensor(name)), name
    assert list(tensors) == list(open_checkpoint(root).tensors)


def test_sharded_by_count_makes_exactly_that_many_nonempty_shards(tmp_path: Path) -> None:
    """``num_shards`` gives that many shards even when one tensor dwarfs the rest."""
    shapes = {"huge": TensorShape("F32", (10**6,))} | {
        f"t{i}": TensorShape("F32", (1,)) for i in range(4)
    }

    root = write_sharded(tmp_path, shapes, num_shards=4, sparse=True)

    weight_map = json.loads((root / INDEX_NAME).read_text())["weight_map"]
    expected = {
        "huge": "model-00001-of-00004.safetensors",
        "t0": "model-00002-of-00004.safetensors",
        "t1": "model-00003-of-00004.safetensors",
        "t2": "model-00004-of-00004.safetensors",
        "t3": "model-00004-of-00004.safetensors",
    }
    assert expected == weight_map


def test_sharded_by_count_balances_bytes(tmp_path: Path) -> None:
    """Equal tensors split into equal shards."""
    shapes = {f"t{i}": TensorShape("BF16", (64,)) for i in range(12)}

    checkpoint = open_checkpoint(write_sharded(tmp_path, shapes, num_shards=3, sparse=True))

    assert [4, 4, 4] == [len(s.tensors) for s in checkpoint.shards]


def test_one_shard_is_plain_model_safetensors(tmp_path: Path) -> None:
    """One shard is written as ``model.safetensors`` without an index."""
    root = write_sharded(tmp_path / "ckpt", {"w": TensorShape("F32", (2,))}, sparse=False)

    assert ["model.safetensors"] == sorted(p.name for p in root.iterdir())
    with safe_open(str(root / "model.safetensors"), framework="pt") as handle:
        assert torch.equal(torch.zeros(2), handle.get_tensor("w"))


def test_sparse_from_real_tensors_keeps_dtype_and_shape(tmp_path: Path) -> None:
    """Real tensors written sparse keep their dtype code and shape, not their values."""
    tensors = {"a": torch.ones(3, 2, dtype=torch.bfloat16), "b": torch.ones(4, dtype=torch.uint8)}

    checkpoint = open_checkpoint(write_sharded(tmp_path, tensors, sparse=True))

    assert [("BF16", (3, 2)), ("U8", (4,))] == [
        (e.dtype, e.shape) for e in checkpoint.tensors.values()
    ]


def test_write_safetensors_tied_and_noncontiguous(tmp_path: Path) -> None:
    """Tensors sharing storage and non-contiguous views are written, each with its values."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"embed": base, "lm_head": base, "t": base.t()}

    path = write_safetensors(tmp_path / "sub" / "tied.safetensors", tensors, {"k": "v"})

    with safe_open(str(path), framework="pt") as handle:
        assert {"k": "v"} == handle.metadata()
        for name, tensor in tensors.items():
            assert torch.equal(tensor, handle.get_tensor(name)), name


def test_invalid_arguments(tmp_path: Path) -> None:
    """Bad shapes, dtypes and shard arguments raise ``ValueError`` before writing anything."""
    with pytest.raises(ValueError, match="unknown dtype"):
        TensorShape("F4", (1,))
    with pytest.raises(ValueError, match="negative"):
        TensorShape("F32", (2, -1))
    with pytest.raises(ValueError, match="no safetensors code"):
        dtype_code(torch.complex64)
    shapes = {"a": TensorShape("F32", (1,))}
    with pytest.raises(ValueError, match="not both"):
        write_sharded(tmp_path / "unused", shapes, num_shards=1, max_shard_bytes=8, sparse=True)
    with pytest.raises(ValueError, match="num_shards"):
        write_sharded(tmp_path / "unused", shapes, num_shards=2, sparse=True)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        write_sharded(tmp_path / "unused", shapes, max_shard_bytes=0, sparse=True)
    with pytest.raises(ValueError, match="at least one"):
        write_sharded(tmp_path / "unused", {}, sparse=True)
    assert not (tmp_path / "unused").exists()
