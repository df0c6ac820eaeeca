"""The one scaling rule: from the gradients the hooks observe to per-example quantities.

The hooks observe γ_n = ∂(σL)/∂s, the gradient of the reduced loss L times the GradScaler's
scale σ (1 without one); the empirical Fisher needs δ_n = ∂ℓ_n/∂s:

    loss_reduction="mean":  L = (1/N) Σ ℓ_n   δ_n = N γ_n / σ     G = (1/N) Σ δ δᵀ = N S_G / σ²
    loss_reduction="sum":   L = Σ ℓ_n         δ_n = γ_n / σ       G = Σ δ δᵀ       = S_G / σ²

with S_G = Σ γ γᵀ; "sum" keeps the empirical Fisher at the scale of the summed loss (N times
the mean form), so that ε means the same at every batch size (docs/math.md, section 3). The
diagonal Fisher F and EKFAC's S scale like G. The sampled-target backward of
``fisher_type="mc"`` observes per-example gradients whatever the reduction (δ_n = γ_n / σ):
G = S_G / (N σ²) for "mean".

Across W data-parallel ranks (DDP averages gradients: the global loss is Σ_r L_r / W, with N_r
examples on rank r): rank r contributes ``rank_weight`` · S_G,r to an all-reduced sum, which
``global_g_scale`` turns into G of the global batch:

    "mean":  G = Σ_r N_r² S_G,r / Σ_r N_r     (δ_n = N_r γ_n on rank r)
    "sum":   G = Σ_r S_G,r / W²               (each rank's gradient is that of Σ ℓ_n / W)

Every scale of kfac_ef's statistics and of the constraint's per-example quantities is one
of these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

Scale = float | Tensor


def g_scale(
    examples: int, loss_reduction: str, loss_scale: Tensor | None, per_example: bool = False
) -> Scale:
    """The scale of G (and of S, F) from the raw sums of observed gradients of one process:
    N / σ² ("mean"), 1 / σ² ("sum"); 1 / (N σ²) for "mean" with per-example (sampled)
    gradients."""
    scale: Scale = 1.0
    if loss_reduction == "mean":
        scale = 1.0 / max(examples, 1) if per_example else float(examples)
    if loss_scale is not None:
        return scale / loss_scale.square()
    return scale


def rank_weight(examples: int, loss_reduction: str, per_example: bool = False) -> float:
    """What a rank multiplies its S_G (S, F) by before the all-reduce: N_r² ("mean", observed
    gradients of a mean-reduced loss), else 1."""
    if loss_reduction == "mean" and not per_example:
        return float(examples) ** 2
    return 1.0


def global_g_scale(
    examples: Tensor, world: int, loss_reduction: str, inv_sigma2: Tensor | None
) -> Tensor:
    """The scale of the all-reduced Σ_r rank_weight · S_G,r: 1 / Σ_r N_r ("mean", a device
    tensor ``examples``), 1 / W² ("sum"); times 1 / σ²."""
    if loss_reduction == "mean":
        scale = 1.0 / examples.clamp_min(1.0)
    else:
        scale = torch.full_like(examples, 1.0 / world**2)
    return scale if inv_sigma2 is None else scale * inv_sigma2


def loss_share(world: int, loss_reduction: str) -> float:
    """From this process's per-example losses and gradients to those of the preconditioner's
    loss: 1/W for "sum" over W ranks (their averaged gradient is that of Σ ℓ_n / W), else 1."""
    return 1.0 / world if loss_reduction == "sum" else 1.0


def direction_scale(
    examples: int, world: int, loss_reduction: str, loss_scale: Tensor | None
) -> Scale:
    """From γ_nᵀ ∇̃ (observed gradients) to g_nᵀ ∇̃ per example: N ("mean") or 1 ("sum"),
    times ``loss_share``, divided by σ."""
    scale: Scale = float(examples) if loss_reduction == "mean" else 1.0
    scale = scale * loss_share(world, loss_reduction)
    return scale if loss_scale is None else scale / loss_scale


def form_per_example(form: Tensor, loss_reduction: str, examples: float | Tensor) -> Tensor:
    """The Kronecker form per example: G of "sum" is N times the mean form, so divide by the
    N of the last statistics step (of the global batch when distributed)."""
    return form / examples if loss_reduction == "sum" else form
