"""Checkpoint entries + config -> ``ModelSpec``: tensors grouped into layers and parts, sized.

How tensors are grouped:

- A *tower* tensor has a path segment naming a vision/audio tower or projector
  (``vision_tower``, ``visual``, ``multi_modal_projector``, ``audio_tower``, ...); it belongs to the
  part named by the path up to that segment (``model.vision_tower``), with ``sub_model`` set.
- Among the other tensors, the *layer container* is the prefix before the first integer segment
  (``model.layers`` in ``model.layers.3.mlp.up_proj.weight``) whose indices cover
  ``0..num_hidden_layers-1`` of the text config. When several do (encoder-decoder checkpoints),
  the one holding the most bytes wins. Indices at or above ``num_hidden_layers`` (DeepSeek-V3's
  MTP layer ``model.layers.61``) become non-mapped parts named ``<container>.<index>``.
- Every other tensor belongs to the part named by its path up to the first segment where it
  leaves the container's path (``model.embed_tokens``, ``model.norm``, ``lm_head``,
  ``transformer.wte``, ``bert.embeddings``, ``cls``), usable as a Hugging Face ``device_map`` key.

Sizes: floating tensors (``FLOAT_CODES``) are counted at ``numel x size(target)``; integer,
bool and FP8 tensors at their stored size, and so are the float side tensors (scales, zero
points) of a checkpoint whose config declares a ``quantization_config`` (``placed_dtype``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from streamload.checkpoint import (
    DTYPE_SIZES,
    FLOAT_CODES,
    Checkpoint,
    TensorEntry,
    open_checkpoint,
)
from streamload.errors import ConfigError
from streamload.model._config import (
    CONFIG_NAME,
    ModelFacts,
    _layers_field,
    _read_facts,
    _text_fields,
    load_config,
)


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One repeating text layer.

    ``nbytes`` is the size once placed (floats in the target dtype, others as stored);
    ``stored_bytes`` what is read from disk; ``converted_bytes`` the part of ``nbytes`` whose dtype
    changes (so cannot be memory-mapped). ``kv_elems_per_token`` counts K and V elements one token
    adds to this layer's cache (MLA: the latent plus the rope key; encoder-only: 0).
    ``sliding_window`` caps the tokens this layer caches, if it is a sliding-window layer.
    """

    index: int
    prefix: str
    tensors: tuple[str, ...]
    nbytes: int
    stored_bytes: int
    converted_bytes: int
    kv_elems_per_token: int
    sliding_window: int | None


