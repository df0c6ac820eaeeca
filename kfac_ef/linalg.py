"""Pure-torch math of kfac_ef: running averages, eigendecompositions with fallbacks, damping.

Conventions (docs/index.md has the derivations): A and G are symmetric positive
semi-definite factors of one Kronecker block G ⊗ A (torch order), kept in float32 or float64.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def finite_gram(acc: Tensor, scale: float) -> Tensor:
    """``(B,)`` flags: whether ``scale · acc[b]`` is finite, for Gram matrices ``acc[b] = XᵀX``.

    Reads only the traces: a NaN or inf in X reaches its column's diagonal entry Σ x², and a
    finite diagonal bounds every entry (|Σ x y| ≤ sqrt(Σ x² Σ y²), Cauchy-Schwarz). The
    diagonal is non-negative, so the trace is finite exactly when every diagonal entry is.
    """
    return torch.isfinite(acc.diagonal(dim1=1, dim2=2).sum(-1) * scale)


def running_average_(
    factor: Tensor, acc: Tensor, scale: float, weight: Tensor, keep: Tensor
) -> Tensor:
    """F ← (1-w) F + w · s · S in place, per block; blocks with ``keep`` False are unchanged.

    ``weight`` and ``keep`` are ``(B,)`` device tensors (w must be 0 where keep is False), so
    no value is read on the host. ``acc`` is clobbered: its rejected blocks are zeroed first,
    so that their NaN/inf cannot leak through 0 · NaN.
    """
    acc.masked_fill_(~keep.view(-1, 1, 1), 0.0)
    factor.mul_((1.0 - weight).view(-1, 1, 1))
    return factor.addcmul_(acc, (weight * scale).view(-1, 1, 1))


@dataclass
class Eigh:
    """Eigendecomposition of a stack of symmetric matrices: ``mats[i] = Q[i] diag(λ[i]) Q[i]ᵀ``.

    ``ok[i]`` is False where the decomposition failed even in float64; those entries of Q and λ
    are undefined and must not be used.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    ok: list[bool]


def eigh_psd(mats: Tensor) -> Eigh:
    """Batched eigendecomposition of ``(B, d, d)`` PSD matrices, eigenvalues clipped at 0.

    One batched call in the input dtype. Matrices for which it fails (LAPACK/cuSOLVER
    non-convergence raises for the whole batch) or returns non-finite values are retried one
    by one in float64 and cast back; those that still fail are flagged in ``ok``. This reads
    results on the host, which is acceptable: decompositions run every ``inv_update_steps``.
    """
    dtype, n = mats.dtype, mats.shape[0]
    try:
        lam, q = torch.linalg.eigh(mats)
        # Sums propagate NaN/inf and cannot overflow here (|Q_ij| <= 1): one cheap pass.
        finite = torch.isfinite(lam.sum(dim=1) + q.sum(dim=(1, 2)))
        retry = (~finite).nonzero().flatten().tolist()
    except torch.linalg.LinAlgError:
        lam = torch.full(mats.shape[:-1], float("nan"), dtype=dtype, device=mats.device)
        q = torch.full_like(mats, float("nan"))
        retry = list(range(n))
    ok = [True] * n
    for i in retry:
        try:
            li, qi = torch.linalg.eigh(mats[i].to(torch.float64))
            if not (torch.isfinite(li).all() and torch.isfinite(qi).all()):
                raise torch.linalg.LinAlgError("non-finite eigendecomposition")
        except torch.linalg.LinAlgError:
            ok[i] = False
            continue
        lam[i], q[i] = li.to(dtype), qi.to(dtype)
        logger.info("eigendecomposition %d of %d needed the float64 retry", i, n)
    return Eigh(lam.clamp_min_(0.0), q, ok)


def pi_scale(trace_a: Tensor, dim_a: int, trace_g: Tensor, dim_g: int) -> Tensor:
    """π = sqrt((tr A / dim A) / (tr G / dim G)) per block, 1 where either trace is 0.

    π balances the damping between the factors (Martens & Grosse, 2015). Computed in
    float64 so that factors of very different scales (1e±30) do not overflow the ratio.
    """
    ta = trace_a.double() / dim_a
    tg = trace_g.double() / dim_g
    ok = (ta > 0) & (tg > 0) & torch.isfinite(ta) & torch.isfinite(tg)
    ratio = torch.where(ok, ta / torch.where(ok, tg, 1.0), 1.0)
    return ratio.sqrt()


def damped_inverse(eig: Eigh, shift: Tensor) -> Tensor:
    """(M + c I)⁻¹ = Q diag(1 / (λ + c)) Qᵀ for each matrix of a stack; ``shift`` is ``(B,)``."""
    q, lam = eig.eigenvectors, eig.eigenvalues
    inv = 1.0 / (lam + shift.to(lam.dtype).unsqueeze(1))
    return (q * inv.unsqueeze(1)) @ q.transpose(1, 2)


