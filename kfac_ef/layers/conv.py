"""nn.Conv1d / nn.Conv2d / nn.Conv3d as a Linear on unfolded patches.

Each output position t of example n sees the patch a_{n,t} of its input (all input channels
of its group, every kernel offset), so the conv is s_{n,t} = W a_{n,t} + b with W flattened
row-major as (out_channels, in_channels/groups · prod(kernel_size)). Groups split channels:
group g maps its in/groups channels to its out/groups channels with its own block of W, so a
grouped conv is `groups` independent Kronecker blocks (depthwise: blocks of width 1 in G).

Padding ('same', 'valid' or explicit, every padding_mode) is applied exactly as the module
applies it: the module's own padding amounts with its padding mode, then patches are taken
with stride and dilation.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerAdapter, _prod, flatten_positions


class ConvAdapter(LayerAdapter):
    kind = "Conv"

    def __init__(self, module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        self.ndim = len(module.kernel_size)
        groups = module.groups
        k = tuple(module.kernel_size)
        super().__init__(
            module,
            blocks=groups,
            a_dim0=module.in_channels // groups * _prod(k),
            g_dim=module.out_channels // groups,
        )
        self.kind = f"Conv{self.ndim}d"
        self.kernel_size = k
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        # Exactly the padding the module applies (for 'same' possibly asymmetric).
        self.pad = tuple(module._reversed_padding_repeated_twice)
        self.pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode

    def _batched(self, x: Tensor) -> bool:
        return x.dim() == self.ndim + 2

    def inputs(self, x: Tensor) -> Tensor:
        batched = self._batched(x)
        if not batched:
            x = x.unsqueeze(0)
        if any(self.pad):
            x = F.pad(x, self.pad, mode=self.pad_mode)
        # Unfold every spatial dim: (N, C, L1.., k1..); dilation by a strided slice of the window.
        for i, (k, s, d) in enumerate(zip(self.kernel_size, self.stride, self.dilation)):
            x = x.unfold(2 + i, d * (k - 1) + 1, s)
            if d > 1:
                x = x[..., ::d]
        n, c = x.shape[0], x.shape[1]
        nd = self.ndim
        # (N, C, L.., k..) -> (N, L.., C, k..) -> (N, T, blocks, C/groups * prod(k))
        perm = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
        x = x.permute(perm).reshape(n, -1, self.blocks, c // self.blocks * _prod(self.kernel_size))
        return x

    def output_grads(self, grad: Tensor) -> Tensor:
        t = flatten_positions(grad, batched=self._batched(grad), channels_last=False)
        return t.reshape(t.shape[0], t.shape[1], self.blocks, self.g_dim)
