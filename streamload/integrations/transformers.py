"""Load straight into a Hugging Face ``transformers`` model (extra: ``streamload[transformers]``).

    model = await streamload.integrations.transformers.load_model(path, params)
    out = model.generate(...)

The model is built on the meta device (parameters only; buffers such as rotary tables are real),
the streamed tensors are assigned without copies (``load_state_dict(assign=True)``), tied weights
are tied by the model's own ``tie_weights``, and the layers are dispatched across the planned
devices by ``accelerate.dispatch_model`` with ``LoadedModel.device_map``: each module runs where
its weights are (CPU layers run on the CPU, not offloaded to a GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio.to_thread
import torch

from streamload.engine import LoadedModel, load
from streamload.errors import ConfigError, LoadError
from streamload.events import Observers
from streamload.params import LoadParams

__all__ = ["build_model", "load_model"]

# Persistent buffers some older checkpoints carry that current models recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _model_class(config: Any, model_class: Any | None) -> Any:
    import transformers

    if model_class is not None:
        return model_class
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _match_keys(
    tensors: dict[str, torch.Tensor], expected: set[str], prefix: str
) -> dict[str, torch.Tensor]:
    """Checkpoint names -> the model's state-dict names (adds or strips the base prefix)."""
    out = {}
    for name, tensor in tensors.items():
        if name in expected:
            out[name] = tensor
        elif f"{prefix}.{name}" in expected:
            out[f"{prefix}.{name}"] = tensor
        elif name.startswith(f"{prefix}.") and name[len(prefix) + 1 :] in expected:
            out[name[len(prefix) + 1 :]] = tensor
        else:
            out[name] = tensor
    return out


def build_model(loaded: LoadedModel, *, model_class: Any | None = None) -> Any:
    """A ``transformers`` model holding ``loaded``'s tensors, dispatched per its device map.

    Raises ``LoadError`` naming the tensors the model expects but the checkpoint lacks (tied
    weights excepted) or the checkpoint holds but the model does not know.
    """
    import accelerate
    import transformers

    root = loaded.spec.checkpoint.root
    try:
        config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            Path(root) / "config.json", f"transformers cannot read it: {exc}"
        ) from exc
    cls = _model_class(config, model_class)
    with accelerate.init_empty_weights(include_buffers=False):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    expected = set(model.state_dict())
    state = _match_keys(loaded.tensors, expected, getattr(model, "base_model_prefix", ""))
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if unexpected or still_meta:
        problems = []
        if still_meta:
            problems.append(f"missing from the checkpoint: {sorted(still_meta)[:8]}")
        if unexpected:
            problems.append(f"unknown to {cls.__name__}: {sorted(unexpected)[:8]}")
        raise LoadError("; ".join(problems), path=root)
    del missing
    model.eval()
    device_map = _module_map(model, loaded)
    devices = set(device_map.values())
    main = "cpu" if "cpu" in devices or not devices else sorted(devices)[0]
    if len(devices) > 1:
        accelerate.dispatch_model(model, device_map=device_map, main_device=main)
    model.hf_device_map = dict(loaded.device_map)
    return model


def _module_map(model: Any, loaded: LoadedModel) -> dict[str, str]:
    """``loaded.device_map`` with keys renamed like the state dict, plus buffers-only modules."""
    names = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "")
    out: dict[str, str] = {}
    for module, device in loaded.device_map.items():
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

    Building the model runs in a worker thread, so the event loop stays free. Cancellation
    behaves as in ``streamload.load`` (everything placed is released). The
    ``LoadedModel`` is kept on the returned model as ``model.streamload`` (plan, report).
    """
    loaded = await load(path, params, on_event=on_event)
    try:
        model = await anyio.to_thread.run_sync(lambda: build_model(loaded, model_class=model_class))
    except BaseException:
        loaded.release()
        raise
    model.streamload = loaded
    return model
