"""Autocast and GradScaler: float32 factors, unscaled statistics, overflow steps skipped."""

from __future__ import annotations

import copy

import pytest
import torch

from kfac_ef import KFACPreconditioner

from .helpers import grads
from .models import GPT, lm_loss

VOCAB = 97


def _batch(n=4, t=9):
    x = torch.randint(0, VOCAB, (n, t))
    return x[:, :-1], x[:, 1:]


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_factors_are_float32_and_close_to_full_precision(dtype):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    twin = copy.deepcopy(model)
    x, y = _batch()
    results = []
    for m, autocast in ((model, False), (twin, True)):
        pre = KFACPreconditioner(m, other_params="diagonal")
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = lm_loss(m(x), y)
        loss.backward()
        pre.step()
        results.append((pre.factors(), pre.diagonal_fishers(), grads(m)))
    (f32, d32, g32), (fmp, dmp, gmp) = results
    assert set(f32) == set(fmp) and len(f32) == 12
    for name, (a, g) in fmp.items():
        assert a.dtype == torch.float32 and g.dtype == torch.float32
        assert _rel(a, f32[name][0]) < 0.05, name
        assert _rel(g, f32[name][1]) < 0.1, name
    for name, f in dmp.items():
        assert _rel(f, d32[name]) < 0.1, name
    for name, g in gmp.items():
        assert torch.isfinite(g).all() and _rel(g, g32[name]) < 0.2, name


def _scaled_step(model, pre, scaler, opt, x, y, autocast=None):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = lm_loss(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # the documented order: unscale_, precond.step(), scaler.step
    pre.step()
    after = grads(model)
    scaler.step(opt)
    scaler.update()
    return after


def test_grad_scaler_statistics_are_unscaled():
    """With a loss scale σ the hooks see σ·∂L/∂s: factors and preconditioned gradients must
    equal those of the unscaled run."""
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    twin = copy.deepcopy(model)
    x, y = _batch()
    pre = KFACPreconditioner(model, other_params="diagonal", damping=1e-2)
    lm_loss(model(x), y).backward()
    pre.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    pre2 = KFACPreconditioner(twin, other_params="diagonal", damping=1e-2, grad_scaler=scaler)
    opt = torch.optim.SGD(twin.parameters(), lr=0.0)
    after = _scaled_step(twin, pre2, scaler, opt, x, y)
    for name, (a, g) in pre.factors().items():
        torch.testing.assert_close(pre2.factors()[name][0], a)
        torch.testing.assert_close(pre2.factors()[name][1], g, rtol=1e-4, atol=1e-10)
    for name, f in pre.diagonal_fishers().items():
        torch.testing.assert_close(pre2.diagonal_fishers()[name], f, rtol=1e-4, atol=1e-10)
    for name, g in grads(model).items():
        torch.testing.assert_close(after[name], g, rtol=1e-4, atol=1e-6)


def test_overflow_step_leaves_every_factor_untouched():
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    pre = KFACPreconditioner(model, other_params="diagonal", grad_scaler=scaler, inv_update_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _batch()
    _scaled_step(model, pre, scaler, opt, x, y, autocast=torch.float16)
    factors = pre.factors()
    fishers = pre.diagonal_fishers()
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    scaler.update(new_scale=2.0**40)  # float16 gradients overflow at this scale
    _scaled_step(model, pre, scaler, opt, x, y, autocast=torch.float16)
    assert scaler.get_scale() < 2.0**40, "the scaler saw the overflow"
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, factors[name][0]) and torch.equal(g, factors[name][1]), name
    for name, f in pre.diagonal_fishers().items():
        assert torch.equal(f, fishers[name]), name
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]), "the optimizer step was skipped"
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        _scaled_step(model, pre, scaler, opt, x, y, autocast=torch.float16)  # decomposes
    for a, g in pre.factors().values():
        assert torch.isfinite(a).all() and torch.isfinite(g).all()


def test_grad_scaler_must_be_a_grad_scaler():
    with pytest.raises(TypeError, match="grad_scaler"):
        KFACPreconditioner(GPT(vocab=VOCAB), grad_scaler=2.0**16)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_step_does_not_synchronize_under_autocast_and_scaler():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(vocab=50257, dim=64, dropout=0.1).to(device)
    scaler = torch.amp.GradScaler("cuda")
    pre = KFACPreconditioner(model, other_params="diagonal", grad_scaler=scaler, inv_update_steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randint(0, 50257, (4, 17), device=device)
    for step in range(4):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if step > 0:  # steps 1-3 neither decompose nor may synchronize
            torch.cuda.set_sync_debug_mode("error")
        try:
            pre.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.step(opt)
        scaler.update()
    for a, g in pre.factors().values():
        assert a.dtype == torch.float32 and torch.isfinite(g).all()


def test_a_non_finite_gradient_alone_skips_the_statistics_step():
    """Finite statistics but one non-finite gradient (e.g. a float16 weight-gradient overflow
    that no activation shows): no factor moves."""
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    pre = KFACPreconditioner(model, other_params="diagonal", inv_update_steps=5)
    x, y = _batch()
    lm_loss(model(x), y).backward()
    pre.step()
    factors, fishers = pre.factors(), pre.diagonal_fishers()
    model.zero_grad()
    lm_loss(model(x), y).backward()
    model.ln_f.weight.grad[0] = float("inf")
    pre.step()
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, factors[name][0]) and torch.equal(g, factors[name][1]), name
    for name, f in pre.diagonal_fishers().items():
        assert torch.equal(f, fishers[name]), name


# EKFAC (the one-hot second moment of the embeddings, attention recomputed) and the
# Kronecker form of the loss-change constraint (the exact form needs per-example calls, which
# GPT's position embedding, called once for the whole batch, does not make; see
# test_constraint_structured for it).
SEED_OPTIONS = {
    "damping_mode": "ekfac",
    "constraint": "kronecker",
    "target_loss_change": 1e-3,
    "loss_change_unit": "absolute",
    "lr": 0.01,
}


@pytest.mark.parametrize("options", [{}, SEED_OPTIONS], ids=["kfac", "ekfac+constraint"])
def test_step_reads_no_tensor_value_on_the_host(options, monkeypatch):
    """A CPU stand-in for CUDA's sync debug mode: between decompositions, step() (with a
    GradScaler, attention, embeddings, wide and diagonal factors) converts no tensor to a
    Python value — .item(), bool(), int(), float(), .tolist(), .nonzero() all raise."""
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    pre = KFACPreconditioner(
        model,
        other_params="diagonal",
        grad_scaler=scaler,
        inv_update_steps=10,
        max_factor_dim=64,
        large_factor_block=16,
        **options,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _batch()
    _scaled_step(model, pre, scaler, opt, x, y, autocast=torch.bfloat16)  # step 0 decomposes

    def host_read(*args, **kwargs):
        raise AssertionError("step() read a tensor value on the host")

    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
            m.setattr(torch.Tensor, name, host_read)
        pre.step()
    scaler.step(opt)
