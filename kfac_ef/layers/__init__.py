"""Adapters from module kinds to Kronecker layers and per-example rules, and the reasons the
others are left out."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import embedding
from .attention import MultiheadAttentionAdapter
from .base import (
    Inputs,
    LayerAdapter,
    ModuleAdapter,
    Observation,
    OneHotInputs,
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

    Only the exact supported types are adapted: a subclass may change ``forward`` (e.g.
    quantized or LoRA variants), so it is reported, never silently treated as its base class.
    An adapter may still cover only some parameters (frozen weights: no Kronecker layer).
    """
    kind = type(module)
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
    for types, reason in _REASONS:
        if isinstance(module, types):
            return reason
    return (
        f"module kind {kind.__name__} is not supported (no Kronecker or per-example gradient "
        "rule for a custom parameter or module)"
    )


_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

__all__ = [
    "DIAGONAL_KINDS",
    "SUPPORTED_KINDS",
    "Inputs",
    "LayerAdapter",
    "ModuleAdapter",
    "Observation",
    "OneHotInputs",
    "make_adapter",
]
