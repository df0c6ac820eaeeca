"""Modules whose parameters are outside the Kronecker form but have cheap per-example gradients.

Used with ``other_params="diagonal"``: the diagonal empirical Fisher of such a parameter needs
its per-example gradients g_n = ∂ℓ_n/∂θ, computed here from the call's input x and the
gradient δ w.r.t. its output (both captured by the hooks), summed over positions:

- LayerNorm / RMSNorm / GroupNorm / InstanceNorm (affine): y = x̂ ⊙ γ + β with x̂ the
  normalized input (recomputed from x without the affine part), so g_n(γ) = Σ_t δ ⊙ x̂ and
  g_n(β) = Σ_t δ, with t running over every position of example n.
- PReLU: y = max(0, x) + w · min(0, x), g_n(w) = Σ δ ⊙ min(0, x) per channel.
- a trainable bias whose weight is frozen or tied elsewhere (Linear, Conv, Bilinear): Σ_t δ
  (see LayerAdapter).

BatchNorm is not here: batch statistics couple the examples, so ∂ℓ_n/∂θ is not a function of
example n's own input and output gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ModuleAdapter, Observation

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class AffineDiagonalAdapter(ModuleAdapter):
    """Per-example gradients of an elementwise affine transform y = x̂ ⊙ γ + β.

    Subclasses say where the parameters broadcast (``_layout``) and how x̂ is computed.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.kind = type(module).__name__
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        # γ and β (None where absent); a rule for another class may name them otherwise.
        self.weight = weight if isinstance(weight, nn.Parameter) else None
        self.bias = bias if isinstance(bias, nn.Parameter) else None

    def diagonal_candidates(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]

    def _normalized(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _per_example(self, t: Tensor, x: Tensor) -> Tensor:
        """Sum ``t`` (shaped like the input) over positions: ``(N, *parameter shape)``."""
        raise NotImplementedError

    def observe(
        self, saved: Any, grad: Tensor, layers: Sequence[int], params: Sequence[nn.Parameter]
    ) -> Observation:
        obs = Observation()
        x: Tensor = saved
        dtype = _compute_dtype(grad)
        delta = grad.to(dtype)
        for p in params:
            if p is self.weight:
                obs.per_example[id(p)] = self._per_example(delta * self._normalized(x), x)
            elif p is self.bias:
                obs.per_example[id(p)] = self._per_example(delta, x)
        return obs


class LayerNormAdapter(AffineDiagonalAdapter):
    """nn.LayerNorm and nn.RMSNorm: parameters over the trailing ``normalized_shape`` dims."""

    def _normalized(self, x: Tensor) -> Tensor:
        m: Any = self.module
        shape = tuple(m.normalized_shape)
        xf = x.to(_compute_dtype(x))
        if isinstance(m, nn.RMSNorm):
            # eps=None means the input dtype's machine epsilon, as in the forward pass.
            eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
            return F.rms_norm(xf, shape, None, eps)
        return F.layer_norm(xf, shape, None, None, m.eps)

    def _per_example(self, t: Tensor, x: Tensor) -> Tensor:
        m: Any = self.module
        k = len(m.normalized_shape)
        if t.dim() == k:  # one example without batch dimension
            t = t.unsqueeze(0)
        elif self.batch_dim:  # sequence-first: (T, N, ...) batched, (T, ...) one example
            t = t.movedim(self.batch_dim, 0) if t.dim() > k + 1 else t.unsqueeze(0)
        return t.reshape(t.shape[0], -1, *t.shape[t.dim() - k :]).sum(dim=1)


class ChannelNormAdapter(AffineDiagonalAdapter):
    """nn.GroupNorm and nn.InstanceNorm*d (affine): parameters over the channel dim 1."""

    def _batched(self, x: Tensor) -> bool:
        m: Any = self.module
        if isinstance(m, _INSTANCE_NORMS):
            return x.dim() != m._get_no_batch_dim()
        return True

    def _normalized(self, x: Tensor) -> Tensor:
        m: Any = self.module
        xf = x.to(_compute_dtype(x))
        if not self._batched(xf):
            xf = xf.unsqueeze(0)
        if isinstance(m, nn.GroupNorm):
            out = F.group_norm(xf, m.num_groups, None, None, m.eps)
        else:
            out = F.instance_norm(xf, eps=m.eps)
        return out if self._batched(x) else out[0]

    def _per_example(self, t: Tensor, x: Tensor) -> Tensor:
        if not self._batched(x):
            t = t.unsqueeze(0)
        return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)


class PReLUAdapter(ModuleAdapter):
    """nn.PReLU: y = max(0, x) + w · min(0, x), w per channel (dim 1) or one shared scalar."""

    kind = "PReLU"

    def diagonal_candidates(self) -> list[nn.Parameter]:
        w: Any = self.module.weight
        return [w] if w.requires_grad else []

    def observe(
        self, saved: Any, grad: Tensor, layers: Sequence[int], params: Sequence[nn.Parameter]
    ) -> Observation:
        obs = Observation()
        w: Any = self.module.weight
        if not any(p is w for p in params):
            return obs
        x: Tensor = saved
        dtype = _compute_dtype(grad)
        t = grad.to(dtype) * x.to(dtype).clamp(max=0)
        if t.dim() == 0:
            t = t.reshape(1, 1)
        bd = self.batch_dim if t.dim() > 2 else 0  # sequence-first (T, N, ...) inputs
        n = t.shape[bd]
        if w.numel() == 1:
            per = t.movedim(bd, 0).reshape(n, -1).sum(dim=1, keepdim=True)
        elif bd == 1:
            # torch applies the weights along dim 1, here the batch: example n meets only
            # w[n] (the module requires as many examples as weights).
            per = torch.diag_embed(t.movedim(1, 0).reshape(n, -1).sum(dim=1))
        else:
            per = t.reshape(n, t.shape[1], -1).sum(dim=2)
        obs.per_example[id(w)] = per.reshape(n, *w.shape)
        return obs
