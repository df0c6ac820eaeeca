"""benchmarks/lm_basis.py's spectral arrangement (an experiment, not a method of the library):
with the identity basis it is torch's Muon, step for step; with K-FAC's factors each step is
L^(-q) orth(L^(-q) M R^(-q)) R^(-q) scaled to the norm of orth(·), checked against a float64
computation (torch's Newton–Schulz iteration for orth) from the layer's inputs and output
gradients."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
try:
    import lm
    import lm_basis
    from tasks import data_of
finally:
    sys.path.remove(str(BENCH))

STEPS = 4


def _args(basis: str, **kw) -> argparse.Namespace:
    base = dict(basis=basis, arrangement="spectral", lr=0.03, statistics_every=1, steps=STEPS,
                damping=1e-2, power=0.25)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def _batches(task, data, n):
    gen = torch.Generator().manual_seed(0)
    return [task.sample(data, 4, gen, i) for i in range(n)]


@pytest.fixture(scope="module")
def setup():
    task = lm.TASKS["chargpt"]
    data = data_of(task)
    torch.manual_seed(0)
    return task, data, task.build(data)


def test_identity_basis_is_torch_muon(setup):
    task, data, model = setup
    mine, ref = copy.deepcopy(model), copy.deepcopy(model)
    stepper = lm_basis.SoapStyle(task, mine, _args("identity"))
    hidden, rest = lm._hidden_matrices(ref)
    opts = [torch.optim.Muon(hidden, lr=0.03), torch.optim.AdamW(rest, lr=3e-3)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lm._schedule(STEPS)) for o in opts]
    for x, y in _batches(task, data, STEPS):
        stepper.step(x, y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        task.losses(ref(x), y).mean().backward()
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
    for (name, a), b in zip(mine.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_kfac_basis_step_against_float64(setup):
    """One step (the first: factors from this batch alone) of one hidden Linear layer."""
    task, data, model = setup
    model = copy.deepcopy(model)
    args = _args("kfac", power=0.25)
    stepper = lm_basis.SoapStyle(task, model, args)
    linear = next(m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    seen = {}
    h1 = linear.register_forward_hook(lambda m, i, o: seen.update(a=i[0].detach().double()))
    h2 = linear.register_full_backward_hook(
        lambda m, gi, go: seen.update(g=go[0].detach().double())
    )
    before = linear.weight.detach().double().clone()
    ((x, y),) = _batches(task, data, 1)
    stepper.step(x, y)
    h1.remove()
    h2.remove()
    a = seen["a"].reshape(-1, seen["a"].shape[-1])
    g = seen["g"].reshape(-1, seen["g"].shape[-1])
    grad = g.T @ a  # the minibatch gradient of the weight (the loss is the mean)

    def root(f):
        lam, q = torch.linalg.eigh(f)
        lam = lam.clamp_min(0)
        lam = lam + args.damping * lam.mean()
        return (q * lam.pow(-args.power)) @ q.T

    left, right = root(0.05 * g.T @ g), root(0.05 * a.T @ a)  # decay 0.95 from zero
    momentum = 0.05 * grad
    nesterov = grad + 0.95 * (momentum - grad)
    lr = args.lr * lm._schedule(STEPS)(0)
    scale = lr * max(1.0, before.shape[0] / before.shape[1]) ** 0.5

    def orth(m):  # torch's Muon's Newton–Schulz iteration (bfloat16 inside), as the script's
        return lm_basis._zeropower_via_newtonschulz(m.float(), (3.4445, -4.775, 2.0315), 5,
                                                    1e-7).double()  # fmt: skip

    ortho = orth(left @ nesterov @ right)
    step = left @ ortho @ right
    step = step * (ortho.norm() / step.norm())
    got = linear.weight.detach().double() - before * (1 - lr * 0.1)  # less the weight decay
    want = -scale * step
    assert float((got - want).norm() / want.norm()) < 0.05  # about 0.014 here
    muon = -scale * orth(nesterov)  # without the factors: a different step
    assert float((got - muon).norm() / muon.norm()) > 0.3  # about 1.2 here
