"""One-call conversion of any model: :func:`sparsify` swaps layers in place, :func:`densify` undoes it.

Converters register by the qualified name of the class they convert, so optional libraries (timm,
torchvision) need not be imported to register theirs.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from selact._registry import Registry
from selact.config import Override, SelectiveConfig, resolve_config
from selact.nn import dense_count
from selact.nn.base import Converted, SelectiveModule
from selact.nn.layers import SelectiveConv2d, SelectiveLinear

FilterFn = Callable[[nn.Module, str], bool]
#: ``resolve(name)`` gives the config of the layer called ``name`` (``None``: leave it dense).
Resolver = Callable[[str], SelectiveConfig | None]
#: ``converter(module, config, name, resolve)`` returns the module that replaces ``module``.
ConverterFn = Callable[[nn.Module, SelectiveConfig, str, Resolver], nn.Module]

CONVERTERS: Registry[ConverterFn] = Registry("converter")


def register_converter(qualified_name: str):
    """Decorator: ``fn(module, config, name, resolve)`` converts modules of that class."""
    return CONVERTERS.register(qualified_name)


@register_converter("torch.nn.modules.linear.Linear")
def _linear(module, config, name, resolve):
    return SelectiveLinear(module, config)


@register_converter("torch.nn.modules.conv.Conv2d")
def _conv2d(module, config, name, resolve):
    return SelectiveConv2d(module, config)


def converter_for(module: nn.Module) -> ConverterFn | None:
    """The converter of ``module``'s class or of the nearest base class with the same ``forward``.

    A subclass that overrides ``forward`` (a LoRA layer, say) is not converted: its forward would
    be lost.
    """
    for cls in type(module).__mro__:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in CONVERTERS:
            return CONVERTERS[key] if type(module).forward is cls.forward else None
    return None


def default_filter(model: nn.Module) -> FilterFn:
    """Every convertible layer except the first convolution (raw pixels) and the last Linear."""
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kept_dense = {first_conv, linears[-1] if linears else None}

    def selects(module: nn.Module, name: str) -> bool:
        return converter_for(module) is not None and name not in kept_dense

    return selects


def sparsify(
    model: nn.Module,
    config: SelectiveConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    overrides: Mapping[str, Override] | None = None,
    **fields: Any,
) -> nn.Module:
    """Swap ``model``'s layers for selective ones, in place, and return the model.

    Args:
        model: any ``nn.Module``; its weights are shared with the selective layers, not copied.
        config: the default :class:`SelectiveConfig`; ``fields`` change it (or make one).
        filter_fn: ``filter_fn(module, name)`` chooses the layers to convert; default
            :func:`default_filter`. Selecting a layer that multiplies by a weight matrix but has
            no converter raises a TypeError listing the convertible classes.
        overrides: per-layer configs by name. Precedence: an exact name, then the first
            ``"re:<regex>"`` key (in order) that fully matches, then ``config``. A value is a
            config, a mapping of fields to change, or ``None`` to leave the layer dense. Exact
            names must exist in the model. Overrides apply only to layers ``filter_fn`` selects,
            and also name the parts of converted attention (``<attn>.in_proj``, ``<attn>.attn``).

    Layers left dense are counted as dense by :func:`selact.stats`.
    """
    if config is None:
        config = SelectiveConfig(**fields)
    elif fields:
        config = config.replace(**fields)
    converted = [n for n, m in model.named_modules() if isinstance(m, Converted)]
    if converted:
        raise RuntimeError(
            f"the model is already sparsified (layer {converted[0] or '<root>'!r} is "
            f"{type(model.get_submodule(converted[0])).__name__}); call selact.densify first"
        )
    names_before = {n for n, _ in model.named_modules()}
    user_filter = filter_fn is not None
    filter_fn = filter_fn or default_filter(model)

    def resolve(name: str) -> SelectiveConfig | None:
        return resolve_config(name, config, overrides)

    def convert(module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, Converted) or not filter_fn(module, name):
            return module
        converter = converter_for(module)
        if converter is None:
            if user_filter and _multiplies(module):
                raise TypeError(
                    f"layer {name!r} ({type(module).__name__}) cannot be converted; convertible: "
                    f"{', '.join(CONVERTERS.names())}"
                )
            return module
        layer_config = resolve(name)
        return module if layer_config is None else converter(module, layer_config, name, resolve)

    model = convert(model, "")
    _walk(model, "", convert)
    _check_override_names(overrides, names_before | {n for n, _ in model.named_modules()})
    for name, module in model.named_modules():
        if isinstance(module, SelectiveModule):
            module.layer_name = name
        elif config.counting:  # hooks cost time in every call: none when nothing is counted
            dense_count.attach(module)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify` in place and return the model with its original modules."""

    def restore(module: nn.Module, name: str) -> nn.Module:
        dense_count.detach(module)
        return (
            module.to_dense() if isinstance(module, Converted) and _has_original(module) else module
        )

    _walk(model, "", restore, children_first=True)
    return restore(model, "")


def _walk(module: nn.Module, prefix: str, visit, children_first: bool = False) -> None:
    skip = () if children_first else getattr(module, "dense_children", ())
    for child_name, child in list(module.named_children()):
        if child_name in skip:
            continue
        name = f"{prefix}{child_name}"
        if children_first:
            _walk(child, f"{name}.", visit, children_first)
        new = visit(child, name)
        if new is not child:
            setattr(module, child_name, new)
        if not children_first:
            _walk(new, f"{name}.", visit, children_first)


def _has_original(module: nn.Module) -> bool:
    return "_original" in module.__dict__


def _multiplies(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() >= 2 and not list(module.children())


def _check_override_names(overrides: Mapping[str, Override] | None, names: set[str]) -> None:
    for key in overrides or {}:
        if not key.startswith("re:") and key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"override {key!r} names no layer of the model{hint}")
