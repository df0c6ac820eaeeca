"""Hostile use: models changed after construction, removed preconditioners, double hooking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_ef import KFACPreconditioner

from .helpers import backward, step_once
from .reference import mse_per_example


def _model():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _data():
    return torch.randn(6, 4), torch.randn(6, 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.__setitem__(2, nn.Linear(5, 3)), "2: module replaced"),
        (lambda m: m.append(nn.Linear(3, 3)), "3: added"),
        (
            lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone())),
            "0: parameters replaced",
        ),
    ],
)
def test_changed_model_is_a_clear_error(change, message):
    model = _model()
    pre = KFACPreconditioner(model, inv_update_steps=1)
    step_once(model, pre, mse_per_example, *_data())
    change(model)
    x, y = _data()
    model.zero_grad()
    out = model(x)
    mse_per_example(out[:, :3], y).mean().backward()
    with pytest.raises(RuntimeError, match=message):
        pre.step()


def test_unfreezing_after_construction_is_a_clear_error():
    model = _model()
    model[0].weight.requires_grad_(False)
    pre = KFACPreconditioner(model, inv_update_steps=1)
    step_once(model, pre, mse_per_example, *_data())
    model[0].weight.requires_grad_(True)
    model.zero_grad()
    backward(model, mse_per_example, *_data(), "mean")
    with pytest.raises(RuntimeError, match="requires_grad changed"):
        pre.step()


def test_backward_after_remove_then_step_is_a_clear_error():
    model = _model()
    pre = KFACPreconditioner(model)
    step_once(model, pre, mse_per_example, *_data())
    pre.remove()
    model.zero_grad()
    backward(model, mse_per_example, *_data(), "mean")
    with pytest.raises(RuntimeError, match="removed"):
        pre.step()
    with pytest.raises(RuntimeError, match="removed"):
        pre.load_state_dict(pre.state_dict())


def test_two_preconditioners_on_one_model_is_a_clear_error():
    model = _model()
    KFACPreconditioner(model)
    with pytest.raises(RuntimeError, match="already hooked by another KFACPreconditioner"):
        KFACPreconditioner(model)
    # A different model that shares a submodule is the same conflict.
    with pytest.raises(RuntimeError, match="already hooked"):
        KFACPreconditioner(nn.Sequential(model[0], nn.Linear(5, 1)))
