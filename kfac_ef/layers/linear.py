"""nn.Linear: y = x Wᵀ + b on inputs of any rank, and nn.Bilinear: y = x₁ᵀ W x₂ + b.

The batch is the first dimension (the second inside sequence-first models); every other
dimension before the features is a shared position (a sequence, image rows, ...). An input
without batch dimension (1-D, or 2-D sequence-first) is one example.

nn.Bilinear is a Linear on the outer product: y_k = Σ_ij W_kij x₁_i x₂_j + b_k, so with
a = vec(x₁ x₂ᵀ) (row-major, in1·in2 wide) its weight reads as (out, in1·in2) and the layer is
one Kronecker block G ⊗ A over a.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import LayerAdapter, flatten_positions, is_batched


class FeatureRows:
    """Inputs and output gradients with the features on the last dimension (every other
    dimension but the batch's a position), as rows ``(rows, features, 1)``: a Linear's."""

    batch_dim: int

    def _rows(self, t: Tensor) -> Tensor:
        batched = is_batched(t, 1, self.batch_dim)
        return flatten_positions(t, batched, channels_last=True, batch_dim=self.batch_dim)

    def inputs(self, x: Tensor) -> Tensor:
        return self._rows(x).unsqueeze(2)

    def output_grads(self, grad: Tensor) -> Tensor:
        return self._rows(grad).unsqueeze(2)


class LinearAdapter(FeatureRows, LayerAdapter):
    kind = "Linear"

    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module, blocks=1, a_dim0=module.in_features, g_dim=module.out_features)


class BilinearAdapter(LayerAdapter):
    kind = "Bilinear"

    def __init__(self, module: nn.Bilinear) -> None:
        super().__init__(
            module,
            blocks=1,
            a_dim0=module.in1_features * module.in2_features,
            g_dim=module.out_features,
        )

    def save(self, args: tuple[Any, ...], kwargs: dict[str, Any], before: Any) -> Any:
        x1 = args[0] if args else kwargs["input1"]
        x2 = args[1] if len(args) > 1 else kwargs["input2"]
        return x1.detach(), x2.detach()

    def _rows(self, t: Tensor) -> Tensor:
        batched = is_batched(t, 1, self.batch_dim)
        return flatten_positions(t, batched, channels_last=True, batch_dim=self.batch_dim)

    def inputs(self, x: tuple[Tensor, Tensor]) -> Tensor:
        x1, x2 = (self._rows(t) for t in x)
        outer = x1.unsqueeze(-1) * x2.unsqueeze(-2)  # (N, T, in1, in2)
        return outer.reshape(outer.shape[0], outer.shape[1], 1, -1)

    def output_grads(self, grad: Tensor) -> Tensor:
        return self._rows(grad).unsqueeze(2)
