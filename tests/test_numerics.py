"""Numerical faults: non-finite statistics, failing decompositions, degenerate factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .helpers import grads, seed_preconditioner, step_once
from .reference import dense_exact, grad_matrix, layer_io, mse_per_example, reference_factors


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("poison", ["input", "loss"])
def test_non_finite_statistics_never_enter_factors(poison):
    model = _mlp()
    pre = seed_preconditioner(model, inv_update_steps=2)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    step_once(model, pre, mse_per_example, x, y)
    saved = {k: (a.clone(), g.clone()) for k, (a, g) in pre.factors().items()}
    bad_x, bad_y = x.clone(), y.clone()
    if poison == "input":
        bad_x[2, 1] = float("nan")
    else:
        bad_y[0, 0] = float("inf")
    step_once(model, pre, mse_per_example, bad_x, bad_y)  # step 1: no decomposition, no sync
    for k, (a, g) in pre.factors().items():
        if poison == "input" or k == "2":
            assert torch.equal(g, saved[k][1]) and torch.equal(a, saved[k][0]), k
    with pytest.warns(RuntimeWarning, match="non-finite values and were skipped"):
        step_once(model, pre, mse_per_example, x, y)  # step 2 decomposes and reports
    assert all(
        torch.isfinite(a).all() and torch.isfinite(g).all() for a, g in pre.factors().values()
    )
    assert all(torch.isfinite(g).all() for g in grads(model).values())


def test_failed_eigh_retries_in_float64(monkeypatch):
    model = _mlp().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    pre = seed_preconditioner(model, damping=1e-2)  # float32 factors
    real = torch.linalg.eigh
    seen = []

    def flaky(m, *args, **kwargs):
        seen.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated non-convergence")
        return real(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    io = layer_io(model, model[0], mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    assert torch.float64 in seen
    A, G = reference_factors(model[0], io)
    expected = dense_exact(A, G, grad_matrix(model[0], before["0.weight"], before["0.bias"]), 1e-2)
    got = grad_matrix(model[0], after["0.weight"], after["0.bias"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_failed_eigh_keeps_previous_decomposition(monkeypatch):
    model = _mlp()
    pre = seed_preconditioner(model, damping=1e-2, inv_update_steps=1, factor_decay=0.0)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    step_once(model, pre, mse_per_example, x, y)
    real = torch.linalg.eigh

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    # Step 1 with the same batch and weights: same factors, decomposition fails, the previous
    # one (equal to what a success would give) is used.
    x_ref = x.clone()
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="keeps its previous decomposition"):
        before, after = step_once(model, pre, mse_per_example, x_ref, y)
    monkeypatch.setattr(torch.linalg, "eigh", real)
    model2 = _mlp()
    model2.load_state_dict(model.state_dict())
    pre2 = seed_preconditioner(model2, damping=1e-2)
    _, expected = step_once(model2, pre2, mse_per_example, x, y)
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v)


def test_failed_first_eigh_leaves_gradients_alone(monkeypatch):
    model = _mlp()
    pre = seed_preconditioner(model)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="stays unpreconditioned"):
        before, after = step_once(model, pre, mse_per_example, torch.randn(3, 4), torch.randn(3, 3))
    for k, v in before.items():
        assert torch.equal(after[k], v)


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_degenerate_statistics_give_finite_gradients(mode, scale):
    """All-zero inputs, rank-deficient factors, extreme scales: finite results."""
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    pre = seed_preconditioner(model, damping_mode=mode)
    x = torch.randn(2, 6) * scale  # 2 examples: rank-deficient A (6+1 wide)
    model.zero_grad()
    (model(x).sum() * (1.0 if scale == 0 else 1.0)).backward()
    pre.step()
    assert all(torch.isfinite(g).all() for g in grads(model).values())


def test_pi_cholesky_failure_falls_back_to_eigh(monkeypatch, float64):
    """A damped factor that Cholesky rejects is inverted through its eigendecomposition."""
    from .reference import dense_pi

    model = _mlp()
    pre = seed_preconditioner(model, damping=1e-2, damping_mode="pi", factor_dtype=torch.float64)
    real = torch.linalg.cholesky_ex

    def failing(m, *args, **kwargs):
        chol, info = real(m, *args, **kwargs)
        return chol, torch.ones_like(info)  # report every factorization as failed

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    io = layer_io(model, model[0], mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    A, G = reference_factors(model[0], io)
    expected = dense_pi(A, G, grad_matrix(model[0], before["0.weight"], before["0.bias"]), 1e-2)
    torch.testing.assert_close(grad_matrix(model[0], after["0.weight"], after["0.bias"]), expected)