def damped_inverses(mats: Tensor, shift: Tensor) -> tuple[Tensor, list[bool]]:
    """(M + c I)⁻¹ for a stack of PSD matrices, ``shift`` c > 0 of shape ``(B,)``.

    A batched Cholesky factorization and inverse (about d³ FLOPs per matrix, against 9d³ for
    an eigendecomposition). Matrices whose factorization fails (M + cI not numerically
    positive definite, e.g. tiny c against a huge M in float32) fall back to the eigenvalue
    route (``eigh_psd`` with its float64 retry); ``ok[i]`` is False where that fails too.
    """
    eye = torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
    damped = mats + shift.to(mats.dtype).view(-1, 1, 1) * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    inv = torch.cholesky_inverse(chol)
    failed = (info != 0) | ~torch.isfinite(inv.sum(dim=(1, 2)))
    ok = [True] * mats.shape[0]
    for i in failed.nonzero().flatten().tolist():
        eig = eigh_psd(mats[i : i + 1])
        ok[i] = eig.ok[0]
        if ok[i]:
            inv[i] = damped_inverse(eig, shift[i : i + 1])[0]
    return inv, ok


# ---------------------------------------------------------------------------- EKFAC
#
# Eigenvalue-corrected K-FAC (George et al., 2018) keeps the eigenbases Q_G, Q_A of the
# factors and replaces the eigenvalue products λ_G λ_Aᵀ of G⊗A by the exact second moment of
# the per-example gradients in that basis,
#
#     S = E_n[(Q_Gᵀ ∇_n Q_A)²]          (elementwise square; ∇_n = Σ_t δ_{n,t} ã_{n,t}ᵀ),
#
# so that the curvature is (Q_G⊗Q_A) diag(vec S) (Q_G⊗Q_A)ᵀ, whose diagonal in the Kronecker
# eigenbasis is exact where K-FAC's λ_G λ_Aᵀ is only a product of marginals.


def ekfac_initial_scale(lg: Tensor, la: Tensor) -> Tensor:
    """λ_G λ_Aᵀ per block, ``(B, g)`` × ``(B, a)`` -> ``(B, g, a)``: K-FAC's own diagonal.

    The scale of a basis that has no statistics of its own yet: with it, EKFAC preconditions
    exactly like K-FAC.
    """
    return lg.unsqueeze(2) * la.unsqueeze(1)


def ekfac_transport(
    s: Tensor, qg_old: Tensor, qa_old: Tensor, qg_new: Tensor, qa_new: Tensor
) -> Tensor:
    """The diagonal, in a new Kronecker eigenbasis, of the curvature S describes in the old one.

    The old curvature is C = (Q_G⊗Q_A) diag(vec S) (Q_G⊗Q_A)ᵀ. Its diagonal in the new basis
    (Q'_G⊗Q'_A) is, entry (i, j), Σ_kl (Q'_Gᵀ Q_G)²_ik S_kl (Q'_Aᵀ Q_A)²_jl, that is

        S' = R_G S R_Aᵀ,    R_G = (Q'_Gᵀ Q_G)⊙²,  R_A = (Q'_Aᵀ Q_A)⊙²,

    the closest (Frobenius) curvature diagonal in the new basis. Used at each basis change so
    that the running average of S carries over instead of restarting. Shapes ``(B, g, a)``,
    ``(B, g, g)``, ``(B, a, a)``.
    """
    rg = (qg_new.transpose(1, 2) @ qg_old).square_()
    ra = (qa_new.transpose(1, 2) @ qa_old).square_()
    return rg @ s @ ra.transpose(1, 2)


def eigenbasis_second_moment(
    a: Tensor, d: Tensor, qa: Tensor, qg: Tensor, *, max_elements: int = 1 << 24
) -> Tensor:
    """Σ_n (Q_Gᵀ ∇_n Q_A)² per block, ``∇_n = Σ_t d_{n,t} a_{n,t}ᵀ``, without materializing ∇_n.

    Args:
        a: ``(N, T, B, a_dim)`` inputs (with the homogeneous coordinate when there is a bias).
        d: ``(N, T, B, g_dim)`` output gradients of the same examples and positions.
        qa, qg: ``(B, a_dim, a_dim)`` and ``(B, g_dim, g_dim)`` eigenbases.
        max_elements: bound on the intermediate per-example projections (positions > 1).

    Returns:
        ``(B, g_dim, a_dim)`` in the dtype of ``qa``.

    With one position (T = 1) the projected gradient is an outer product,
    Q_Gᵀ ∇_n Q_A = (Q_Gᵀ d_n)(Q_Aᵀ a_n)ᵀ, so its square is (Q_Gᵀ d_n)²(Q_Aᵀ a_n)²ᵀ and the sum
    over examples is one product of the squared projections, (P_G²)ᵀ P_A². With shared
    positions the positions of each example are summed first (one (g × T)(T × a) product per
    example and block), in chunks of examples so that at most ``max_elements`` values are live.
    """
    n, t, b, ad = a.shape
    gd = d.shape[-1]
    dtype = qa.dtype
    # (N, T, B, k) -> (B, N·T, k) projected onto the eigenbasis: one batched product per factor.
    pa = a.to(dtype).permute(2, 0, 1, 3).reshape(b, n * t, ad) @ qa
    pd = d.to(dtype).permute(2, 0, 1, 3).reshape(b, n * t, gd) @ qg
    if t == 1:
        return pd.square().transpose(1, 2) @ pa.square()
    pa = pa.reshape(b, n, t, ad)
    pd = pd.reshape(b, n, t, gd)
    out = torch.zeros(b, gd, ad, dtype=dtype, device=a.device)
    chunk = max(1, max_elements // max(1, b * gd * ad))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        per_example = pd[:, start:stop].transpose(2, 3) @ pa[:, start:stop]  # (B, n', g, a)
        out.add_(per_example.square_().sum(dim=1))
    return out
