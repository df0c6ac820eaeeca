"""EKFAC: the scale S against its definition from torch.func per-example gradients, and the
preconditioned gradient against a dense solve, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_ef import _ekfac
from kfac_ef._factors import FactorSpec

from . import internals
from .helpers import conv_head, seed_preconditioner, step_once
from .reference import (
    dense_exact,
    grad_matrix,
    layer_io,
    mse_per_example,
    per_example_grads,
    reference_factors,
)
from .test_factors import CONVS, SeqModel

pytestmark = pytest.mark.usefixtures("float64")


def _decomposition(pre, name):
    return {k: v.clone() for k, v in internals.layer(pre, name).decomposition.parts().items()}


def _per_example_matrices(module, name, pe):
    """(N, blocks, g, a) per-example gradient matrices ∇_n of one layer."""
    n = pe[f"{name}.weight"].shape[0]
    has_b = f"{name}.bias" in pe
    return torch.stack(
        [
            grad_matrix(module, pe[f"{name}.weight"][i], pe[f"{name}.bias"][i] if has_b else None)
            for i in range(n)
        ]
    )


def _check_eigenbases(dec, A, G):
    """The preconditioner's bases diagonalize the reference factors (anchors the test)."""
    for q, lam, F in ((dec["qa"], dec["la"], A), (dec["qg"], dec["lg"], G)):
        torch.testing.assert_close(q.transpose(1, 2) @ F @ q, torch.diag_embed(lam))


def _definition(dec, mats, reduction="mean"):
    """S = E_n[(Q_Gᵀ ∇_n Q_A)²] (N times that for sum reduction)."""
    proj = dec["qg"].transpose(1, 2).unsqueeze(0) @ mats @ dec["qa"].unsqueeze(0)
    s = proj.square().mean(0)
    return s * mats.shape[0] if reduction == "sum" else s


def _dense_ekfac(dec, grad_m, damping):
    """(Q_G⊗Q_A) diag(S + ε)⁻¹ (Q_G⊗Q_A)ᵀ vec(∇) per block, dense, row-major vec."""
    out = []
    for qg, qa, s, gm in zip(dec["qg"], dec["qa"], dec["s"], grad_m):
        k = torch.kron(qg, qa)
        m = k @ torch.diag(1.0 / (s.reshape(-1) + damping)) @ k.T
        out.append((m @ gm.reshape(-1)).reshape(gm.shape))
    return torch.stack(out)


CASES = {
    "mlp": (
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)
        ),
        ["0", "2", "4"],
        (7, 5),
        (7, 3),
    ),
    "sequence": (SeqModel, ["proj", "head"], (5, 3, 4), (5, 2)),
    **{
        f"conv-{k}": (
            lambda fn=fn, shape=shape: conv_head(fn(), shape),
            ["0", "3"],
            (3, *shape),
            (3, 2),
        )
        for k, (fn, shape) in CONVS.items()
        if k in ("conv2d-same-reflect-dil-groups", "conv1d-stride-dil")
    },
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_scale_and_preconditioned_gradient_match_definitions(case, reduction, approx):
    make, names, xs, ys = CASES[case]
    model = make()
    damping = 1e-2
    pre = seed_preconditioner(
        model,
        damping=damping,
        damping_mode="ekfac",
        loss_reduction=reduction,
        kfac_approx=approx,
        factor_dtype=torch.float64,
    )
    x, y = torch.randn(*xs), torch.randn(*ys)
    pe = per_example_grads(model, mse_per_example, x, y)
    ios = {n: layer_io(model, model.get_submodule(n), mse_per_example, x, y) for n in names}
    before, after = step_once(model, pre, mse_per_example, x, y, reduction)
    for n in names:
        module = model.get_submodule(n)
        dec = _decomposition(pre, n)
        A, G = reference_factors(module, ios[n], approx=approx, reduction=reduction)
        _check_eigenbases(dec, A, G)
        torch.testing.assert_close(
            dec["s"], _definition(dec, _per_example_matrices(module, n, pe), reduction)
        )
        gm = grad_matrix(module, before[f"{n}.weight"], before.get(f"{n}.bias"))
        got = grad_matrix(module, after[f"{n}.weight"], after.get(f"{n}.bias"))
        torch.testing.assert_close(got, _dense_ekfac(dec, gm, damping))


