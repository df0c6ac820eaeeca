"""nn.Linear: y = x Wᵀ + b on inputs of any rank.

The first dimension is the batch; every dimension between it and the features is a shared
position (a sequence, image rows, ...). A 1-D input is one example at one position.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerAdapter, flatten_positions


class LinearAdapter(LayerAdapter):
    kind = "Linear"

    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module, blocks=1, a_dim0=module.in_features, g_dim=module.out_features)

    def inputs(self, x: Tensor) -> Tensor:
        t = flatten_positions(x, batched=x.dim() > 1, channels_last=True)
        return t.unsqueeze(2)

    def output_grads(self, grad: Tensor) -> Tensor:
        t = flatten_positions(grad, batched=grad.dim() > 1, channels_last=True)
        return t.unsqueeze(2)

    def linear_map(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)
