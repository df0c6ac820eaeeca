"""Eigenbasis preconditioning of Kronecker-factored blocks.

For each block b of a batch: with A = Q_A diag(λ_A) Q_Aᵀ, G = Q_G diag(λ_G) Q_Gᵀ and the
gradient matrix ∇ (g_dim × a_dim, torch order), computes

    V = Q_Gᵀ ∇ Q_A,   V ⊘= (λ_G λ_Aᵀ + ε)   (or  V ⊘= (S + ε)  when a scale matrix S is given),
    result = Q_G V Q_Aᵀ,

which is (G⊗A + εI)⁻¹ vec(∇) (resp. the eigenvalue-corrected form) without forming G⊗A.
"""

from __future__ import annotations

from torch import Tensor

from ._dispatch import use_triton


def _check(grad: Tensor, qg: Tensor, lg: Tensor, qa: Tensor, la: Tensor) -> None:
    b, m, n = grad.shape
    expected = {"qg": (b, m, m), "lg": (b, m), "qa": (b, n, n), "la": (b, n)}
    for name, t in {"qg": qg, "lg": lg, "qa": qa, "la": la}.items():
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"precondition_eigen: {name} has shape {tuple(t.shape)}, expected "
                f"{expected[name]} for a gradient batch of shape {(b, m, n)}"
            )


def precondition_eigen_reference(
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float,
    scale: Tensor | None = None,
) -> Tensor:
    """Pure-torch reference: four batched products and one fused division."""
    v = qg.transpose(1, 2) @ grad @ qa
    v.div_((lg.unsqueeze(2) * la.unsqueeze(1)).add_(damping) if scale is None else scale + damping)
    return qg @ v @ qa.transpose(1, 2)


def precondition_eigen(
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float,
    scale: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Precondition a batch of same-shaped blocks in the Kronecker eigenbasis.

    Args:
        grad: ``(B, m, n)`` gradient matrices, in the dtype of the factors.
        qg, lg: eigenvectors ``(B, m, m)`` and eigenvalues ``(B, m)`` of G.
        qa, la: eigenvectors ``(B, n, n)`` and eigenvalues ``(B, n)`` of A.
        damping: ε added to every eigenvalue product (or to S).
        scale: optional ``(B, m, n)`` matrix S replacing λ_G λ_Aᵀ (EKFAC).
        backend: "auto", "torch" or "triton".

    Returns:
        A new ``(B, m, n)`` tensor.
    """
    _check(grad, qg, lg, qa, la)
    if use_triton(backend, grad.device):
        raise NotImplementedError("Triton precondition_eigen kernel is not part of this version")
    return precondition_eigen_reference(grad, qg, lg, qa, la, damping, scale)
