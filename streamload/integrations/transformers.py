"""Load straight into a Hugging Face ``transformers`` model (extra: ``streamload[transformers]``).

    model = await streamload.integrations.transformers.load_model(path, params)
    out = model.generate(...)

The model is built on the meta device (parameters only; buffers such as rotary tables are real)
and its keys are matched against the checkpoint's headers before streaming, so a mismatch fails
at once with the names; tensors the model does not take (non-persistent buffers such as BERT's
``embeddings.position_ids``, its ``_keys_to_ignore_on_load_unexpected``) are left out as
``from_pretrained`` leaves them. The streamed tensors are assigned without copies
(``load_state_dict(assign=True)``), tied weights are tied by the model's own ``tie_weights``, every
buffer is moved to its module's device (also when one GPU holds the whole model),
legacy key layouts are renamed as ``from_pretrained`` renames them, and the layers are
dispatched across the planned devices by ``accelerate.dispatch_model`` with
``LoadedModel.device_map``: each module runs where its weights are (CPU layers run on the
CPU, not offloaded to a GPU).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread

import streamload
from streamload.engine import LoadedModel, load
from streamload.errors import ConfigError, LoadError
from streamload.events import Observers
from streamload.params import LoadParams

__all__ = ["KeyPlan", "build_model", "load_model", "plan_keys"]

# Persistent buffers some older checkpoints carry that current models recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _is_causal_lm(config: Any) -> bool:
    import transformers

    names = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return getattr(config, "model_type", None) in names


def _model_class(config: Any, model_class: Any | None) -> Any:
    """``model_class``, else the config's first architecture transformers knows, else
    ``AutoModelForCausalLM`` for decoders and ``AutoModel`` for the rest (encoders)."""
    import transformers

    if model_class is not None:
        return model_class
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM if _is_causal_lm(config) else transformers.AutoModel


def _rename(name: str, expected: Collection[str], prefix: str) -> str:
    """A checkpoint name -> the model's state-dict name (adds or strips the base prefix)."""
    if name in expected or not prefix:
        return name
    if f"{prefix}.{name}" in expected:
        return f"{prefix}.{name}"
    if name.startswith(f"{prefix}.") and name[len(prefix) + 1 :] in expected:
        return name[len(prefix) + 1 :]
    return name


