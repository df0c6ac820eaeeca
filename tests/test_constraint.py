"""The loss-change constraint and diagnostics against per-example gradients (torch.func) and
reference factors, in float64: the realized SGD step meets E[(Δℓ)²] = c."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from . import internals
from .helpers import conv_head, seed_preconditioner
from .reference import (
    ce_per_example,
    grad_matrix,
    layer_io,
    mse_per_example,
    per_example_grads,
    reference_factors,
)
from .test_factors import SeqModel

pytestmark = pytest.mark.usefixtures("float64")

LR = 0.1


class Twice(nn.Module):
    """One Linear applied twice per forward pass (weights shared across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        return self.out(torch.tanh(self.shared(h)))


def _mlp():
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)
    )


MODELS = {
    "mlp": (_mlp, (7, 5), (7, 3)),
    "conv-groups": (
        lambda: conv_head(nn.Conv2d(2, 4, 3, padding=1, groups=2), (2, 4, 5), outputs=3),
        (5, 2, 4, 5),
        (5, 3),
    ),
    "sequence": (SeqModel, (5, 3, 4), (5, 2)),
    "twice": (Twice, (6, 4), (6, 2)),
}


def _hooked(model):
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
    }


def _sgd_step(model, pre, loss_fn, batches, reduction="mean", step_loss=None):
    """Backward over ``batches`` (micro-batches, mean over all examples), step(), SGD step.

    Returns the parameter change Δθ per parameter name."""
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    model.zero_grad()
    total = sum(x.shape[0] for x, _ in batches)
    for x, y in batches:
        losses = loss_fn(model(x), y)
        (losses.sum() / total if reduction == "mean" else losses.sum()).backward()
    pre.step(loss=step_loss)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(LR * p.grad)
    return {k: p.detach() - before[k] for k, p in model.named_parameters()}


def _predicted_changes(pe, delta):
    """Δℓ_n = g_nᵀ Δθ from torch.func per-example gradients."""
    n = next(iter(pe.values())).shape[0]
    return sum(pe[k].reshape(n, -1) @ d.reshape(-1) for k, d in delta.items())


def _pre(model, **kw):
    opts = dict(
        damping=1e-2,
        factor_dtype=torch.float64,
        factor_decay=0.0,
        inv_update_steps=1,
        lr=LR,
        loss_change_unit="absolute",
    )
    opts.update(kw)
    return seed_preconditioner(model, **opts)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kronecker_constraint_met_by_sgd_step(name, mode, reduction):
    make, xs, ys = MODELS[name]
    model = make()
    c = 3e-3
    pre = _pre(
        model,
        damping_mode=mode,
        constraint="kronecker",
        target_loss_change=c,
        loss_reduction=reduction,
    )
    x, y = torch.randn(*xs), torch.randn(*ys)
    ref = {  # factors at θ before the step
        n: reference_factors(m, layer_io(model, m, mse_per_example, x, y), reduction=reduction)
        for n, m in _hooked(model).items()
    }
    delta = _sgd_step(model, pre, mse_per_example, [(x, y)], reduction)
    form = torch.zeros(())
    for n, m in _hooked(model).items():
        A, G = ref[n]
        dm = grad_matrix(m, delta[f"{n}.weight"], delta.get(f"{n}.bias"))
        form = form + (dm * (G @ dm @ A)).sum()
    form = form / (x.shape[0] if reduction == "sum" else 1)
    torch.testing.assert_close(form, torch.tensor(c), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["exact", "pi", "ekfac"])
