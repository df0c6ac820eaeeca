"""Small models and training-step helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kfac_ef import KFACPreconditioner

from .reference import PerExampleLoss

# The seed's update, which the tests of the math check against dense float64 solves:
# (G⊗A + εI)⁻¹ with an absolute ε = 1e-3, no grafting, statistics at every step. The
# library's defaults differ (chosen from the benchmarks); tests/test_defaults.py checks them.
SEED_UPDATE = {
    "damping": 1e-3,
    "damping_unit": "absolute",
    "exponent": -1.0,
    "grafting": "none",
    "factor_update_steps": 1,
    "wide_layers": "diagonal",
    "damping_mode": "exact",
}


def seed_preconditioner(model: nn.Module, **options: object) -> KFACPreconditioner:
    """KFACPreconditioner with the seed's update unless ``options`` say otherwise."""
    return KFACPreconditioner(model, **{**SEED_UPDATE, **options})  # type: ignore[arg-type]


def backward(
    model: nn.Module, loss: PerExampleLoss, x: Tensor, y: Tensor, reduction: str
) -> Tensor:
    losses = loss(model(x), y)
    total = losses.mean() if reduction == "mean" else losses.sum()
    total.backward()
    return total.detach()


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def step_once(
    model: nn.Module,
    precond: KFACPreconditioner,
    loss: PerExampleLoss,
    x: Tensor,
    y: Tensor,
    reduction: str = "mean",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One backward and step(); returns the gradients before and after step()."""
    model.zero_grad()
    backward(model, loss, x, y, reduction)
    before = grads(model)
    precond.step()
    return before, grads(model)


def conv_head(conv: nn.Module, in_shape: tuple[int, ...], outputs: int = 2) -> nn.Sequential:
    """conv -> tanh -> flatten -> linear, sized for an input of shape (C, *spatial)."""
    with torch.no_grad():
        n_out = conv(torch.zeros(1, *in_shape, dtype=conv.weight.dtype)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, outputs))