def _checkpoint_renamer(model: Any) -> Callable[[str], str]:
    """How ``from_pretrained`` renames checkpoint keys for ``model`` (legacy layouts, such as a
    llava checkpoint's ``language_model.model.*`` for ``model.language_model.*``): the
    model's conversion mapping on transformers 5, its ``_checkpoint_conversion_mapping``
    (regex -> replacement) before. Only renames: tensors a converter would merge or split
    keep their names and are reported as unknown."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4
        mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
        compiled = [(re.compile(str(source)), str(target)) for source, target in mapping.items()]

        def legacy(name: str) -> str:
            for pattern, target in compiled:
                renamed, count = pattern.subn(target, name)
                if count:
                    return renamed
            return name

        return legacy
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    def rename(name: str) -> str:
        renamed: str = rename_source_key(name, renamings, [], prefix, meta)[0]
        return renamed

    return rename


def _ignored_unexpected(model: Any) -> list[re.Pattern[str]]:
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    return [re.compile(p) for p in patterns]


def _tied_names(model: Any, config: Any) -> set[str]:
    """Parameters the model ties to another one (the checkpoint may leave them out)."""
    tied: set[str] = set()
    keys = getattr(model, "_tied_weights_keys", None) or ()
    tied.update(keys)  # a list of names, or (newer transformers) a target -> source mapping
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(text, "tie_word_embeddings", False) and output is not None:
        weight = getattr(output, "weight", None)
        tied.update(name for name, p in model.named_parameters() if p is weight)
    return tied


@dataclass(frozen=True, slots=True)
class KeyPlan:
    """How a checkpoint's tensors meet a model's state dict, decided before any tensor data
    is read: ``rename`` maps each checkpoint name the model takes to its state-dict name;
    ``ignored`` are checkpoint tensors the model does not take, as ``from_pretrained`` ignores
    them (non-persistent buffers such as BERT's ``embeddings.position_ids``, the model's
    ``_keys_to_ignore_on_load_unexpected``, recomputed rotary tables)."""

    rename: Mapping[str, str]
    ignored: tuple[str, ...]


def plan_keys(model: Any, config: Any, names: Collection[str], root: Path) -> KeyPlan:
    """Match the checkpoint's tensor ``names`` (headers only) against ``model`` (built on the
    meta device). ``LoadError`` naming what the model expects but the checkpoint lacks (tied
    parameters excepted) and what the checkpoint holds that the model does not know."""
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "")
    buffers = {name for name, _ in model.named_buffers()}
    ignore = _ignored_unexpected(model)
    convert = _checkpoint_renamer(model)
    rename: dict[str, str] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for name in names:
        target = _rename(name, expected | buffers, prefix)
        if target not in expected and target not in buffers:
            target = _rename(convert(name), expected | buffers, prefix)
        if target in expected:
            rename[name] = target
        elif (
            target in buffers
            or name.endswith(_IGNORED_SUFFIXES)
            or any(p.search(name) for p in ignore)
        ):
            ignored.append(name)
        else:
            unknown.append(name)
    given = set(rename.values())
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - given - _tied_names(model, config))
    if missing or unknown:
        cls = type(model).__name__
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {_listed(missing)}")
        if unknown:
            problems.append(f"unknown to {cls}: {_listed(sorted(unknown))}")
        raise LoadError("; ".join(problems), path=root)
    return KeyPlan(rename, tuple(ignored))


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:8])
    return f"[{shown}]" if len(names) <= 8 else f"[{shown}, ... {len(names) - 8} more]"


@dataclass(frozen=True, slots=True)
class _Prepared:
    model: Any
    keys: KeyPlan


def _prepare(root: Path, names: Collection[str], model_class: Any | None) -> _Prepared:
    """The model built on the meta device and its key plan (no tensor data read)."""
    import accelerate
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            Path(root) / "config.json", f"transformers cannot read it: {exc}"
        ) from exc
    cls = _model_class(config, model_class)
    with accelerate.init_empty_weights(include_buffers=False):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    return _Prepared(model, plan_keys(model, config, names, root))


def _assign(prepared: _Prepared, loaded: LoadedModel) -> Any:
    import accelerate

    model, keys = prepared.model, prepared.keys
    state = {keys.rename[k]: v for k, v in loaded.tensors.items() if k in keys.rename}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise LoadError(
            f"missing from the checkpoint: {_listed(sorted(still_meta))}",
            path=loaded.spec.checkpoint.root,
        )
    model.eval()
    device_map = _module_map(model, loaded, _checkpoint_renamer(model))
    _place_buffers(model, device_map)
    devices = set(device_map.values())
    main = "cpu" if "cpu" in devices or not devices else sorted(devices)[0]
    if len(devices) > 1:
        accelerate.dispatch_model(model, device_map=device_map, main_device=main)
    model.hf_device_map = dict(loaded.device_map)
    return model


def _place_buffers(model: Any, device_map: dict[str, str]) -> None:
    """Move every buffer to its module's device in ``device_map`` (the deepest mapped module
    that contains it). The model is built with its buffers real, on the CPU; a model held by
    one GPU is not dispatched, so nothing else would move them and forward would mix devices."""
    import torch

    for name in sorted(device_map, key=lambda n: n.count(".") if n else -1):
        target = torch.device(device_map[name])
        for module in model.get_submodule(name).modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device != target:
                    module._buffers[key] = buffer.to(target)


def build_model(loaded: LoadedModel, *, model_class: Any | None = None) -> Any:
    """A ``transformers`` model holding ``loaded``'s tensors, dispatched per its device map.

    Checkpoint tensors the model does not take are left out as ``from_pretrained`` leaves them
    (``KeyPlan.ignored``). Raises ``LoadError`` naming the tensors the model expects but the
    checkpoint lacks (tied weights excepted) or the checkpoint holds but the model does not
    know. ``load_model`` makes the same check before streaming.
    """
    root = loaded.spec.checkpoint.root
    return _assign(_prepare(root, list(loaded.spec.checkpoint.tensors), model_class), loaded)


def _module_map(model: Any, loaded: LoadedModel, convert: Callable[[str], str]) -> dict[str, str]:
    """``loaded.device_map`` with keys renamed like the state dict, plus buffers-only modules."""
    names = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "")
    out: dict[str, str] = {}
    for given, device in loaded.device_map.items():
        module = given if given in names else convert(given)
        if module in names:
            out[module] = device
        elif f"{prefix}.{module}" in names:
            out[f"{prefix}.{module}"] = device
        elif module.startswith(f"{prefix}.") and module[len(prefix) + 1 :] in names:
            out[module[len(prefix) + 1 :]] = device
    primary = next(iter(loaded.device_map.values()), "cpu")
    covered = set(out)
    for name, module in model.named_modules():
        if not name or any(name == c or name.startswith(c + ".") for c in covered):
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            out[name] = primary
    return out


async def load_model(
    path: str | Path,
    params: LoadParams | None = None,
    *,
    on_event: Observers = None,
    model_class: Any | None = None,
) -> Any:
    """Stream ``path`` with ``streamload.load`` and return a ready ``transformers`` model.

    The model is built on the meta device and its keys are matched against the checkpoint's
    headers first, so a checkpoint the model cannot take fails with the list of names before
    any tensor is read (``plan_keys``). Causal LMs, encoders (``AutoModel``: BERT, MiniLM) and
    vision-language models load alike; the class is the config's first architecture unless
    ``model_class`` is given. Building and assigning run in worker threads, so the event loop
    stays free. Cancellation behaves as in ``streamload.load`` (everything placed is
    released). The ``LoadedModel`` is kept on the returned model as ``model.streamload``.
    """
    spec = await anyio.to_thread.run_sync(lambda: streamload.inspect(path))
    root, names = spec.checkpoint.root, list(spec.checkpoint.tensors)
    prepared = await anyio.to_thread.run_sync(lambda: _prepare(root, names, model_class))
    loaded = await load(path, params, on_event=on_event)
    try:
        model = await anyio.to_thread.run_sync(lambda: _assign(prepared, loaded))
    except BaseException:
        loaded.release()
        raise
    model.streamload = loaded
    return model
