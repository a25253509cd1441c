"""Checkpoints: safetensors files written atomically, each with a JSON sidecar.

Two kinds, both one safetensors file plus ``<name>.json`` beside it:

- a **model** checkpoint (:func:`save_model`): :func:`selact.save`'s format (weights, thresholds
  and every selective layer's config), loadable with :func:`selact.load` or :func:`load_model`;
  the sidecar holds what produced it (config, seed, data, split, metrics, command) and the
  file's SHA-256.
- a **training state** (:func:`save_state`): model, EMA weights, optimizer state and random
  states in one file, with the loop's position and history in the file's own metadata, so a
  resume never pairs tensors with the wrong epoch. The sidecar is a readable copy.

The tensor file is written first and the sidecar second, each to a temporary name and renamed:
a crash leaves the previous pair or a new tensor file with an old sidecar, never a torn file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

import selact
from selact._files import atomic_write, atomic_write_text

__all__ = [
    "file_sha256",
    "load_model",
    "load_state",
    "read_sidecar",
    "save_model",
    "save_state",
    "sidecar_path",
]

_STATE_KEY = "selact_train_state"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``run/model.safetensors`` -> ``run/model.json``."""
    return Path(path).with_suffix(".json")


def _write_sidecar(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    info = {**info, "file": path.name, "sha256": file_sha256(path)}
    atomic_write_text(sidecar_path(path), json.dumps(info, indent=2, default=str) + "\n")
    return info


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of a checkpoint (``{}`` if there is none)."""
    side = sidecar_path(path)
    return json.loads(side.read_text()) if side.is_file() else {}


def save_model(model: nn.Module, path: str | os.PathLike[str], info: dict[str, Any]) -> dict:
    """Write ``model`` with :func:`selact.save` and its sidecar; return the sidecar's content."""
    path = Path(path)
    selact.save(model, path)
    return _write_sidecar(path, info)


def load_model(model: nn.Module, path: str | os.PathLike[str]) -> tuple[nn.Module, dict]:
    """Load a model checkpoint into ``model`` (a dense model of the same architecture: it is
    converted as the saved one was); return it and the sidecar."""
    return selact.load(model, path), read_sidecar(path)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        plain["state"][str(index)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
            else:
                plain["state"][str(index)][name] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_state(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write the training state (see the module docstring); ``meta`` must be JSON-ready."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("model", model), ("ema", ema)):
        if module is not None:
            for key, value in module.state_dict().items():
                tensors[f"{prefix}.{key}"] = value
    optim_tensors, optim_plain = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    # Clones break memory sharing (tied weights), which safetensors refuses.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    full = {**meta, "optimizer": optim_plain}
    metadata = {_STATE_KEY: json.dumps(full, default=str)}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata))
    return _write_sidecar(path, meta)


def load_state(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote into the given objects; return its ``meta``."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_STATE_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (KeyError, ValueError, safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable selact training state: {error}") from error
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}, "rng": {}}
    for key, value in tensors.items():
        prefix, rest = key.split(".", 1)
        groups[prefix][rest if prefix in ("model", "ema") else key] = value
    model.load_state_dict(groups["model"])
    if ema is not None:
        if not groups["ema"]:
            raise ValueError(f"{path} holds no EMA weights but this run keeps an EMA")
        ema.load_state_dict(groups["ema"])
    optimizer.load_state_dict(_unflatten_optimizer(groups["optim"], meta.pop("optimizer")))
    if restore_rng:
        torch.set_rng_state(groups["rng"]["rng.cpu"])
        cuda = [groups["rng"][k] for k in sorted(groups["rng"]) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return meta
