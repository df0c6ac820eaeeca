"""Training patterns that gave wrong factors or crashed without a word, each against the
answer a plain run gives (or the clear error the pattern must raise)."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_ef import KFACPreconditioner
from kfac_ef.linalg import damped_inverse, damped_inverses, eigh_psd

from .helpers import grads, seed_preconditioner, step_once
from .reference import mse_per_example, per_example_grads


def _mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _clean_factors(**options) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors of one plain ``loss.backward(); step()`` on the standard batch."""
    m = _mlp()
    pre = seed_preconditioner(m, damping=0.1, **options)
    x, y = _batch()
    F.cross_entropy(m(x), y).backward()
    pre.step()
    return pre.factors()


# ---------------------------------------------------------------- which backward feeds


@pytest.mark.parametrize("how", ["autograd.grad", "backward(inputs=x)"])
def test_input_gradient_before_the_loss_backward_leaves_the_factors_alone(how):
    """A saliency map / gradient-norm log before the real backward: the factors are those of
    the loss the optimizer steps on (it used to make G 664x off)."""
    m = _mlp()
    pre = seed_preconditioner(m, damping=0.1)
    x, y = _batch()
    x.requires_grad_(True)
    out = m(x)
    if how == "autograd.grad":
        torch.autograd.grad(out.sum(), x, retain_graph=True)
    else:
        out.sum().backward(inputs=[x], retain_graph=True)
    F.cross_entropy(out, y).backward()
    pre.step()
    expected = _clean_factors()
    for name, (a, g) in pre.factors().items():
        torch.testing.assert_close(a, expected[name][0])
        torch.testing.assert_close(g, expected[name][1])


def test_input_gradient_alone_is_not_a_backward_pass():
    m = _mlp()
    pre = seed_preconditioner(m, damping=0.1)
    x, _ = _batch()
    x.requires_grad_(True)
    torch.autograd.grad(m(x).sum(), x)
    with pytest.raises(RuntimeError, match="without a backward pass"):
        pre.step()


