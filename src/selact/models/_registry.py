"""A name -> factory registry for models, filled by the ``@register_model`` decorator."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["register_model", "create_model", "list_models"]

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Register a factory under ``name``; registering a taken name is an error."""

    def decorate(factory: Factory) -> Factory:
        if name in _MODELS:
            raise ValueError(
                f"model {name!r} is already registered (by {_MODELS[name].__module__})"
            )
        _MODELS[name] = factory
        return factory

    return decorate


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``, passing ``kwargs`` to its factory.

    ``"torchvision:<name>"`` builds ``torchvision.models.get_model(name, **kwargs)`` and
    ``"timm:<name>"`` builds ``timm.create_model(name, **kwargs)`` (random weights unless the
    keyword arguments ask for pretrained ones).
    """
    if name.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], **kwargs)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as error:
            raise ImportError(f"model {name!r} needs timm: pip install timm") from error
        return timm.create_model(name.split(":", 1)[1], **kwargs)
    if name not in _MODELS:
        raise KeyError(
            f"unknown model {name!r}; known models: {', '.join(list_models()) or 'none'} "
            "(or torchvision:<name>, timm:<name>)"
        )
    return _MODELS[name](**kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching the glob ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))
