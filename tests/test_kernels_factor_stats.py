"""The factor-statistics kernel against float64 ground truth, through Triton's interpreter."""

from __future__ import annotations

import importlib

import pytest
import torch

from kfac_ef.kernels import factor_stats, factor_stats_reference
from kfac_ef.kernels.factor_stats import factor_stats_triton

from .kernel_checks import assert_within_bound, gram_torch, gram_truth

# Kernel failures fall back to the reference with this warning: here it would hide the bug.
pytestmark = pytest.mark.filterwarnings("error::kfac_ef.kernels.KernelFallbackWarning")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, rows, d): sides 1, 7, 33, 129, 257 and rows that are not multiples of any tile.
SHAPES = [(1, 1, 1), (3, 7, 7), (2, 45, 33), (1, 130, 129), (1, 67, 257), (2, 300, 20)]
REL_ATOL = 1e-7


def _case(shape, dtype, append_ones, beta):
    b, rows, d = shape
    x = torch.randn(b, rows, d).to(dtype)
    dim = d + append_ones
    f0 = torch.randn(b, dim, dim)
    f0 = f0 + f0.transpose(1, 2)
    # β = 0 must overwrite every element without reading it: poison with NaN. With β ≠ 0 an
    # element left unwritten keeps its old value, which is not β F0 + α X̃ᵀX̃.
    out = torch.full_like(f0, float("nan")) if beta == 0.0 else f0.clone()
    return x, f0, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("append_ones", [False, True], ids=["plain", "ones"])
@pytest.mark.parametrize("beta", [0.0, 0.95])
def test_factor_stats_triton_within_bound(dtype, shape, append_ones, beta):
    x, f0, out = _case(shape, dtype, append_ones, beta)
    alpha = 0.37
    factor_stats(x, out, alpha=alpha, beta=beta, append_ones=append_ones, backend="triton")
    truth = gram_truth(x, f0, alpha, beta, append_ones)
    torch_result = gram_torch(x, f0, alpha, beta, append_ones)
    assert_within_bound(out, torch_result, truth, REL_ATOL)
    # The reference itself obeys the same bound.
    ref = f0.clone() if beta else torch.full_like(f0, float("nan"))
    factor_stats_reference(x, ref, alpha=alpha, beta=beta, append_ones=append_ones)
    assert_within_bound(ref, torch_result, truth, REL_ATOL)
    # Mirrored tiles make the result exactly symmetric when the old F is.
    assert torch.equal(out, out.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("append_ones", [False, True], ids=["plain", "ones"])
@pytest.mark.parametrize("beta", [0.0, 0.95])
@pytest.mark.parametrize(("d", "tile"), [(50, 16), (48, 16), (33, 32), (20, 64)])
def test_factor_stats_torch_upper_strips(dtype, append_ones, beta, d, tile):
    """The torch path's upper-triangle strips (a last strip shorter than the others, one of
    exactly a tile, a single strip, no strip at all) mirrored into the lower triangle."""
    x, f0, out = _case((2, 61, d), dtype, append_ones, beta)
    factor_stats_reference(x, out, alpha=0.37, beta=beta, append_ones=append_ones, tile=tile)
    truth = gram_truth(x, f0, 0.37, beta, append_ones)
    assert_within_bound(out, gram_torch(x, f0, 0.37, beta, append_ones), truth, REL_ATOL)
    # Every entry outside the diagonal tiles is the mirror of its transpose.
    lower = torch.ones(d + append_ones, d + append_ones, dtype=torch.bool).tril(-1)
    for start in range(0, d, tile):
        lower[start : start + tile, start : start + tile] = False
    assert torch.equal(out[:, lower], out.transpose(1, 2)[:, lower])


def test_factor_stats_torch_path_takes_strips_from_the_minimum_width():
    """``factor_stats`` off the GPU uses strips for factors at least TRIANGLE_MIN_DIM wide."""
    module = importlib.import_module("kfac_ef.kernels.factor_stats")
    calls = []
    real = module.factor_stats_reference

    def spy(*args, **kwargs):
        calls.append(kwargs["tile"])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "factor_stats_reference", spy)
        for d in (module.TRIANGLE_MIN_DIM - 1, module.TRIANGLE_MIN_DIM):
            x = torch.randn(1, 8, d)
            factor_stats(x, torch.empty(1, d, d), beta=0.0, backend="torch")
    assert calls == [None, module.TRIANGLE_TILE]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("append_ones", [False, True], ids=["plain", "ones"])
