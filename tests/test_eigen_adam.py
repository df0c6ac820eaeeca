"""damping_mode="eigen_adam": Adam's second moment of the minibatch gradient kept in the
eigenbasis of K-FAC's factors, against a float64 reference built from the per-example
definitions of A and G (its own eigendecompositions) and the recurrence written out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_ef import DistributedOptions, KFACOptions, KFACPreconditioner
from kfac_ef.distributed import _check_supported as check_supported

from .reference import grad_matrix, layer_io, mse_per_example, reference_factors

pytestmark = pytest.mark.usefixtures("float64")

BETA = 0.9


def _mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _rotate(gm, qg, qa):
    return qg.T @ gm @ qa


@pytest.mark.parametrize("unit", ["absolute", "relative"])
def test_matches_adam_in_the_eigenbasis_over_steps(unit):
    """Three steps with the basis of step 0 (inv_update_steps=10): S_t = β S + (1-β) V², Ŝ =
    S/(1-βᵗ), ∇̃ = Q_G [V ⊙ (Ŝ + ε)^(-1/2)] Q_Aᵀ, ε absolute or relative to mean Ŝ."""
    torch.manual_seed(0)
    model = _mlp()
    damping = 1e-6 if unit == "absolute" else 1e-2
    pre = KFACPreconditioner(
        model, damping_mode="eigen_adam", exponent=-0.5, grafting="none", damping=damping,
        damping_unit=unit, factor_decay=BETA, factor_update_steps=1, inv_update_steps=10,
        factor_dtype=torch.float64,
    )  # fmt: skip
    names = ["0", "2"]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    moments: dict[str, torch.Tensor] = {}
    for t in range(1, 4):
        x, y = torch.randn(8, 5), torch.randn(8, 3)
        if t == 1:  # the basis of the first decomposition: the first batch's factors
            for n in names:
                module = model.get_submodule(n)
                A, G = reference_factors(module, layer_io(model, module, mse_per_example, x, y))
                bases[n] = (torch.linalg.eigh(G[0])[1], torch.linalg.eigh(A[0])[1])
        model.zero_grad()
        mse_per_example(model(x), y).mean().backward()
        raw = {n: grad_matrix(m, m.weight.grad, m.bias.grad)[0] for n, m in
               ((n, model.get_submodule(n)) for n in names)}  # fmt: skip
        pre.step()
        for n in names:
            module = model.get_submodule(n)
            qg, qa = bases[n]
            v = _rotate(raw[n], qg, qa)
            moments[n] = BETA * moments.get(n, torch.zeros_like(v)) + (1 - BETA) * v.square()
            s_hat = moments[n] / (1 - BETA**t)
            eps = damping * s_hat.mean() if unit == "relative" else damping
            want = qg @ (v * (s_hat + eps).rsqrt()) @ qa.T
            got = grad_matrix(module, module.weight.grad, module.bias.grad)[0]
            torch.testing.assert_close(got, want, msg=f"step {t}, layer {n}")


def test_moments_survive_a_checkpoint_and_a_new_basis():
    torch.manual_seed(0)
    model = _mlp()
    options = dict(damping_mode="eigen_adam", exponent=-0.5, inv_update_steps=2,
                   factor_update_steps=1, factor_dtype=torch.float64)  # fmt: skip
    pre = KFACPreconditioner(model, **options)
    batches = [(torch.randn(8, 5), torch.randn(8, 3)) for _ in range(5)]

    def run(p, m, steps):
        out = []
        for x, y in steps:
            m.zero_grad()
            mse_per_example(m(x), y).mean().backward()
            p.step()
            out.append(m[0].weight.grad.clone())
        return out

    run(pre, model, batches[:3])  # steps 0, 1, 2: a new basis at step 2, moments carried
    state = pre.state_dict()
    twin = _mlp()
    twin.load_state_dict(model.state_dict())
    pre_twin = KFACPreconditioner(twin, **options)
    pre_twin.load_state_dict(state)
    for a, b in zip(run(pre, model, batches[3:]), run(pre_twin, twin, batches[3:])):
        torch.testing.assert_close(a, b)
    counts = state["layers"]["0"]["decomposition"]["n"]
    assert counts.tolist() == [3.0]  # three moment updates, across the basis change


def test_layers_without_a_gradient_keep_their_moments():
    """Two same-shaped layers share a bucket; when one has no gradient, the other's moment
    still advances (it is written back from the partial stack)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    pre = KFACPreconditioner(model, damping_mode="eigen_adam", factor_update_steps=1)
    for step in range(3):
        model.zero_grad()
        mse_per_example(model(torch.randn(6, 4)), torch.randn(6, 4)).mean().backward()
        if step == 2:
            model[0].weight.grad = None
            model[0].bias.grad = None
        pre.step()
    counts = {n: pre.state_dict()["layers"][n]["decomposition"]["n"].item() for n in ("0", "2")}
    assert counts == {"0": 2.0, "2": 3.0}


def test_needs_every_eigenbasis_on_every_rank():
    kfac = KFACOptions(damping_mode="eigen_adam")
    with pytest.raises(ValueError, match="eigen_adam"):
        check_supported(kfac, DistributedOptions(grad_worker_fraction="mem_opt"), 2)
    check_supported(kfac, DistributedOptions(), 2)


@pytest.mark.parametrize("bad", [float("inf"), 1e30])
def test_a_non_finite_gradient_leaves_the_moments_alone(bad):
    """A loss-scale overflow: the step's gradient is inf, or finite with squares beyond the
    factors' float32 (1e30); the second moments and their counts stay as they were
    (the scaler skips that optimizer step), and the next finite step is preconditioned as if
    the overflow had not happened."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 5), torch.randn(8, 3)) for _ in range(3)]
    results = []
    for overflow in (False, True):
        torch.manual_seed(1)
        model = _mlp()
        pre = KFACPreconditioner(model, damping_mode="eigen_adam", factor_update_steps=1,
                                 inv_update_steps=10)  # fmt: skip
        for i, (x, y) in enumerate(batches):
            if overflow and i == 1:
                model.zero_grad()
                mse_per_example(model(x), y).mean().backward()
                for p in model.parameters():
                    p.grad.fill_(bad)
                pre.step()
            model.zero_grad()
            mse_per_example(model(x), y).mean().backward()
            pre.step()
        results.append([p.grad.clone() for p in model.parameters()])
        counts = pre.state_dict()["layers"]["0"]["decomposition"]["n"]
        assert counts.tolist() == [3.0]
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)
