"""Checkpoint inventory + ``config.json`` -> ``ModelSpec``: what the planner places.

A ``ModelSpec`` splits a checkpoint's tensors into repeating text layers (what the planner
maps across devices) and non-mapped parts (embeddings, final norm, lm_head, vision/audio
towers and projectors, extra layers with index >= ``num_hidden_layers`` such as MTP heads),
with every size in the *target* dtype, and carries the architecture facts the KV-cache and
activation estimators need. Pure logic over ``checkpoint`` entries plus one ``config.json`` read.

Where things live (this module only re-exports):

- ``_archs``: per-architecture tables: config key aliases, sub-config class defaults, which
  layers slide, the KV kind and the tie default per ``model_type``; ``KvKind``.
- ``_config``: ``load_config``, ``model_facts`` and the facts they read (``ModelFacts``,
  ``VisionFacts``, ``CONFIG_NAME``).
- ``_spec``: grouping tensors into layers and parts and sizing them in the target dtype:
  ``build_spec``, ``inspect``, ``ModelSpec``, ``LayerSpec``, ``PartSpec``, ``placed_dtype``,
  ``is_quantized``; its docstring has the grouping and sizing rules.
- ``_estimators``: ``layer_kv_bytes``, ``activation_bytes`` and ``Activations``.

Imports flow one way, ``_archs`` <- ``_config`` <- ``_spec`` <- ``_estimators``, and reach
only ``streamload.checkpoint`` and ``streamload.errors`` outside the package (no torch): the
planner and ``streamload inspect`` work from headers alone.
"""

from streamload.model._archs import KvKind
from streamload.model._config import CONFIG_NAME, ModelFacts, VisionFacts, load_config, model_facts
from streamload.model._estimators import Activations, activation_bytes, layer_kv_bytes
from streamload.model._spec import (
    LayerSpec,
    ModelSpec,
    PartSpec,
    build_spec,
    headers_spec,
    inspect,
    is_quantized,
    placed_dtype,
)

__all__ = [
    "CONFIG_NAME",
    "Activations",
    "KvKind",
    "LayerSpec",
    "ModelFacts",
    "ModelSpec",
    "PartSpec",
    "VisionFacts",
    "activation_bytes",
    "build_spec",
    "headers_spec",
    "inspect",
    "is_quantized",
    "layer_kv_bytes",
    "load_config",
    "model_facts",
    "placed_dtype",
]
