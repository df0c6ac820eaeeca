"""Factor statistics: F ← β·F + α·X̃ᵀX̃, with X̃ = [X | 1] when ``append_ones``.

X is ``(batch, rows, d)`` in float32, bfloat16 or float16, any strides; F is
``(batch, d', d')`` in float32 or float64 with d' = d + 1 when the homogeneous ones column is
appended, else d. The loss-reduction scale and the running-average weights are folded into
α and β by the caller.

The Triton kernel (float32 F) computes X̃ᵀX̃ as one GEMM-like pass per tile of the upper
triangle of tiles only, and mirrors each tile into the lower triangle: half the FLOPs of the
full product. It reads X in its own dtype (no upcast copy) and accumulates in float32.
The ones column is never materialized: its entries of X̃ᵀX̃ are the column sums Xᵀ1 and the
row count, X̃ᵀX̃ = [[XᵀX, Xᵀ1], [1ᵀX, rows]]; the program of each diagonal tile sums its
columns while it streams them, and the program of the last one writes the corner.
When there are too few tiles to fill the GPU (d small, rows large), the rows are split
among several programs per tile (split-K) whose partial tiles a second, small kernel adds in
a fixed order (deterministic results, no atomics) before applying α, β and the mirror.

float64 F, and every F off the GPU, is computed in torch (cuBLAS/BLAS products): factors
at least ``TRIANGLE_MIN_DIM`` wide as row strips of the upper triangle mirrored into the lower
one (about 5/8 of the full product's FLOPs for four strips), narrower ones as one product.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from . import _dispatch
from ._dispatch import batch_chunks, device_guard, interpreter_enabled, multiprocessors, triton_mode
from ._guard import TF32_EPS, Job, PartialLaunchError, pick, run

# ---------------------------------------------------------------------------------- kernel
# The jitted functions are built on first use so that importing kfac_ef never imports
# triton. They are bound as module globals (``global`` below) because Triton resolves the
# names a kernel uses (``tl``, helper functions) through the module's globals.
tl: Any = None


@functools.cache
def _build() -> SimpleNamespace:
    global tl, _tile_coords, _gram_tile, _store_gram_tile
    global _factor_stats_kernel, _factor_stats_reduce_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_coords(t):
        # Program t covers tile (ti, tj), ti <= tj, enumerating the triangle column by column:
        # t = tj (tj + 1) / 2 + ti. Consecutive programs share the column strip tj (L2 reuse).
        tj = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        # The float square root can be off by one for large t; correct it exactly.
        tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)
        tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)
        ti = t - tj * (tj + 1) // 2
        return ti, tj

    @triton.jit
    def _gram_tile(
        x_ptr,
        k_start,
        k_end,
        d,
        stride_xr,
        stride_xd,
        offs_i,
        offs_j,
        WITH_SUM: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        # acc[i, j] = Σ_k X[k, i] X[k, j] over rows k_start <= k < k_end; with WITH_SUM also
        # colsum[j] = Σ_k X[k, j]. Out-of-range rows and columns load as 0.
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        colsum = tl.zeros((BLOCK,), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + (k_start + offs_k)[:, None] * stride_xr + offs_i[None, :] * stride_xd
        b_ptrs = x_ptr + (k_start + offs_k)[:, None] * stride_xr + offs_j[None, :] * stride_xd
        mask_i = offs_i[None, :] < d
        mask_j = offs_j[None, :] < d
        for k in range(k_start, k_end, BLOCK_K):
            mask_k = (k + offs_k)[:, None] < k_end
            a = tl.load(a_ptrs, mask=mask_k & mask_i, other=0.0)
            b = tl.load(b_ptrs, mask=mask_k & mask_j, other=0.0)
            if WITH_SUM:
                colsum += tl.sum(b.to(tl.float32), axis=0)
            if DOT_FP32:
                # Only under Triton's CPU interpreter, whose tl.dot misreads bfloat16 operands
                # (it stores them as raw uint16): products of 16-bit floats are exact in
                # float32, so this computes the same values as the 16-bit dot on a GPU.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_xr
            b_ptrs += BLOCK_K * stride_xr
        return acc, colsum

    @triton.jit
    def _store_gram_tile(
        out_ptr,
        acc,
        colsum,
        ti,
        tj,
        last_tile,
        d,
        rows,
        stride_or,
        stride_oc,
        alpha,
        beta,
        APPEND_ONES: tl.constexpr,
        BETA_ZERO: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # F[i, j] and F[j, i] ← β F + α acc[i, j] for i <= j; on a diagonal tile the lower
        # half comes from the upper one, so F is exactly symmetric.
        offs_i = ti * BLOCK + tl.arange(0, BLOCK)
        offs_j = tj * BLOCK + tl.arange(0, BLOCK)
        ii = offs_i[:, None]
        jj = offs_j[None, :]
        inside = (ii < d) & (jj < d)
        upper_mask = inside & (ii <= jj)
        lower_mask = inside & (ii < jj)
        upper_ptrs = out_ptr + ii * stride_or + jj * stride_oc
        lower_ptrs = out_ptr + jj * stride_or + ii * stride_oc
        val = alpha * acc
        if BETA_ZERO:
            # β = 0 overwrites: old values (possibly NaN) are never read.
            tl.store(upper_ptrs, val, mask=upper_mask)
            tl.store(lower_ptrs, val, mask=lower_mask)
        else:
            old_up = tl.load(upper_ptrs, mask=upper_mask, other=0.0)
            tl.store(upper_ptrs, beta * old_up + val, mask=upper_mask)
            old_lo = tl.load(lower_ptrs, mask=lower_mask, other=0.0)
            tl.store(lower_ptrs, beta * old_lo + val, mask=lower_mask)
        if APPEND_ONES:  # noqa: SIM102 (constexpr branch around a run-time one)
            if ti == tj:
                border = alpha * colsum
                m = offs_j < d
                col_ptrs = out_ptr + offs_j * stride_or + d * stride_oc
                row_ptrs = out_ptr + d * stride_or + offs_j * stride_oc
                if BETA_ZERO:
                    tl.store(col_ptrs, border, mask=m)
                    tl.store(row_ptrs, border, mask=m)
                else:
                    tl.store(col_ptrs, beta * tl.load(col_ptrs, mask=m, other=0.0) + border, mask=m)
                    tl.store(row_ptrs, beta * tl.load(row_ptrs, mask=m, other=0.0) + border, mask=m)
                if ti == last_tile:
                    # The corner Σ 1·1 = rows, written as a one-element masked vector.
                    first = tl.arange(0, BLOCK) == 0
                    corner_ptrs = out_ptr + d * stride_or + d * stride_oc + tl.arange(0, BLOCK)
                    corner = tl.zeros((BLOCK,), dtype=tl.float32) + alpha * rows
                    if not BETA_ZERO:
                        corner += beta * tl.load(corner_ptrs, mask=first, other=0.0)
                    tl.store(corner_ptrs, corner, mask=first)

    @triton.jit
    def _factor_stats_kernel(
        x_ptr,
        out_ptr,
        part_ptr,
        psum_ptr,
        rows,
        d,
        rows_per_split,
        stride_xb,
        stride_xr,
        stride_xd,
        stride_ob,
        stride_or,
        stride_oc,
        alpha,
        beta,
        APPEND_ONES: tl.constexpr,
        BETA_ZERO: tl.constexpr,
        PARTIAL: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        # grid = (tiles of the upper triangle, batch, row splits)
        t = tl.program_id(0)
        b = tl.program_id(1)
        s = tl.program_id(2)
        ti, tj = _tile_coords(t)
        x_ptr += b.to(tl.int64) * stride_xb
        k_start = s * rows_per_split
        k_end = tl.minimum(k_start + rows_per_split, rows)
        offs_i = ti * BLOCK + tl.arange(0, BLOCK)
        offs_j = tj * BLOCK + tl.arange(0, BLOCK)
        # Only diagonal tiles sum columns (one program per column strip); the others run
        # the plain loop. The branch is uniform per program.
        if APPEND_ONES:
            if ti == tj:
                acc, colsum = _gram_tile(
                    x_ptr, k_start, k_end, d, stride_xr, stride_xd, offs_i, offs_j,
                    True, BLOCK, BLOCK_K, DOT_FP32, INPUT_PRECISION,
                )  # fmt: skip
            else:
                acc, colsum = _gram_tile(
                    x_ptr, k_start, k_end, d, stride_xr, stride_xd, offs_i, offs_j,
                    False, BLOCK, BLOCK_K, DOT_FP32, INPUT_PRECISION,
                )  # fmt: skip
        else:
            acc, colsum = _gram_tile(
                x_ptr, k_start, k_end, d, stride_xr, stride_xd, offs_i, offs_j,
                False, BLOCK, BLOCK_K, DOT_FP32, INPUT_PRECISION,
            )  # fmt: skip
        n_tiles = tl.cdiv(d, BLOCK)
        if not PARTIAL:
            _store_gram_tile(
                out_ptr + b.to(tl.int64) * stride_ob, acc, colsum, ti, tj, n_tiles - 1, d,
                rows, stride_or, stride_oc, alpha, beta, APPEND_ONES, BETA_ZERO, BLOCK,
            )  # fmt: skip
        else:
            # Partial tiles, laid out (split, batch, tile, BLOCK, BLOCK) and contiguous.
            slot = (s * tl.num_programs(1) + b).to(tl.int64)
            r = tl.arange(0, BLOCK)
            tile_ptrs = part_ptr + (slot * tl.num_programs(0) + t) * BLOCK * BLOCK
            tl.store(tile_ptrs + r[:, None] * BLOCK + r[None, :], acc)
            if APPEND_ONES:  # noqa: SIM102 (constexpr branch around a run-time one)
                if ti == tj:
                    tl.store(psum_ptr + (slot * n_tiles + ti) * BLOCK + r, colsum)

    @triton.jit
    def _factor_stats_reduce_kernel(
        out_ptr,
        part_ptr,
        psum_ptr,
        rows,
        d,
        n_splits,
        stride_ob,
        stride_or,
        stride_oc,
        alpha,
        beta,
        APPEND_ONES: tl.constexpr,
        BETA_ZERO: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # grid = (tiles, batch): adds the partial tiles in split order, then stores.
        t = tl.program_id(0)
        b = tl.program_id(1)
        n_batch = tl.num_programs(1)
        n_tri = tl.num_programs(0)
        ti, tj = _tile_coords(t)
        n_tiles = tl.cdiv(d, BLOCK)
        r = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        colsum = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, n_splits):
            slot = (s * n_batch + b).to(tl.int64)
            tile_ptrs = part_ptr + (slot * n_tri + t) * BLOCK * BLOCK
            acc += tl.load(tile_ptrs + r[:, None] * BLOCK + r[None, :])
            if APPEND_ONES:  # noqa: SIM102 (constexpr branch around a run-time one)
                if ti == tj:
                    colsum += tl.load(psum_ptr + (slot * n_tiles + ti) * BLOCK + r)
        _store_gram_tile(
            out_ptr + b.to(tl.int64) * stride_ob, acc, colsum, ti, tj, n_tiles - 1, d, rows,
            stride_or, stride_oc, alpha, beta, APPEND_ONES, BETA_ZERO, BLOCK,
        )  # fmt: skip

    return SimpleNamespace(main=_factor_stats_kernel, reduce=_factor_stats_reduce_kernel)


# -------------------------------------------------------------------------------- launcher
_TRITON_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2**31 - 1


def _max_offset(t: Tensor) -> int:
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0)


def triton_supports(x: Tensor, out: Tensor) -> str | None:
    """Why the Triton kernel does not take these tensors (None when it does)."""
    if out.dtype != torch.float32:
        return f"out is {out.dtype} (the kernel accumulates float32 factors)"
    if x.dtype not in _TRITON_X_DTYPES:
        return f"x is {x.dtype} (the kernel reads float32, bfloat16 or float16)"
    if x.shape[2] == 0:
        return "x has no columns"
    if max(_max_offset(x), _max_offset(out)) > _INT32_MAX:
        return "a tensor spans more than 2**31 elements (32-bit offsets)"
    return None


# float32 operands: three TF32 tensor-core products per multiply (about float32 accuracy,
# several times the float32 FMA rate). 16-bit operands ignore the setting.
DEFAULT_PRECISION = "tf32x3"


def _config(d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK, BLOCK_K, num_warps, num_stages) for d columns of ``dtype``."""
    block = min(128, max(16, 1 << (d - 1).bit_length()))
    if interpreter_enabled():
        # The interpreter runs each program serially in numpy: larger tiles run faster,
        # and 64 still gives the test shapes several tiles per side.
        return min(block, 64), 64, 4, 1
    block_k = 64 if dtype.itemsize == 2 else 32
    return block, block_k, (8 if block >= 128 else 4), 3


