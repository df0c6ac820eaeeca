"""How one Kronecker factor is stored: dense, diagonal or block-diagonal, one layout for all.

A factor of width d (A over a layer's inputs, G over its output gradients) is kept as ``nb``
diagonal blocks of size ``bs`` with ``nb · bs ≥ d``; the last ``nb · bs - d`` coordinates are
zero padding. Every layout is a stack of square matrices, ``(blocks · nb, bs, bs)`` for a layer
with ``blocks`` Kronecker blocks (groups of a grouped conv):

- dense:          nb = 1, bs = d          ``(blocks, d, d)``, the full matrix;
- diagonal:       nb = d, bs = 1          ``(blocks · d, 1, 1)``, a vector of d entries;
- block-diagonal: nb = ⌈d / b⌉, bs = ⌈d / nb⌉ ≤ b, near-equal blocks of size at most b.

A factor wider than ``max_factor_dim`` is never dense: it is block-diagonal with blocks of at
most ``large_factor_block`` (1, the default, meaning diagonal), so a vocabulary-sized G never
allocates d². Some factors are diagonal by structure whatever their width: A of an embedding,
a Linear on one-hot inputs, whose Gram matrix Σ onehot onehotᵀ has no off-diagonal entry.

Keeping A (resp. G) block-diagonal means C ≈ G ⊗ A with A replaced by the block-diagonal part
of its statistics: the preconditioner then solves (G ⊗ A_bd + εI)⁻¹ exactly. Zero padding is
exact too: the padded coordinates carry no gradient and are decoupled from the real ones in
every function of the factor (its eigendecomposition, its damped inverse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .kernels import factor_stats

if TYPE_CHECKING:
    from ._decomposition import Decomposition

# Rows of a diagonal statistic processed per chunk, so that the float32 upcast of a wide
# input (e.g. output gradients over a 50257-token vocabulary) never materializes in full.
_DIAG_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class FactorSpec:
    """Storage of one factor of width ``dim`` as ``nb`` blocks of size ``bs`` (see module doc).

    Attributes:
        dim: the factor's width d (A includes the homogeneous bias coordinate).
        bs: block size; ``dim`` for a dense factor, 1 for a diagonal one.
        structural: diagonal by the layer's structure (exact), not by the size limit.
    """

    dim: int
    bs: int
    structural: bool = False

    @property
    def nb(self) -> int:
        """Number of diagonal blocks."""
        return math.ceil(self.dim / self.bs)

    @property
    def padded(self) -> int:
        """Width including the zero padding of the last blocks: nb · bs."""
        return self.nb * self.bs

    @property
    def dense(self) -> bool:
        return self.nb == 1

    @property
    def diagonal(self) -> bool:
        return self.bs == 1 and self.dim > 1

    @property
    def has_basis(self) -> bool:
        """Whether the decomposition stores eigenvectors (a diagonal factor's basis is I)."""
        return not self.diagonal

    @property
    def kind(self) -> str:
        """ "dense", "diagonal" or "block-diagonal"."""
        if self.dense:
            return "dense"
        return "diagonal" if self.bs == 1 else "block-diagonal"

    def describe(self) -> str:
        """Short description for tables: "dense", "diagonal", "13 blocks of 3866"."""
        if self.kind == "block-diagonal":
            return f"{self.nb} blocks of {self.bs}"
        return self.kind

    def shape(self, blocks: int) -> tuple[int, int, int]:
        """Storage shape of the factor for a layer with ``blocks`` Kronecker blocks."""
        return (blocks * self.nb, self.bs, self.bs)

    def numel(self, blocks: int) -> int:
        return blocks * self.nb * self.bs * self.bs

    def decomposition_numel(self, blocks: int, damping_mode: str) -> int:
        """Entries of the decomposition: eigenbasis and eigenvalues ("exact", "ekfac"), or
        damped inverse and its shift ("pi"). The EKFAC scale is counted per layer (it
        belongs to both factors).

        A diagonal factor (bs = 1) needs no eigenbasis: its eigenvalues are its entries.
        """
        stacks = blocks * self.nb
        if damping_mode != "pi":
            return stacks * self.bs + (stacks * self.bs * self.bs if self.has_basis else 0)
        return stacks * self.bs * self.bs + stacks


def plan_factor(
    dim: int,
    max_factor_dim: int | None,
    large_factor_block: int,
    structural_diagonal: bool,
    bias: bool = False,
) -> FactorSpec:
    """The storage of a factor of width ``dim`` under the size limit.

    Args:
        dim: the factor's width.
        max_factor_dim: widest dense factor (None: no limit), not counting A's bias
            coordinate: a layer with d inputs and a bias keeps its (d+1)-wide A dense for
            d <= max_factor_dim.
        large_factor_block: block size of factors wider than that (1: diagonal).
        structural_diagonal: the factor is diagonal by construction (one-hot inputs).
        bias: ``dim`` includes A's bias coordinate.
    """
    if structural_diagonal:
        return FactorSpec(dim, 1, structural=True)
    if max_factor_dim is None or dim - int(bias) <= max_factor_dim:
        return FactorSpec(dim, dim)
    nb = math.ceil(dim / large_factor_block)
    return FactorSpec(dim, math.ceil(dim / nb))


# --------------------------------------------------------------------------- statistics
def _sum_squares_(x: Tensor, out: Tensor, beta: float) -> None:
    """out ← β·out + Σ_rows x² per column, for x ``(K, rows, d)`` and out ``(K, d)``."""
    k, rows, d = x.shape
    chunk = max(1, _DIAG_CHUNK_ELEMENTS // max(1, k * d))
    if beta == 0.0:
        out.zero_()
    elif beta != 1.0:
        out.mul_(beta)
    for start in range(0, rows, chunk):
        part = x[:, start : start + chunk].to(out.dtype)
        out.add_(part.square().sum(dim=1))


def gram_(x: Tensor, out: Tensor, spec: FactorSpec, beta: float, append_ones: bool, backend: str):
    """out ← β·out + X̃ᵀX̃ restricted to the factor's blocks, X̃ = [X | 1] if ``append_ones``.

    Args:
        x: ``(K, rows, d0)`` rows of K Kronecker blocks, any float dtype (upcast here).
        out: ``spec.shape(K)`` accumulator in the factor dtype.
        spec: the factor's storage.
        beta: 0 to overwrite, 1 to add.
        append_ones: append the homogeneous coordinate (d = d0 + 1).
        backend: kernel backend of the dense path.
    """
    k = x.shape[0]
    if spec.dense:
        factor_stats(x, out, beta=beta, append_ones=append_ones, backend=backend)
        return
    if spec.bs == 1:
        vec = out.view(k, spec.dim)
        d0 = x.shape[2]
        _sum_squares_(x, vec[:, :d0], beta)
        if append_ones:
            # Σ_rows 1² = rows for the homogeneous coordinate.
            if beta == 0.0:
                vec[:, d0] = float(x.shape[1])
            else:
                vec[:, d0].add_(float(x.shape[1]))
        return
    # Block-diagonal: one padded copy of [X | 1], split into blocks, one batched Gram.
    rows, d0 = x.shape[1], x.shape[2]
    xt = torch.zeros(k, rows, spec.padded, dtype=out.dtype, device=x.device)
    xt[:, :, :d0] = x
    if append_ones:
        xt[:, :, d0] = 1.0
    xt = xt.view(k, rows, spec.nb, spec.bs).transpose(1, 2).reshape(k * spec.nb, rows, spec.bs)
    factor_stats(xt, out, beta=beta, append_ones=False, backend=backend)


def one_hot_counts_(
    indices: Tensor, out: Tensor, beta: float, approx: str, num_classes: int
) -> int:
    """Diagonal Gram of one-hot rows: out ← β·out + Σ_rows onehot², returns the row count.

    ``indices`` is ``(N, T)`` with -1 marking positions that contribute a zero vector (an
    embedding's padding_idx). "expand": each (n, t) is a row and the diagonal holds the token
    counts. "reduce": each example is a row ā_n = (1/T) Σ_t onehot(i_{n,t}) and the diagonal
    of Σ_n ā_n ā_nᵀ is Σ_n (c_{n,v}/T)² (its off-diagonal entries are dropped: the stored
    factor is the diagonal). Scatter-adds, no host synchronization.
    """
    vec = out.view(-1)
    if beta == 0.0:
        vec.zero_()
    n, t = indices.shape
    valid = indices >= 0
    safe = indices.clamp_min(0)
    if approx == "expand" or t == 1:
        vec.index_add_(0, safe.reshape(-1), valid.reshape(-1).to(vec.dtype))
        return n * t
    counts = torch.zeros(n, num_classes, dtype=vec.dtype, device=vec.device)
    counts.scatter_add_(1, safe, valid.to(vec.dtype))
    vec.add_(counts.div_(t).square_().sum(dim=0))
    return n


# --------------------------------------------------------------------------- inspection
def block_traces(factor: Tensor, spec: FactorSpec, blocks: int) -> Tensor:
    """tr F per Kronecker block, ``(blocks,)`` (padding contributes 0)."""
    return factor.diagonal(dim1=1, dim2=2).reshape(blocks, -1).sum(-1)


def to_user(factor: Tensor, spec: FactorSpec, blocks: int) -> Tensor:
    """The factor as returned by ``KFACPreconditioner.factors()`` (a copy).

    Dense: ``(blocks, d, d)``; diagonal: ``(blocks, d)``; block-diagonal: ``(blocks, nb, bs,
    bs)`` with the padding of the last block zero.
    """
    if spec.dense:
        return factor.clone()
    if spec.bs == 1:
        return factor.reshape(blocks, spec.dim).clone()
    return factor.reshape(blocks, spec.nb, spec.bs, spec.bs).clone()


# --------------------------------------------------------------------------- products
def _rotate(x: Tensor, q: Tensor | None, spec: FactorSpec, transpose: bool, left: bool) -> Tensor:
    """Q x (``left``, x ``(B, g_pad, a)``) or x Q (x ``(B, g, a_pad)``) with a block-diagonal
    Q ``(B·nb, bs, bs)`` (Qᵀ with ``transpose``); None is the identity (a diagonal factor)."""
    if q is None:
        return x
    b, g, a = x.shape
    qb = q.view(b, spec.nb, spec.bs, spec.bs)
    if transpose:
        qb = qb.transpose(-1, -2)
    if left:
        return (qb @ x.view(b, spec.nb, spec.bs, a)).view(b, spec.padded, a)
    xb = x.view(b, g, spec.nb, spec.bs).transpose(1, 2)  # (B, nb, g, bs)
    return (xb @ qb).transpose(1, 2).reshape(b, g, spec.padded)


def rotate_g(x: Tensor, q: Tensor | None, spec: FactorSpec, transpose: bool) -> Tensor:
    """Q_G x (or Q_Gᵀ x) for x ``(B, g_pad, a)``."""
    return _rotate(x, q, spec, transpose, left=True)


def rotate_a(x: Tensor, q: Tensor | None, spec: FactorSpec, transpose: bool) -> Tensor:
    """x Q_A (or x Q_Aᵀ) for x ``(B, g, a_pad)``."""
    return _rotate(x, q, spec, transpose, left=False)


def eigenvalue_products(dec: Decomposition, g_spec: FactorSpec, a_spec: FactorSpec) -> Tensor:
    """K = λ_G λ_Aᵀ per Kronecker block, ``(B, g_pad, a_pad)``: the eigenvalues of G⊗A, from
    the stored eigenvalues ``lg``, ``la`` ``(B·nb, bs)``."""
    assert dec.lg is not None and dec.la is not None
    b = dec.lg.shape[0] // g_spec.nb
    return dec.lg.reshape(b, g_spec.padded, 1) * dec.la.reshape(b, 1, a_spec.padded)


def precondition_structured_eigen(
    grads: Tensor,
    dec: Decomposition,
    g_spec: FactorSpec,
    a_spec: FactorSpec,
    damping: float | Tensor,
    scale: Tensor | None = None,
    with_form: bool = False,
    exponent: float = -1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """(G⊗A + εI)⁻¹ vec(∇) for block-diagonal (incl. diagonal) factors, in their eigenbases
    (dense factors are one block: the torch path of any ``exponent``).

    ``damping``: a number, or one ε per Kronecker block, ``(B,)``. ``exponent`` p: the
    power (G⊗A + εI)^p, -1 by default (⊘ (K + ε) below becomes ⊙ (K + ε)^p).

    ∇̃ = Q_G [(Q_Gᵀ ∇ Q_A) ⊘ (K + ε)] Q_Aᵀ with K = λ_G λ_Aᵀ, or the EKFAC scale S
    (``scale``, ``(B, g_pad, a_pad)``), and Q's block-diagonal (absent when diagonal: the
    identity). ``grads`` is ``(B, g_pad, a_pad)``; eigenvalues ``lg``, ``la`` are
    ``(B·nb, bs)`` and read as ``(B, pad)``.

    With ``with_form`` also returns the ``(B,)`` quadratic forms ∇̃ᵀ C ∇̃ = Σ_ij K_ij Ṽ_ij² of
    the undamped curvature C = (Q_G⊗Q_A) diag(vec K) (Q_G⊗Q_A)ᵀ, Ṽ = Q_Gᵀ ∇̃ Q_A (as
    ``kernels.precondition_eigen_with_form`` for dense factors).
    """
    b = grads.shape[0]
    if isinstance(damping, Tensor):
        damping = damping.view(b, 1, 1)
    qg, qa = dec.qg, dec.qa
    v = rotate_a(rotate_g(grads, qg, g_spec, transpose=True), qa, a_spec, transpose=False)
    if scale is None:
        assert dec.lg is not None and dec.la is not None
        k = eigenvalue_products(dec, g_spec, a_spec)  # a (B, g, a) temporary, then in place
        denominator = k + damping if with_form else k.add_(damping)
    else:
        k = scale
        denominator = scale + damping
    if exponent != -1.0:
        # a fresh tensor in every branch above (k itself only when it is a temporary)
        denominator = denominator.pow_(exponent)
        v = v.mul_(denominator) if v is not grads else v * denominator
    else:
        v = v.div_(denominator) if v is not grads else v / denominator
    out = rotate_a(rotate_g(v, qg, g_spec, transpose=False), qa, a_spec, transpose=True)
    if not with_form:
        return out
    return out, (k * v.square()).sum(dim=(1, 2))


def precondition_eigen_adam(
    grads: Tensor,
    dec: Decomposition,
    g_spec: FactorSpec,
    a_spec: FactorSpec,
    damping: float,
    relative: bool,
    decay: float,
    exponent: float,
    with_form: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """damping_mode="eigen_adam": the gradient in the factors' eigenbasis, V = Q_Gᵀ ∇ Q_A,
    scaled by Adam's second moment of it, then rotated back:

        S ← β S + (1 - β) V⊙V,   Ŝ = S / (1 - βⁿ),   ∇̃ = Q_G [V ⊙ (Ŝ + ε)^p] Q_Aᵀ,

    updated in place in ``dec`` (``s``, and the count ``n`` per block; a block whose gradient
    is not finite keeps both). ε is ``damping``, or
    with ``relative`` ``damping`` times the mean of Ŝ over the block. With p = -1/2 this is
    an Adam step (without its momentum) in K-FAC's eigenbasis. With ``with_form`` also the
    ``(B,)`` forms Σ_ij K_ij Ṽ_ij² of K-FAC's curvature K = λ_G λ_Aᵀ.
    """
    s, n = dec.s, dec.n
    assert s is not None and n is not None
    b = grads.shape[0]
    v = rotate_a(rotate_g(grads, dec.qg, g_spec, transpose=True), dec.qa, a_spec, transpose=False)
    updated = torch.addcmul(s * decay, v, v, value=1.0 - decay)
    # A block whose gradient is not finite (a loss-scale overflow) leaves its moment as it was,
    # decided on the device from the largest entry of its update (it propagates NaN; a square
    # beyond the dtype's range counts as not finite too): one inf would otherwise stay in S.
    finite = torch.isfinite(updated.amax(dim=(1, 2)))
    torch.where(finite.view(b, 1, 1), updated, s, out=s)
    n.add_(finite.to(n.dtype))
    unbias = (1.0 - torch.pow(decay, n)).clamp_min(1e-30).reciprocal_()  # Ŝ = S · unbias
    eps: float | Tensor = damping
    if relative:
        mean = s.mean(dim=(1, 2)) * unbias
        eps = damping * torch.where((mean > 0) & torch.isfinite(mean), mean, 1.0).view(b, 1, 1)
    denominator = torch.mul(s, unbias.view(b, 1, 1), out=updated).add_(eps)  # Ŝ + ε
    denominator = denominator.rsqrt_() if exponent == -0.5 else denominator.pow_(exponent)
    v = v.mul_(denominator) if v is not grads else v * denominator
    out = rotate_a(rotate_g(v, dec.qg, g_spec, transpose=False), dec.qa, a_spec, transpose=True)
    if not with_form:
        return out
    k = eigenvalue_products(dec, g_spec, a_spec)
    return out, (k * v.square()).sum(dim=(1, 2))


def _inverse_g(x: Tensor, ig: Tensor, spec: FactorSpec) -> Tensor:
    """(G + c_G I)⁻¹ x for x ``(B, g_pad, a)`` and a stored block-diagonal damped inverse."""
    if spec.bs == 1:
        return x * ig.reshape(x.shape[0], spec.padded, 1)
    return rotate_g(x, ig, spec, transpose=False)


def _inverse_a(x: Tensor, ia: Tensor, spec: FactorSpec) -> Tensor:
    """x (A + c_A I)⁻¹ for x ``(B, g, a_pad)`` (the inverse is symmetric: x Iᵀ = x I)."""
    if spec.bs == 1:
        return x * ia.reshape(x.shape[0], 1, spec.padded)
    return rotate_a(x, ia, spec, transpose=False)


def precondition_structured_inverse(
    grads: Tensor, dec: Decomposition, g_spec: FactorSpec, a_spec: FactorSpec
) -> Tensor:
    """(G + c_G I)⁻¹ ∇ (A + c_A I)⁻¹ with block-diagonal (incl. diagonal) damped inverses."""
    assert dec.ig is not None and dec.ia is not None
    return _inverse_a(_inverse_g(grads, dec.ig, g_spec), dec.ia, a_spec)


def precondition_inverse_with_form(
    grads: Tensor, dec: Decomposition, g_spec: FactorSpec, a_spec: FactorSpec
) -> tuple[Tensor, Tensor]:
    """∇̃ = (G + c_G I)⁻¹ ∇ (A + c_A I)⁻¹ and ⟨∇̃, G ∇̃ A⟩ per block, any factor storage.

    With R = ∇ (A + c_A)⁻¹ and L = (G + c_G)⁻¹ ∇, ∇̃ = (G + c_G)⁻¹ R = L (A + c_A)⁻¹, hence
    G ∇̃ = R - c_G ∇̃ and ∇̃ A = L - c_A ∇̃, and by symmetry of G

        ⟨∇̃, G ∇̃ A⟩ = tr(∇̃ᵀ G ∇̃ A) = ⟨R - c_G ∇̃, L - c_A ∇̃⟩,

    with G and A as stored (their block-diagonal parts). The chain needs one of R, L; the
    form needs both, so one product more than ``precondition_structured_inverse`` (and than
    ``kernels.precondition_factored``): the cheaper of the two is done twice. The factors
    themselves are not needed, only the inverses and the shifts c_G, c_A (``cg``, ``ca``,
    one per stored block, equal within a Kronecker block).
    """
    b = grads.shape[0]
    ig, ia, cg_, ca_ = dec.ig, dec.ia, dec.cg, dec.ca
    assert ig is not None and ia is not None and cg_ is not None and ca_ is not None
    right = _inverse_a(grads, ia, a_spec)  # R
    left = _inverse_g(grads, ig, g_spec)  # L
    if g_spec.padded <= a_spec.padded:
        out = _inverse_g(right, ig, g_spec)
    else:
        out = _inverse_a(left, ia, a_spec)
    cg = cg_.reshape(b, g_spec.nb)[:, :1].unsqueeze(2)
    ca = ca_.reshape(b, a_spec.nb)[:, :1].unsqueeze(2)
    form = ((right - cg * out) * (left - ca * out)).sum(dim=(1, 2))
    return out, form
