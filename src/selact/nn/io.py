"""Save and load sparsified models: safetensors weights plus each layer's config as metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
from torch import nn

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
    """Write ``model``'s state (weights, thresholds) and configs to one safetensors file, atomically."""
    path = Path(path)
    metadata = {_KEY: json.dumps({"format": _FORMAT, **selective_configs(model)})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_model(model, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Sparsify the dense ``model`` as the saved one was, then load its weights and thresholds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no selact checkpoint at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        saved = json.loads(metadata[_KEY])
        converted = {n: SelectiveConfig.from_dict(c) for n, c in saved["converted"].items()}
        layers = {n: SelectiveConfig.from_dict(c) for n, c in saved["layers"].items()}
    except (KeyError, ValueError, TypeError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path} is not a valid selact checkpoint: {error}") from error
    if converted:
        sparsify(
            model,
            next(iter(converted.values())),
            filter_fn=lambda module, name: name in converted,
            overrides={**converted, **layers},
        )
    missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model
