"""Factor statistics: F ← β·F + α·X̃ᵀX̃, with X̃ = [X | 1] when ``append_ones``.

X is ``(batch, rows, d)`` in float32, bfloat16 or float16; F is ``(batch, d', d')`` in float32
or float64 with d' = d + 1 when the homogeneous ones column is appended, else d. The product
accumulates in F's dtype. The loss-reduction scale and the running-average weights are
folded into α and β by the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import use_triton


def _check(x: Tensor, out: Tensor, append_ones: bool) -> None:
    if x.dim() != 3 or out.dim() != 3:
        raise ValueError(
            f"factor_stats expects x (B, rows, d) and out (B, d', d'); got "
            f"{tuple(x.shape)} and {tuple(out.shape)}"
        )
    d = x.shape[2] + (1 if append_ones else 0)
    if out.shape != (x.shape[0], d, d):
        raise ValueError(
            f"factor_stats: out has shape {tuple(out.shape)}, expected "
            f"{(x.shape[0], d, d)} for x of shape {tuple(x.shape)}"
        )
    if not out.dtype.is_floating_point or out.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"factor_stats: out must be float32 or float64, got {out.dtype}")
    if x.device != out.device:
        raise ValueError(f"factor_stats: x on {x.device} but out on {out.device}")


def factor_stats_reference(
    x: Tensor, out: Tensor, *, alpha: float, beta: float, append_ones: bool
) -> Tensor:
    """Pure-torch reference, in place on ``out``.

    The ones column is never materialized: X̃ᵀX̃ = [[XᵀX, Xᵀ1], [1ᵀX, rows]], so the product
    goes into the leading block (a strided view) and the column sums into the border.
    With β = 0, baddbmm ignores out's old values (NaN/inf in them do not propagate).
    """
    xf = x.to(out.dtype)
    d = xf.shape[-1]
    out[:, :d, :d].baddbmm_(xf.transpose(1, 2), xf, beta=beta, alpha=alpha)
    if append_ones:
        border = xf.sum(dim=1).mul_(alpha)
        rows = float(xf.shape[1]) * alpha
        if beta == 0.0:
            out[:, :d, d] = border
            out[:, d, :d] = border
            out[:, d, d] = rows
        else:
            out[:, :d, d].mul_(beta).add_(border)
            out[:, d, :d].mul_(beta).add_(border)
            out[:, d, d].mul_(beta).add_(rows)
    return out


def factor_stats(
    x: Tensor,
    out: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    append_ones: bool = False,
    backend: str = "auto",
) -> Tensor:
    """F ← β·F + α·X̃ᵀX̃ in place on ``out``; returns ``out``. See the module docstring."""
    _check(x, out, append_ones)
    if use_triton(backend, x.device):
        raise NotImplementedError("Triton factor_stats kernel is not part of this version")
    return factor_stats_reference(x, out, alpha=alpha, beta=beta, append_ones=append_ones)
