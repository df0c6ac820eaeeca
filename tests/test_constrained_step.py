"""constrained_step="optimizer": the loss-change constraint on the update the optimizer
makes (momentum, Adam), checked against per-example gradients from torch.func (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from kfac_ef import KFACOptions, KFACPreconditioner

from .reference import mse_per_example

pytestmark = pytest.mark.usefixtures("float64")


def _mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)


def _loss_changes(model, before, x, y):
    """u_n = g_nᵀ Δθ, g_n the per-example gradients at the parameters before the update."""

    def loss_n(params, xi, yi):
        return mse_per_example(functional_call(model, params, (xi[None],)), yi[None]).sum()

    per_example = vmap(grad(loss_n), in_dims=(None, 0, 0))(before, x, y)
    after = dict(model.named_parameters())
    return sum((per_example[k] * (after[k].detach() - before[k])).flatten(1).sum(1) for k in before)


def _train(model, pre, opt, steps=3, loss=False):
    """Steps of backward, precond.step(), optimizer.step(); the E_n[(g_nᵀΔθ)²] of each."""
    out = []
    for i in range(steps):
        x, y = _data(i)
        opt.zero_grad()
        losses = mse_per_example(model(x), y)
        losses.mean().backward()
        pre.step(losses.detach() if loss else None)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt.step()
        out.append(float(_loss_changes(model, before, x, y).square().mean()))
    return out


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_the_optimizers_update_meets_the_target(make):
    torch.manual_seed(0)
    model = _mlp()
    pre = KFACPreconditioner(model, target_loss_change=1e-3, loss_change_unit="absolute",
                             constrained_step="optimizer", factor_dtype=torch.float64,
                             factor_update_steps=1)  # fmt: skip
    opt = make(model.parameters())
    pre.attach(opt)
    for value in _train(model, pre, opt):
        assert value == pytest.approx(1e-3, rel=1e-9)
    d = pre.diagnostics()
    assert d.exact == pytest.approx(1e-3, rel=1e-9) and d.nu != 1.0


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_the_trust_region_shrinks_only_large_updates(make):
    """max_loss_change: a small c scales the update to it, a large one leaves the optimizer's
    update as it was (the same parameters as without the constraint, to rounding)."""
    finals = {}
    for c in (1e-4, 1e6, None):
        torch.manual_seed(0)
        model = _mlp()
        options = {} if c is None else {"max_loss_change": c, "loss_change_unit": "absolute",
                                        "constrained_step": "optimizer"}  # fmt: skip
        pre = KFACPreconditioner(model, factor_dtype=torch.float64, **options)
        opt = make(model.parameters())
        if c is not None:
            pre.attach(opt)
        values = _train(model, pre, opt)
        if c == 1e-4:
            assert all(v == pytest.approx(1e-4, rel=1e-9) for v in values)
        finals[c] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(finals[1e6], finals[None]):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_sgd_without_momentum_matches_the_gradient_form():
    """Without momentum the optimizer's update is -lr·∇̃: both modes give the same steps."""
    finals = []
    for mode in ("gradient", "optimizer"):
        torch.manual_seed(0)
        model = _mlp()
        pre = KFACPreconditioner(model, target_loss_change=0.5, loss_change_unit="spread",
                                 constrained_step=mode, factor_dtype=torch.float64,
                                 lr=0.1 if mode == "gradient" else None)  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if mode == "optimizer":
            pre.attach(opt)
        _train(model, pre, opt, loss=True)
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b)


def test_an_optimizer_step_without_a_precond_step_is_left_alone():
    torch.manual_seed(0)
    model = _mlp()
    twin = _mlp()
    twin.load_state_dict(model.state_dict())
    pre = KFACPreconditioner(model, target_loss_change=1e-3, loss_change_unit="absolute",
                             constrained_step="optimizer")  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pre.attach(opt)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    x, y = _data()
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        mse_per_example(m(x), y).mean().backward()
        o.step()  # no precond.step() in between (model's backward is then discarded)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pre.remove()


def test_remove_detaches_the_optimizer_hooks():
    torch.manual_seed(0)
    model = _mlp()
    pre = KFACPreconditioner(model, target_loss_change=1e-6, loss_change_unit="absolute",
                             constrained_step="optimizer")  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre.attach(opt)
    x, y = _data()
    mse_per_example(model(x), y).mean().backward()
    pre.step()
    pre.remove()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()  # a plain SGD step: not scaled any more
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


def test_misuse_is_refused():
    for bad in ({"constraint": "kronecker", "max_loss_change": 1.0},
                {"max_loss_change": 1.0, "track_loss_changes": True},
                {"constraint": "none"}):  # fmt: skip
        with pytest.raises(ValueError, match="constrained_step='optimizer'"):
            KFACOptions(constrained_step="optimizer", **bad)
    with pytest.raises(ValueError, match="constrained_step"):
        KFACOptions(constrained_step="update", max_loss_change=1.0, lr=0.1)
    KFACOptions(constrained_step="optimizer", max_loss_change=1.0)  # no lr needed
    model = _mlp()
    pre = KFACPreconditioner(model, max_loss_change=1.0, loss_change_unit="absolute",
                             constrained_step="optimizer")  # fmt: skip
    mse_per_example(model(torch.randn(4, 5)), torch.randn(4, 3)).mean().backward()
    with pytest.raises(RuntimeError, match="attach"):
        pre.step()
    with pytest.raises(TypeError, match="Optimizer"):
        pre.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre.attach(opt)
    with pytest.raises(ValueError, match="already"):
        pre.attach(opt)
    pre.step()  # the same backward, now attached
    pre.remove()
    plain = KFACPreconditioner(_mlp(), max_loss_change=1.0, lr=0.1)
    with pytest.raises(ValueError, match="constrained_step='optimizer'"):
        plain.attach(opt)
