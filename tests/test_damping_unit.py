"""damping_unit="relative": per Kronecker block ε = damping · (tr G/dim G)(tr A/dim A), fixed at
each decomposition, against dense float64 solves built from the factor definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_ef.kernels import precondition_eigen, precondition_eigen_with_form

from . import internals
from .helpers import conv_head, seed_preconditioner, step_once
from .kernel_checks import assert_within_bound, eigen_truth, eigenbasis
from .reference import (
    block_diagonal_part,
    dense_exact,
    dense_pi,
    grad_matrix,
    layer_io,
    mse_per_example,
    per_example_grads,
    reference_factors,
)
from .test_diagonal import MODELS as DIAGONAL_MODELS
from .test_ekfac import _definition, _dense_ekfac, _per_example_matrices
from .test_factors import CONVS

pytestmark = pytest.mark.usefixtures("float64")

DAMPING = 0.05


def _mlp():
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)
    )


# name -> (model, layers, input shape, output shape)
CASES = {
    "mlp": (_mlp, ["0", "2", "4"], (7, 5), (7, 3)),
    "conv-groups": (
        lambda: conv_head(CONVS["conv2d-same-reflect-dil-groups"][0](), (4, 6, 5)),
        ["0", "3"],
        (3, 4, 6, 5),
        (3, 2),
    ),
    "conv-depthwise-nobias": (
        lambda: conv_head(CONVS["conv2d-depthwise-valid-nobias"][0](), (4, 5, 5)),
        ["0", "3"],
        (3, 4, 5, 5),
        (3, 2),
    ),
}


def relative_eps(A, G, damping):
    """ε per block: damping times the mean eigenvalue of G⊗A, from the traces."""
    ta = torch.diagonal(A, dim1=1, dim2=2).sum(1) / A.shape[1]
    tg = torch.diagonal(G, dim1=1, dim2=2).sum(1) / G.shape[1]
    return (damping * ta * tg).tolist()


def _expected(mode, module, name, A, G, gm, pe, dec, damping):
    eps = relative_eps(A, G, damping)
    assert len(eps) == getattr(module, "groups", 1)
    out = []
    for b, e in enumerate(eps):
        sl = slice(b, b + 1)
        if mode == "exact":
            out.append(dense_exact(A[sl], G[sl], gm[sl], e))
        elif mode == "pi":
            out.append(dense_pi(A[sl], G[sl], gm[sl], e))
        else:
            s = _definition(dec, _per_example_matrices(module, name, pe))
            torch.testing.assert_close(dec["s"], s)  # the scale itself is the definition
            out.append(
                _dense_ekfac({k: dec[k][sl] for k in ("qg", "qa")} | {"s": s[sl]}, gm[sl], e)
            )
    return torch.cat(out)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["exact", "pi", "ekfac"])
def test_matches_dense_solve_with_per_block_eps(case, mode):
    make, names, xs, ys = CASES[case]
    model = make()
    pre = seed_preconditioner(
        model,
        damping=DAMPING,
        damping_unit="relative",
        damping_mode=mode,
        factor_dtype=torch.float64,
    )
    assert pre.options.damping_unit == "relative"
    x, y = torch.randn(*xs), torch.randn(*ys)
    pe = per_example_grads(model, mse_per_example, x, y) if mode == "ekfac" else None
    ios = {n: layer_io(model, model.get_submodule(n), mse_per_example, x, y) for n in names}
    before, after = step_once(model, pre, mse_per_example, x, y)
    for n in names:
        module = model.get_submodule(n)
        A, G = reference_factors(module, ios[n])
        dec = {k: v.clone() for k, v in internals.layer(pre, n).decomposition.parts().items()}
        if mode != "pi":
            torch.testing.assert_close(dec["eps"], torch.tensor(relative_eps(A, G, DAMPING)))
        gm = grad_matrix(module, before[f"{n}.weight"], before.get(f"{n}.bias"))
        got = grad_matrix(module, after[f"{n}.weight"], after.get(f"{n}.bias"))
        expected = _expected(mode, module, n, A, G, gm, pe, dec, DAMPING)
        torch.testing.assert_close(got, expected, msg=lambda m, n=n: f"layer {n}: {m}")


@pytest.mark.parametrize("mode", ["exact", "pi", "ekfac"])
def test_relative_unit_makes_the_step_independent_of_the_loss_scale(mode):
    """Loss × c: G, F and every ε scale by c², the gradient by c, so the preconditioned
    gradient scales by exactly 1/c (with an absolute ε it does not)."""
    c = 1e3
    results = {}
    for unit in ("relative", "absolute"):
        for scale in (1.0, c):
            make, in_shape, _ = DIAGONAL_MODELS["rmsnorm"]
            torch.manual_seed(0)
            model = make()
            pre = seed_preconditioner(
                model,
                damping=DAMPING,
                damping_unit=unit,
                damping_mode=mode,
                factor_dtype=torch.float64,
                other_params="diagonal",
            )
            torch.manual_seed(1)
            x, y = torch.randn(5, *in_shape), torch.randn(5, 2)
            _, after = step_once(model, pre, lambda o, t, s=scale: s * mse_per_example(o, t), x, y)
            results[(unit, scale)] = after
    for k, v in results[("relative", 1.0)].items():
        torch.testing.assert_close(results[("relative", c)][k] * c, v, msg=k)
    assert not all(
        torch.allclose(results[("absolute", c)][k] * c, v)
        for k, v in results[("absolute", 1.0)].items()
    )


def test_diagonal_parameters_use_the_mean_of_their_fisher():
    make, in_shape, names = DIAGONAL_MODELS["layernorm-seq"]
    model = make()
    pre = seed_preconditioner(
        model,
        damping=DAMPING,
        damping_unit="relative",
        factor_dtype=torch.float64,
        other_params="diagonal",
    )
    x, y = torch.randn(5, *in_shape), torch.randn(5, 2)
    pe = per_example_grads(model, mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    for n in names:
        f = pe[n].square().mean(0)
        torch.testing.assert_close(after[n], before[n] / (f + DAMPING * f.mean()), msg=n)


@pytest.mark.parametrize("shape", [(3, 7, 33), (2, 64, 17)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_scale", [False, True], ids=["eigenvalues", "scale"])
def test_per_block_eps_through_the_triton_kernels(shape, with_scale):
    """A ``(B,)`` ε through the interpreted Triton path (which rescales λ_G or S per block)
    against a float64 solve per block, the gradients and the quadratic form."""
    b, m, n = shape
    qg, lg = eigenbasis(b, m)
    qa, la = eigenbasis(b, n)
    grad = torch.randn(b, m, n, dtype=torch.float32)
    scale = torch.rand(b, m, n, dtype=torch.float32) * 2 if with_scale else None
    eps = torch.tensor([1e-3, 0.3, 3e-5][:b], dtype=torch.float32)
    args = (grad, qg, lg, qa, la, eps, scale)
    got = precondition_eigen(*args, backend="triton")
    got_f, form = precondition_eigen_with_form(*args, backend="triton")
    ref = precondition_eigen(*args, backend="torch")
    ref_f, ref_form = precondition_eigen_with_form(*args, backend="torch")
    for i in range(b):
        sl = slice(i, i + 1)
        block = (grad[sl], qg[sl], lg[sl], qa[sl], la[sl], eps[i].item())
        s = scale[sl] if scale is not None else None
        truth = eigen_truth(*block, s)
        same = eigen_truth(*block, s, dtype=torch.float32)
        for out in (got, got_f, ref, ref_f):
            assert_within_bound(out[sl], same, truth, 1e-7)
        k = (lg[sl].double()[:, :, None] * la[sl].double()[:, None, :]) if s is None else s.double()
        rot = qg[sl].double().transpose(1, 2) @ truth @ qa[sl].double()
        form_truth = (k * rot.square()).sum()
        for f in (form[i], ref_form[i]):
            assert f.item() == pytest.approx(form_truth.item(), rel=1e-4)


def _train(pre, model, batches):
    out = []
    for x, y in batches:
        _, after = step_once(model, pre, mse_per_example, x, y)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.sub_(0.1 * after[name])
        out.append(after)
    return out


@pytest.mark.parametrize("mode", ["exact", "pi", "ekfac"])
def test_state_dict_round_trip(mode):
    """A relative-ε checkpoint resumes bit for bit (its ε kept between decompositions); with
    another damping or unit the decompositions are recomputed with the new ε."""
    make, in_shape, _ = DIAGONAL_MODELS["rmsnorm"]
    kw = dict(
        damping_mode=mode,
        factor_dtype=torch.float64,
        other_params="diagonal",
        inv_update_steps=3,
    )
    batches = [(torch.randn(5, *in_shape), torch.randn(5, 2)) for _ in range(4)]
    model = make()
    pre = seed_preconditioner(model, damping=DAMPING, damping_unit="relative", **kw)
    _train(pre, model, batches[:2])
    state, params = pre.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    assert state["options"]["damping_unit"] == "relative"
    full = _train(pre, model, batches[2:])

    def resumed(**opts):
        m = make()
        m.load_state_dict(params)
        p = seed_preconditioner(m, **kw, **opts)
        p.load_state_dict(state)
        return p, _train(p, m, batches[2:])

    p2, again = resumed(damping=DAMPING, damping_unit="relative")
    for a, b in zip(full, again):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)

    # Another damping or another unit: the next step decomposes with the new ε, as a fresh
    # preconditioner loaded with the same factors would.
    for opts in ({"damping": 10 * DAMPING, "damping_unit": "relative"}, {"damping": DAMPING}):
        p3, got = resumed(**opts)
        assert internals.layer(p3, "0").decomposition is not None
        if opts.get("damping_unit") == "relative" and mode != "pi":
            A, G = p3.factors()["0"]
            assert internals.layer(p3, "0").decomposition.eps.item() == pytest.approx(
                relative_eps(A[None], G[None], 10 * DAMPING)[0]
            )
        if "damping_unit" not in opts:  # absolute: no per-block ε stored
            assert internals.layer(p3, "0").decomposition.eps is None
        assert not torch.allclose(got[0]["0.weight"], full[0]["0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "unit"),
    [
        ({}, "absolute"),
        ({"max_loss_change": 1.0, "lr": 0.1}, "absolute"),
        ({"max_loss_change": 1.0, "lr": 0.1, "damping_unit": "relative"}, "relative"),
        ({"damping_unit": "relative"}, "relative"),
    ],
)
def test_default_unit_is_absolute(kwargs, unit):
    pre = seed_preconditioner(_mlp(), **kwargs)
    assert pre.options.damping_unit == unit
    pre.remove()


@pytest.mark.parametrize("bad", ["Relative", "mean", 1.0])
def test_bad_unit_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="damping_unit"):
        seed_preconditioner(_mlp(), damping_unit=bad)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_wide_factors_use_the_traces_of_their_stored_part(block, mode):
    """Factors over max_factor_dim (stored diagonal or block-diagonal): ε from the traces of
    what is stored (the same traces as the full factors), solved densely with those parts."""
    model = nn.Sequential(
        nn.Linear(3, 19), nn.Tanh(), nn.Linear(19, 20), nn.Tanh(), nn.Linear(20, 2)
    )
    pre = seed_preconditioner(
        model,
        damping=DAMPING,
        damping_unit="relative",
        damping_mode=mode,
        factor_dtype=torch.float64,
        max_factor_dim=10,
        large_factor_block=block,
    )
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    lin = model[2]
    io = layer_io(model, lin, mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    A, G = reference_factors(lin, io)
    A, G = A[0], G[0]
    parts = [
        block_diagonal_part(F, block) if block > 1 else torch.diag(F.diagonal()) for F in (A, G)
    ]
    eps = relative_eps(A[None], G[None], DAMPING)[0]
    gm = grad_matrix(lin, before["2.weight"], before["2.bias"])
    solve = dense_exact if mode == "exact" else dense_pi
    expected = solve(parts[0][None], parts[1][None], gm, eps)
    got = grad_matrix(lin, after["2.weight"], after["2.bias"])
    torch.testing.assert_close(got, expected)
