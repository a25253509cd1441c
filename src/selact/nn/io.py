"""Save and load sparsified models: safetensors weights plus each layer's config as metadata."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
from torch import nn

from selact._files import atomic_write
from selact.config import SelectiveConfig
from selact.nn.base import Converted, SelectiveModule
from selact.nn.convert import sparsify

_KEY = "selact"
_FORMAT = 1


def selective_configs(model: nn.Module) -> dict[str, dict[str, dict]]:
    """The conversion of ``model`` as data: converted modules and every selective layer's config."""
    converted, layers = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Converted) and "_original" in module.__dict__:
            converted[name] = module.config.to_dict()
        if isinstance(module, SelectiveModule):
            layers[name] = module.config.to_dict()
    return {"converted": converted, "layers": layers}


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s state (weights, thresholds) and configs to one safetensors file,
    atomically. Tensors that share memory (tied weights) are stored once."""
    metadata = {_KEY: json.dumps({"format": _FORMAT, **selective_configs(model)})}
    return atomic_write(
        path, lambda tmp: safetensors.torch.save_model(model, str(tmp), metadata=metadata)
    )


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Sparsify the dense ``model`` as the saved one was, then load its weights and thresholds.

    The file is checked against a converted copy first: if it does not fit, a ValueError names
    the file and ``model`` is left untouched.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no selact checkpoint at {path}")
    converted, layers, shapes = _read(path)
    candidate = copy.deepcopy(model)
    try:
        _convert(candidate, converted, layers)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} does not match the model: {error}") from error
    _check_shapes(candidate, shapes, path)
    del candidate
    _convert(model, converted, layers)
    safetensors.torch.load_model(model, str(path), strict=True)
    return model


def _read(path: Path) -> tuple[dict, dict, dict[str, tuple[int, ...]]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
        if _KEY not in metadata:
            raise ValueError("it has no selact metadata (was it written by selact.save?)")
        saved = json.loads(metadata[_KEY])
        if not isinstance(saved, dict):
            raise ValueError("its selact metadata is not a JSON object")
        if saved.get("format") != _FORMAT:
            raise ValueError(f"format {saved.get('format')!r}, this selact reads {_FORMAT}")
        converted = {n: SelectiveConfig.from_dict(c) for n, c in saved["converted"].items()}
        layers = {n: SelectiveConfig.from_dict(c) for n, c in saved["layers"].items()}
    except (KeyError, ValueError, TypeError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path} is not a valid selact checkpoint: {error}") from error
    return converted, layers, shapes


def _convert(model: nn.Module, converted: dict, layers: dict) -> None:
    if converted:
        sparsify(
            model,
            next(iter(converted.values())),
            filter_fn=lambda module, name: name in converted,
            overrides={**converted, **layers},
        )
    found = set(selective_configs(model)["converted"])  # as save() records them
    if found != set(converted):
        raise ValueError(f"layers {sorted(set(converted) ^ found)} could not be converted alike")


def _check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    state = model.state_dict()
    stored = {t.untyped_storage().data_ptr() for k, t in state.items() if k in shapes}
    missing = [  # a tensor sharing memory with a saved one was deduplicated by save
        k for k in state if k not in shapes and state[k].untyped_storage().data_ptr() not in stored
    ]
    unexpected = [k for k in shapes if k not in state]
    wrong = [
        f"{k}: {shapes[k]} in the file, {tuple(state[k].shape)} in the model"
        for k in shapes
        if k in state and tuple(state[k].shape) != shapes[k]
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
