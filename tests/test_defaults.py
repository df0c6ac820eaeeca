"""The defaults of ``KFACPreconditioner(model)``: what they are, that the default update is
the documented one (against a dense float64 matrix power of the per-example definitions), and
that they hold on the case where the previous defaults diverged."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from kfac_ef import KFACOptions, KFACPreconditioner

from .models import GPT
from .reference import grad_matrix, layer_io, mse_per_example, reference_factors


def test_the_defaults_are_the_measured_ones():
    """benchmarks/defaults.py and benchmarks/lm.py measured these (docs/guides/transformers.md);
    a change here is a change of the documented defaults."""
    o = KFACOptions()
    assert (o.exponent, o.grafting) == (-0.5, "gradient")
    assert (o.damping, o.damping_unit) == (1e-2, "relative")
    assert (o.factor_update_steps, o.inv_update_steps, o.factor_decay) == (5, 10, 0.95)
    assert (o.damping_mode, o.constraint) == ("eigen_adam", "none")
    assert (o.wide_layers, o.max_factor_dim) == ("optimizer", 4096)


def test_the_default_update_is_grafted_adam_in_the_eigenbasis(float64):
    """Per layer, with the eigenbases Q_G, Q_A of the first batch's factors (per-example
    definitions) and V_t = Q_Gᵀ ∇_t Q_A: S_t = 0.95 S + 0.05 V_t², Ŝ = S_t / (1 - 0.95ᵗ),
    ∇̃ = Q_G [V_t ⊙ (Ŝ + 0.01 · mean Ŝ)^(-1/2)] Q_Aᵀ, rescaled to the norm of ∇_t."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    pre = KFACPreconditioner(model, factor_dtype=torch.float64)
    bases, moments = {}, {}
    for t in (1, 2):
        x, y = torch.randn(9, 5), torch.randn(9, 3)
        if t == 1:
            for n in ("0", "2"):
                module = model.get_submodule(n)
                A, G = reference_factors(module, layer_io(model, module, mse_per_example, x, y))
                bases[n] = (torch.linalg.eigh(G[0])[1], torch.linalg.eigh(A[0])[1])
        model.zero_grad()
        mse_per_example(model(x), y).mean().backward()
        before = {k: p.grad.clone() for k, p in model.named_parameters()}
        pre.step()
        for n in ("0", "2"):
            module = model.get_submodule(n)
            qg, qa = bases[n]
            gm = grad_matrix(module, before[f"{n}.weight"], before[f"{n}.bias"])[0]
            v = qg.T @ gm @ qa
            moments[n] = 0.95 * moments.get(n, torch.zeros_like(v)) + 0.05 * v.square()
            s_hat = moments[n] / (1 - 0.95**t)
            want = qg @ (v * (s_hat + 0.01 * s_hat.mean()).rsqrt()) @ qa.T
            want = want * gm.norm() / want.norm()
            got = grad_matrix(module, module.weight.grad, module.bias.grad)[0]
            torch.testing.assert_close(got, want, msg=f"step {t}, layer {n}")


def _memorize(optimizer: str, **options) -> list[float]:
    torch.manual_seed(0)
    model = GPT(vocab=50257, dim=32, context=16, attention=("mha", "sdpa"))
    params = list(model.parameters())
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    pre = None if options.get("alone") else KFACPreconditioner(model, **options)
    ids = torch.randint(0, 50257, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):
        opt.zero_grad()
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50257), ids[:, 1:].reshape(-1))
        loss.backward()
        if pre is not None:
            pre.step()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_defaults_do_not_diverge_where_the_old_ones_did(optimizer):
    """A GPT with GPT-2's 50 257-token tied head (the suite's initialization: logits far from
    uniform, a loss near 80) memorizing one batch under SGD (lr 0.05, momentum 0.9) or AdamW
    (lr 1e-3). The previous defaults (ε = 1e-3 absolute, p = -1, no grafting) reach NaN under
    SGD; the defaults stay finite and end at most 10 % above the optimizer alone."""
    alone = _memorize(optimizer, alone=True)
    losses = _memorize(optimizer)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 1.1 * alone[-1], (losses, alone)
    if optimizer == "sgd":
        old = _memorize(optimizer, damping=1e-3, damping_unit="absolute", exponent=-1.0,
                        grafting="none", factor_update_steps=1, inv_update_steps=5,
                        damping_mode="exact", wide_layers="diagonal")  # fmt: skip
        assert not all(math.isfinite(v) and v < 2 * alone[0] for v in old), old


def test_vocabulary_sized_layers_are_left_to_the_optimizer_by_default():
    """A tied 50 257-token embedding and head: left to the optimizer as one (with the reason),
    the blocks covered; wide_layers="diagonal" preconditions them with a diagonal factor."""
    model = GPT(vocab=50257, dim=32, context=16, attention=("sdpa",))
    left = dict(KFACPreconditioner(model).summary().unpreconditioned)
    assert "vocabulary-sized" in left["wte.weight"]
    assert "max_factor_dim=4096" in left["wte.weight"]
    assert not KFACPreconditioner(model).summary().ties  # no owner: the optimizer has it
    # a wide layer that is not an embedding (nor tied to one) keeps its diagonal factor
    with pytest.warns(RuntimeWarning, match="not dense"):
        wide = KFACPreconditioner(nn.Sequential(nn.Linear(8, 5000), nn.Tanh(), nn.Linear(5000, 2)))
    assert {la.name for la in wide.summary().layers} == {"0", "2"}
    with warnings.catch_warnings():  # block-diagonal factors asked for: a plan, not a warning
        warnings.simplefilter("error")
        blocks = KFACPreconditioner(
            nn.Sequential(nn.Linear(8, 5000), nn.Tanh(), nn.Linear(5000, 2)), large_factor_block=512
        )
    assert "blocks of" in str(blocks.summary())
    covered = {la.name for la in KFACPreconditioner(model).summary().layers}
    assert "wte" not in covered and "head" not in covered and len(covered) > 0
    with warnings.catch_warnings():  # the embedding owns the tie: its A is diagonal anyway
        warnings.simplefilter("error")
        diagonal = KFACPreconditioner(model, wide_layers="diagonal").summary()
    assert "wte.weight" not in dict(diagonal.unpreconditioned)
    assert "wte alone" in diagonal.ties[0][1]
    with pytest.warns(RuntimeWarning, match="not dense"):  # "exact": the head owns, G diagonal
        KFACPreconditioner(model, wide_layers="diagonal", damping_mode="exact")
    x = torch.randint(0, 50257, (2, 9))
    pre = KFACPreconditioner(model)
    logits = model(x[:, :-1])
    nn.functional.cross_entropy(logits.reshape(-1, 50257), x[:, 1:].reshape(-1)).backward()
    raw = model.wte.weight.grad.clone()
    pre.step()
    torch.testing.assert_close(model.wte.weight.grad, raw)  # untouched: the optimizer's
