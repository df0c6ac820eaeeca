"""statistics_stride: factor statistics from every k-th position, against the per-example
reference factors of exactly those positions (torch.func, float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfac_ef import KFACOptions

from .helpers import seed_preconditioner, step_once
from .reference import embedding_factors, layer_io, mse_per_example, reference_factors

pytestmark = pytest.mark.usefixtures("float64")


class Sequence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 3)

    def forward(self, idx):
        return self.lin(torch.tanh(self.emb(idx)))


def _kept(io, offset, stride, scale_d):
    """The positions offset, offset + stride, ... of every call; δ scaled by √(T / kept)."""
    out = []
    for calls in io:
        mine = []
        for a, d in calls:
            t = d.shape[0]
            kept = len(range(offset, t, stride))
            s = math.sqrt(t / kept) if scale_d else 1.0
            mine.append((a[offset::stride], d[offset::stride] * s))
        out.append(mine)
    return out


@pytest.mark.parametrize("stride", [2, 3])
def test_each_statistics_step_uses_its_positions(stride):
    """Step i uses positions i mod k, i mod k + k, ... (T = 7 is not a multiple of k); G is
    scaled by T / (positions kept)."""
    torch.manual_seed(0)
    model = Sequence()
    pre = seed_preconditioner(model, statistics_stride=stride, factor_decay=0.0,
                              factor_update_steps=1, factor_dtype=torch.float64)  # fmt: skip
    x = torch.randint(0, 7, (5, 7))
    y = torch.randn(5, 7, 3)
    for step in range(stride + 1):
        io_lin = layer_io(model, model.lin, mse_per_example, x, y)
        io_emb = layer_io(model, model.emb, mse_per_example, x, y)
        step_once(model, pre, mse_per_example, x, y)
        offset = step % stride
        a_ref, g_ref = reference_factors(model.lin, _kept(io_lin, offset, stride, True))
        got_a, got_g = pre.factors()["lin"]
        torch.testing.assert_close(got_a, a_ref[0])
        torch.testing.assert_close(got_g, g_ref[0])
        ea, eg = embedding_factors(model.emb, _kept(io_emb, offset, stride, True))
        got_ea, got_eg = pre.factors()["emb"]
        torch.testing.assert_close(got_ea, torch.diagonal(ea))
        torch.testing.assert_close(got_eg, eg)
        model.lin.weight.data.add_(0.01)  # another point: the statistics change


def test_stride_one_and_reduce_use_every_position():
    torch.manual_seed(0)
    x = torch.randint(0, 7, (4, 6))
    y = torch.randn(4, 6, 3)
    out = {}
    for options in ({}, {"statistics_stride": 1}, {"kfac_approx": "reduce"},
                    {"kfac_approx": "reduce", "statistics_stride": 3}):  # fmt: skip
        torch.manual_seed(1)
        model = Sequence()
        pre = seed_preconditioner(model, factor_dtype=torch.float64, **options)
        step_once(model, pre, mse_per_example, x, y)
        out[str(options)] = pre.factors()["lin"]
    keys = list(out)
    for a, b in zip(out[keys[0]], out[keys[1]]):
        torch.testing.assert_close(a, b)
    for a, b in zip(out[keys[2]], out[keys[3]]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_stride(value):
    with pytest.raises(ValueError, match="statistics_stride"):
        KFACOptions(statistics_stride=value)


def test_k_offsets_average_to_every_position_when_k_divides_t():
    """At fixed parameters, the factors of k consecutive statistics steps average to those
    of every position (T = 6, k = 3)."""
    torch.manual_seed(0)
    x = torch.randint(0, 7, (4, 6))
    y = torch.randn(4, 6, 3)
    torch.manual_seed(1)
    model = Sequence()
    full = seed_preconditioner(model, factor_dtype=torch.float64)
    step_once(model, full, mse_per_example, x, y)
    want = full.factors()
    del full
    strided = seed_preconditioner(model, statistics_stride=3, factor_decay=0.0,
                                  factor_update_steps=1, factor_dtype=torch.float64)  # fmt: skip
    sums: dict[str, list[torch.Tensor]] = {}
    for _ in range(3):
        step_once(model, strided, mse_per_example, x, y)
        for name, pair in strided.factors().items():
            sums[name] = [s + f for s, f in zip(sums[name], pair)] if name in sums else list(pair)
    for name, pair in want.items():
        for got, ref in zip(sums[name], pair):
            torch.testing.assert_close(got / 3, ref)


def test_the_offset_follows_the_step_count_across_a_checkpoint():
    """A preconditioner loaded from a checkpoint at step 2 keeps positions 2, 5, ... next, as
    the run it continues would (the offset is the statistics step's index, not local state)."""
    torch.manual_seed(0)
    x = torch.randint(0, 7, (4, 7))
    y = torch.randn(4, 7, 3)
    opts = {"statistics_stride": 3, "factor_decay": 0.0, "factor_update_steps": 1,
            "factor_dtype": torch.float64}  # fmt: skip
    torch.manual_seed(1)
    model = Sequence()
    whole = seed_preconditioner(model, **opts)
    for _ in range(3):
        step_once(model, whole, mse_per_example, x, y)
    want = whole.factors()
    whole.remove()
    first = seed_preconditioner(model, **opts)
    for _ in range(2):
        step_once(model, first, mse_per_example, x, y)
    state = first.state_dict()
    first.remove()
    resumed = seed_preconditioner(model, **opts)
    resumed.load_state_dict(state)
    step_once(model, resumed, mse_per_example, x, y)
    for name, pair in want.items():
        for got, ref in zip(resumed.factors()[name], pair):
            torch.testing.assert_close(got, ref)