def test_second_loss_through_a_retained_graph_raises():
    m = _mlp()
    pre = seed_preconditioner(m, damping=0.1)
    x, y = _batch()
    out = m(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward pass reached the output"):
        out.square().mean().backward()
    pre.remove()


def test_second_loss_inside_ignored_is_left_out_of_the_factors():
    m = _mlp()
    pre = seed_preconditioner(m, damping=0.1)
    x, y = _batch()
    out = m(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    with pre.ignored():
        out.square().mean().backward()
    total = grads(m)
    pre.step()
    expected = _clean_factors()
    for name, (_, g) in pre.factors().items():
        torch.testing.assert_close(g, expected[name][1])
    # Both losses' gradients reached p.grad (and were preconditioned).
    m2 = _mlp()
    F.cross_entropy(m2(x), y).backward()
    assert not torch.allclose(total["2.weight"], m2[2].weight.grad)


def test_gradient_penalty_with_create_graph_raises_unless_ignored():
    m = _mlp()
    pre = seed_preconditioner(m, damping=0.1)
    x, y = _batch()
    x.requires_grad_(True)
    out = m(x)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    out = m(x)
    with pre.ignored():
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (F.cross_entropy(out, y) + gx.square().sum(1).mean()).backward()
    pre.step()
    # The penalty depends on the head's weight, not on its output: its G is the loss's alone.
    torch.testing.assert_close(pre.factors()["2"][1], _clean_factors()["2"][1])


def test_statistics_free_steps_do_not_mind_extra_backward_passes():
    """Off statistics steps nothing is kept, so nothing can be wrong: no error."""
    m = _mlp()
    pre = seed_preconditioner(m, damping=0.1, factor_update_steps=2)
    x, y = _batch()
    F.cross_entropy(m(x), y).backward()
    pre.step()
    out = m(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    out.square().mean().backward()
    pre.step()


# ---------------------------------------------------------------- numerics and state


def test_pi_damped_inverse_falls_back_when_cholesky_fails():
    """A failed Cholesky factorization takes the documented eigenvalue route (it used to
    raise from cholesky_inverse). Which one fails depends on the CPU's last bits, so a
    singular M with a tiny shift is compared with that route itself, and a well-posed
    matrix of the same stack must come out exact."""
    singular = torch.ones(1, 2, 2)
    shift = torch.tensor([1e-9])
    inv, ok = damped_inverses(singular, shift)
    assert ok == [True] and torch.isfinite(inv).all()
    chol_ok = torch.linalg.cholesky_ex(singular + 1e-9 * torch.eye(2))[1] == 0
    if not bool(chol_ok):  # this CPU takes the fallback: it is the eigenvalue route
        torch.testing.assert_close(inv, damped_inverse(eigh_psd(singular), shift))
    mats = torch.stack([singular[0], torch.eye(2)])
    inv, ok = damped_inverses(mats, torch.tensor([1e-9, 1.0]))
    assert ok == [True, True]
    torch.testing.assert_close(inv[1], 0.5 * torch.eye(2))


def test_pi_damped_inverse_fallback_path_is_taken_when_the_factorization_fails(monkeypatch):
    """Force every factorization to fail: each matrix goes the eigenvalue route."""
    mats = torch.stack([torch.ones(2, 2), 2 * torch.eye(2)])
    shift = torch.tensor([0.5, 1.0])
    real = torch.linalg.cholesky_ex

    def failing(m, **kwargs):
        chol, info = real(m, **kwargs)
        return chol.zero_(), torch.ones_like(info)  # a zero pivot, as a failed one leaves

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    inv, ok = damped_inverses(mats, shift)
    assert ok == [True, True]
    eye = torch.eye(2, dtype=torch.float64)
    for i in range(2):
        expected = torch.linalg.inv(mats[i].double() + shift[i].item() * eye)
        torch.testing.assert_close(inv[i].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        dict(damping_mode="ekfac", inv_update_steps=1),
        dict(constraint="exact", target_loss_change=1e-3, loss_change_unit="absolute", lr=0.1),
    ],
    ids=["ekfac", "exact-constraint"],
)
def test_input_buffer_overwritten_before_step_changes_nothing(options):
    """A reused batch buffer refilled between backward() and step(): step() works from
    what the forward pass saw."""
    x, y = _batch()
    results = []
    for overwrite in (False, True):
        m = _mlp()
        pre = seed_preconditioner(m, damping=0.1, **options)
        buffer = x.clone()
        F.cross_entropy(m(buffer), y).backward()
        if overwrite:
            buffer.copy_(torch.randn_like(buffer))
        pre.step()
        results.append(grads(m))
    for name, g in results[0].items():
        torch.testing.assert_close(results[1][name], g, msg=name)


def _trained(**options) -> KFACPreconditioner:
    m = _mlp()
    pre = seed_preconditioner(m, damping=0.1, other_params="diagonal", **options)
    x, y = _batch()
    F.cross_entropy(m(x), y).backward()
    pre.step()
    return pre


def _fresh() -> KFACPreconditioner:
    return seed_preconditioner(_mlp(), damping=0.1, other_params="diagonal")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: s["layers"]["0"]["decomposition"]["qa"].view(-1)[3].fill_(math.nan), "qa"),
        (lambda s: s["layers"]["2"]["A"].view(-1)[0].fill_(math.inf), "2: A has 1 non-finite"),
        (lambda s: s.update(steps=-5), "steps must be a non-negative"),
        (lambda s: s["layers"]["0"]["updates"].fill_(-1), "0: updates must be"),
        (lambda s: s.update(stats_examples=math.nan), "stats_examples"),
    ],
    ids=["nan-decomposition", "inf-factor", "negative-steps", "negative-updates", "nan-count"],
)
def test_load_state_dict_rejects_values_that_cannot_be_right(corrupt, message):
    state = _trained().state_dict()
    corrupt(state)
    pre = _fresh()
    with pytest.raises(ValueError, match=message):
        pre.load_state_dict(state)
    assert pre.steps == 0 and all(a is None for a, _ in pre.factors().values())


def test_factor_decay_keeps_float64_precision():
    x, y = _batch()
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    factors = {}
    for decay in (0.0, 0.95):
        m = _mlp().double()
        pre = seed_preconditioner(m, factor_decay=decay, factor_dtype=torch.float64)
        seen = []
        for xb in (x, x2):
            m.zero_grad()
            F.cross_entropy(m(xb.double()), y).backward()
            pre.step()
            seen.append(pre.factors()["0"][0])
        factors[decay] = seen
    first, second = factors[0.0]  # each batch's own A (decay 0 keeps the latest)
    expected = 0.95 * first + (1 - 0.95) * second
    torch.testing.assert_close(factors[0.95][1], expected, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_lr_callable_returning_a_bad_value_raises(value):
    m = _mlp()
    pre = seed_preconditioner(
        m, constraint="kronecker", target_loss_change=1e-3, lr=lambda step: value
    )
    x, y = _batch()
    losses = F.cross_entropy(m(x), y, reduction="none")
    losses.mean().backward()
    with pytest.raises(ValueError, match=r"lr\(0\) returned"):
        pre.step(loss=losses.detach())


# ---------------------------------------------------------------- memory and lifetime


def _tensors_of_shape(shape: tuple[int, ...]) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.shape == shape)


def test_mc_forwards_never_backpropagated_keep_nothing():
    m = _mlp()
    pre = seed_preconditioner(m, fisher_type="mc")
    before = _tensors_of_shape((13, 6))
    for _ in range(20):
        m(torch.randn(13, 6))  # train mode, grad on, never backpropagated
    assert _tensors_of_shape((13, 6)) == before
    pre.remove()


def test_dropped_preconditioner_is_collected_and_unhooks():
    m = _mlp()
    pre = seed_preconditioner(m)
    x, y = _batch()
    F.cross_entropy(m(x), y).backward()
    pre.step()
    ref = weakref.ref(pre)
    del pre
    gc.collect()
    assert ref() is None
    assert not m[0]._forward_hooks and not m[2]._forward_hooks
    again = seed_preconditioner(m)  # no "call remove() on that one first"
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    again.step()