def test_exact_constraint_met_by_sgd_step(name, mode):
    make, xs, ys = MODELS[name]
    model = make()
    c = 2e-3
    pre = _pre(model, damping_mode=mode, constraint="exact", target_loss_change=c)
    x, y = torch.randn(*xs), torch.randn(*ys)
    pe = per_example_grads(model, mse_per_example, x, y)
    delta = _sgd_step(model, pre, mse_per_example, [(x, y)])
    dl = _predicted_changes(pe, delta)
    torch.testing.assert_close(dl.square().mean(), torch.tensor(c), rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_constraint_with_gradient_accumulation(reduction):
    """Two micro-batches: the examples of both enter E_n, each with its own gradient."""
    model = _mlp()
    c = 1e-3
    pre = _pre(model, constraint="exact", target_loss_change=c, loss_reduction=reduction)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    pe = per_example_grads(model, ce_per_example, x, y)
    delta = _sgd_step(model, pre, ce_per_example, [(x[:3], y[:3]), (x[3:], y[3:])], reduction)
    dl = _predicted_changes(pe, delta)
    torch.testing.assert_close(dl.square().mean(), torch.tensor(c), rtol=1e-6, atol=0)


def test_constraint_holds_on_later_steps_between_decompositions():
    """Steps that reuse a decomposition and do not collect statistics still meet c exactly."""
    model = _mlp()
    c = 5e-4
    pre = _pre(
        model,
        constraint="exact",
        target_loss_change=c,
        inv_update_steps=3,
        factor_update_steps=2,
        factor_decay=0.9,
    )
    for _ in range(4):
        x, y = torch.randn(6, 5), torch.randn(6, 3)
        pe = per_example_grads(model, mse_per_example, x, y)
        delta = _sgd_step(model, pre, mse_per_example, [(x, y)])
        dl = _predicted_changes(pe, delta)
        torch.testing.assert_close(dl.square().mean(), torch.tensor(c), rtol=1e-6, atol=0)


@pytest.mark.parametrize("constraint", ["kronecker", "exact"])
def test_trust_region_scales_down_only(constraint):
    x, y = torch.randn(7, 5), torch.randn(7, 3)
    torch.manual_seed(3)
    free_model = _mlp()
    free = _pre(free_model, track_loss_changes=True)
    delta_free = _sgd_step(free_model, free, mse_per_example, [(x, y)])
    d = free.diagnostics()
    size = d.kronecker if constraint == "kronecker" else d.exact
    for cap, expect_nu_one in ((10 * size, True), (0.1 * size, False)):
        torch.manual_seed(3)
        model = _mlp()
        pre = _pre(model, constraint=constraint, max_loss_change=cap, track_loss_changes=True)
        delta = _sgd_step(model, pre, mse_per_example, [(x, y)])
        diag = pre.diagnostics()
        if expect_nu_one:
            assert diag.nu == 1.0
            for k in delta:
                torch.testing.assert_close(delta[k], delta_free[k])
        else:
            got = diag.kronecker if constraint == "kronecker" else diag.exact
            assert diag.nu < 1.0
            assert math.isclose(got, cap, rel_tol=1e-9)


@pytest.mark.parametrize(
    ("unit", "per_example"), [("loss", True), ("loss", False), ("spread", True)]
)
def test_relative_units_follow_the_loss(unit, per_example):
    model = _mlp()
    kappa = 0.05
    pre = _pre(model, constraint="exact", target_loss_change=kappa, loss_change_unit=unit)
    x, y = torch.randn(7, 5), torch.randn(7, 3)
    with torch.no_grad():
        losses = mse_per_example(model(x), y)
    pe = per_example_grads(model, mse_per_example, x, y)
    delta = _sgd_step(
        model, pre, mse_per_example, [(x, y)], step_loss=losses if per_example else losses.mean()
    )
    ref = losses.mean() ** 2 if unit == "loss" else losses.var(correction=0)
    dl = _predicted_changes(pe, delta)
    torch.testing.assert_close(dl.square().mean(), kappa * ref, rtol=1e-6, atol=0)


def test_relative_unit_needs_the_loss():
    """A missing or misshapen loss is an error before anything changes: step() can be called
    again, with the loss, for the same backward."""
    model = _mlp()
    pre = _pre(model, constraint="exact", target_loss_change=0.1, loss_change_unit="spread")
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    losses = mse_per_example(model(x), y)
    losses.mean().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="step\\(loss="):
        pre.step()
    with pytest.raises(ValueError, match="per-example"):
        pre.step(loss=losses.mean().detach())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), raw))
    assert pre.steps == 0
    pre.step(loss=losses.detach())
    d = pre.diagnostics()
    assert d.step == 0 and d.target == pytest.approx(0.1 * float(losses.detach().var(correction=0)))


def test_sum_reduction_needs_per_example_losses_for_the_loss_unit():
    model = _mlp()
    pre = _pre(
        model,
        constraint="kronecker",
        target_loss_change=0.1,
        loss_reduction="sum",
        loss_change_unit="loss",
    )
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    losses = mse_per_example(model(x), y)
    losses.sum().backward()
    with pytest.raises(ValueError, match="per-example"):
        pre.step(loss=losses.sum())


