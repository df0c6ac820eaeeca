"""fisher_type="mc": factors from sampled targets against their definitions for a fixed
generator (per-example δ of the sampled loss, one example at a time), in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_ef import mc_backward
from kfac_ef.mc import sample_targets

from . import internals
from .helpers import seed_preconditioner
from .reference import (
    ce_per_example,
    clean_copy,
    layer_io,
    per_example_grads,
    reference_factors,
)
from .test_factors import SeqModel

pytestmark = pytest.mark.usefixtures("float64")


def _model(out=4):
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, out))


def _draw_categorical(logits, seed):
    """The documented draw: one multinomial sample per row of softmax(logits)."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g).squeeze(1)


def _draw_gaussian(out, variance, seed):
    g = torch.Generator().manual_seed(seed)
    return out + math.sqrt(variance) * torch.randn(out.shape, generator=g)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_categorical_factors_match_definition_and_grads_are_the_users(reduction):
    model = _model()
    pre = seed_preconditioner(
        model, fisher_type="mc", loss_reduction=reduction, factor_dtype=torch.float64
    )
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    with torch.no_grad():
        sampled = _draw_categorical(model(x), seed=7)
    assert not torch.equal(sampled, y)
    plain = clean_copy(model)
    losses = ce_per_example(plain(x), y)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    expected_grads = {k: p.grad.clone() for k, p in plain.named_parameters()}
    ios = {i: layer_io(model, model[i], ce_per_example, x, sampled) for i in (0, 2)}

    out = model(x)
    loss = F.cross_entropy(out, y, reduction=reduction)
    mc_backward(
        pre, loss, out, likelihood="categorical", generator=torch.Generator().manual_seed(7)
    )
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[k])
    pre.step()
    for i in (0, 2):
        A, G = reference_factors(model[i], ios[i], reduction=reduction)
        got_a, got_g = pre.factors()[str(i)]
        torch.testing.assert_close(got_a, A[0])
        torch.testing.assert_close(got_g, G[0])


def test_gaussian_factors_match_definition_over_positions():
    """Regression outputs per position (N, T, D): ℓ̂_n = Σ ||f - ŷ||² / (2σ²)."""
    model = SeqModel()
    variance = 0.3
    pre = seed_preconditioner(model, fisher_type="mc", factor_dtype=torch.float64)
    x, y = torch.randn(5, 3, 4), torch.randn(5, 2)
    with torch.no_grad():
        sampled = _draw_gaussian(model(x), variance, seed=3)

    def nll(out, target):
        return (out - target).square().reshape(out.shape[0], -1).sum(1) / (2 * variance)

    ios = {n: layer_io(model, model.get_submodule(n), nll, x, sampled) for n in ("proj", "head")}
    out = model(x)
    mc_backward(
        pre,
        F.mse_loss(out, y),
        out,
        likelihood="gaussian",
        variance=variance,
        generator=torch.Generator().manual_seed(3),
    )
    pre.step()
    for n in ("proj", "head"):
        A, G = reference_factors(model.get_submodule(n), ios[n])
        got_a, got_g = pre.factors()[n]
        torch.testing.assert_close(got_a, A[0])
        torch.testing.assert_close(got_g, G[0])


def test_mc_ekfac_scale_uses_sampled_gradients_and_exact_constraint_the_users():
    """EKFAC's S comes from the sampled backward; the exact loss-change form from the
    gradients of the user's loss (what the step does to the actual losses)."""
    model = _model()
    pre = seed_preconditioner(
        model,
        fisher_type="mc",
        damping_mode="ekfac",
        factor_dtype=torch.float64,
        constraint="exact",
        target_loss_change=1e-3,
        loss_change_unit="absolute",
        lr=0.1,
    )
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    with torch.no_grad():
        sampled = _draw_categorical(model(x), seed=11)
    pe_mc = per_example_grads(model, ce_per_example, x, sampled)
    pe = per_example_grads(model, ce_per_example, x, y)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    out = model(x)
    mc_backward(
        pre,
        F.cross_entropy(out, y),
        out,
        likelihood="categorical",
        generator=torch.Generator().manual_seed(11),
    )
    pre.step()
    dec = internals.layer(pre, "0").decomposition
    mats = torch.cat([pe_mc["0.weight"], pe_mc["0.bias"][:, :, None]], dim=2)
    proj = dec.qg[0].T @ mats @ dec.qa[0]
    torch.testing.assert_close(dec.s[0], proj.square().mean(0))
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    dl = sum(
        pe[k].reshape(8, -1) @ (p.detach() - before[k]).reshape(-1)
        for k, p in model.named_parameters()
    )
    torch.testing.assert_close(dl.square().mean(), torch.tensor(1e-3), rtol=1e-6, atol=0)


