"""Autocast and GradScaler: float32 factors, unscaled statistics, overflow steps skipped."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from .helpers import grads, seed_preconditioner
from .models import GPT, lm_loss
from .reference import grad_matrix

VOCAB = 97


def _batch(n=4, t=9):
    x = torch.randint(0, VOCAB, (n, t))
    return x[:, :-1], x[:, 1:]


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _capture_linears(model):
    """Hooks that record, for every plain nn.Linear, its input as the module receives it and
    the gradient of its output: under autocast the low-precision tensors the preconditioner's
    hooks see too (the input float32 after a LayerNorm, which autocast runs in float32)."""
    seen = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear:

            def hook(module, args, out, name=name):
                seen[name] = [args[0].detach(), None]
                out.register_hook(lambda g: seen[name].__setitem__(1, g.detach()))

            module.register_forward_hook(hook)
    return seen


def _reference(module, x, dy):
    """A and G per DESIGN.md in float64 from one batch, N examples × T positions, the mean
    loss over the batch: A = (1/(N·T)) Σ ã ãᵀ, G = (1/N) Σ (N δ)(N δ)ᵀ."""
    n = x.shape[0]
    a = x.double().reshape(-1, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    d = n * dy.double().reshape(-1, dy.shape[-1])
    return a.T @ a / len(a), d.T @ d / n


def _kron_solve(A, G, grad, damping):
    """(G⊗A + εI)⁻¹ vec(∇) in float64 through the factors' eigenbases (exact, like a dense
    solve, which would take seconds at these sizes: G⊗A is up to 4224 wide)."""
    la, qa = torch.linalg.eigh(A)
    lg, qg = torch.linalg.eigh(G)
    return qg @ ((qg.T @ grad @ qa) / (lg[:, None] * la[None, :] + damping)) @ qa.T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_factors_are_float32_and_match_their_activations(dtype):
    """Under autocast the factors are float32 and, for every Linear, equal a float64
    computation from the same low-precision activations and output gradients: only float32
    accumulation error (≈1e-7 relative), so the bound can be 1e-5 and a wrong scale (by N,
    by T, by 2, or by a few percent) fails. The preconditioned gradients of those layers
    equal (G⊗A + εI)⁻¹ ∇ in float64 with the reference factors, up to float32 round-off
    times the damped curvature's condition number (≤ 3e3 here, default damping: ≤ 2e-4).

    Layers whose inputs the test cannot see (attention's projections, recomputed inside the
    preconditioner), the embedding's and the LayerNorms' diagonal statistics and the other
    gradients are compared with a float32 run instead, within a few units of the autocast
    dtype's epsilon ε (2⁻⁷ for bfloat16, 2⁻¹⁰ for float16): observed at most 1.4ε for the
    statistics and 3.5ε for the gradients."""
    eps = torch.finfo(dtype).eps
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    twin = copy.deepcopy(model)
    seen = _capture_linears(twin)
    x, y = _batch()
    results = []
    for m, autocast in ((model, False), (twin, True)):
        pre = seed_preconditioner(m, other_params="diagonal")
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = lm_loss(m(x), y)
        loss.backward()
        before = grads(m)
        pre.step()
        results.append((pre.factors(), pre.diagonal_fishers(), grads(m)))
    (f32, d32, g32), (fmp, dmp, gmp) = results
    assert set(f32) == set(fmp) and len(f32) == 12
    assert len(seen) == 7 and all(dy is not None and dy.dtype == dtype for _, dy in seen.values())
    for name, (a, g) in fmp.items():
        assert a.dtype == torch.float32 and g.dtype == torch.float32
        if name in seen:
            module = twin.get_submodule(name)
            ref_a, ref_g = _reference(module, *seen[name])
            assert _rel(a.double(), ref_a) < 1e-5, name
            assert _rel(g.double(), ref_g) < 1e-5, name
            weight = next(k for k, p in twin.named_parameters() if p is module.weight)
            bias = f"{name}.bias" if module.bias is not None else None
            grad_m = grad_matrix(module, before[weight], before[bias] if bias else None)[0]
            expected = _kron_solve(ref_a, ref_g, grad_m.double(), 1e-3)
            got = grad_matrix(module, gmp[weight], gmp[bias] if bias else None)[0]
            assert _rel(got.double(), expected) < 1e-3, name
        else:
            assert _rel(a, f32[name][0]) < 4 * eps, name
            assert _rel(g, f32[name][1]) < 4 * eps, name
    for name, f in dmp.items():
        assert f.dtype == torch.float32 and _rel(f, d32[name]) < 4 * eps, name
    linear_params = {k for k, p in twin.named_parameters()
                     if any(p is twin.get_submodule(n).weight or p is twin.get_submodule(n).bias
                            for n in seen)}  # fmt: skip
    assert set(gmp) == set(g32)
    for name, g in gmp.items():
        assert torch.isfinite(g).all(), name
        if name not in linear_params:
            assert _rel(g, g32[name]) < 16 * eps, name


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
    pre = seed_preconditioner(model, other_params="diagonal", damping=1e-2)
    lm_loss(model(x), y).backward()
    pre.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    pre2 = seed_preconditioner(twin, other_params="diagonal", damping=1e-2, grad_scaler=scaler)
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
    pre = seed_preconditioner(
        model, other_params="diagonal", grad_scaler=scaler, inv_update_steps=2
    )
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
        seed_preconditioner(GPT(vocab=VOCAB), grad_scaler=2.0**16)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_step_does_not_synchronize_under_autocast_and_scaler():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(vocab=50257, dim=64, dropout=0.1).to(device)
    scaler = torch.amp.GradScaler("cuda")
    pre = seed_preconditioner(
        model, other_params="diagonal", grad_scaler=scaler, inv_update_steps=4
    )
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
    pre = seed_preconditioner(model, other_params="diagonal", inv_update_steps=5)
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
    pre = seed_preconditioner(
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


def test_constraint_with_grad_scaler_needs_the_documented_order():
    """With a loss-change constraint, step() on still-scaled gradients would compute ν off by
    the loss scale: it raises; in the documented order the result equals the unscaled run."""
    from .reference import mse_per_example

    def build(scaler=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        pre = seed_preconditioner(
            model, damping=0.1, max_loss_change=1e-3, loss_change_unit="absolute", lr=0.1,
            grad_scaler=scaler,
        )  # fmt: skip
        return model, pre, torch.optim.SGD(model.parameters(), lr=0.1)

    x, y = torch.randn(8, 5), torch.randn(8, 3)
    model, pre, _ = build()
    mse_per_example(model(x), y).mean().backward()
    pre.step()
    expected = grads(model)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, pre, opt = build(scaler)
    scaler.scale(mse_per_example(model(x), y).mean()).backward()
    with pytest.raises(RuntimeError, match=r"scaler.unscale_\(optimizer\) before precond.step"):
        pre.step()
    scaler.unscale_(opt)
    pre.step()  # the same backward: the failed call changed nothing
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-8)
    assert pre.diagnostics().nu < 1.0  # the trust region was active
    scaler.step(opt)
    scaler.update()