@dataclass(frozen=True, slots=True)
class PartSpec:
    """A non-mapped part: a module prefix in Hugging Face form (``"model.embed_tokens"``).

    ``sub_model`` is ``"vision"`` or ``"audio"`` for towers and projectors, else ``None``.
    """

    name: str
    tensors: tuple[str, ...]
    nbytes: int
    stored_bytes: int
    converted_bytes: int
    sub_model: str | None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The inventory the planner and engine work from.

    ``tied`` maps a tensor name to the tensor it is tied to when the checkpoint stores both
    (e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}``); the alias costs no bytes and is
    not streamed. ``activation_dtype`` is the dtype code of activations and (by default) the
    KV cache: the target dtype, else the checkpoint's dominant float dtype.
    ``has_lm_head`` says whether the model computes logits over its vocabulary: always for
    decoders; for encoder-only models only when the checkpoint holds a head (such as BERT's
    ``cls.predictions``) with a dimension equal to the vocabulary size.
    """

    checkpoint: Checkpoint
    facts: ModelFacts
    config: Mapping[str, Any]
    target_dtype: str | None
    activation_dtype: str
    layers: tuple[LayerSpec, ...]
    non_mapped: tuple[PartSpec, ...]
    tied: Mapping[str, str]
    has_lm_head: bool = True

    @property
    def non_mapped_bytes(self) -> int:
        return sum(part.nbytes for part in self.non_mapped)

    @property
    def total_bytes(self) -> int:
        return self.non_mapped_bytes + sum(layer.nbytes for layer in self.layers)

    @property
    def stored_bytes(self) -> int:
        """Bytes read from disk for every streamed tensor (tied aliases excluded)."""
        return sum(part.stored_bytes for part in self.non_mapped) + sum(
            layer.stored_bytes for layer in self.layers
        )

    @property
    def quantized(self) -> bool:
        """Whether the config declares a quantization (see ``placed_dtype``)."""
        return is_quantized(self.config)

    def placed_dtype(self, name: str) -> str:
        """The dtype code tensor ``name`` has once placed (see ``placed_dtype``)."""
        entry = self.checkpoint.tensors[name]
        return placed_dtype(entry, self.target_dtype, quantized=self.quantized)


# Path segments that root a tower or projector; None: the model's own modality (a projector).
_TOWER_SEGMENTS: Mapping[str, str | None] = {
    "vision_tower": "vision",
    "vision_model": "vision",
    "visual": "vision",
    "vision_encoder": "vision",
    "embed_vision": "vision",
    "audio_tower": "audio",
    "audio_model": "audio",
    "audio_encoder": "audio",
    "embed_audio": "audio",
    "multi_modal_projector": None,
    "mm_projector": None,
}

# Quantization side tensors: stored in a float dtype but never converted.
_QUANT_AUX = frozenset(
    {
        "weight_scale_inv",
        "weight_scale",
        "weight_global_scale",
        "weight_zero_point",
        "input_scale",
        "input_global_scale",
        "output_scale",
        "k_scale",
        "v_scale",
        "scales",
        "qzeros",
        "g_idx",
        "absmax",
        "nested_absmax",
        "quant_map",
        "nested_quant_map",
    }
)

# Output heads and the input embeddings they may be tied to.
_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "cls.predictions.decoder.weight")
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")

# Any tower segment, dot-delimited, in the names joined by dots (see ``_towers``).
_ANY_TOWER = re.compile(r"\.(?:" + "|".join(map(re.escape, _TOWER_SEGMENTS)) + r")\.")
_FIRST_INDEX = re.compile(r"^(.+?)\.(\d+)(?=\.|$)")


def placed_dtype(entry: TensorEntry, target_dtype: str | None, *, quantized: bool = False) -> str:
    """The dtype code a tensor has once placed: ``target_dtype`` for floating tensors
    (``FLOAT_CODES``), the stored code for everything else (integers, bool, FP8, packed
    quantized weights). In a ``quantized`` checkpoint (its config has a
    ``quantization_config``), float side tensors of the quantization (``*.weight_scale_inv``,
    ``*.scales``, ``*.qzeros``, ...) also keep their stored dtype, the precision their kernels
    expect."""
    if target_dtype is None or entry.dtype not in FLOAT_CODES:
        return entry.dtype
    if quantized and entry.name.rsplit(".", 1)[-1] in _QUANT_AUX:
        return entry.dtype
    return target_dtype


def is_quantized(config: Mapping[str, Any]) -> bool:
    """Whether ``config.json`` declares a quantization (root or ``text_config``)."""
    text = config.get("text_config")
    return "quantization_config" in config or (
        isinstance(text, Mapping) and "quantization_config" in text
    )


@dataclass(frozen=True, slots=True)
class _Sizes:
    """Bytes of a group of tensors: once placed, as stored, and placed bytes that change dtype."""

    nbytes: int = 0
    stored: int = 0
    converted: int = 0

    @classmethod
    def of(
        cls,
        names: Iterable[str],
        tensors: Mapping[str, TensorEntry],
        target_dtype: str | None,
        quantized: bool,
    ) -> _Sizes:
        if target_dtype is None:
            stored = sum(tensors[name].nbytes for name in names)
            return cls(stored, stored, 0)
        stored = replaced = converted = 0
        for name in names:
            entry = tensors[name]
            stored += entry.nbytes
            dtype = entry.dtype
            if dtype == target_dtype or dtype not in FLOAT_CODES:
                continue  # placed as stored, whatever ``placed_dtype`` would add
            placed = placed_dtype(entry, target_dtype, quantized=quantized)
            if placed != dtype:
                replaced += entry.nbytes
                converted += entry.numel * DTYPE_SIZES[placed]
        return cls(stored - replaced + converted, stored, converted)


@dataclass(slots=True)
class _Group:
    """Tensors gathered under one name while grouping (mutable only inside ``build_spec``)."""

    tensors: list[str] = field(default_factory=list)
    sizes: _Sizes = _Sizes()  # frozen: one shared zero until the group is sized
    sub_model: str | None = None


def _towers(names: Collection[str]) -> dict[str, tuple[str, str | None]]:
    """``{tensor: (part, sub_model)}`` for the tensors under a tower segment."""
    if _ANY_TOWER.search(f".{'.'.join(names)}.") is None:
        return {}  # no segment of any name is a tower's (text-only models): no per-name walk
    return {name: root for name in names if (root := _tower_root(name))}


def _tower_root(name: str) -> tuple[str, str | None] | None:
    segments = name.split(".")
    for i, segment in enumerate(segments[:-1]):
        if segment in _TOWER_SEGMENTS:
            return ".".join(segments[: i + 1]), _TOWER_SEGMENTS[segment]
    return None


def _indexed(names: Iterable[str]) -> dict[str, dict[int, list[str]]]:
    """``{container: {index: [tensor, ...]}}`` for the names with an integer segment: the prefix
    before the first one, and its value (``model.layers.3.mlp.up_proj.weight``:
    ``model.layers``, 3); names in the order given.

    A name that starts with the last match's ``container.index.`` has that container and index
    (the text the pattern looks at is the same), so of each layer's tensors, which lie together
    in checkpoint order, only the first is matched.
    """
    found: dict[str, dict[int, list[str]]] = {}
    members: list[str] = []
    run = ""  # "<container>.<index>." of the last match, if a dot followed its index
    for name in names:
        if run and name.startswith(run):
            members.append(name)
            continue
        match = _FIRST_INDEX.match(name)
        if match is None:
            continue
        container, digits = match.groups()
        members = found.setdefault(container, {}).setdefault(int(digits), [])
        members.append(name)
        end = match.end()
        run = name[: end + 1] if name[end : end + 1] == "." else ""
    return found


def _find_container(
    indexed: Mapping[str, Mapping[int, list[str]]],
    tensors: Mapping[str, TensorEntry],
    layers: int,
    path: Path,
    field_name: str,
) -> str:
    """The prefix before the first integer segment whose indices cover ``0..layers-1``."""
    wanted = set(range(layers))
    covering = [name for name, by_index in indexed.items() if wanted.issubset(by_index)]
    if not covering:
        found = ", ".join(f"{name} ({len(by_index)} indices)" for name, by_index in indexed.items())
        raise ConfigError(
            path,
            f"{layers} layers, but no tensor container in the checkpoint holds layers "
            f"0..{layers - 1} (found: {found or 'no indexed tensors'})",
            field=field_name,
        )
    if len(covering) == 1:
        return covering[0]

    def weight(container: str) -> int:
        return sum(tensors[n].nbytes for names in indexed[container].values() for n in names)

    return max(covering, key=weight)  # first wins a tie (dict order)


def _part_name(name: str, container: list[str]) -> str:
    """The prefix of ``name`` up to the first segment that leaves ``container``'s path."""
    segments = name.split(".")
    depth = 0
    while depth < len(container) and depth < len(segments) and segments[depth] == container[depth]:
        depth += 1
    return ".".join(segments[: depth + 1])