def test_running_average_carries_over_basis_changes():
    """S₁ = β·diag_new(C₀) + (1-β)·S_batch₁: the old curvature (Q₀, S₀) is re-expressed in
    the new basis (its diagonal there, computed densely), then the new batch is folded in."""
    beta = 0.7
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    pre = seed_preconditioner(
        model,
        damping_mode="ekfac",
        factor_decay=beta,
        inv_update_steps=1,
        factor_dtype=torch.float64,
    )
    x0, y0 = torch.randn(6, 4), torch.randn(6, 3)
    step_once(model, pre, mse_per_example, x0, y0)
    dec0 = _decomposition(pre, "0")
    pe0 = per_example_grads(model, mse_per_example, x0, y0)  # after step 0: θ unchanged
    torch.testing.assert_close(
        dec0["s"], _definition(dec0, _per_example_matrices(model[0], "0", pe0))
    )

    x1, y1 = torch.randn(6, 4), torch.randn(6, 3)
    pe1 = per_example_grads(model, mse_per_example, x1, y1)
    step_once(model, pre, mse_per_example, x1, y1)
    dec1 = _decomposition(pre, "0")
    assert not torch.allclose(dec0["qa"], dec1["qa"])  # the basis did change
    k0 = torch.kron(dec0["qg"][0], dec0["qa"][0])
    k1 = torch.kron(dec1["qg"][0], dec1["qa"][0])
    old_curvature = k0 @ torch.diag(dec0["s"][0].reshape(-1)) @ k0.T
    carried = torch.diagonal(k1.T @ old_curvature @ k1).reshape(dec1["s"][0].shape)
    batch = _definition(dec1, _per_example_matrices(model[0], "0", pe1))[0]
    torch.testing.assert_close(dec1["s"][0], beta * carried + (1 - beta) * batch)


def test_scale_before_statistics_in_a_basis_is_kfac():
    """A basis computed on a step without statistics starts from λ_G λ_Aᵀ (K-FAC exactly),
    and the first statistics in that basis replace it."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    pre = seed_preconditioner(
        model,
        damping_mode="ekfac",
        factor_update_steps=2,
        inv_update_steps=1,
        factor_dtype=torch.float64,
        factor_decay=0.5,
    )
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    step_once(model, pre, mse_per_example, x, y)  # step 0: statistics, basis, S from the batch
    # Step 1: no statistics, a new decomposition of the same factors: the same basis up to
    # signs, and S is carried over unchanged.
    dec0 = _decomposition(pre, "0")
    step_once(model, pre, mse_per_example, x, y)
    dec1 = _decomposition(pre, "0")
    torch.testing.assert_close(dec1["s"], dec0["s"])

    # A layer whose state lost its scale (a checkpoint of another mode) restarts from K-FAC.
    fresh = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    fresh.load_state_dict(model.state_dict())
    kfac_state = seed_preconditioner(fresh, damping_mode="exact", factor_dtype=torch.float64)
    step_once(fresh, kfac_state, mse_per_example, x, y)
    kfac_state.remove()
    pre2 = seed_preconditioner(
        fresh,
        damping_mode="ekfac",
        factor_update_steps=2,
        inv_update_steps=1,
        factor_dtype=torch.float64,
    )
    pre2.load_state_dict(kfac_state.state_dict())  # steps = 1: not a statistics step
    before, after = step_once(fresh, pre2, mse_per_example, x, y)
    dec = _decomposition(pre2, "0")
    torch.testing.assert_close(dec["s"], dec["lg"].unsqueeze(2) * dec["la"].unsqueeze(1))
    A, G = kfac_state.factors()["0"]
    gm = grad_matrix(fresh[0], before["0.weight"], before["0.bias"])
    got = grad_matrix(fresh[0], after["0.weight"], after["0.bias"])
    torch.testing.assert_close(got, dense_exact(A[None], G[None], gm, 1e-3))


def test_chunked_second_moment_equals_unchunked(monkeypatch):
    a, d = torch.randn(7, 4, 2, 5), torch.randn(7, 4, 2, 3)
    qa = torch.linalg.qr(torch.randn(2, 5, 5))[0]
    qg = torch.linalg.qr(torch.randn(2, 3, 3))[0]
    specs = FactorSpec(3, 3), FactorSpec(5, 5)

    def moment():
        raw, n = _ekfac.batch_second_moment([(a, d, 0)], False, qg, qa, *specs, torch.float64)
        assert n == 7
        return raw

    whole = moment()
    monkeypatch.setattr(_ekfac, "MAX_ELEMENTS", 1)
    chunked = moment()
    torch.testing.assert_close(chunked, whole)
    per_example = torch.einsum("bgh,ntbg,ntba,bac->nbhc", qg, d, a, qa)
    torch.testing.assert_close(whole, per_example.square().sum(0))


def test_checkpoint_round_trip_keeps_the_scale():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    pre = seed_preconditioner(model, damping_mode="ekfac", factor_dtype=torch.float64)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    step_once(model, pre, mse_per_example, x, y)
    state = pre.state_dict()
    pre.remove()
    other = seed_preconditioner(model, damping_mode="ekfac", factor_dtype=torch.float64)
    other.load_state_dict(state)
    torch.testing.assert_close(
        internals.layer(other, "0").decomposition.s, state["layers"]["0"]["decomposition"]["s"]
    )
    torch.testing.assert_close(
        internals.layer(other, "0").scale_updates, state["layers"]["0"]["scale_updates"]
    )
    _, a1 = step_once(model, other, mse_per_example, x, y)
    assert all(torch.isfinite(v).all() for v in a1.values())


def test_summary_counts_the_scale():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    exact = seed_preconditioner(model).summary()
    exact_bytes = {r.name: r.decomposition_bytes for r in exact.layers}
    model2 = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    ekfac = seed_preconditioner(model2, damping_mode="ekfac").summary()
    for r in ekfac.layers:
        g, a = r.g_shape[0], r.a_shape[0]
        assert r.decomposition_bytes == exact_bytes[r.name] + 4 * g * a
