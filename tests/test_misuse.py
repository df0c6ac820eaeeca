"""Hostile use: models changed after construction, removed preconditioners, double hooking."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kfac_ef import KFACPreconditioner

from .helpers import backward, step_once
from .models import GPT, lm_loss
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
    first = KFACPreconditioner(model)
    with pytest.raises(RuntimeError, match="already hooked by another KFACPreconditioner"):
        KFACPreconditioner(model)
    # A different model that shares a submodule is the same conflict.
    with pytest.raises(RuntimeError, match="already hooked"):
        KFACPreconditioner(nn.Sequential(model[0], nn.Linear(5, 1)))
    first.remove()
    KFACPreconditioner(model)


def _untie(m: nn.Module) -> None:
    m.head.weight = nn.Parameter(m.head.weight.detach().clone())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_untie, "head: parameters replaced"),
        (
            lambda m: setattr(m.blocks[0].attn.attn, "out_proj", nn.Linear(8, 8)),
            "blocks.0.attn.attn.out_proj: module replaced",
        ),
        (
            lambda m: setattr(
                m.blocks[0].attn.attn,
                "in_proj_weight",
                nn.Parameter(m.blocks[0].attn.attn.in_proj_weight.detach().clone()),
            ),
            "blocks.0.attn.attn: parameters replaced",
        ),
        (
            lambda m: m.blocks[0].ln1.weight.requires_grad_(False),
            "blocks.0.ln1: requires_grad changed",
        ),
    ],
    ids=["untied", "attention-out_proj", "attention-in_proj", "frozen-norm"],
)
def test_changed_transformer_is_a_clear_error(change, message):
    """Tied weights, attention's packed and submodule parameters, diagonal parameters: a
    change after construction is caught like any other (the attention's adapter reads them
    on every call, so a replaced one would silently stop being preconditioned)."""
    torch.manual_seed(0)
    model = GPT(vocab=20, dim=8, heads=2, context=4, attention=("mha",))
    pre = KFACPreconditioner(model, inv_update_steps=1, other_params="diagonal")
    idx = torch.randint(0, 20, (2, 4))
    lm_loss(model(idx), idx).backward()
    pre.step()
    change(model)
    model.zero_grad()
    lm_loss(model(idx), idx).backward()
    with pytest.raises(RuntimeError, match=message):
        pre.step()


def test_sharded_models_one_rank_and_tensor_parallel(tmp_path):
    """FSDP2's fully_shard on one rank trains exactly as the unsharded model (the shards are
    whole); DTensor parameters outside fully_shard (tensor parallelism) are refused at
    construction, naming them. Several ranks: tests/test_fsdp.py."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        model = copy.deepcopy(plain)
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        runs = []
        for net in (plain, model):
            pre = KFACPreconditioner(net, factor_dtype=torch.float64, factor_update_steps=1)
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            for step in range(3):
                g = torch.Generator().manual_seed(step)
                x = torch.randn(8, 4, generator=g, dtype=torch.float64)
                opt.zero_grad()
                net(x).square().mean().backward()
                pre.step()
                opt.step()
            runs.append([p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
                         for p in net.parameters()])  # fmt: skip
            pre.remove()
        for a, b in zip(*runs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

        tp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        tp[0].weight = nn.Parameter(distribute_tensor(tp[0].weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(NotImplementedError, match=r"outside fully_shard \(0.weight"):
            KFACPreconditioner(tp)
    finally:
        dist.destroy_process_group()
