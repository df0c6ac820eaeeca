"""other_params="diagonal": the diagonal empirical Fisher against torch.func (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .helpers import seed_preconditioner, step_once
from .reference import mse_per_example, per_example_grads

pytestmark = pytest.mark.usefixtures("float64")


class Twice(nn.Module):
    """One LayerNorm applied twice: its per-example gradient sums both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.lin(self.norm(x)))).mean(dim=1))


class Pool(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], x.shape[1], -1).mean(-1)


class SeqFirst(nn.Module):
    """A sequence-first encoder layer (inputs (T, N, d)) with a PReLU activation module: its
    per-example gradients sum over positions along the batch at dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(
            6, 2, dim_feedforward=8, dropout=0.0, activation=nn.PReLU(), batch_first=False
        )
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.enc(x.transpose(0, 1)).transpose(0, 1).mean(dim=1))


def _frozen_weight_linear():
    lin = nn.Linear(4, 6)
    lin.weight.requires_grad_(False)
    return nn.Sequential(lin, nn.Tanh(), nn.Linear(6, 2))


# name -> (model, input shape, parameters preconditioned diagonally)
MODELS = {
    "layernorm-seq": (
        lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), Pool(), nn.Linear(3, 2)),
        (3, 4),
        ["1.weight", "1.bias"],
    ),
    "layernorm-2d-shape": (
        lambda: nn.Sequential(nn.LayerNorm((3, 4)), nn.Flatten(), nn.Linear(12, 2)),
        (3, 4),
        ["0.weight", "0.bias"],
    ),
    "rmsnorm": (
        lambda: nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), Pool(), nn.Linear(3, 2)),
        (3, 4),
        ["1.weight"],
    ),
    "groupnorm": (
        lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), Pool(), nn.Linear(4, 2)),
        (2, 7),
        ["1.weight", "1.bias"],
    ),
    "instancenorm": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 2), nn.InstanceNorm2d(3, affine=True), Pool(), nn.Linear(3, 2)
        ),
        (2, 4, 4),
        ["1.weight", "1.bias"],
    ),
    "prelu": (
        lambda: nn.Sequential(nn.Conv1d(2, 3, 2), nn.PReLU(3), Pool(), nn.Linear(3, 2)),
        (2, 5),
        ["1.weight"],
    ),
    "prelu-shared": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 2)),
        (4,),
        ["1.weight"],
    ),
    "prelu-seq-first": (
        SeqFirst,
        (3, 6),
        [
            "enc.activation.weight",
            *(f"enc.norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias")),
        ],
    ),
    "lone-bias": (_frozen_weight_linear, (4,), ["0.bias"]),
    "called-twice": (Twice, (5, 6), ["norm.weight", "norm.bias"]),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diagonal_fisher_matches_per_example_gradients(name, reduction):
    make, in_shape, names = MODELS[name]
    model = make()
    with torch.no_grad():  # non-trivial affine parameters
        for n, p in model.named_parameters():
            if n in names:
                p.add_(0.3 * torch.randn_like(p))
    damping = 1e-2
    pre = seed_preconditioner(
        model,
        damping=damping,
        factor_dtype=torch.float64,
        loss_reduction=reduction,
        other_params="diagonal",
    )
    assert {d.name for d in pre.summary().diagonal} == set(names)
    x, y = torch.randn(5, *in_shape), torch.randn(5, 2)
    pe = per_example_grads(model, mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y, reduction)
    fishers = pre.diagonal_fishers()
    for n in names:
        expected = pe[n].square().mean(0) if reduction == "mean" else pe[n].square().sum(0)
        torch.testing.assert_close(fishers[n], expected, msg=n)
        torch.testing.assert_close(after[n], before[n] / (expected + damping), msg=n)


def test_ignore_leaves_them_to_the_optimizer():
    make, in_shape, names = MODELS["layernorm-seq"]
    model = make()
    pre = seed_preconditioner(model)
    reasons = dict(pre.summary().unpreconditioned)
    assert all("other_params='ignore'" in reasons[n] for n in names)
    x, y = torch.randn(5, *in_shape), torch.randn(5, 2)
    before, after = step_once(model, pre, mse_per_example, x, y)
    for n in names:
        assert torch.equal(before[n], after[n])


def test_batchnorm_and_custom_parameters_have_reasons():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model.register_parameter("scale", nn.Parameter(torch.ones(())))
    pre = seed_preconditioner(model, other_params="diagonal")
    reasons = dict(pre.summary().unpreconditioned)
    assert "batch statistics" in reasons["1.weight"]
    assert "custom parameter" in reasons["scale"]


def test_running_average_and_cadence():
    """F follows the same running average as the factors, and 1/(F+ε) the decomposition
    cadence: between decompositions the preconditioner is the one of the last one."""
    make, in_shape, names = MODELS["rmsnorm"]
    model = make()
    beta, damping = 0.6, 0.1
    pre = seed_preconditioner(
        model,
        damping=damping,
        factor_decay=beta,
        inv_update_steps=2,
        factor_dtype=torch.float64,
        other_params="diagonal",
    )
    expected = None
    for step in range(3):
        x, y = torch.randn(4, *in_shape), torch.randn(4, 2)
        pe = per_example_grads(model, mse_per_example, x, y)["1.weight"]
        f = pe.square().mean(0)
        previous = expected
        expected = f if expected is None else beta * expected + (1 - beta) * f
        before, after = step_once(model, pre, mse_per_example, x, y)
        torch.testing.assert_close(pre.diagonal_fishers()["1.weight"], expected)
        used = expected if step != 1 else previous  # step 1 reuses step 0's inverse
        torch.testing.assert_close(after["1.weight"], before["1.weight"] / (used + damping))
