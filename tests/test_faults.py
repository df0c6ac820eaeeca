"""Numerical faults over many steps: failing decompositions in a row, skipped statistics
counted and warned about at a bounded rate, warnings attributed to the user's line."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from .helpers import seed_preconditioner, step_once
from .reference import mse_per_example


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _batch(poison: bool = False):
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    if poison:
        x[1, 2] = float("nan")
    return x, y


def _broken_eigh(*args, **kwargs):
    raise torch.linalg.LinAlgError("simulated non-convergence")


def test_consecutive_decomposition_failures_raise_with_the_statistics(monkeypatch):
    model = _mlp()
    pre = seed_preconditioner(model, inv_update_steps=1, max_decomposition_failures=3)
    step_once(model, pre, mse_per_example, *_batch())
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", _broken_eigh)
    for k in (1, 2):  # below the limit: the previous decomposition is kept
        with pytest.warns(RuntimeWarning, match=rf"failed even in float64 \({k} in a row\)"):
            before, after = step_once(model, pre, mse_per_example, *_batch())
        assert not torch.equal(after["0.weight"], before["0.weight"])  # still preconditioned
    assert pre.faults().consecutive_failures == {"0": 2, "2": 2}
    # A success resets the run; two more failures stay below the limit.
    monkeypatch.setattr(torch.linalg, "eigh", real)
    step_once(model, pre, mse_per_example, *_batch())
    assert pre.faults().consecutive_failures == {}
    assert pre.faults().decomposition_failures == {"0": 2, "2": 2}
    monkeypatch.setattr(torch.linalg, "eigh", _broken_eigh)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="keeps its previous decomposition"):
            step_once(model, pre, mse_per_example, *_batch())
    with (
        pytest.warns(RuntimeWarning, match="3 in a row"),
        pytest.raises(RuntimeError, match="3 decomposition steps in a row") as err,
    ):
        step_once(model, pre, mse_per_example, *_batch())
    text = str(err.value)
    for expected in ("0 A: (1, 5, 5) float32", "0 G:", "2 A:", "trace", "non-finite entries"):
        assert expected in text, expected
    trace_a0 = float(pre.factors()["0"][0].trace())
    assert f"trace {trace_a0:.3e}" in text  # the statistics are the factor's own
    assert pre.faults().decomposition_failures == {"0": 5, "2": 5}


def test_failures_limit_is_validated():
    with pytest.raises(ValueError, match="max_decomposition_failures"):
        seed_preconditioner(_mlp(), max_decomposition_failures=0)
    with pytest.raises(ValueError, match="warning_interval"):
        seed_preconditioner(_mlp(), warning_interval=0)


def test_skipped_statistics_are_counted_and_warned_once_per_interval():
    model = _mlp()
    pre = seed_preconditioner(model, inv_update_steps=1, warning_interval=5)
    poisoned = {1, 2, 3, 7}
    warned_at, messages = [], []
    for step in range(9):
        x, y = _batch(poison=step in poisoned)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.zero_grad()
            mse_per_example(model(x), y).mean().backward()
            pre.step()
        ours = [w for w in caught if "were skipped" in str(w.message)]
        if ours:
            warned_at.append(step)
            messages.append(str(ours[0].message))
            assert len(ours) == 1
            assert ours[0].filename == __file__  # attributed to the line calling step()
    # Step 1 warns at once; the skips of 2 and 3 accumulate and are reported at 1 + 5 = 6;
    # 7's waits for step 11.
    assert warned_at == [1, 6]
    assert "'0' (1)" in messages[0] and "'0' (2)" in messages[1]
    assert "2 step(s) had non-finite gradients" in messages[1]
    faults = pre.faults()
    assert faults.steps == 9
    assert faults.skipped_steps == len(poisoned)
    assert faults.skipped_updates == {"0": len(poisoned), "2": len(poisoned)}
    assert all(
        torch.isfinite(a).all() and torch.isfinite(g).all() for a, g in pre.factors().values()
    )


def test_fault_counts_survive_a_checkpoint():
    model = _mlp()
    pre = seed_preconditioner(model, inv_update_steps=1)
    step_once(model, pre, mse_per_example, *_batch())
    with pytest.warns(RuntimeWarning, match="were skipped"):
        step_once(model, pre, mse_per_example, *_batch(poison=True))
    state = pre.state_dict()
    fresh = seed_preconditioner(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    fresh.load_state_dict(state)
    assert fresh.faults() == pre.faults()
    assert fresh.faults().skipped_steps == 1


def test_warning_from_a_backward_hook_points_at_user_code():
    """A warning raised in a tensor hook (during loss.backward()) names the user's line."""

    class TwoBatches(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).sum() + self.lin(x[:2]).sum()

    model = TwoBatches()
    pre = seed_preconditioner(model)
    with pytest.warns(RuntimeWarning, match="batch sizes") as record:
        model(torch.randn(4, 3)).backward()
    assert {w.filename for w in record} == {__file__}
    pre.step()