def _find_ties(
    entries: Mapping[str, TensorEntry], candidates: Iterable[str], tie: bool
) -> dict[str, str]:
    """``{head: embedding}`` for output heads stored next to a same-shaped input embedding."""
    if not tie:
        return {}
    names = list(candidates)
    embeddings = [n for n in names if n.endswith(_EMBED_SUFFIXES)]
    tied: dict[str, str] = {}
    for head in names:
        if not any(head == h or head.endswith("." + h) for h in _HEAD_NAMES):
            continue
        for embedding in embeddings:
            if entries[embedding].shape == entries[head].shape:
                tied[head] = embedding
                break
    return tied


def _activation_dtype(checkpoint: Checkpoint, target_dtype: str | None) -> str:
    """The target when it is a float code, else the float code holding the most stored bytes."""
    if target_dtype in FLOAT_CODES:
        assert target_dtype is not None
        return target_dtype
    codes = {entry.dtype for entry in checkpoint.tensors.values()} & FLOAT_CODES
    if len(codes) < 2:  # the one float code; none (fully packed): the common compute type
        return min(codes, default="BF16")
    totals: dict[str, int] = {}
    for entry in checkpoint.tensors.values():
        if entry.dtype in FLOAT_CODES:
            totals[entry.dtype] = totals.get(entry.dtype, 0) + entry.nbytes
    return max(sorted(totals), key=lambda code: totals[code])


