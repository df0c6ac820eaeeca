"""Adapters from module kinds to Kronecker layers and per-example rules, and the reasons the
others are left out."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import embedding, rules
from .attention import MultiheadAttentionAdapter
from .base import (
    Inputs,
    LayerAdapter,
    ModuleAdapter,
    Observation,
    OneHotInputs,
    module_class,
)
from .conv import ConvAdapter
from .diagonal import ChannelNormAdapter, LayerNormAdapter, PReLUAdapter
from .embedding import EmbeddingAdapter
from .linear import BilinearAdapter, LinearAdapter

# Kronecker-factored kinds (nn.MultiheadAttention gives four Linear layers).
SUPPORTED_KINDS = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.MultiheadAttention,
)
# Kinds whose parameters have a per-example rule (preconditioned with other_params="diagonal").
DIAGONAL_KINDS = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.PReLU,
)

_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Torch classes whose subclasses are covered after a probe check against the base formula.
_BASES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.PReLU,
)
# Subclasses never adapted as their base: lazy modules (not materialized), and classes with
# a reason of their own.
_NO_SUBCLASS: tuple[type, ...] = (nn.modules.lazy.LazyModuleMixin,)

# Linear subclasses whose forward is nn.Linear's (the out_proj type of MultiheadAttention).
_LINEAR_TYPES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)

_REASONS: tuple[tuple[Any, str], ...] = (
    (
        nn.modules.lazy.LazyModuleMixin,
        "lazy module not materialized yet: run one forward pass before building the preconditioner",
    ),
    (
        nn.modules.batchnorm._NormBase,
        "batch normalization: batch statistics couple the examples, so per-example gradients "
        "(and a Kronecker or diagonal empirical Fisher) are not defined",
    ),
    (
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        "transposed convolutions are not supported yet",
    ),
    (
        nn.RNNBase,
        "recurrent layers run fused kernels: their per-time-step inputs and gate gradients "
        "are not observable by module hooks",
    ),
    (
        nn.RNNCellBase,
        "recurrent cells compute their gates internally: the gates' gradients are not "
        "observable by module hooks",
    ),
    (
        tuple(t for t in (getattr(nn, "LinearCrossEntropyLoss", None),) if t is not None),
        "LinearCrossEntropyLoss applies its Linear inside a fused, chunked loss: the logits and "
        "their gradients are never materialized for the hooks",
    ),
    (
        nn.EmbeddingBag,
        "EmbeddingBag sums or averages tokens inside the module: A is not diagonal and the "
        "per-bag inputs are not kept",
    ),
)


def make_adapter(module: nn.Module) -> ModuleAdapter | str:
    """The adapter for ``module``, or a string saying why it cannot be preconditioned at all.

    The exact supported torch types have their adapters. Any other module is matched by what
    it is expected to compute (``rules``: a rule registered for its class, the torch class
    it subclasses, or a built-in rule for another library's class) and adapted only if a
    probe call at construction confirms it: a subclass may change ``forward`` (quantized or
    LoRA variants), so it is never silently treated as its base class. An adapter may still
    cover only some parameters (frozen weights: no Kronecker layer).
    """
    kind = module_class(module)
    exact = _exact_adapter(module, kind)
    if exact is not None:
        return exact
    found = rules.find_rule(module)
    if found is not None and not isinstance(module, _BASES):
        rule, origin = found
        why = rules.check_rule(module, rule)
        if why is None:
            return rules.adapt(module, rule)
        return (
            f"{kind.__name__} ({origin}: {rule.computes!r}) failed the probe check, {why}; "
            "left out (kfac_ef.register_module declares what a class computes)"
        )
    for base in _BASES:
        if isinstance(module, base) and not isinstance(module, _NO_SUBCLASS):
            return _adapt_subclass(module, base, found)
    for types, reason in _REASONS:
        if isinstance(module, types):
            return reason
    if any(True for _ in module.children()):
        return (
            f"custom parameter of {kind.__name__} (used by its own forward, not through a "
            "module with a rule: no Kronecker or per-example gradient rule for it)"
        )
    return (
        f"module kind {kind.__name__} is not supported (no Kronecker or per-example gradient "
        "rule for a custom parameter or module; kfac_ef.register_module declares one for a "
        "class that computes a linear map, a norm or a scale)"
    )


def _adapt_subclass(
    module: nn.Module, base: type[nn.Module], found: tuple[rules.ModuleRule, str] | None
) -> ModuleAdapter | str:
    """A subclass of a supported torch class: a rule registered for it, else the base
    class's formula, else a built-in look-alike rule (timm's LayerNorm2d is an nn.LayerNorm
    over the channels), each only if the probe agrees."""
    name = module_class(module).__name__
    if found is not None and found[1] != "built-in rule":
        why = rules.check_rule(module, found[0])
        if why is None:
            return rules.adapt(module, found[0])
        return f"{name} ({found[1]}: {found[0].computes!r}) failed the probe check, {why}"
    why = rules.check_subclass(module, base)
    if why is None:
        adapter = _exact_adapter(module, base)
        assert adapter is not None
        if isinstance(adapter, ModuleAdapter):
            adapter.kind = name
        return adapter
    if found is not None and rules.check_rule(module, found[0]) is None:
        return rules.adapt(module, found[0])
    return (
        f"{name}, a subclass of nn.{base.__name__}, failed the probe check against "
        f"nn.{base.__name__}'s formula: {why}; left out (if it computes something a rule "
        "covers, declare it with kfac_ef.register_module)"
    )


def _exact_adapter(module: nn.Module, kind: type | None = None) -> ModuleAdapter | str | None:
    """The adapter of an exact supported type (``kind``: treat the module as that type)."""
    kind = kind or module_class(module)
    if kind in _LINEAR_TYPES:
        return LinearAdapter(module)  # type: ignore[arg-type]
    if kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return ConvAdapter(module)  # type: ignore[arg-type]
    if kind is nn.Bilinear:
        return BilinearAdapter(module)  # type: ignore[arg-type]
    if kind is nn.Embedding:
        why = embedding.unsupported(module)  # type: ignore[arg-type]
        return why if why is not None else EmbeddingAdapter(module)  # type: ignore[arg-type]
    if kind is nn.MultiheadAttention:
        return MultiheadAttentionAdapter(module)  # type: ignore[arg-type]
    if kind in (nn.LayerNorm, nn.RMSNorm):
        return LayerNormAdapter(module)
    if kind in (nn.GroupNorm, *_INSTANCE):
        return ChannelNormAdapter(module)
    if kind is nn.PReLU:
        return PReLUAdapter(module)
    return None


__all__ = [
    "DIAGONAL_KINDS",
    "SUPPORTED_KINDS",
    "Inputs",
    "LayerAdapter",
    "ModuleAdapter",
    "Observation",
    "OneHotInputs",
    "make_adapter",
    "rules",
]
