"""Ground truth and error bounds shared by the kernel tests (no kfac_ef code here).

The bound follows the usual rule for reduced-precision kernels: against a float64 result
computed from the same (rounded) inputs, the kernel's error may be at most twice the error
of plain torch at the kernel's precision, plus a small absolute slack.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gram_truth(x: Tensor, f0: Tensor, alpha: float, beta: float, append_ones: bool) -> Tensor:
    """β F0 + α X̃ᵀX̃ in float64, with the ones column concatenated explicitly."""
    xd = x.double()
    if append_ones:
        xd = torch.cat([xd, torch.ones_like(xd[..., :1])], dim=-1)
    gram = xd.transpose(1, 2) @ xd
    return alpha * gram if beta == 0.0 else beta * f0.double() + alpha * gram


def gram_torch(x: Tensor, f0: Tensor, alpha: float, beta: float, append_ones: bool) -> Tensor:
    """The same in float32 with plain torch ops: the error scale of a float32 kernel."""
    xf = x.float()
    if append_ones:
        xf = torch.cat([xf, torch.ones_like(xf[..., :1])], dim=-1)
    gram = xf.transpose(1, 2) @ xf
    return alpha * gram if beta == 0.0 else beta * f0.float() + alpha * gram


def eigen_truth(
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float,
    scale: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Q_G [(Q_Gᵀ ∇ Q_A) ⊘ (λ_G λ_Aᵀ + ε)] Q_Aᵀ (or ⊘ (S + ε)) in ``dtype``, term by term."""
    g, qg, lg, qa, la = (t.to(dtype) for t in (grad, qg, lg, qa, la))
    v = torch.matmul(torch.matmul(qg.transpose(1, 2), g), qa)
    denom = lg[:, :, None] * la[:, None, :] if scale is None else scale.to(dtype)
    v = v / (denom + damping)
    return torch.matmul(torch.matmul(qg, v), qa.transpose(1, 2))


def eigenbasis(
    b: int, n: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Eigenvectors and eigenvalues of b random PSD n × n matrices (float32)."""
    x = torch.randn(b, n, 2 * n + 1, generator=generator, dtype=torch.float64)
    lam, q = torch.linalg.eigh(x @ x.transpose(1, 2) / (2 * n + 1))
    return q.float(), lam.clamp_min(0).float()


def ill_conditioned_eigenbasis(
    b: int, n: int, lo: float = 1e-8, hi: float = 1e2, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Eigenvectors and eigenvalues of b factors Q diag(λ) Qᵀ (float32): Q random orthogonal
    (QR of a Gaussian matrix, in float64), λ spread log-uniformly over [lo, hi] in a random
    order. Their eigenbasis is (Q, λ), up to the rounding of Q to float32 (the ground truth is
    computed from the rounded values, so it does not matter)."""
    x = torch.randn(b, n, n, generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(x)[0]
    lam = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)
    order = torch.argsort(torch.rand(b, n, generator=generator), dim=1)
    return q.float(), lam[order].float()


def assert_within_bound(got: Tensor, torch_result: Tensor, truth: Tensor, rel_atol: float) -> None:
    """max |got - truth| <= 2 max |torch_result - truth| + rel_atol · max |truth|, all finite."""
    assert torch.isfinite(got).all(), "non-finite values (an element left unwritten?)"
    err = (got.double() - truth).abs().max().item()
    ref_err = (torch_result.double() - truth).abs().max().item()
    atol = rel_atol * max(truth.abs().max().item(), 1.0)
    assert err <= 2 * ref_err + atol, f"error {err:.3e} > 2 x torch's {ref_err:.3e} + {atol:.1e}"
