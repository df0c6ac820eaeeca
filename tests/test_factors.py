"""Factors against their definitions, from independent per-example quantities (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .helpers import conv_head, seed_preconditioner, step_once
from .reference import (
    ce_per_example,
    grad_matrix,
    homogeneous,
    layer_io,
    mse_per_example,
    per_example_grads,
    positions,
    reference_factors,
)

pytestmark = pytest.mark.usefixtures("float64")

CONVS = {
    "conv2d-stride-pad": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 7, 6)),
    "conv2d-same-reflect-dil-groups": (
        lambda: nn.Conv2d(
            4, 6, (2, 3), dilation=(2, 1), padding="same", padding_mode="reflect", groups=2
        ),
        (4, 6, 5),
    ),
    "conv2d-depthwise-valid-nobias": (
        lambda: nn.Conv2d(4, 4, 3, groups=4, padding="valid", bias=False),
        (4, 5, 5),
    ),
    "conv2d-circular": (lambda: nn.Conv2d(3, 5, 3, padding=2, padding_mode="circular"), (3, 4, 5)),
    "conv2d-replicate-stride": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate", stride=(1, 2)),
        (2, 5, 6),
    ),
    "conv1d-stride-dil": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (3, 11)),
    "conv1d-same-even-groups": (lambda: nn.Conv1d(4, 4, 4, padding="same", groups=2), (4, 9)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (2, 3, 4, 3)),
}


def _io_and_grads(model, layer, loss, x, y):
    return layer_io(model, layer, loss, x, y), per_example_grads(model, loss, x, y)


@pytest.mark.parametrize("name", list(CONVS))
def test_reference_is_consistent(name):
    """The test's own patches and δ's reproduce torch.func's per-example gradients."""
    conv_fn, in_shape = CONVS[name]
    model = conv_head(conv_fn(), in_shape)
    conv = model[0]
    x = torch.randn(3, *in_shape)
    y = torch.randn(3, 2)
    io, pe = _io_and_grads(model, conv, mse_per_example, x, y)
    for n, calls in enumerate(io):
        ((a, d),) = calls
        pa, pd = positions(conv, a, d)
        g_n = torch.einsum("tbo,tbi->boi", pd, homogeneous(pa, conv.bias is not None))
        expected = grad_matrix(
            conv, pe["0.weight"][n], pe["0.bias"][n] if conv.bias is not None else None
        )
        torch.testing.assert_close(g_n, expected)


def _linear_model(bias=True):
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3))


def test_exact_rank_one_linear():
    """N = 1, T = 1: G ⊗ A equals g gᵀ of the layer's per-example gradient."""
    model = _linear_model()
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    x, y = torch.randn(1, 5), torch.tensor([2])
    pe = per_example_grads(model, ce_per_example, x, y)
    step_once(model, pre, ce_per_example, x, y)
    for idx in ("0", "2"):
        A, G = pre.factors()[idx]
        g = torch.cat([pe[f"{idx}.weight"][0], pe[f"{idx}.bias"][0][:, None]], 1).reshape(-1)
        torch.testing.assert_close(torch.kron(G, A), torch.outer(g, g))


@pytest.mark.parametrize("bias", [True, False])
def test_exact_rank_one_conv_single_position(bias):
    """A conv whose kernel covers its input has one output position: G ⊗ A = g gᵀ."""
    conv = nn.Conv2d(2, 3, (3, 4), bias=bias)
    model = conv_head(conv, (2, 3, 4))
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    x, y = torch.randn(1, 2, 3, 4), torch.randn(1, 2)
    pe = per_example_grads(model, mse_per_example, x, y)
    step_once(model, pre, mse_per_example, x, y)
    A, G = pre.factors()["0"]
    g = grad_matrix(conv, pe["0.weight"][0], pe["0.bias"][0] if bias else None).reshape(-1)
    torch.testing.assert_close(torch.kron(G, A), torch.outer(g, g))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors(reduction, bias):
    model = _linear_model(bias)
    pre = seed_preconditioner(model, factor_dtype=torch.float64, loss_reduction=reduction)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    io = layer_io(model, model[0], ce_per_example, x, y)
    io2 = layer_io(model, model[2], ce_per_example, x, y)
    step_once(model, pre, ce_per_example, x, y, reduction)
    for name, layer, lio in (("0", model[0], io), ("2", model[2], io2)):
        A, G = reference_factors(layer, lio, reduction=reduction)
        got_a, got_g = pre.factors()[name]
        torch.testing.assert_close(got_a, A[0])
        torch.testing.assert_close(got_g, G[0])


