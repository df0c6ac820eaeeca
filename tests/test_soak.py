"""Soak: a long bfloat16-autocast run on the digits task stays finite and keeps valid factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .helpers import seed_preconditioner


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (
        torch.tensor(data.data, dtype=torch.float32) / 16.0,
        torch.tensor(data.target, dtype=torch.int64),
    )


@pytest.mark.slow
def test_soak_2000_steps_bfloat16_autocast():
    x_all, y_all = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    pre = seed_preconditioner(model, damping=0.1, inv_update_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(2000):
        idx = torch.randint(0, len(x_all), (64,), generator=gen)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x_all[idx])
        loss = F.cross_entropy(logits.float(), y_all[idx])
        loss.backward()
        pre.step()
        opt.step()
        losses.append(loss.item())
        assert torch.isfinite(loss), f"loss became {loss.item()} at step {step}"
        if step % 250 == 249:
            for name, (a, g) in pre.factors().items():
                for f in (a, g):
                    assert f.dtype == torch.float32
                    assert torch.isfinite(f).all(), name
                    torch.testing.assert_close(f, f.transpose(-1, -2), rtol=0, atol=1e-6)
                    evals = torch.linalg.eigvalsh(f.double())
                    assert evals.min() >= -1e-6 * max(1.0, evals.max().item()), (name, evals.min())
    for p in model.parameters():
        assert torch.isfinite(p).all()
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.01 * first, (first, last)
