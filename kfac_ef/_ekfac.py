"""EKFAC: the exact second moment S in the Kronecker eigenbasis (George et al., 2018).

Eigenvalue-corrected K-FAC keeps the eigenbases Q_G, Q_A of a layer's factors and replaces
the eigenvalue products λ_G λ_Aᵀ of G⊗A by the second moment of the per-example gradients in
that basis,

    S = E_n[(Q_Gᵀ ∇_n Q_A)²]          (elementwise square; ∇_n = Σ_t δ_{n,t} ã_{n,t}ᵀ),

so that the curvature is (Q_G⊗Q_A) diag(vec S) (Q_G⊗Q_A)ᵀ, whose diagonal in the Kronecker
eigenbasis is exact where K-FAC's λ_G λ_Aᵀ is only a product of marginals.

Every factor storage of _factors.py works the same way, because each is a stack of blocks:
a block-diagonal factor has block-diagonal eigenbases (one per block), a diagonal factor has
the identity as its eigenbasis (its eigenvalues are its entries). S is stored per Kronecker
block as ``(blocks, g_pad, a_pad)`` over the padded widths (padding carries no gradient: its
entries of S are 0). With both factors diagonal, S is the diagonal empirical Fisher of the
layer's weight matrix.

All functions are pure torch on the device, without host synchronization.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from ._decomposition import Decomposition
from ._factors import FactorSpec, rotate_a, rotate_g
from .layers import Inputs, OneHotInputs

# Bound on the per-example projected gradients live at once (shared positions).
MAX_ELEMENTS = 1 << 24

Record = tuple[Inputs, Tensor, int]
"""One call of a layer as observed: inputs ``(N, T, blocks, a_dim0)`` (or one-hot indices),
output gradients ``(N, T, blocks, g_dim)``, and the pass it belongs to."""


def transport(
    s: Tensor,
    old: Decomposition,
    new: Decomposition,
    g_spec: FactorSpec,
    a_spec: FactorSpec,
) -> Tensor:
    """The diagonal, in a new Kronecker eigenbasis, of the curvature S describes in the old one.

    The old curvature is C = (Q_G⊗Q_A) diag(vec S) (Q_G⊗Q_A)ᵀ. Its diagonal in the new basis
    (Q'_G⊗Q'_A) is, entry (i, j), Σ_kl (Q'_Gᵀ Q_G)²_ik S_kl (Q'_Aᵀ Q_A)²_jl, that is

        S' = R_G S R_Aᵀ,    R_G = (Q'_Gᵀ Q_G)⊙²,  R_A = (Q'_Aᵀ Q_A)⊙²,

    the closest (Frobenius) curvature diagonal in the new basis. Used at each basis change so
    that the running average of S carries over instead of restarting. With block-diagonal
    bases R is block-diagonal too; a diagonal factor's basis is the identity (R = I).
    """
    out = s
    if new.qg is not None and old.qg is not None:
        rg = (new.qg.transpose(1, 2) @ old.qg).square_()
        out = rotate_g(out, rg, g_spec, transpose=False)
    if new.qa is not None and old.qa is not None:
        ra = (new.qa.transpose(1, 2) @ old.qa).square_()
        out = rotate_a(out, ra, a_spec, transpose=True)
    return out if out is not s else s.clone()


def _pad_last(x: Tensor, width: int) -> Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _project(rows: Tensor, q: Tensor | None, spec: FactorSpec) -> Tensor:
    """Rows ``(B, R, d)`` in the eigenbasis: ``x Q`` blockwise over the padded width."""
    return rotate_a(_pad_last(rows, spec.padded), q, spec, transpose=False)


def _per_pass(records: list[Record]) -> list[tuple[Inputs, Tensor]]:
    """The calls of one step grouped per pass (the same N examples), concatenated along
    positions: a module applied several times in one pass sums its calls per example. Calls
    of one pass with different batch sizes stay apart (the statistics warn about them)."""
    by_pass: dict[int, list[tuple[Inputs, Tensor]]] = defaultdict(list)
    for inputs, grads, pass_id in records:
        by_pass[pass_id].append((inputs, grads))
    out: list[tuple[Inputs, Tensor]] = []
    for items in by_pass.values():
        if len(items) == 1 or len({x.shape[0] for x, _ in items}) != 1:
            out.extend(items)
            continue
        grads = torch.cat([g for _, g in items], 1)
        first = items[0][0]
        if isinstance(first, OneHotInputs):
            idx = [x.indices for x, _ in items if isinstance(x, OneHotInputs)]
            out.append((OneHotInputs(torch.cat(idx, 1), first.num_classes), grads))
        else:
            dense = [x for x, _ in items if isinstance(x, Tensor)]
            out.append((torch.cat(dense, 1), grads))
    return out


def batch_second_moment(
    records: list[Record],
    has_bias: bool,
    qg: Tensor | None,
    qa: Tensor | None,
    g_spec: FactorSpec,
    a_spec: FactorSpec,
    dtype: torch.dtype,
) -> tuple[Tensor, int]:
    """Σ_n (Q_Gᵀ ∇̂_n Q_A)² per Kronecker block and the number of examples n, from the calls
    of one step, with ∇̂_n = Σ_t γ_{n,t} ã_{n,t}ᵀ the observed gradient of example n (summed
    over its positions and its calls of one pass), never materialized for one position.

    With one position (T = 1) the projected gradient is an outer product,
    Q_Gᵀ ∇̂_n Q_A = (Q_Gᵀ γ_n)(Q_Aᵀ ã_n)ᵀ, so the sum over examples is one product of the
    squared projections, (P_G²)ᵀ P_A². With shared positions each example's projected
    gradient P_G,nᵀ P_A,n is formed (in chunks of at most ``MAX_ELEMENTS`` values) and
    squared. One-hot inputs (an embedding: Q_A = I) add each example's projected output
    gradients per token, then square them into the token's column.

    Returns:
        ``(blocks, g_pad, a_pad)`` in ``dtype`` and the example count (summed over passes).
    """
    total: Tensor | None = None
    examples = 0
    for inputs, grads in _per_pass(records):
        n, t, b, _ = grads.shape
        pg = _project(grads.to(dtype).permute(2, 0, 1, 3).reshape(b, n * t, -1), qg, g_spec)
        if isinstance(inputs, OneHotInputs):
            part = _one_hot_moment(inputs, pg.view(b, n, t, -1), a_spec.padded)
        else:
            a = inputs.to(dtype)
            if has_bias:
                a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
            pa = _project(a.permute(2, 0, 1, 3).reshape(b, n * t, -1), qa, a_spec)
            part = _positions_moment(pg, pa, n, t)
        total = part if total is None else total.add_(part)
        examples += n
    assert total is not None
    return total, examples


def _positions_moment(pg: Tensor, pa: Tensor, n: int, t: int) -> Tensor:
    """Σ_n (Σ_t p_G,t p_A,tᵀ)² from projected rows ``(B, N·T, g)`` and ``(B, N·T, a)``."""
    if t == 1:
        return pg.square().transpose(1, 2) @ pa.square()
    b, _, gd = pg.shape
    ad = pa.shape[-1]
    pg4, pa4 = pg.view(b, n, t, gd), pa.view(b, n, t, ad)
    out = pg.new_zeros(b, gd, ad)
    chunk = max(1, MAX_ELEMENTS // max(1, b * gd * ad))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        per_example = pg4[:, start:stop].transpose(2, 3) @ pa4[:, start:stop]  # (B, n', g, a)
        out.add_(per_example.square_().sum(dim=1))
    return out


def _one_hot_moment(inputs: OneHotInputs, pg: Tensor, a_pad: int) -> Tensor:
    """Σ_n Σ_v (Σ_{t: i_{n,t} = v} p_G,n,t)² into column v, for projected output gradients
    ``pg`` ``(B, N, T, g)`` and indices ``(N, T)`` (-1: a zero input, e.g. padding_idx).

    The positions of one example with the same token are added up by sorting the keys
    n·V + v and summing segments of equal keys (index_add into segment slots): no host
    synchronization, O(N·T·g) memory.
    """
    b, n, t, gd = pg.shape
    idx = inputs.indices.reshape(-1)
    valid = idx >= 0
    v = inputs.num_classes
    example = torch.arange(n, device=idx.device).repeat_interleave(t)
    keys = torch.where(valid, example * v + idx.clamp_min(0), -1)
    keys, order = torch.sort(keys, stable=True)
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    segment = torch.cumsum(first, 0) - 1
    rows = pg.reshape(b, n * t, gd)[:, order] * valid[order].to(pg.dtype).view(1, -1, 1)
    sums = pg.new_zeros(b, n * t, gd).index_add_(1, segment, rows)
    token = torch.zeros_like(keys).scatter_(0, segment, keys.clamp_min(0) % v)
    out = pg.new_zeros(b, gd, a_pad)
    return out.index_add_(2, token, sums.square_().transpose(1, 2))


def scale_numel(blocks: int, g_spec: FactorSpec, a_spec: FactorSpec) -> int:
    """Entries of S for a layer: one padded g × a matrix per Kronecker block."""
    return blocks * g_spec.padded * a_spec.padded


__all__ = [
    "MAX_ELEMENTS",
    "Record",
    "batch_second_moment",
    "scale_numel",
    "transport",
]
