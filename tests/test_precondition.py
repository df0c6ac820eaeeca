"""Preconditioned gradients against dense solves on small layers, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_ef import kernels as kfac_kernels

from .helpers import conv_head, seed_preconditioner, step_once
from .reference import (
    dense_exact,
    dense_pi,
    grad_matrix,
    layer_io,
    mse_per_example,
    reference_factors,
)
from .test_factors import CONVS, SeqModel

pytestmark = pytest.mark.usefixtures("float64")


def _check_layer(module, name, before, after, io, damping, mode, approx="expand", reduction="mean"):
    A, G = reference_factors(module, io, approx=approx, reduction=reduction)
    has_b = module.bias is not None
    gm = grad_matrix(module, before[f"{name}.weight"], before[f"{name}.bias"] if has_b else None)
    dense = dense_exact if mode == "exact" else dense_pi
    expected = dense(A, G, gm, damping)
    got = grad_matrix(module, after[f"{name}.weight"], after[f"{name}.bias"] if has_b else None)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("damping", [1e-3, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_matches_dense(mode, damping, reduction):
    model = nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)
    )
    pre = seed_preconditioner(
        model,
        damping=damping,
        damping_mode=mode,
        loss_reduction=reduction,
        factor_dtype=torch.float64,
    )
    x, y = torch.randn(7, 5), torch.randn(7, 3)
    ios = {i: layer_io(model, model[i], mse_per_example, x, y) for i in (0, 2, 4)}
    before, after = step_once(model, pre, mse_per_example, x, y, reduction)
    for i in (0, 2, 4):
        _check_layer(model[i], str(i), before, after, ios[i], damping, mode, reduction=reduction)


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_conv_matches_dense(name, mode):
    conv_fn, in_shape = CONVS[name]
    model = conv_head(conv_fn(), in_shape)
    pre = seed_preconditioner(model, damping=1e-2, damping_mode=mode, factor_dtype=torch.float64)
    x, y = torch.randn(3, *in_shape), torch.randn(3, 2)
    io = layer_io(model, model[0], mse_per_example, x, y)
    io3 = layer_io(model, model[3], mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    _check_layer(model[0], "0", before, after, io, 1e-2, mode)
    _check_layer(model[3], "3", before, after, io3, 1e-2, mode)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_shared_positions_match_dense(approx):
    model = SeqModel()
    pre = seed_preconditioner(model, damping=1e-2, kfac_approx=approx, factor_dtype=torch.float64)
    x, y = torch.randn(5, 3, 4), torch.randn(5, 2)
    io = layer_io(model, model.proj, mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    _check_layer(model.proj, "proj", before, after, io, 1e-2, "exact", approx=approx)


def test_decomposition_reused_between_inverse_updates():
    """Between decompositions the factors move but the preconditioner stays the one computed
    at the last decomposition step."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    pre = seed_preconditioner(
        model, damping=1e-2, inv_update_steps=3, factor_dtype=torch.float64, factor_decay=0.0
    )
    b0 = (torch.randn(6, 4), torch.randn(6, 2))
    io0 = layer_io(model, model[0], mse_per_example, *b0)
    step_once(model, pre, mse_per_example, *b0)
    b1 = (torch.randn(6, 4), torch.randn(6, 2))
    before, after = step_once(model, pre, mse_per_example, *b1)
    # Step 1 preconditions with the decomposition of step 0's factors.
    _check_layer(model[0], "0", before, after, io0, 1e-2, "exact")


def test_batch_size_does_not_change_damping_meaning():
    """Mean reduction: duplicating every example leaves the EF, the gradient, and therefore the
    preconditioned gradient unchanged; sum reduction scales gradient and G alike."""
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    x2, y2 = torch.cat([x, x]), torch.cat([y, y])
    results = {}
    for reduction in ("mean", "sum"):
        for tag, (xx, yy) in {"1x": (x, y), "2x": (x2, y2)}.items():
            torch.manual_seed(1)
            model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
            pre = seed_preconditioner(
                model, damping=1e-2, loss_reduction=reduction, factor_dtype=torch.float64
            )
            _, after = step_once(model, pre, mse_per_example, xx, yy, reduction)
            results[(reduction, tag)] = after
    for k in results[("mean", "1x")]:
        torch.testing.assert_close(results[("mean", "1x")][k], results[("mean", "2x")][k])
    # Sum: ∇ and G both double, so (2G⊗A + ε)⁻¹ 2∇ = (G⊗A + ε/2)⁻¹ ∇: different from 1x, and
    # the factors() G doubles exactly.
    assert not torch.allclose(
        results[("sum", "1x")]["0.weight"], results[("sum", "2x")]["0.weight"]
    )


# The kernel step() runs for dense factors, per damping mode (and with the Kronecker form of
# the loss-change constraint, which the eigenbasis chain computes in the same call).
KERNEL_OF_MODE = {
    "exact": ({}, "precondition_eigen"),
    "ekfac": ({"damping_mode": "ekfac"}, "precondition_eigen"),
    "pi": ({"damping_mode": "pi"}, "precondition_factored"),
    "exact+kronecker-form": (
        {"constraint": "kronecker", "max_loss_change": 1e-3, "loss_change_unit": "absolute",
         "lr": 0.1},
        "precondition_eigen_with_form",
    ),
}  # fmt: skip


@pytest.mark.parametrize("mode", list(KERNEL_OF_MODE))
def test_same_shaped_layers_preconditioned_in_one_call(mode, monkeypatch):
    """Launch count does not grow with the number of layers of one shape: step() calls the
    kernel of its mode once per shape, with the gradients of every layer of that shape
    stacked. The public kernels of kfac_ef.kernels (which step() calls through the module,
    each choosing Triton or its torch reference inside) are replaced by counting wrappers;
    a call that bypassed them would leave ``calls`` short and fail the test too."""
    options, expected = KERNEL_OF_MODE[mode]
    calls = []

    def counting(name, original):
        def count(grad, *args, **kwargs):
            calls.append((name, tuple(grad.shape)))
            return original(grad, *args, **kwargs)

        return count

    for name in ("precondition_eigen", "precondition_eigen_with_form", "precondition_factored"):
        monkeypatch.setattr(kfac_kernels, name, counting(name, getattr(kfac_kernels, name)))
    layers = [nn.Linear(6, 6) for _ in range(5)]
    model = nn.Sequential(*[m for lin in layers for m in (lin, nn.Tanh())], nn.Linear(6, 2))
    pre = seed_preconditioner(model, factor_dtype=torch.float64, **options)
    x, y = torch.randn(4, 6), torch.randn(4, 2)
    for _ in range(2):  # step 0 decomposes, step 1 reuses the decompositions
        calls.clear()
        before, after = step_once(model, pre, mse_per_example, x, y)
        assert sorted(calls) == [(expected, (1, 2, 7)), (expected, (5, 6, 7))]
        # The stacked call's results reached p.grad.
        assert all(not torch.equal(before[k], after[k]) for k in before)