def _splits(tiles: int, rows: int, block_k: int, device: torch.device) -> int:
    """Row splits per tile so that a small triangle still fills the GPU (1 when it does)."""
    if device.type != "cuda":
        return 1
    sms = multiprocessors(device)
    # One wave of programs (a second, partial wave would leave most SMs idle), and at least
    # 8 K-steps per split so that the partial tiles' round trip stays small against the work.
    by_rows = max(1, rows // (8 * block_k))
    return max(1, min(sms // tiles, by_rows, 64))


def _plan(
    x: Tensor, block: int | None = None, splits: int | None = None
) -> tuple[int, int, int, int, int, int]:
    """(BLOCK, BLOCK_K, num_warps, num_stages, row splits, rows per split) of a launch on
    ``x`` (host arithmetic only)."""
    nb, rows, d = x.shape
    blk, block_k, warps, stages = _config(d, x.dtype)
    if block is not None:
        if block < 16 or block & (block - 1):
            raise ValueError(f"factor_stats: block={block} must be a power of 2 >= 16")
        blk = block
    n_tiles = math.ceil(d / blk)
    tiles = n_tiles * (n_tiles + 1) // 2
    if splits is None:
        splits = _splits(max(1, tiles * nb), rows, block_k, x.device)
    # The splits sit on grid axis 2 (at most GRID_YZ_LIMIT programs).
    n_splits = max(1, min(splits, max(1, math.ceil(rows / block_k)), _dispatch.GRID_YZ_LIMIT))
    rows_per_split = math.ceil(rows / n_splits / block_k) * block_k if rows else 0
    if rows_per_split:
        n_splits = math.ceil(rows / rows_per_split)  # no split without rows
    return blk, block_k, warps, stages, n_splits, rows_per_split


def factor_stats_triton(
    x: Tensor,
    out: Tensor,
    *,
    alpha: float,
    beta: float,
    append_ones: bool,
    input_precision: str | None = None,
    block: int | None = None,
    splits: int | None = None,
) -> Tensor:
    """Launch the Triton kernel (checked inputs: see ``factor_stats``); in place on ``out``.

    ``block`` (tile side, a power of 2 >= 16) and ``splits`` (row splits per tile) override
    the heuristics; tests use them to reach every code path on small shapes. The batch sits
    on grid axis 1, limited to ``GRID_YZ_LIMIT`` programs: larger batches take one launch
    per chunk, and a failure after the first chunk raises ``PartialLaunchError`` (the blocks
    before it are complete, the others untouched).
    """
    reason = triton_supports(x, out)
    if reason is not None:
        raise ValueError(f"factor_stats: the Triton kernel cannot run: {reason}")
    kernels = _build()
    nb, rows, d = x.shape
    blk, block_k, warps, stages, n_splits, rows_per_split = _plan(x, block, splits)
    if nb == 0:
        return out
    n_tiles = math.ceil(d / blk)
    tiles = n_tiles * (n_tiles + 1) // 2
    precision = input_precision or DEFAULT_PRECISION
    flags = dict(
        APPEND_ONES=append_ones,
        BETA_ZERO=beta == 0.0,
        BLOCK=blk,
    )
    chunks = list(batch_chunks(nb))
    if n_splits > 1:
        # One workspace for the largest chunk, reused by the next ones (stream order).
        width = chunks[0][1]
        part = torch.empty(
            n_splits * width * tiles * blk * blk, dtype=torch.float32, device=x.device
        )
        psum = torch.empty(n_splits * width * n_tiles * blk, dtype=torch.float32, device=x.device)
    else:
        part = psum = out  # unused
    with device_guard(x.device):
        for start, stop in chunks:
            # Each chunk writes its blocks of out in its last launch only: a failure leaves
            # the chunk's blocks untouched.
            xc, oc = x[start:stop], out[start:stop]
            try:
                kernels.main[(tiles, stop - start, n_splits)](
                    xc, oc, part, psum,
                    rows, d, rows_per_split,
                    *xc.stride(), *oc.stride(),
                    float(alpha), float(beta),
                    PARTIAL=n_splits > 1, BLOCK_K=block_k,
                    DOT_FP32=interpreter_enabled() and x.dtype == torch.bfloat16,
                    # unused for 16-bit x
                    INPUT_PRECISION=precision if x.dtype == torch.float32 else "tf32",
                    num_warps=warps, num_stages=stages, **flags,
                )  # fmt: skip
                if n_splits > 1:
                    kernels.reduce[(tiles, stop - start)](
                        oc, part, psum, rows, d, n_splits, *oc.stride(), float(alpha),
                        float(beta), num_warps=warps, **flags,
                    )  # fmt: skip
            except Exception as exc:
                if start == 0:
                    raise
                raise PartialLaunchError(start, exc) from exc
    return out


# ------------------------------------------------------------------------------- reference
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
    if not x.dtype.is_floating_point:
        raise ValueError(f"factor_stats: x must be a floating-point tensor, got {x.dtype}")
    if x.device != out.device:
        raise ValueError(f"factor_stats: x on {x.device} but out on {out.device}")


# The torch path computes factors at least this wide as strips of the upper triangle (one
# product per strip of TRIANGLE_TILE rows) and mirrors them; narrower ones in one product.
TRIANGLE_MIN_DIM = 512
TRIANGLE_TILE = 256


def factor_stats_reference(
    x: Tensor,
    out: Tensor,
    *,
    alpha: float,
    beta: float,
    append_ones: bool,
    tile: int | None = None,
) -> Tensor:
    """Pure-torch path, in place on ``out``.

    The ones column is never materialized: X̃ᵀX̃ = [[XᵀX, Xᵀ1], [1ᵀX, rows]], so the product
    goes into the leading block (a strided view) and the column sums into the border.
    With β = 0, baddbmm ignores out's old values (NaN/inf in them do not propagate).

    ``tile``: compute XᵀX as row strips of this height of its upper triangle (strip i is
    X[:, strip]ᵀ X[:, strip start:], one product each) and mirror them into the lower
    triangle, as the Triton kernel does: (1 + 1/strips)/2 of the full product's FLOPs, a
    result that is exactly symmetric outside the diagonal tiles, and F's lower triangle
    taken to be the transpose of its upper one (F symmetric). None: one full product.
    """
    xf = x.to(out.dtype)
    d = xf.shape[-1]
    if tile is None or d <= tile:
        out[:, :d, :d].baddbmm_(xf.transpose(1, 2), xf, beta=beta, alpha=alpha)
    else:
        xt = xf.transpose(1, 2)
        for start in range(0, d, tile):
            stop = min(start + tile, d)
            strip = out[:, start:stop, start:d]
            strip.baddbmm_(xt[:, start:stop], xf[:, :, start:], beta=beta, alpha=alpha)
            if start:
                out[:, start:stop, :start] = out[:, :start, start:stop].transpose(1, 2)
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


# ---------------------------------------------------------------------------------- public
def factor_stats(
    x: Tensor,
    out: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    append_ones: bool = False,
    backend: str = "auto",
    input_precision: str | None = None,
) -> Tensor:
    """F ← β·F + α·X̃ᵀX̃ in place on ``out``; returns ``out``. See the module docstring.

    Args:
        x: ``(B, rows, d)`` floating-point inputs, any strides.
        out: ``(B, d', d')`` float32 or float64, d' = d + 1 with ``append_ones``.
        alpha, beta: scalars of the update. β = 0 overwrites ``out`` without reading it.
        append_ones: append the homogeneous ones column to X (never materialized).
        backend: "auto" (Triton for CUDA tensors when triton imports), "torch" or "triton".
        input_precision: Triton's ``tl.dot`` precision for float32 ``x``: "tf32x3" (default,
            about float32 accuracy on tensor cores), "ieee" (float32 FMA) or "tf32".

    The Triton path takes float32 ``out`` and float32/bfloat16/float16 ``x``; other cases
    (float64 factors) run the reference whatever the backend. It runs under the safety net
    of ``_guard`` (fallback to the reference on failure, a first-use check with "auto").
    ``KFAC_EF_BACKEND`` overrides ``backend``.
    """
    _check(x, out, append_ones)
    mode = triton_mode(backend, x.device)
    if mode is None or triton_supports(x, out) is not None:
        tile = TRIANGLE_TILE if x.shape[-1] >= TRIANGLE_MIN_DIM else None
        return factor_stats_reference(
            x, out, alpha=alpha, beta=beta, append_ones=append_ones, tile=tile
        )
    job = _FactorStatsJob(x, out, alpha, beta, append_ones, input_precision)
    return run(job, mode, x.device)


# Rows per float64 chunk of the first-use check's ground truth (bounds its memory).
_TRUTH_ELEMENTS = 1 << 22


class _FactorStatsJob(Job):
    """One ``factor_stats`` call for the safety net (kernels/_guard.py)."""

    kernel = "factor_stats"

    def __init__(
        self,
        x: Tensor,
        out: Tensor,
        alpha: float,
        beta: float,
        append_ones: bool,
        precision: str | None,
    ) -> None:
        self.x, self.out, self.batch = x, out, x.shape[0]
        self.alpha, self.beta, self.append_ones = alpha, beta, append_ones
        self.precision = precision

    def _triton(self, out: Tensor) -> Tensor:
        # The launcher is looked up per call (tests count and replace it).
        return factor_stats_triton(
            self.x, out, alpha=self.alpha, beta=self.beta, append_ones=self.append_ones,
            input_precision=self.precision,
        )  # fmt: skip

    def _reference(self, x: Tensor, out: Tensor, beta: float | None = None) -> Tensor:
        beta = self.beta if beta is None else beta
        return factor_stats_reference(
            x, out, alpha=self.alpha, beta=beta, append_ones=self.append_ones
        )

    def variant(self) -> tuple[tuple[str, object], ...]:
        blk, _, _, _, n_splits, _ = _plan(self.x)
        is_fp32 = self.x.dtype == torch.float32
        return (
            ("x", str(self.x.dtype).removeprefix("torch.")),
            ("append_ones", self.append_ones),
            ("beta_zero", self.beta == 0.0),
            ("BLOCK", blk),
            ("split_rows", n_splits > 1),
            ("precision", (self.precision or DEFAULT_PRECISION) if is_fp32 else "-"),
        )

    def describe(self) -> str:
        x, out = self.x, self.out
        return (
            f"x {tuple(x.shape)} {x.dtype}, out {tuple(out.shape)} {out.dtype}, "
            f"alpha={self.alpha}, beta={self.beta}, append_ones={self.append_ones}"
        )

    def launch(self) -> Tensor:
        return self._triton(self.out)

    def launch_scratch(self) -> tuple[Tensor, ...]:
        # β = 0 must write every element: poison the scratch so that a gap shows.
        scratch = self.out.clone() if self.beta != 0.0 else torch.full_like(self.out, float("nan"))
        return (self._triton(scratch),)

    def truth(self, blocks: list[int]) -> tuple[Tensor, ...]:
        # Rows in chunks (the reference upcasts its input): F is linear in the rows, the
        # first chunk applies β and the next ones add with β = 1.
        f = pick(self.out, blocks).double()
        rows, d = self.x.shape[1], self.x.shape[2]
        step = max(1, _TRUTH_ELEMENTS // max(1, d))
        for i, b in enumerate(blocks):
            for start in range(0, max(rows, 1), step):
                xs = self.x[b : b + 1, start : start + step]
                self._reference(xs, f[i : i + 1], beta=None if start == 0 else 1.0)
        return (f,)

    def reference(self) -> Tensor:
        return self._reference(self.x, self.out)

    def arithmetic_eps(self) -> float | None:
        return TF32_EPS if self.precision == "tf32" and self.x.dtype == torch.float32 else None

    def outputs(self, result: Tensor) -> tuple[Tensor, ...]:
        return (result,)

    def recover(self, exc: BaseException) -> Tensor:
        # A chunked launch may have completed its first blocks: finish the others only
        # (with β ≠ 0 the done blocks must not be folded twice).
        done = exc.done if isinstance(exc, PartialLaunchError) else 0
        self._reference(self.x[done:], self.out[done:])
        return self.out