def build_spec(
    checkpoint: Checkpoint, config: Mapping[str, Any], *, target_dtype: str | None
) -> ModelSpec:
    """Group the checkpoint's tensors into layers and non-mapped parts and size them.

    ``target_dtype`` is a dtype code (``"BF16"``) or ``None`` for as stored (``ValueError`` for
    an unknown code). ``ConfigError`` if the config lacks a needed field or no tensor container
    holds the config's layers.
    """
    if target_dtype is not None and target_dtype not in DTYPE_SIZES:
        raise ValueError(f"unknown target dtype code {target_dtype!r}")
    path = checkpoint.root / CONFIG_NAME
    facts, windows = _read_facts(config, path)
    towers = _towers(checkpoint.tensors)
    text = [name for name in checkpoint.tensors if name not in towers]
    indexed = _indexed(text)
    container = _find_container(
        indexed,
        checkpoint.tensors,
        facts.num_hidden_layers,
        path,
        _layers_field(_text_fields(config, path)),
    )
    outside = (name for name in text if not name.startswith(container + "."))
    tied = _find_ties(checkpoint.tensors, outside, facts.tie_word_embeddings)

    grouping = _Grouping(
        container=container,
        layers=[indexed[container][i] for i in range(len(windows))],
        towers=towers,
        modality="audio"
        if "audio_config" in config and "vision_config" not in config
        else "vision",
        target_dtype=target_dtype,
        quantized=is_quantized(config),
    )
    layer_groups, parts = grouping.run(checkpoint, skip=tied)
    layers = _layer_specs(container, layer_groups, facts.kv_elems_per_token, windows)
    non_mapped = _part_specs(parts)
    return ModelSpec(
        checkpoint=checkpoint,
        facts=facts,
        config=config,
        target_dtype=target_dtype,
        activation_dtype=_activation_dtype(checkpoint, target_dtype),
        layers=layers,
        non_mapped=non_mapped,
        tied=tied,
        has_lm_head=_has_lm_head(facts, checkpoint, non_mapped, tied),
    )


@dataclass(frozen=True, slots=True)
class _Grouping:
    """Where each tensor goes: a layer, a tower part, or the part its path names."""

    container: str
    layers: Sequence[list[str]]  # the tensors of each layer
    towers: Mapping[str, tuple[str, str | None]]
    modality: str
    target_dtype: str | None
    quantized: bool

    def run(
        self, checkpoint: Checkpoint, *, skip: Mapping[str, str]
    ) -> tuple[list[_Group], dict[str, _Group]]:
        layer_groups = [_Group(names) for names in self.layers]  # never tied: ties lie outside
        in_layers = set(chain.from_iterable(self.layers))
        container_path = self.container.split(".")
        parts: dict[str, _Group] = {}
        rest = [n for n in checkpoint.tensors if n not in in_layers and n not in skip]
        for name in rest:
            if name in self.towers:
                root, sub_model = self.towers[name]
                group = parts.setdefault(root, _Group(sub_model=sub_model or self.modality))
            else:
                group = parts.setdefault(_part_name(name, container_path), _Group())
            group.tensors.append(name)
        for group in (*layer_groups, *parts.values()):
            group.sizes = _Sizes.of(
                group.tensors, checkpoint.tensors, self.target_dtype, self.quantized
            )
        return layer_groups, parts


def _has_lm_head(
    facts: ModelFacts,
    checkpoint: Checkpoint,
    non_mapped: Iterable[PartSpec],
    tied: Mapping[str, str],
) -> bool:
    """Decoders always produce logits; encoders only with a vocabulary-sized head tensor
    (other than the input word embedding)."""
    if facts.kv_kind != "none" or tied:
        return True
    for part in non_mapped:
        for name in part.tensors:
            head = part.sub_model is None and not name.endswith(_EMBED_SUFFIXES)
            if head and facts.vocab_size in checkpoint.tensors[name].shape:
                return True
    return False


