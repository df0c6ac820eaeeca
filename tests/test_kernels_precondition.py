"""The preconditioning kernels against float64 ground truth, through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from kfac_ef.kernels import (
    precondition_eigen,
    precondition_eigen_reference,
    precondition_eigen_with_form,
    precondition_factored,
    precondition_factored_reference,
)
from kfac_ef.kernels.eigen_precondition import precondition_eigen_triton
from kfac_ef.kernels.factored_precondition import precondition_factored_triton

from .kernel_checks import (
    assert_within_bound,
    eigen_truth,
    eigenbasis,
    ill_conditioned_eigenbasis,
)

# Kernel failures fall back to the reference with this warning: here it would hide the bug.
pytestmark = pytest.mark.filterwarnings("error::kfac_ef.kernels.KernelFallbackWarning")

# (blocks, m, n): sides 1, 7, 33, 129, 257, non-square, on both sides of the fused limit (64).
SHAPES = [(1, 1, 1), (3, 7, 33), (2, 33, 7), (2, 64, 17), (2, 129, 33), (1, 7, 257), (1, 257, 129)]
REL_ATOL = 1e-7
DAMPING = 1e-3


def _inputs(b, m, n, with_scale):
    qg, lg = eigenbasis(b, m)
    qa, la = eigenbasis(b, n)
    grad = torch.randn(b, m, n)
    scale = torch.rand(b, m, n) * 2 if with_scale else None
    return grad, qg, lg, qa, la, scale


def _check_eigen(got, grad, qg, lg, qa, la, scale):
    truth = eigen_truth(grad, qg, lg, qa, la, DAMPING, scale)
    same_precision = eigen_truth(grad, qg, lg, qa, la, DAMPING, scale, dtype=torch.float32)
    assert_within_bound(got, same_precision, truth, REL_ATOL)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_scale", [False, True], ids=["eigenvalues", "scale"])
@pytest.mark.parametrize("path", ["auto", "gemm"])
def test_precondition_eigen_within_bound(shape, with_scale, path):
    grad, qg, lg, qa, la, scale = _inputs(*shape, with_scale)
    out = torch.full_like(grad, float("nan"))  # poisoned: every element must be written
    fused = None if path == "auto" else False
    got = precondition_eigen_triton(grad, qg, lg, qa, la, DAMPING, scale, fused=fused, out=out)
    assert got is out
    _check_eigen(got, grad, qg, lg, qa, la, scale)
    ref = precondition_eigen_reference(grad, qg, lg, qa, la, DAMPING, scale)
    _check_eigen(ref, grad, qg, lg, qa, la, scale)


# Ill-conditioned factors: eigenvalues spread over ten decades, so λ_G λ_Aᵀ + ε spans
# [ε, 1e4] and the division amplifies some directions 1/ε times more than others. The error
# of both float32 chains is then dominated by those directions; the bound is the same rule
# with an absolute slack of 8 float32 epsilons of the output's scale (not the last bits of
# any BLAS: the errors seen are about 3e-7 of the scale, for the kernels and torch alike).
ILL_SHAPES = [(3, 7, 33), (2, 33, 7), (2, 64, 17), (2, 129, 33), (1, 7, 257)]
ILL_REL_ATOL = 8 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("shape", ILL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("damping", [1e-3, 1e-6])
@pytest.mark.parametrize("path", ["auto", "gemm"])
def test_precondition_eigen_ill_conditioned_within_bound(shape, damping, path):
    b, m, n = shape
    qg, lg = ill_conditioned_eigenbasis(b, m)
    qa, la = ill_conditioned_eigenbasis(b, n)
    grad = torch.randn(b, m, n)
    form = torch.full((b,), float("nan"))
    out = torch.full_like(grad, float("nan"))
    fused = None if path == "auto" else False
    got = precondition_eigen_triton(
        grad, qg, lg, qa, la, damping, fused=fused, out=out, form=form
    )  # fmt: skip
    truth = eigen_truth(grad, qg, lg, qa, la, damping)
    same = eigen_truth(grad, qg, lg, qa, la, damping, dtype=torch.float32)
    assert_within_bound(got, same, truth, ILL_REL_ATOL)
    ref = precondition_eigen_reference(grad, qg, lg, qa, la, damping)
    assert_within_bound(ref, same, truth, ILL_REL_ATOL)
    form_truth = _form_truth(grad, qg, lg, qa, la, None, damping=damping)
    form_same = _form_truth(grad, qg, lg, qa, la, None, torch.float32, damping=damping)
    assert_within_bound(form, form_same, form_truth, ILL_REL_ATOL)


@pytest.mark.parametrize("shape", [(4, 7, 33), (3, 33, 19), (2, 64, 64)], ids=str)
def test_precondition_factored_ill_conditioned_within_bound(shape):
    """Damped inverses (Q diag(λ + c) Qᵀ)⁻¹ of ill-conditioned factors: eigenvalues of the
    inverses from 1e-2 to 1e4."""
    b, m, n = shape
    ig, ia = _ill_inverse(b, m, 1e-4), _ill_inverse(b, n, 1e-4)
    grad = torch.randn(b, m, n)
    out = torch.full_like(grad, float("nan"))
    got = precondition_factored_triton(grad, ig, ia, out=out)
    truth = ig.double() @ grad.double() @ ia.double()
    assert_within_bound(got, ig @ grad @ ia, truth, ILL_REL_ATOL)


def _ill_inverse(b, n, c):
    q, lam = ill_conditioned_eigenbasis(b, n)
    q = q.double()
    return (q @ torch.diag_embed(1.0 / (lam.double() + c)) @ q.transpose(1, 2)).float()


def _form_truth(grad, qg, lg, qa, la, scale, dtype=torch.float64, damping=DAMPING):
    """∇̃ᵀ C ∇̃ per block, C = (Q_G⊗Q_A) diag(vec K) (Q_G⊗Q_A)ᵀ, from the ``dtype`` chain."""
    out = eigen_truth(grad, qg, lg, qa, la, damping, scale, dtype=dtype)
    k = lg.to(dtype)[:, :, None] * la.to(dtype)[:, None, :] if scale is None else scale.to(dtype)
    rotated = qg.to(dtype).transpose(1, 2) @ out @ qa.to(dtype)
    return (k * rotated.square()).sum(dim=(1, 2))


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 33), (2, 64, 17)])
@pytest.mark.parametrize("with_scale", [False, True], ids=["eigenvalues", "scale"])
@pytest.mark.parametrize("path", ["auto", "gemm"])
def test_precondition_eigen_form_within_bound(shape, with_scale, path):
    """The quadratic form of the constraint, from the fused kernel's registers or the tiled
    path's stored Ṽ (forced: the tiles do not depend on the size), and the gradients it comes
    with."""
    grad, qg, lg, qa, la, scale = _inputs(*shape, with_scale)
    form = torch.full((shape[0],), float("nan"))  # poisoned: every block must be written
    fused = None if path == "auto" else False
    got = precondition_eigen_triton(grad, qg, lg, qa, la, DAMPING, scale, fused=fused, form=form)
    _check_eigen(got, grad, qg, lg, qa, la, scale)
    truth = _form_truth(grad, qg, lg, qa, la, scale)
    same_precision = _form_truth(grad, qg, lg, qa, la, scale, dtype=torch.float32)
    assert_within_bound(form, same_precision, truth, REL_ATOL)
    ref, ref_form = precondition_eigen_with_form(
        grad, qg, lg, qa, la, DAMPING, scale, backend="torch"
    )
    assert torch.equal(ref, precondition_eigen_reference(grad, qg, lg, qa, la, DAMPING, scale))
    assert_within_bound(ref_form, same_precision, truth, REL_ATOL)


def test_precondition_eigen_form_is_the_kronecker_quadratic_form():
    """∇̃ᵀ (G⊗A) ∇̃ with a dense Kronecker product, for one small block (float64)."""
    m, n = 4, 6
    x = torch.randn(m, 9, dtype=torch.float64)
    y = torch.randn(n, 11, dtype=torch.float64)
    G, A = x @ x.T / 9, y @ y.T / 11
    lg, qg = torch.linalg.eigh(G)
    la, qa = torch.linalg.eigh(A)
    grad = torch.randn(1, m, n, dtype=torch.float64)
    out, form = precondition_eigen_with_form(
        grad, qg[None], lg[None], qa[None], la[None], 0.1, backend="triton"
    )
    v = out.reshape(-1)
    torch.testing.assert_close(form[0], v @ torch.kron(G, A) @ v)


def test_precondition_eigen_public_dispatch_and_strides():
    """Non-contiguous operands (transposed views) go through the public function."""
    grad, qg, lg, qa, la, _ = _inputs(3, 20, 70, False)
    grad_t = grad.transpose(1, 2).contiguous().transpose(1, 2)
    qg_t = qg.transpose(1, 2).contiguous().transpose(1, 2)
    lg_s = torch.stack([lg, lg], dim=2)[..., 0]
    got = precondition_eigen(grad_t, qg_t, lg_s, qa, la, DAMPING, backend="triton")
    _check_eigen(got, grad, qg, lg, qa, la, None)


def test_precondition_eigen_is_the_damped_kronecker_solve():
    """(G⊗A + εI)⁻¹ vec(∇) by a dense float64 solve, for one small block."""
    m, n = 5, 6
    x = torch.randn(m, 9, dtype=torch.float64)
    y = torch.randn(n, 11, dtype=torch.float64)
    G, A = x @ x.T / 9, y @ y.T / 11
    grad = torch.randn(1, m, n)
    lg, qg = torch.linalg.eigh(G)
    la, qa = torch.linalg.eigh(A)
    got = precondition_eigen(
        grad, qg[None].float(), lg[None].float(), qa[None].float(), la[None].float(), 0.1,
        backend="triton",
    )  # fmt: skip
    dense = torch.linalg.solve(torch.kron(G, A) + 0.1 * torch.eye(m * n, dtype=torch.float64),
                               grad.double().reshape(-1))  # fmt: skip
    torch.testing.assert_close(got.double().reshape(-1), dense, rtol=1e-4, atol=1e-5)


def test_precondition_eigen_float64_runs_the_reference():
    grad, qg, lg, qa, la, _ = _inputs(2, 9, 5, False)
    args = [t.double() for t in (grad, qg, lg, qa, la)]
    got = precondition_eigen(*args, DAMPING, backend="triton")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, eigen_truth(*args, DAMPING), rtol=1e-10, atol=1e-10)


def test_precondition_eigen_bad_inputs_name_the_problem():
    grad, qg, lg, qa, la, _ = _inputs(2, 9, 5, False)
    with pytest.raises(ValueError, match="qa has shape"):
        precondition_eigen(grad, qg, lg, qg, la, DAMPING)
    with pytest.raises(ValueError, match="scale has shape"):
        precondition_eigen(grad, qg, lg, qa, la, DAMPING, torch.ones(2, 5, 9))
    with pytest.raises(ValueError, match="grad must be"):
        precondition_eigen(grad[0], qg, lg, qa, la, DAMPING)


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 7, 33), (3, 33, 19), (2, 64, 64)])
def test_precondition_factored_within_bound(shape):
    b, m, n = shape
    ig = torch.linalg.inv(_spd(b, m))
    ia = torch.linalg.inv(_spd(b, n))
    grad = torch.randn(b, m, n)
    out = torch.full_like(grad, float("nan"))
    got = precondition_factored_triton(grad, ig, ia, out=out)
    truth = ig.double() @ grad.double() @ ia.double()
    assert_within_bound(got, ig @ grad @ ia, truth, REL_ATOL)
    assert_within_bound(
        precondition_factored_reference(grad, ig, ia), ig @ grad @ ia, truth, REL_ATOL
    )


def test_precondition_factored_large_blocks_run_the_reference():
    grad, ig, ia = torch.randn(2, 70, 9), _spd(2, 70), _spd(2, 9)
    got = precondition_factored(grad, ig, ia, backend="triton")
    torch.testing.assert_close(got, ig @ grad @ ia)
    with pytest.raises(ValueError, match="exceed the fused kernel"):
        precondition_factored_triton(grad, ig, ia)
    with pytest.raises(ValueError, match="ia has shape"):
        precondition_factored(grad, ig, ig)


def _spd(b, n):
    x = torch.randn(b, n, n + 3)
    return x @ x.transpose(1, 2) / (n + 3) + 0.1 * torch.eye(n)
