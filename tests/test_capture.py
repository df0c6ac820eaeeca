"""What the hooks capture, and when: accumulation, in-place activations, modes, frozen, remove."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from .helpers import backward, grads, seed_preconditioner, step_once
from .reference import (
    dense_exact,
    grad_matrix,
    layer_io,
    mse_per_example,
    per_example_grads,
    reference_factors,
)

pytestmark = pytest.mark.usefixtures("float64")


def _mlp(inplace=False):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_accumulation_equals_big_batch(reduction, approx):
    x, y = torch.randn(12, 4), torch.randn(12, 3)
    big, small = _mlp(), _mlp()
    pre_big = seed_preconditioner(
        big, loss_reduction=reduction, kfac_approx=approx, factor_dtype=torch.float64
    )
    pre_small = seed_preconditioner(
        small, loss_reduction=reduction, kfac_approx=approx, factor_dtype=torch.float64
    )
    _, after_big = step_once(big, pre_big, mse_per_example, x, y, reduction)
    small.zero_grad()
    k = 3
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        losses = mse_per_example(small(xs), ys)
        (losses.mean() / k if reduction == "mean" else losses.sum()).backward()
    pre_small.step()
    for name, (a, g) in pre_big.factors().items():
        torch.testing.assert_close(pre_small.factors()[name][0], a)
        torch.testing.assert_close(pre_small.factors()[name][1], g)
    for k_, v in after_big.items():
        torch.testing.assert_close(grads(small)[k_], v)


def test_inplace_activation_matches_out_of_place():
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    results = []
    for inplace in (False, True):
        model = _mlp(inplace)
        pre = seed_preconditioner(model, factor_dtype=torch.float64)
        _, after = step_once(model, pre, mse_per_example, x, y)
        results.append((pre.factors(), after))
    for name in results[0][0]:
        torch.testing.assert_close(results[1][0][name][1], results[0][0][name][1])
    for k, v in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], v)


def test_hooks_do_not_change_gradients_before_step():
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    plain = _mlp()
    backward(plain, mse_per_example, x, y, "mean")
    hooked = _mlp()
    seed_preconditioner(hooked, factor_dtype=torch.float64)
    backward(hooked, mse_per_example, x, y, "mean")
    for k, v in grads(plain).items():
        assert torch.equal(grads(hooked)[k], v)


def test_eval_mode_captures_nothing():
    model = _mlp()
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    model.eval()
    model.zero_grad()
    backward(model, mse_per_example, torch.randn(4, 4), torch.randn(4, 3), "mean")
    before = grads(model)
    with pytest.warns(RuntimeWarning, match="no statistics yet"):
        pre.step()  # a backward happened: allowed, but there is nothing to precondition with
    assert pre.factors() == {}
    for k, v in before.items():
        assert torch.equal(grads(model)[k], v)


def test_no_grad_and_validation_forwards_do_not_count():
    """Forwards under no_grad, and train-mode forwards never backpropagated, leave no trace."""
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    model = _mlp()
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    with torch.no_grad():
        model(torch.randn(10, 4))
    model(torch.randn(7, 4))  # grad enabled, train mode, but no backward
    io = layer_io(model, model[0], mse_per_example, x, y)
    step_once(model, pre, mse_per_example, x, y)
    A, G = reference_factors(model[0], io)
    torch.testing.assert_close(pre.factors()["0"][0], A[0])
    torch.testing.assert_close(pre.factors()["0"][1], G[0])


def test_torch_func_on_hooked_model_is_ignored():
    model = _mlp()
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    per_example_grads(model, mse_per_example, torch.randn(3, 4), torch.randn(3, 3))
    with pytest.raises(RuntimeError, match="without a backward"):
        pre.step()


def test_frozen_weight_layer_is_skipped():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    summary = pre.summary()
    assert [row.name for row in summary.layers] == ["2"]
    reasons = dict(summary.unpreconditioned)
    assert "frozen" in reasons["0.weight"]
    assert "0.bias" in reasons


def test_frozen_bias_drops_homogeneous_coordinate():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    pre = seed_preconditioner(model, damping=1e-2, factor_dtype=torch.float64)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    io = layer_io(model, model[0], mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    A, G = pre.factors()["0"]
    assert A.shape == (4, 4)
    model[0].bias = None  # the reference reads "no trainable bias" from the module
    ref_a, ref_g = reference_factors(model[0], io)
    torch.testing.assert_close(A, ref_a[0])
    expected = dense_exact(ref_a, ref_g, grad_matrix(model[0], before["0.weight"], None), 1e-2)
    torch.testing.assert_close(after["0.weight"][None], expected)
    assert "0.bias" in dict(pre.summary().unpreconditioned)


def test_remove_detaches_hooks():
    model = _mlp()
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    with pytest.raises(RuntimeError, match="already hooked"):
        seed_preconditioner(model)
    pre.remove()
    assert all(not m._forward_hooks for m in model.modules())
    backward(model, mse_per_example, torch.randn(4, 4), torch.randn(4, 3), "mean")
    with pytest.raises(RuntimeError, match="removed"):
        pre.step()
    seed_preconditioner(model)  # the model is free again


def test_unused_layer_passes_through():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    pre = seed_preconditioner(model)
    model(torch.randn(4, 3)).pow(2).mean().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre.step()
    assert any("'unused' has no statistics" in str(w.message) for w in caught)
    assert model.unused.weight.grad is None