def test_statistics_step_without_sampled_backward_is_an_error():
    model = _model()
    pre = seed_preconditioner(model, fisher_type="mc")
    x, y = torch.randn(4, 5), torch.randint(0, 4, (4,))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="mc_backward"):
        pre.step()


def test_sampled_backward_only_on_statistics_steps():
    model = _model()
    pre = seed_preconditioner(model, fisher_type="mc", factor_update_steps=2)
    x, y = torch.randn(4, 5), torch.randint(0, 4, (4,))
    calls = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for _ in range(4):
        model.zero_grad()
        out = model(x)
        torch.autograd.grad = counting
        try:
            mc_backward(pre, F.cross_entropy(out, y), out, likelihood="categorical")
        finally:
            torch.autograd.grad = original
        pre.step()
    assert len(calls) == 2


def test_empirical_preconditioner_mc_backward_is_plain_backward():
    model = _model()
    twin = clean_copy(model)
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    twin_pre = seed_preconditioner(twin, factor_dtype=torch.float64)
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    out = model(x)
    mc_backward(pre, F.cross_entropy(out, y), out, likelihood="categorical")
    F.cross_entropy(twin(x), y).backward()
    pre.step()
    twin_pre.step()
    for (_, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_sample_targets_follow_the_predictive_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    draws = sample_targets(
        logits.repeat(4000, 1), "categorical", generator=torch.Generator().manual_seed(0)
    )
    freq = torch.stack([torch.bincount(draws[i::2], minlength=3) / 4000 for i in range(2)])
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.03, rtol=0)
    # Class dim second, as F.cross_entropy: (N, C, T) logits -> (N, T) targets.
    seq = sample_targets(torch.randn(5, 3, 7), "categorical")
    assert seq.shape == (5, 7) and seq.max() < 3
    mean = torch.full((20000, 2), 1.5)
    g = sample_targets(mean, "gaussian", variance=4.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(g.mean()) - 1.5) < 0.05 and abs(float(g.var()) - 4.0) < 0.15


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"likelihood": "poisson"}, "likelihood"),
        ({"likelihood": "gaussian", "variance": 0.0}, "variance"),
    ],
)
def test_bad_likelihood_names_itself(kw, match):
    model = _model()
    pre = seed_preconditioner(model, fisher_type="mc")
    out = model(torch.randn(3, 5))
    with pytest.raises(ValueError, match=match):
        mc_backward(pre, out.sum(), out, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_factors_do_not_depend_on_how_the_loss_is_divided_or_scaled(reduction):
    """The sampled loss is a sum of per-example losses (times the GradScaler's scale): two
    micro-batches whose loss is divided by 2 (gradient accumulation), or a loss scaled by a
    GradScaler, give the factors of one plain batch with the same targets."""
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    with torch.no_grad():
        targets = _draw_categorical(_model()(x), seed=3)  # any fixed draw: the same in all three
    factors = []
    for how in ("one batch", "two micro-batches", "grad scaler"):
        torch.manual_seed(0)
        model = _model()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7) if how == "grad scaler" else None
        pre = seed_preconditioner(
            model,
            fisher_type="mc",
            loss_reduction=reduction,
            factor_dtype=torch.float64,
            grad_scaler=scaler,
        )
        chunks = [slice(0, 3), slice(3, 8)] if how == "two micro-batches" else [slice(0, 8)]
        for sl in chunks:
            out = model(x[sl])
            losses = F.cross_entropy(out, y[sl], reduction="none")
            loss = losses.mean() / len(chunks) if reduction == "mean" else losses.sum()
            if scaler is not None:
                loss = scaler.scale(loss)
            mc_backward(pre, loss, out, likelihood="categorical", targets=targets[sl])
        pre.step()
        factors.append(pre.factors())
    for other in factors[1:]:
        for name, (a, g) in factors[0].items():
            torch.testing.assert_close(other[name][0], a)
            torch.testing.assert_close(other[name][1], g)
