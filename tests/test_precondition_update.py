"""precondition_update=True: the optimizer's update preconditioned once more, checked against
dense (G⊗A + εI)^p in float64, under SGD and under torch's Muon with AdamW on the biases."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kfac_ef import KFACPreconditioner

pytestmark = pytest.mark.usefixtures("float64")

EPS = 1e-2
OPTIONS = dict(damping=EPS, damping_unit="absolute", factor_update_steps=1, inv_update_steps=1,
               grafting="none", factor_dtype=torch.float64)  # fmt: skip


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)


def _backward(model, x, y):
    nn.functional.cross_entropy(model(x), y).backward()


def _power(pre, name, exponent):
    """The dense (G⊗A + εI)^p of a layer, acting on its [W | b] matrices (rows: outputs)."""
    a, g = pre.factors()[name]
    lam, q = torch.linalg.eigh(torch.kron(g, a))
    return (q * (lam + EPS).pow(exponent)) @ q.T


def _joined(w, b):
    return torch.cat([w, b[:, None]], 1).reshape(-1)


def _split(layer, v):
    m = v.reshape(layer.out_features, layer.in_features + 1)
    return m[:, :-1], m[:, -1]


def _graft(new, old):
    return new * (old.norm() / new.norm())


@pytest.mark.parametrize("exponent", [-0.5, -1.0, -0.125])
def test_sgd_update_is_preconditioned_twice(exponent):
    """SGD without momentum: Δθ = -lr (C+εI)^p ∇ by step(), then (C+εI)^p Δθ rescaled to
    ‖Δθ‖ per layer by the hooks; gradients are left as step() wrote them."""
    model = _mlp()
    pre = KFACPreconditioner(model, damping_mode="exact", exponent=exponent,
                             precondition_update=True, **OPTIONS)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre.attach(opt)
    x, y = _data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _backward(model, x, y)
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre.step()
    written = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        power = _power(pre, name, exponent)
        step = -0.1 * power @ _joined(raw[f"{name}.weight"], raw[f"{name}.bias"])
        want = _joined(before[f"{name}.weight"], before[f"{name}.bias"])
        want = want + _graft(power @ step, step)
        got = _joined(layer.weight.detach(), layer.bias.detach())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        plain = _joined(before[f"{name}.weight"], before[f"{name}.bias"]) + step
        assert (got - plain).norm() > 0.1 * step.norm()  # the second preconditioning acted
    for n, p in model.named_parameters():  # step()'s gradients, restored after the update
        torch.testing.assert_close(p.grad, written[n], rtol=0, atol=0)


def _muon_setup(update: bool):
    model = _mlp()
    pre = KFACPreconditioner(model, damping_mode="exact", exponent=-0.25,
                             precondition_update=update, **OPTIONS)  # fmt: skip
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    muon = torch.optim.Muon(weights, lr=0.02)
    adamw = torch.optim.AdamW(biases, lr=0.01)
    if update:
        pre.attach(muon)
    return model, pre, [adamw, muon]  # AdamW first: its step is outside Muon's hooks


def test_under_muon_the_weights_update_is_preconditioned_and_the_biases_are_adamws():
    """Muon on the weights (attached), AdamW on the biases: after one step the biases are
    exactly AdamW's; each weight's update is the W part of (C+εI)^p [ΔW | 0], rescaled to
    ‖ΔW‖ over the joint block, where ΔW is Muon's own update (the same setup without the
    option)."""
    x, y = _data()
    runs = {}
    for update in (False, True):
        model, pre, opts = _muon_setup(update)
        before = copy.deepcopy(model.state_dict())
        _backward(model, x, y)
        pre.step()
        for opt in opts:
            opt.step()
        runs[update] = (model, pre, before)
    (plain, _, before), (mine, pre, _) = runs[False], runs[True]
    for name in ("0", "2"):
        a, b = plain.get_submodule(name), mine.get_submodule(name)
        torch.testing.assert_close(b.bias, a.bias, rtol=0, atol=0)  # AdamW's alone
        dw = a.weight.detach() - before[f"{name}.weight"]
        joined = _joined(dw, torch.zeros(a.out_features))
        moved = _graft(_power(pre, name, -0.25) @ joined, joined)
        want_w, _ = _split(a, moved)
        torch.testing.assert_close(b.weight - before[f"{name}.weight"], want_w, rtol=1e-9,
                                   atol=1e-12)  # fmt: skip
        assert (want_w - dw).norm() > 0.1 * dw.norm()


def test_an_optimizer_step_without_step_is_left_alone():
    model, pre, (adamw, muon) = _muon_setup(True)
    twin = copy.deepcopy(model)
    x, y = _data()
    _backward(model, x, y)
    _backward(twin, x, y)
    weights = [m.weight for m in twin if isinstance(m, nn.Linear)]
    torch.optim.Muon(weights, lr=0.02).step()
    muon.step()  # no precond.step() before it: Muon's own update
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="eigen_adam"):
        KFACPreconditioner(_mlp(), precondition_update=True)
    with pytest.raises(ValueError, match="constraint"):
        KFACPreconditioner(_mlp(), damping_mode="exact", precondition_update=True,
                           max_loss_change=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="constraint"):
        KFACPreconditioner(_mlp(), damping_mode="exact", precondition_update=True,
                           track_loss_changes=True, lr=0.1)  # fmt: skip
    with pytest.raises(TypeError, match="True or False"):
        KFACPreconditioner(_mlp(), damping_mode="exact", precondition_update=1)
    model = _mlp()
    pre = KFACPreconditioner(model, damping_mode="exact", precondition_update=True)
    _backward(model, *_data())
    with pytest.raises(RuntimeError, match="attach"):
        pre.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre.attach(opt)
    with pytest.raises(ValueError, match="already"):
        pre.attach(opt)
    pre.step()  # the failed step() changed nothing: it runs now
    plain = _mlp()
    with pytest.raises(ValueError, match="precondition_update"):
        KFACPreconditioner(plain, damping_mode="exact").attach(torch.optim.SGD(plain.parameters()))


def test_remove_detaches_the_hooks():
    model, pre, (adamw, muon) = _muon_setup(True)
    x, y = _data()
    _backward(model, x, y)
    pre.step()
    pre.remove()
    twin = copy.deepcopy(model)  # gradients as step() wrote them
    weights = [m.weight for m in twin if isinstance(m, nn.Linear)]
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    torch.optim.Muon(weights, lr=0.02).step()
    muon.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