@pytest.mark.parametrize("mode", ["exact", "pi", "ekfac"])
def test_diagnostics_equal_their_definitions(mode):
    model = _mlp()
    c = 1e-3
    pre = _pre(
        model,
        damping_mode=mode,
        constraint="kronecker",
        target_loss_change=c,
        track_loss_changes=True,
    )
    x, y = torch.randn(9, 5), torch.randn(9, 3)
    pe = per_example_grads(model, mse_per_example, x, y)
    model.zero_grad()
    mse_per_example(model(x), y).mean().backward()
    pre.step()
    pre_grad = {k: p.grad.clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        before = {k: p.clone() for k, p in model.named_parameters()}
        for p in model.parameters():
            p.sub_(LR * p.grad)
    delta = {k: p.detach() - before[k] for k, p in model.named_parameters()}
    d = pre.diagnostics()

    dl = _predicted_changes(pe, delta)
    assert d.step == 0 and d.lr == LR
    torch.testing.assert_close(d.loss_changes, dl)
    assert math.isclose(d.exact, float(dl.square().mean()), rel_tol=1e-9)
    assert math.isclose(d.mean, float(dl.mean()), rel_tol=1e-9)
    assert math.isclose(d.std, float(dl.std(correction=0)), rel_tol=1e-9)
    assert (d.min, d.max) == pytest.approx((float(dl.min()), float(dl.max())), rel=1e-9)
    assert d.fraction_rising == float((dl > 0).double().mean())
    assert math.isclose(d.kronecker, c, rel_tol=1e-9)
    assert d.target == c
    # ν: the written gradient is ν times the unconstrained preconditioned one.
    model2 = _mlp()
    model2.load_state_dict({k: before[k] for k in before})
    free = _pre(model2, damping_mode=mode)
    model2.zero_grad()
    mse_per_example(model2(x), y).mean().backward()
    free.step()
    for k, p in model2.named_parameters():
        torch.testing.assert_close(pre_grad[k], d.nu * p.grad)


def test_zero_form_gives_unit_scale():
    """A zero gradient predicts no loss change: ν = 1 (no 0/0), gradients stay finite."""
    model = _mlp()
    pre = _pre(model, constraint="exact", target_loss_change=1e-3, track_loss_changes=True)
    x = torch.randn(4, 5)
    (0.0 * model(x).sum()).backward()
    pre.step()
    d = pre.diagnostics()
    assert d.nu == 1.0 and d.exact == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_unpreconditioned_parameters_are_not_scaled():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    pre = _pre(model, constraint="exact", target_loss_change=1e-6)
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    mse_per_example(model(x), y).mean().backward()
    norm_grad = model[1].weight.grad.clone()
    pre.step()
    torch.testing.assert_close(model[1].weight.grad, norm_grad)
    assert pre.diagnostics().nu != 1.0


def test_lr_callable_is_called_with_the_step():
    seen = []

    def lr(step):
        seen.append(step)
        return LR / (1 + step)

    model = _mlp()
    pre = _pre(model, constraint="exact", target_loss_change=1e-3, lr=lr)
    for _ in range(2):
        x, y = torch.randn(5, 5), torch.randn(5, 3)
        model.zero_grad()
        mse_per_example(model(x), y).mean().backward()
        pre.step()
    assert seen == [0, 1]
    assert pre.diagnostics().lr == LR / 2
    assert "callable" in pre.state_dict()["options"]["lr"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"constraint": "loose"}, "constraint"),
        ({"constraint": "exact", "lr": 0.1}, "exactly one"),
        (
            {"constraint": "exact", "lr": 0.1, "target_loss_change": 1, "max_loss_change": 1},
            "exactly one",
        ),
        ({"constraint": "exact", "target_loss_change": 1e-3}, "lr"),
        ({"constraint": "none", "target_loss_change": 1e-3}, "target_loss_change"),
        ({"constraint": "exact", "lr": 0.1, "target_loss_change": -1.0}, "target_loss_change"),
        ({"constraint": "exact", "lr": 0.1, "max_loss_change": math.nan}, "max_loss_change"),
        ({"constraint": "exact", "lr": -0.1, "target_loss_change": 1.0}, "lr"),
        (
            {
                "constraint": "exact",
                "lr": 0.1,
                "target_loss_change": 1.0,
                "loss_change_unit": "percent",
            },
            "loss_change_unit",
        ),
        ({"track_loss_changes": True}, "lr"),
        ({"track_loss_changes": 1}, "track_loss_changes"),
        ({"fisher_type": "true"}, "fisher_type"),
    ],
)
def test_bad_constraint_options_name_themselves(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        seed_preconditioner(_mlp(), **kw)


def test_diagnostics_errors():
    with pytest.raises(RuntimeError, match="track_loss_changes"):
        seed_preconditioner(_mlp()).diagnostics()
    with pytest.raises(RuntimeError, match="step"):
        _pre(_mlp(), constraint="exact", target_loss_change=1.0).diagnostics()


def test_kronecker_only_diagnostics_have_no_distribution():
    model = _mlp()
    pre = _pre(model, constraint="kronecker", target_loss_change=1e-3)
    x, y = torch.randn(5, 5), torch.randn(5, 3)
    mse_per_example(model(x), y).mean().backward()
    pre.step()
    d = pre.diagnostics()
    assert d.kronecker == pytest.approx(1e-3) and d.exact is None and d.loss_changes is None


def test_loss_records_only_kept_when_needed():
    """Without the exact form, non-statistics steps keep no layer input (nothing held)."""
    model = _mlp()
    pre = _pre(model, constraint="kronecker", target_loss_change=1e-3, factor_update_steps=2)
    x, y = torch.randn(5, 5), torch.randn(5, 3)
    for _ in range(2):
        model.zero_grad()
        mse_per_example(model(x), y).mean().backward()
        assert not internals.held_loss_calls(pre)
        pre.step()


_SYNCING = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("mode", ["exact", "pi", "ekfac"])
def test_step_reads_no_device_value_between_decompositions(mode, monkeypatch):
    """Steady-state step() with the constraint never reads a tensor value on the host."""
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    pre = _pre(
        model,
        damping_mode=mode,
        constraint="exact",
        target_loss_change=0.01,
        loss_change_unit="spread",
        track_loss_changes=True,
        inv_update_steps=5,
    )
    x, y = torch.randn(6, 2, 6), torch.randn(6, 3)
    losses = mse_per_example(model(x), y)
    losses.mean().backward()
    pre.step(loss=losses)  # decomposition step: may synchronize

    def forbidden(*args, **kwargs):
        raise AssertionError("step() read a tensor value on the host")

    model.zero_grad()
    losses = mse_per_example(model(x), y)
    losses.mean().backward()
    with monkeypatch.context() as m:
        for name in _SYNCING:
            m.setattr(torch.Tensor, name, forbidden)
        pre.step(loss=losses)
    assert pre.diagnostics().step == 1


@pytest.mark.gpu
def test_step_does_not_synchronize_on_cuda():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).cuda()
    pre = seed_preconditioner(
        model,
        damping_mode="ekfac",
        constraint="exact",
        target_loss_change=0.01,
        loss_change_unit="loss",
        lr=0.1,
        track_loss_changes=True,
        inv_update_steps=5,
    )
    x, y = torch.randn(32, 8, device="cuda"), torch.randn(32, 4, device="cuda")
    for i in range(3):
        model.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        torch.cuda.set_sync_debug_mode("error" if i > 0 else "default")
        try:
            pre.step(loss=loss.detach())
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_a_target_alone_selects_the_measured_best_form():
    """The defaults are what benchmarks/loss_change.py found best: the exact form, with c in
    units of the variance of the per-example losses."""
    pre = seed_preconditioner(_mlp(), lr=LR, target_loss_change=1.0)
    assert pre.options.constraint == "exact" and pre.options.loss_change_unit == "spread"
    other = seed_preconditioner(_mlp(), lr=LR, max_loss_change=1.0)
    assert other.options.constraint == "exact"
    assert seed_preconditioner(_mlp()).options.constraint == "none"


def test_zero_spread_leaves_the_step_to_the_optimizer():
    """A zero-initialized classifier head: every per-example loss is ln(classes), their
    spread is 0, so the "spread" unit gives no scale; ν = 1 (the optimizer's step), not 0
    (which would stop training for good)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    pre = seed_preconditioner(model, lr=0.1, max_loss_change=1.0, loss_change_unit="spread")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    first = None
    for _ in range(3):
        opt.zero_grad()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        first = losses.detach() if first is None else first
        losses.mean().backward()
        pre.step(loss=losses.detach())
        opt.step()
    assert torch.allclose(first, torch.full_like(first, math.log(4)))
    assert pre.diagnostics().nu > 0
    assert losses.mean() < first.mean()