class SeqModel(nn.Module):
    """A Linear over (N, T, d) sequences, then per-example pooling."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6, bias=bias)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(dim=1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_shared_positions(approx, reduction, bias):
    model = SeqModel(bias)
    pre = seed_preconditioner(
        model, factor_dtype=torch.float64, kfac_approx=approx, loss_reduction=reduction
    )
    x, y = torch.randn(5, 3, 4), torch.randn(5, 2)
    io = layer_io(model, model.proj, mse_per_example, x, y)
    step_once(model, pre, mse_per_example, x, y, reduction)
    A, G = reference_factors(model.proj, io, approx=approx, reduction=reduction)
    got_a, got_g = pre.factors()["proj"]
    torch.testing.assert_close(got_a, A[0])
    torch.testing.assert_close(got_g, G[0])


def test_linear_rank4_input():
    """Every dim between the batch and the features is a position (here 2 x 3 of them)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.Linear(18, 2))
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    x, y = torch.randn(4, 2, 3, 4), torch.randn(4, 2)
    io = layer_io(model, model[0], mse_per_example, x, y)
    step_once(model, pre, mse_per_example, x, y)
    A, G = reference_factors(model[0], io)
    torch.testing.assert_close(pre.factors()["0"][0], A[0])
    torch.testing.assert_close(pre.factors()["0"][1], G[0])


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_conv_factors(name, approx, reduction):
    conv_fn, in_shape = CONVS[name]
    model = conv_head(conv_fn(), in_shape)
    conv = model[0]
    pre = seed_preconditioner(
        model, factor_dtype=torch.float64, kfac_approx=approx, loss_reduction=reduction
    )
    x, y = torch.randn(3, *in_shape), torch.randn(3, 2)
    io = layer_io(model, conv, mse_per_example, x, y)
    step_once(model, pre, mse_per_example, x, y, reduction)
    A, G = reference_factors(conv, io, approx=approx, reduction=reduction)
    got_a, got_g = pre.factors()["0"]
    if conv.groups == 1:
        A, G = A[0], G[0]
    torch.testing.assert_close(got_a, A)
    torch.testing.assert_close(got_g, G)


def test_module_called_twice_is_shared_positions():
    """A module applied twice in one forward pass: its calls are positions of the same examples."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.head = nn.Linear(3, 1)

        def forward(self, x):
            return self.head(self.lin(torch.tanh(self.lin(x))))

    model = Twice()
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    io = layer_io(model, model.lin, mse_per_example, x, y)
    assert all(len(calls) == 2 for calls in io)
    step_once(model, pre, mse_per_example, x, y)
    A, G = reference_factors(model.lin, io)
    torch.testing.assert_close(pre.factors()["lin"][0], A[0])
    torch.testing.assert_close(pre.factors()["lin"][1], G[0])


def test_running_average():
    """F ← β F + (1-β) F_batch, with the first update taking the batch estimate."""
    model = _linear_model()
    beta = 0.7
    pre = seed_preconditioner(model, factor_dtype=torch.float64, factor_decay=beta)
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    expected = None
    for x, y in batches:
        # Reference factors at the current weights (step() changes only grads, not weights).
        A, G = reference_factors(model[0], layer_io(model, model[0], ce_per_example, x, y))
        expected = (
            (A[0], G[0])
            if expected is None
            else (beta * expected[0] + (1 - beta) * A[0], beta * expected[1] + (1 - beta) * G[0])
        )
        step_once(model, pre, ce_per_example, x, y)
    torch.testing.assert_close(pre.factors()["0"][0], expected[0])
    torch.testing.assert_close(pre.factors()["0"][1], expected[1])


def test_factor_update_steps_cadence():
    """With factor_update_steps=2 only steps 0, 2, 4 contribute statistics."""
    model = _linear_model()
    pre = seed_preconditioner(
        model, factor_dtype=torch.float64, factor_decay=0.0, factor_update_steps=2
    )
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(4)]
    for i, (x, y) in enumerate(batches):
        if i == 2:
            A, G = reference_factors(model[0], layer_io(model, model[0], ce_per_example, x, y))
        step_once(model, pre, ce_per_example, x, y)
    # decay 0 keeps the latest statistics: those of step 2 (step 3 collected none).
    torch.testing.assert_close(pre.factors()["0"][0], A[0])
    torch.testing.assert_close(pre.factors()["0"][1], G[0])


def test_factor_dtype_float32_with_float64_model_inputs_upcast():
    """Factors stay float32 for a float32 model; bfloat16 activations upcast into float32."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).float()
    pre = seed_preconditioner(model)
    x, y = torch.randn(8, 5, dtype=torch.float32), torch.randn(8, 2, dtype=torch.float32)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    mse_per_example(out.float(), y).mean().backward()
    pre.step()
    A, G = pre.factors()["0"]
    assert A.dtype == torch.float32 and G.dtype == torch.float32
    assert torch.isfinite(A).all() and torch.isfinite(G).all()
