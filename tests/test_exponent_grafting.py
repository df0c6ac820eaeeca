"""``exponent`` (the power p of (G⊗A + εI)^p) and ``grafting="gradient"`` (each block's step
norm taken from its raw gradient), against dense float64 matrix powers built from the factor
definitions (per-example quantities, not the preconditioner's own factors)."""

from __future__ import annotations

import pytest
import torch

from kfac_ef import KFACPreconditioner

from .helpers import step_once
from .reference import (
    grad_matrix,
    layer_io,
    mse_per_example,
    per_example_grads,
    reference_factors,
)
from .test_damping_unit import CASES as DAMPING_CASES
from .test_damping_unit import _mlp
from .test_diagonal import MODELS as DIAGONAL_MODELS

pytestmark = pytest.mark.usefixtures("float64")

DAMPING = 0.05


CASES = {k: DAMPING_CASES[k] for k in ("mlp", "conv-groups")}


def dense_power(A, G, gm, damping, p):
    """(G⊗A + εI)^p vec(∇) per block, from an eigendecomposition of the dense Kronecker
    product (row-major vec)."""
    out = []
    for a, g, m in zip(A, G, gm):
        c = torch.kron(g, a)
        lam, q = torch.linalg.eigh(c)
        power = q @ torch.diag((lam.clamp_min(0) + damping) ** p) @ q.T
        out.append((power @ m.reshape(-1)).reshape(m.shape))
    return torch.stack(out)


def _run(case, **options):
    make, names, xs, ys = CASES[case]
    torch.manual_seed(0)
    model = make()
    options = {"damping_unit": "absolute", "grafting": "none", "damping_mode": "exact", **options}
    pre = KFACPreconditioner(model, damping=DAMPING, factor_dtype=torch.float64, **options)
    torch.manual_seed(1)
    x, y = torch.randn(*xs), torch.randn(*ys)
    ios = {n: layer_io(model, model.get_submodule(n), mse_per_example, x, y) for n in names}
    before, after = step_once(model, pre, mse_per_example, x, y)
    return model, names, ios, before, after


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("p", [-0.5, -0.25, -1.0])
def test_exponent_matches_the_dense_matrix_power(case, p):
    model, names, ios, before, after = _run(case, exponent=p)
    for n in names:
        module = model.get_submodule(n)
        A, G = reference_factors(module, ios[n])
        gm = grad_matrix(module, before[f"{n}.weight"], before.get(f"{n}.bias"))
        got = grad_matrix(module, after[f"{n}.weight"], after.get(f"{n}.bias"))
        torch.testing.assert_close(got, dense_power(A, G, gm, DAMPING, p), msg=n)


def test_exponent_half_is_scale_free():
    """Loss × c: C scales by c², the gradient by c; with p = -1/2 and ε scaled alike
    (relative damping) the step is unchanged, where p = -1 scales it by 1/c."""
    c = 1e3
    results = {}
    for p in (-0.5, -1.0):
        for scale in (1.0, c):
            torch.manual_seed(0)
            model = _mlp()
            pre = KFACPreconditioner(
                model, damping=DAMPING, damping_unit="relative", exponent=p,
                factor_dtype=torch.float64, grafting="none", damping_mode="exact",
            )  # fmt: skip
            torch.manual_seed(1)
            x, y = torch.randn(7, 5), torch.randn(7, 3)
            loss = lambda o, t, s=scale: s * mse_per_example(o, t)  # noqa: E731
            results[(p, scale)] = step_once(model, pre, loss, x, y)[1]
    for k, v in results[(-0.5, 1.0)].items():
        torch.testing.assert_close(results[(-0.5, c)][k], v, msg=k)
        torch.testing.assert_close(results[(-1.0, c)][k] * c, results[(-1.0, 1.0)][k], msg=k)


@pytest.mark.parametrize("mode", ["exact", "ekfac"])
def test_grafting_keeps_each_blocks_norm_and_the_direction(mode):
    _, names, _, _, plain = _run("conv-groups", damping_mode=mode, exponent=-0.5)
    model, _, _, before, grafted = _run(
        "conv-groups", damping_mode=mode, exponent=-0.5, grafting="gradient"
    )
    for n in names:
        module = model.get_submodule(n)
        raw = grad_matrix(module, before[f"{n}.weight"], before.get(f"{n}.bias"))
        p = grad_matrix(module, plain[f"{n}.weight"], plain.get(f"{n}.bias"))
        g = grad_matrix(module, grafted[f"{n}.weight"], grafted.get(f"{n}.bias"))
        for b in range(raw.shape[0]):  # per Kronecker block (the groups of the conv)
            expected = p[b] * (raw[b].norm() / p[b].norm())
            torch.testing.assert_close(g[b], expected, msg=f"{n} block {b}")
            assert not torch.allclose(g[b], raw[b])  # a direction of its own


def test_diagonal_parameters_take_the_power_and_the_graft():
    make, in_shape, names = DIAGONAL_MODELS["layernorm-seq"]
    for graft in ("none", "gradient"):
        torch.manual_seed(0)
        model = make()
        pre = KFACPreconditioner(
            model, damping=DAMPING, other_params="diagonal", exponent=-0.5, grafting=graft,
            factor_dtype=torch.float64, damping_unit="absolute",
        )  # fmt: skip
        torch.manual_seed(1)
        x, y = torch.randn(5, *in_shape), torch.randn(5, 2)
        pe = per_example_grads(model, mse_per_example, x, y)
        before, after = step_once(model, pre, mse_per_example, x, y)
        for n in names:
            expected = before[n] * (pe[n].square().mean(0) + DAMPING) ** -0.5
            if graft == "gradient":
                expected = expected * before[n].norm() / expected.norm()
            torch.testing.assert_close(after[n], expected, msg=n)


@pytest.mark.parametrize("bad", [0.0, -1.5, 0.5, float("nan"), True, "half"])
def test_bad_exponent_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="exponent"):
        KFACPreconditioner(_mlp(), exponent=bad)


def test_pi_kronecker_form_needs_exponent_minus_one():
    with pytest.raises(ValueError, match="damping_mode='pi'"):
        KFACPreconditioner(
            _mlp(), exponent=-0.5, damping_mode="pi", constraint="kronecker", lr=0.1,
            max_loss_change=1.0,
        )  # fmt: skip


@pytest.mark.parametrize("p", [-0.5, -1.0])
def test_pi_raises_both_damped_factors_to_the_power(p):
    """(G + c_G I)^p ∇ (A + c_A I)^p with π's shifts c_A = √ε·π, c_G = √ε/π."""
    model, names, ios, before, after = _run("mlp", damping_mode="pi", exponent=p,
                                            damping_unit="absolute")  # fmt: skip
    for n in names:
        module = model.get_submodule(n)
        A, G = reference_factors(module, ios[n])
        a, g = A[0], G[0]
        pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])).sqrt()
        root = DAMPING**0.5

        def power(m, c):
            lam, q = torch.linalg.eigh(m)
            return q @ torch.diag((lam.clamp_min(0) + c) ** p) @ q.T

        gm = grad_matrix(module, before[f"{n}.weight"], before.get(f"{n}.bias"))[0]
        got = grad_matrix(module, after[f"{n}.weight"], after.get(f"{n}.bias"))[0]
        expected = power(g, root / pi) @ gm @ power(a, root * pi)
        torch.testing.assert_close(got, expected, msg=n)


def test_bad_grafting_is_a_clear_error():
    with pytest.raises(ValueError, match="grafting"):
        KFACPreconditioner(_mlp(), grafting="adam")
