"""Adapters from supported module kinds to Kronecker blocks, and the reasons others are left out."""

from __future__ import annotations

from torch import nn

from .base import LayerAdapter
from .conv import ConvAdapter
from .linear import LinearAdapter

SUPPORTED_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def make_adapter(module: nn.Module) -> LayerAdapter | str:
    """The adapter for ``module``, or a string saying why it cannot be preconditioned.

    Only the exact supported types are adapted: a subclass may change ``forward`` (e.g.
    LazyLinear before materialization, or quantized / LoRA variants), so it is reported,
    never silently treated as its base class.
    """
    kind = type(module)
    if kind is nn.Linear:
        adapter: LayerAdapter = LinearAdapter(module)  # type: ignore[arg-type]
    elif kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        adapter = ConvAdapter(module)  # type: ignore[arg-type]
    else:
        return f"module kind {kind.__name__} is not supported"
    if not adapter.weight.requires_grad:
        return "frozen (weight.requires_grad is False)"
    return adapter


__all__ = ["SUPPORTED_KINDS", "LayerAdapter", "make_adapter"]