def test_backward_passes_without_step_warn_once_when_calls_pile_up():
    m = _mlp()
    pre = seed_preconditioner(
        m, constraint="exact", target_loss_change=1e-3, loss_change_unit="absolute", lr=0.1
    )
    x, y = _batch(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(70):
            F.cross_entropy(m(x), y).backward()
    piled = [w for w in caught if "backward passes since the last step()" in str(w.message)]
    assert len(piled) == 1
    pre.step()


# ---------------------------------------------------------------- empty batches


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(other_params="diagonal"),
        dict(constraint="exact", target_loss_change=1e-3, loss_change_unit="absolute", lr=0.1),
        dict(damping_mode="ekfac"),
    ],
    ids=["plain", "diagonal", "exact-constraint", "ekfac"],
)
def test_an_empty_micro_batch_adds_nothing(options):
    x, y = _batch(8)
    results = []
    for empty in (False, True):
        m = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
        torch.manual_seed(3)
        for p in m.parameters():
            nn.init.normal_(p, std=0.5)
        pre = seed_preconditioner(m, damping=0.1, loss_reduction="sum", **options)
        F.cross_entropy(m(x), y, reduction="sum").backward()
        if empty:
            F.cross_entropy(m(x[:0]), y[:0], reduction="sum").backward()
        pre.step()
        results.append((grads(m), pre.factors()))
    for name, g in results[0][0].items():
        torch.testing.assert_close(results[1][0][name], g, msg=name)
    for name, (a, g) in results[0][1].items():
        torch.testing.assert_close(results[1][1][name][0], a)
        torch.testing.assert_close(results[1][1][name][1], g)


# ---------------------------------------------------------------- found by reading


def test_sum_form_scale_survives_a_checkpoint_between_statistics_steps():
    """loss_reduction="sum": the Kronecker form divides by the last statistics step's N,
    which a resume between statistics steps must restore."""

    def run(resume: bool) -> float:
        torch.manual_seed(0)
        m = _mlp()
        opts = dict(
            loss_reduction="sum",
            constraint="kronecker",
            target_loss_change=1e-2,
            loss_change_unit="absolute",
            lr=0.1,
            factor_update_steps=2,
        )
        pre = seed_preconditioner(m, damping=0.1, **opts)
        x, y = _batch(16)
        F.cross_entropy(m(x), y, reduction="sum").backward()
        pre.step()  # statistics step, N = 16
        if resume:
            state = pre.state_dict()
            pre.remove()
            pre = seed_preconditioner(m, damping=0.1, **opts)
            pre.load_state_dict(state)
        m.zero_grad()
        F.cross_entropy(m(x[:4]), y[:4], reduction="sum").backward()
        pre.step()  # no statistics: the form uses N = 16
        return pre.diagnostics().nu

    assert run(True) == pytest.approx(run(False), rel=1e-6)


def test_diagonal_form_uses_the_curvature_of_the_last_decomposition(float64):
    """The Kronecker form's diagonal share Σ F ∇̃² takes the F that made ∇̃ (the one of the
    last decomposition), as the Kronecker layers take their decompositions' eigenvalues."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(5, bias=False))
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn(5))
    lr = 0.1
    pre = seed_preconditioner(
        model,
        damping=1e-2,
        other_params="diagonal",
        factor_dtype=torch.float64,
        inv_update_steps=3,
        factor_decay=0.0,
        track_loss_changes=True,
        lr=lr,
    )
    fishers = []
    for _ in range(2):
        x, y = torch.randn(7, 5), torch.randn(7, 5)
        pe = per_example_grads(model, mse_per_example, x, y)
        fishers.append(pe["0.weight"].square().mean(0))
        _, after = step_once(model, pre, mse_per_example, x, y)
    # Step 1 is not a decomposition step: ∇̃ = g / (F_0 + ε), and the form uses F_0.
    tilde = after["0.weight"].square()
    form = pre.diagnostics().kronecker
    assert form is not None
    expected, stale = (float((f * tilde).sum()) * lr**2 for f in fishers)
    assert form == pytest.approx(expected, rel=1e-9)
    assert not math.isclose(expected, stale, rel_tol=1e-3)


def test_channels_last_gradient_keeps_its_layout_and_identity():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 6, 6), torch.randn(4, 2)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 2))
        xm = x
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
            xm = x.to(memory_format=torch.channels_last)
        pre = seed_preconditioner(m, damping=0.1)
        mse_per_example(m(xm), y).mean().backward()
        grad = m[0].weight.grad
        assert grad.is_contiguous() != channels_last
        strides = grad.stride()
        pre.step()
        assert m[0].weight.grad is grad and grad.stride() == strides
        results.append(grads(m))
    for name, g in results[0].items():
        torch.testing.assert_close(results[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