def headers_spec(checkpoint: Checkpoint, *, target_dtype: str | None) -> ModelSpec:
    """A spec from the headers alone, for a checkpoint without ``config.json``.

    Layers are grouped by name: the container (the prefix before the first integer segment)
    whose indices run ``0..n-1`` with the most bytes holds the layers; towers and every other
    tensor form non-mapped parts as in ``build_spec``. Nothing the config would say is known:
    ``config`` is empty, ``facts`` hold zeros and ``kv_kind="none"``, no ties are found. Good
    for an inventory, not for a plan (KV and activations need the config).
    """
    if target_dtype is not None and target_dtype not in DTYPE_SIZES:
        raise ValueError(f"unknown target dtype code {target_dtype!r}")
    towers = _towers(checkpoint.tensors)
    indexed = _indexed(name for name in checkpoint.tensors if name not in towers)

    def run_length(by_index: Mapping[int, list[str]]) -> int:
        count = 0
        while count in by_index:
            count += 1
        return count

    def weight(container: str) -> int:
        by_index = indexed[container]
        names = (n for i in range(run_length(by_index)) for n in by_index[i])
        return sum(checkpoint.tensors[n].nbytes for n in names)

    container = max(indexed, key=weight, default="")
    count = run_length(indexed[container]) if container else 0
    grouping = _Grouping(
        container=container,
        layers=[indexed[container][i] for i in range(count)],
        towers=towers,
        modality="vision",
        target_dtype=target_dtype,
        quantized=False,
    )
    layer_groups, parts = grouping.run(checkpoint, skip={})
    facts = ModelFacts(
        model_type="unknown",
        num_hidden_layers=count,
        hidden_size=0,
        num_attention_heads=0,
        num_key_value_heads=0,
        head_dim=0,
        v_head_dim=0,
        vocab_size=0,
        intermediate_size=None,
        kv_kind="none",
        kv_lora_rank=None,
        qk_rope_head_dim=None,
        sliding_window=None,
        tie_word_embeddings=False,
        vision=None,
    )
    return ModelSpec(
        checkpoint=checkpoint,
        facts=facts,
        config={},
        target_dtype=target_dtype,
        activation_dtype=_activation_dtype(checkpoint, target_dtype),
        layers=_layer_specs(container, layer_groups, 0, [None] * len(layer_groups)),
        non_mapped=_part_specs(parts),
        tied={},
        has_lm_head=False,
    )


def _layer_specs(
    container: str, groups: Sequence[_Group], kv_elems: int, windows: Sequence[int | None]
) -> tuple[LayerSpec, ...]:
    """Layer ``i`` of ``container`` from its group of tensors (``windows[i]``: its sliding
    window, if any)."""
    return tuple(
        LayerSpec(
            index=i,
            prefix=f"{container}.{i}",
            tensors=tuple(group.tensors),
            nbytes=group.sizes.nbytes,
            stored_bytes=group.sizes.stored,
            converted_bytes=group.sizes.converted,
            kv_elems_per_token=kv_elems,
            sliding_window=windows[i],
        )
        for i, group in enumerate(groups)
    )


def _part_specs(parts: Mapping[str, _Group]) -> tuple[PartSpec, ...]:
    """A non-mapped part per group of tensors, by its name."""
    return tuple(
        PartSpec(
            name=name,
            tensors=tuple(group.tensors),
            nbytes=group.sizes.nbytes,
            stored_bytes=group.sizes.stored,
            converted_bytes=group.sizes.converted,
            sub_model=group.sub_model,
        )
        for name, group in parts.items()
    )


def inspect(
    path: str | Path, *, target_dtype: str | None = None, config_optional: bool = False
) -> ModelSpec:
    """Open the checkpoint at ``path``, read its ``config.json`` and build the spec.

    ``config_optional``: a checkpoint without ``config.json`` gets ``headers_spec`` (the
    inventory from the headers alone) instead of a ``ConfigError``.
    """
    checkpoint = open_checkpoint(path)
    if config_optional and not (checkpoint.root / CONFIG_NAME).exists():
        return headers_spec(checkpoint, target_dtype=target_dtype)
    return build_spec(checkpoint, load_config(checkpoint.root), target_dtype=target_dtype)
