"""The contract between a module kind and the Kronecker-factored math.

An adapter turns one call of a module into the two quantities K-FAC needs, laid out as
``(N, T, blocks, d)``: N examples (the batch dimension), T shared positions (sequence
positions of a Linear, output positions of a conv), one Kronecker block per weight group,
and the block's input width (``a_dim0``, without the homogeneous coordinate) or output width
(``g_dim``). It also says how the weight's gradient reads as ``(blocks, g_dim, a_dim0)``.

With s = W a + b per position, the gradient of [W | b] for one position is δ ãᵀ with
ã = [a; 1]; flattened row-major that is δ ⊗ ã, hence the block G ⊗ A (torch order).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.func import functional_call


class LayerAdapter(ABC):
    """One supported module: its Kronecker blocks and how to read its inputs and gradients.

    Attributes:
        module: the wrapped module.
        weight: the weight parameter (trainable; frozen weights are never adapted).
        bias: the bias parameter if the module has one *and* it is trainable, else None.
            A frozen bias is constant: its homogeneous coordinate is left out of A.
        blocks: number of Kronecker blocks (the groups of a grouped conv, else 1).
        a_dim0: input width of one block, without the homogeneous coordinate.
        g_dim: output width of one block.
    """

    kind: str = "?"

    def __init__(self, module: nn.Module, blocks: int, a_dim0: int, g_dim: int) -> None:
        self.module = module
        weight = module.weight
        assert isinstance(weight, nn.Parameter)
        self.weight: nn.Parameter = weight
        bias = getattr(module, "bias", None)
        self.bias: nn.Parameter | None = (
            bias if isinstance(bias, nn.Parameter) and bias.requires_grad else None
        )
        self.blocks = blocks
        self.a_dim0 = a_dim0
        self.g_dim = g_dim

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def a_dim(self) -> int:
        """Width of A: the input width plus the homogeneous coordinate when there is a bias."""
        return self.a_dim0 + (1 if self.has_bias else 0)

    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @abstractmethod
    def inputs(self, x: Tensor) -> Tensor:
        """The layer input of one call as ``(N, T, blocks, a_dim0)`` (may be a view)."""

    @abstractmethod
    def output_grads(self, grad: Tensor) -> Tensor:
        """The gradient w.r.t. the layer output of one call as ``(N, T, blocks, g_dim)``."""

    def weight_matrix(self, t: Tensor) -> Tensor:
        """A weight-shaped tensor as ``(blocks, g_dim, a_dim0)`` (row-major flattening)."""
        return t.reshape(self.blocks, self.g_dim, self.a_dim0)

    def bias_matrix(self, t: Tensor) -> Tensor:
        """A bias-shaped tensor as ``(blocks, g_dim, 1)``."""
        return t.reshape(self.blocks, self.g_dim, 1)

    def linear_map(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The module's output for input ``x`` with its parameters replaced by ``weight`` and
        ``bias`` (None: no bias term, also when the module's bias is frozen).

        The output is linear in (weight, bias), so with a step (ΔW, Δb) it is the first-order
        change of the output, Σ over positions of ΔW ã (the loss-change constraint's
        directional derivative). This default calls the module through torch.func; adapters
        override it with the functional form.
        """
        params: dict[str, Tensor] = {"weight": weight}
        module_bias = getattr(self.module, "bias", None)
        if isinstance(module_bias, Tensor):
            params["bias"] = bias if bias is not None else torch.zeros_like(module_bias)
        return functional_call(self.module, params, (x,))

    def describe(self) -> str:
        return self.kind


def _prod(xs: tuple[int, ...]) -> int:
    return int(math.prod(xs))


def flatten_positions(t: Tensor, batched: bool, channels_last: bool) -> Tensor:
    """Reshape to ``(N, T, features)``.

    Args:
        t: ``(N, *positions, features)`` if ``channels_last`` else ``(N, features, *positions)``;
            without the leading N when ``batched`` is False (one example).
        batched: whether ``t`` has a batch dimension.
        channels_last: where the feature dimension is.
    """
    if not batched:
        t = t.unsqueeze(0)
    if channels_last:
        return t.reshape(t.shape[0], -1, t.shape[-1])
    n, c = t.shape[0], t.shape[1]
    return t.reshape(n, c, -1).transpose(1, 2)


__all__ = ["LayerAdapter", "flatten_positions"]
