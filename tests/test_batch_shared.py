"""Batch-shared calls (a position embedding called once on positions of shape (1, T)) and
reentrant activation checkpointing: never mis-scaled, never an error at step()."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import internals
from .helpers import seed_preconditioner, step_once
from .reference import layer_io, mse_per_example, reference_factors

pytestmark = pytest.mark.usefixtures("float64")


class PositionModel(nn.Module):
    """Token and position embeddings, then a Linear; positions (1, T) unless expanded."""

    def __init__(self, expand: bool = False) -> None:
        super().__init__()
        self.expand = expand
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(6, 4)
        self.lin = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, idx):
        n, t = idx.shape
        positions = torch.arange(t).unsqueeze(0)
        if self.expand:
            positions = positions.expand(n, t)
        h = self.tok(idx) + self.pos(positions)
        return self.head(torch.tanh(self.lin(h)).mean(dim=1))


def _data(n=5, t=4):
    return torch.randint(0, 10, (n, t)), torch.randn(n, 2)


@pytest.mark.parametrize("constraint", [False, True])
def test_batch_shared_layer_is_left_out_with_one_warning(constraint):
    model = PositionModel()
    kw = dict(target_loss_change=0.1, lr=0.1, loss_change_unit="absolute") if constraint else {}
    pre = seed_preconditioner(model, damping=1e-2, factor_dtype=torch.float64, **kw)
    x, y = _data()
    caught = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            before, after = step_once(model, pre, mse_per_example, x, y)
        caught += [str(w.message) for w in got]
    shared = [m for m in caught if "broadcast over the batch" in m]
    assert len(shared) == 1 and "position_ids.expand(N, T)" in shared[0]
    reasons = dict(pre.summary().unpreconditioned)
    assert reasons["pos.weight"].startswith("batch-shared")
    assert "pos" not in internals.layer_names(pre)
    torch.testing.assert_close(after["pos.weight"], before["pos.weight"])  # untouched
    assert pre.summary().coverage.embeddings == (1, 2)


def test_other_layers_are_not_mis_scaled():
    """The layers that see the batch get the factors of the per-example reference."""
    model = PositionModel()
    pre = seed_preconditioner(model, damping=1e-2, factor_dtype=torch.float64)
    x, y = _data()
    io = layer_io(model, model.lin, mse_per_example, x, y)
    with pytest.warns(RuntimeWarning, match="broadcast over the batch"):
        step_once(model, pre, mse_per_example, x, y)
    A, G = reference_factors(model.lin, io)
    got_a, got_g = pre.factors()["lin"]
    torch.testing.assert_close(got_a, A[0])
    torch.testing.assert_close(got_g, G[0])


def test_expanded_positions_are_covered():
    model = PositionModel(expand=True)
    pre = seed_preconditioner(model, damping=1e-2, factor_dtype=torch.float64)
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_once(model, pre, mse_per_example, x, y)
    assert "pos" in internals.layer_names(pre)
    assert "pos.weight" not in dict(pre.summary().unpreconditioned)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(4, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            if self.reentrant is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_checkpointing_matches_the_plain_run(reentrant, micro_batches):
    """Exact constraint, 3 steps: ν and the preconditioned gradients of the checkpointed
    model equal those of the same model without checkpointing."""
    runs = []
    for mode in (None, reentrant):
        torch.manual_seed(0)
        model = Checkpointed(mode)
        pre = seed_preconditioner(
            model,
            damping=1e-2,
            factor_dtype=torch.float64,
            target_loss_change=0.05,
            lr=0.1,
            loss_change_unit="absolute",
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        record = []
        for _ in range(3):
            opt.zero_grad()
            for _ in range(micro_batches):
                x = torch.randn(4, 3, 4, generator=gen)
                y = torch.randn(4, 2, generator=gen)
                (mse_per_example(model(x), y).mean() / micro_batches).backward()
            pre.step()
            grads = [p.grad.clone() for p in model.parameters()]
            record.append((pre.diagnostics().nu, grads))
            opt.step()
        runs.append(record)
    for (nu0, g0), (nu1, g1) in zip(*runs):
        assert nu1 == pytest.approx(nu0, rel=1e-9)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b)