@pytest.mark.parametrize(("block", "splits"), [(16, 1), (16, 3), (64, 4)])
def test_factor_stats_small_tiles_and_row_splits(dtype, append_ones, block, splits):
    """Many tiles per side (triangle enumeration, mirroring) and the split-K reduction."""
    for beta in (0.0, 0.95):
        x, f0, out = _case((2, 203, 50), dtype, append_ones, beta)
        factor_stats_triton(
            x, out, alpha=1.5, beta=beta, append_ones=append_ones, block=block, splits=splits
        )
        truth = gram_truth(x, f0, 1.5, beta, append_ones)
        assert_within_bound(out, gram_torch(x, f0, 1.5, beta, append_ones), truth, REL_ATOL)


@pytest.mark.parametrize("layout", ["blocks-transposed", "column-major", "sliced"])
def test_factor_stats_strided_inputs(layout):
    """The preconditioner hands over transposed views (blocks, rows, d); any strides work."""
    base = torch.randn(70, 3, 41)  # (rows, blocks, d)
    if layout == "blocks-transposed":
        x = base.transpose(0, 1)
    elif layout == "column-major":
        x = base.permute(1, 2, 0).contiguous().transpose(1, 2)  # stride 1 along rows
    else:
        x = base.transpose(0, 1)[:, ::2, 1:40]
    assert not x.is_contiguous()
    out = torch.full((3, x.shape[2] + 1, x.shape[2] + 1), float("nan"))
    factor_stats(x, out, alpha=1.0, beta=0.0, append_ones=True, backend="triton")
    f0 = torch.zeros_like(out)
    assert_within_bound(
        out, gram_torch(x, f0, 1.0, 0.0, True), gram_truth(x, f0, 1.0, 0.0, True), REL_ATOL
    )


def test_factor_stats_strided_out():
    """``out`` may be a view (e.g. a slice of a larger buffer)."""
    x = torch.randn(2, 40, 30)
    big = torch.full((2, 40, 40), float("nan"))
    out = big[:, 3:34, 5:36]
    factor_stats(x, out, alpha=2.0, beta=0.0, append_ones=True, backend="triton")
    f0 = torch.zeros(2, 31, 31)
    torch.testing.assert_close(out, gram_truth(x, f0, 2.0, 0.0, True).float())
    assert torch.isnan(big[:, :3]).all() and torch.isnan(big[:, 34:]).all()


def test_factor_stats_accumulates_over_calls():
    """β = 1 sums calls, as the statistics accumulators do between two steps."""
    xs = [torch.randn(1, r, 12, dtype=torch.bfloat16) for r in (9, 31, 64)]
    out = torch.empty(1, 13, 13)
    for i, x in enumerate(xs):
        factor_stats(x, out, beta=0.0 if i == 0 else 1.0, append_ones=True, backend="triton")
    total = torch.cat(xs, dim=1)
    truth = gram_truth(total, torch.zeros(1, 13, 13), 1.0, 0.0, True)
    torch.testing.assert_close(out.double(), truth, rtol=1e-6, atol=1e-5)


def test_factor_stats_empty_rows_and_batch():
    out = torch.full((2, 6, 6), float("nan"))
    factor_stats(torch.empty(2, 0, 5), out, beta=0.0, append_ones=True, backend="triton")
    expected = torch.zeros(2, 6, 6)
    torch.testing.assert_close(out, expected)
    out = torch.empty(0, 6, 6)
    factor_stats(torch.empty(0, 3, 5), out, append_ones=True, backend="triton")


def test_factor_stats_float64_out_runs_the_reference():
    x = torch.randn(2, 33, 9)
    out = torch.full((2, 10, 10), float("nan"), dtype=torch.float64)
    factor_stats(x, out, alpha=0.5, beta=0.0, append_ones=True, backend="triton")
    f0 = torch.zeros(2, 10, 10)
    torch.testing.assert_close(out, gram_truth(x, f0, 0.5, 0.0, True), rtol=1e-12, atol=1e-12)


def test_factor_stats_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="out has shape"):
        factor_stats(torch.randn(1, 4, 3), torch.empty(1, 3, 3), append_ones=True)
    with pytest.raises(ValueError, match="float32 or float64"):
        factor_stats(torch.randn(1, 4, 3), torch.empty(1, 3, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="floating-point"):
        factor_stats(torch.ones(1, 4, 3, dtype=torch.int64), torch.empty(1, 3, 3))
    with pytest.raises(ValueError, match="power of 2"):
        factor_stats_triton(
            torch.randn(1, 4, 3), torch.empty(1, 3, 3), alpha=1, beta=0, append_ones=False, block=24
        )
