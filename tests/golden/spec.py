"""The model, data and options of the golden checkpoints (shared by the generator and the
test, so that both build exactly the same run). Frozen with the files it made: the model is
written out here, not imported from other tests that may change theirs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# The options the golden files were made with that have changed their defaults since: written
# out, so that these runs stay the runs that made the files.
MADE_WITH = {
    "damping_mode": "exact",
    "damping_unit": "absolute",
    "exponent": -1.0,
    "grafting": "none",
    "wide_layers": "diagonal",
}

CONFIGS: dict[str, dict[str, Any]] = {
    "exact_diagonal_constraint": dict(
        MADE_WITH,
        damping=0.05,
        factor_dtype=torch.float64,
        factor_update_steps=2,
        inv_update_steps=3,
        other_params="diagonal",
        max_loss_change=0.5,
        lr=1e-2,
    ),
    "ekfac_sum": dict(
        MADE_WITH,
        damping=0.05,
        factor_dtype=torch.float64,
        factor_update_steps=2,
        inv_update_steps=3,
        damping_mode="ekfac",
        loss_reduction="sum",
    ),
    "pi_relative": dict(
        {**MADE_WITH, "damping_unit": "relative"},
        damping=0.1,
        factor_dtype=torch.float64,
        factor_update_steps=2,
        inv_update_steps=3,
        damping_mode="pi",
    ),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 7),
        nn.LayerNorm(7),
        nn.Tanh(),
        nn.Linear(7, 2, bias=False),
    ).double()


def batches(n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randn(5, 2, generator=g, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def train_step(
    model: nn.Module, pre: Any, x: Tensor, y: Tensor, options: dict[str, Any]
) -> dict[str, Tensor]:
    """One step of SGD on preconditioned gradients; returns them (before the update)."""
    model.zero_grad()
    losses = (model(x) - y).square().sum(1)
    (losses.sum() if options.get("loss_reduction") == "sum" else losses.mean()).backward()
    pre.step(losses.detach() if "max_loss_change" in options else None)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1e-2 * p.grad)
    return grads
