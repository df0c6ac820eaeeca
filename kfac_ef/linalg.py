"""Pure-torch math of kfac_ef: running averages, eigendecompositions with fallbacks, damping.

Conventions (docs/math.md has the derivations): A and G are symmetric positive
semi-definite factors of one Kronecker block G ⊗ A (torch order), kept in float32 or float64.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def finite_gram(acc: Tensor, scale: float | Tensor) -> Tensor:
    """``(B,)`` flags: whether ``scale · acc[b]`` is finite, for Gram matrices ``acc[b] = XᵀX``.

    Reads only the traces: a NaN or inf in X reaches its column's diagonal entry Σ x², and a
    finite diagonal bounds every entry (|Σ x y| ≤ sqrt(Σ x² Σ y²), Cauchy-Schwarz). The
    diagonal is non-negative, so the trace is finite exactly when every diagonal entry is.
    """
    return torch.isfinite(acc.diagonal(dim1=1, dim2=2).sum(-1) * scale)


def running_average_(
    factor: Tensor, acc: Tensor, scale: float | Tensor, weight: Tensor, keep: Tensor
) -> Tensor:
    """F ← (1-w) F + w · s · S in place, per block; blocks with ``keep`` False are unchanged.

    ``scale`` is a number or a 0-d device tensor (a loss scale folded in without reading it).

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


def damped_inverse(eig: Eigh, shift: Tensor, exponent: float = -1.0) -> Tensor:
    """(M + c I)^p = Q diag((λ + c)^p) Qᵀ for each matrix of a stack (p = -1 by default: the
    damped inverse); ``shift`` is ``(B,)``."""
    q, lam = eig.eigenvectors, eig.eigenvalues
    inv = (lam + shift.to(lam.dtype).unsqueeze(1)).pow(exponent)
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
    factored = (info == 0).view(-1, 1, 1)
    # A failed factorization leaves a partial factor with a zero or NaN pivot, on which
    # cholesky_inverse raises for the whole stack: invert the identity there instead, and
    # take those matrices by the eigenvalue route below.
    inv = torch.cholesky_inverse(torch.where(factored, chol, eye))
    failed = ~factored.view(-1) | ~torch.isfinite(inv.sum(dim=(1, 2)))
    ok = [True] * mats.shape[0]
    for i in failed.nonzero().flatten().tolist():
        eig = eigh_psd(mats[i : i + 1])
        ok[i] = eig.ok[0]
        if ok[i]:
            inv[i] = damped_inverse(eig, shift[i : i + 1])[0]
    return inv, ok


def describe(mats: Tensor) -> str:
    """A one-line statistical summary of a ``(B, d, d)`` factor stack, for error messages:
    what made its decomposition fail is usually visible here (non-finite entries, a scale
    near the dtype's limits, asymmetry). Reads values on the host."""
    m = mats.detach().to(torch.float64)
    finite = torch.isfinite(m)
    bad = int((~finite).sum())
    m = torch.where(finite, m, 0.0)
    diag = m.diagonal(dim1=-2, dim2=-1)
    asym = (m - m.transpose(-2, -1)).abs().amax() if m.numel() else m.new_zeros(())
    return (
        f"{tuple(mats.shape)} {str(mats.dtype).removeprefix('torch.')}, "
        f"{bad} non-finite entries, trace {float(diag.sum()):.3e}, diagonal in "
        f"[{float(diag.amin()):.3e}, {float(diag.amax()):.3e}], max |entry| "
        f"{float(m.abs().amax()):.3e}, max asymmetry {float(asym):.3e}"
    )
