"""What each rank runs in the FSDP2 tests (``test_fsdp.py``): the scenarios of
``distributed_workers`` on a model sharded with ``fully_shard`` (each module with
parameters, then the root) instead of wrapped in DistributedDataParallel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kfac_ef import DistributedOptions, KFACPreconditioner

from . import internals
from .distributed_workers import (
    Scenario,
    _local,
    _reduce,
    _scaler,
    _step,
    backward_pass,
    batch,
    make,
    mc_noise,
)
from .helpers import seed_preconditioner


@dataclass(frozen=True)
class FSDPScenario(Scenario):
    reshard: bool = True  # reshard_after_forward
    mixed: bool = False  # MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)
    autocast: bool = False  # a float32 model, forward and backward under torch.autocast(bf16)


def shard(model: nn.Module, sc: FSDPScenario) -> nn.Module:
    """fully_shard on every module that holds parameters directly, then on the root (which
    takes the rest: tied weights, as FSDP2 wants them in one group)."""
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if sc.mixed
        else MixedPrecisionPolicy()
    )
    users: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    alone = [
        m
        for m in model.modules()
        if m is not model
        and any(True for _ in m.parameters(recurse=False))
        and all(users[id(p)] == 1 for p in m.parameters(recurse=False))
    ]
    for m in alone:  # (a submodule of one sharded before is sharded already)
        if not any(isinstance(p, DTensor) for p in m.parameters(recurse=False)):
            fully_shard(m, reshard_after_forward=sc.reshard, mp_policy=policy)
    fully_shard(model, reshard_after_forward=sc.reshard, mp_policy=policy)
    return model


def full_params(model: nn.Module) -> Tensor:
    """Every parameter whole (collective: each DTensor is all-gathered), flattened."""
    out = []
    for p in model.parameters():
        t = p.detach()
        out.append(t.full_tensor().flatten() if hasattr(t, "full_tensor") else t.flatten())
    return torch.cat(out).clone()


def train_fsdp(rank: int, world: int, scenarios: list[FSDPScenario]) -> dict[str, Any]:
    """Every scenario on this rank; results by scenario name."""
    return {sc.name: _train(sc, rank, world) for sc in scenarios}


def _model(sc: FSDPScenario) -> nn.Module:
    return shard(make(sc.model).float() if sc.autocast else make(sc.model), sc)


def _train(sc: FSDPScenario, r: int, world: int) -> dict[str, Any]:
    sizes = sc.local_sizes(world)
    model = _model(sc)
    opts = DistributedOptions(grad_worker_fraction=sc.fraction, bucket_cap_mb=sc.bucket_cap_mb)
    scaler = _scaler(sc)
    pre = seed_preconditioner(model, distributed=opts, grad_scaler=scaler, **sc.kfac_options())
    assert pre.distributed is not None and pre.distributed.sharded
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out: dict[str, Any] = {"params": [], "diagnostics": []}
    for step in range(sc.steps):
        if sc.resume_at is not None and step == sc.resume_at:
            state = pre.state_dict()  # collective: every rank gets every layer's entry
            inner = model.state_dict()
            pre.remove()
            model = _model(sc)
            model.load_state_dict(inner)
            pre = seed_preconditioner(model, distributed=opts, **sc.kfac_options())
            pre.load_state_dict(state)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = batch(step, sum(sizes), sc.model)
        x, y = _local(x, sizes, r), _local(y, sizes, r)
        noise = _local(mc_noise(step, sum(sizes), sc.model), sizes, r)
        opt.zero_grad()
        if sc.accumulate:
            h = x.shape[0] // 2

            def half(v: Tensor) -> Tensor:
                return _reduce(v, sc.reduction, 2)

            assert isinstance(model, FSDPModule)
            model.set_requires_gradient_sync(not sc.no_sync)
            first = backward_pass(pre, model, sc, x[:h], y[:h], half, noise[:h], scaler)
            model.set_requires_gradient_sync(True)
            second = backward_pass(pre, model, sc, x[h:], y[h:], half, noise[h:], scaler)
            values = torch.cat([first, second])
        else:

            def whole(v: Tensor) -> Tensor:
                return _reduce(v, sc.reduction, 1)

            if sc.autocast:
                x = x.float() if x.is_floating_point() else x
                y = y.float() if y.is_floating_point() else y
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sc.autocast):
                values = backward_pass(pre, model, sc, x, y, whole, noise, scaler)
        _step(pre, opt, scaler, values if sc.step_loss else None)
        out["params"].append(full_params(model))
        if sc.measures:
            out["diagnostics"].append(pre.diagnostics().as_dict())
    out["factors"] = pre.factors()
    out["fishers"] = pre.diagonal_fishers()
    out["state"] = pre.state_dict()
    out["bytes"] = pre.distributed.communicated()
    summary = pre.summary()
    out["state_bytes"] = summary.total_bytes
    out["largest_layer_bytes"] = max(row.total_bytes for row in summary.layers)
    out["preconditions"] = {
        layer.name: pre.distributed.preconditions(layer) for layer in internals.layers(pre)
    }
    out["holds"] = {layer.name: layer.decomposition is not None for layer in internals.layers(pre)}
    return out


def unsupported(rank: int, world: int, what: str) -> str:
    """The error a rank gets for a sharding K-FAC refuses (every rank must raise)."""
    model = make("mlp")
    if what == "hybrid":
        shard(model, FSDPScenario("x"))
        kwargs: dict[str, Any] = {"distributed": DistributedOptions(grad_worker_fraction="hybrid")}
    elif what == "not_distributed":
        shard(model, FSDPScenario("x"))
        kwargs = {"distributed": False}
    elif what in ("precondition_update", "constrained_step"):  # attach() on shards
        shard(model, FSDPScenario("x"))
        kwargs = (
            {"damping_mode": "exact", "precondition_update": True}
            if what == "precondition_update"
            else {"max_loss_change": 1.0, "constrained_step": "optimizer"}
        )
    else:
        raise ValueError(what)
    try:
        pre = KFACPreconditioner(model, **kwargs)
        pre.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    except (ValueError, NotImplementedError) as exc:
        return str(exc)
    return "no error"


def dcp_save(rank: int, world: int, path: str, fraction: str) -> dict[str, Any]:
    """Train 3 steps, save model and preconditioner with DCP, and return the factors of
    the state (every layer's, from the collective ``state_dict()``)."""
    import torch.distributed.checkpoint as dcp

    sc = FSDPScenario("dcp", fraction, "eigen_adam", "mean", model="tokens", kfac=_TOKENS)
    model = shard(make("tokens"), sc)
    pre = seed_preconditioner(
        model, distributed=DistributedOptions(grad_worker_fraction=fraction), **sc.kfac_options()
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sizes = sc.local_sizes(world)
    for step in range(3):
        x, y = batch(step, sum(sizes), "tokens")
        opt.zero_grad()
        backward_pass(pre, model, sc, _local(x, sizes, rank), _local(y, sizes, rank),
                      lambda v: v.mean(), torch.zeros(()), None)  # fmt: skip
        pre.step()
        opt.step()
    items = pre.dcp_state().state_dict()
    dcp.save({"kfac": pre.dcp_state()}, checkpoint_id=path)
    return {"state": pre.state_dict(), "written": sorted(items)}


def dcp_load(rank: int, world: int, path: str, fraction: str, how: str = "dcp") -> dict[str, Any]:
    """A fresh preconditioner loads the checkpoint (``how``: "dcp", a DCP checkpoint; or
    "state_dict", a file of ``state_dict()``): what it holds afterwards."""
    import torch.distributed.checkpoint as dcp

    sc = FSDPScenario("dcp", fraction, "eigen_adam", "mean", model="tokens", kfac=_TOKENS)
    model = make("tokens")
    if world > 1:
        shard(model, sc)
    pre = seed_preconditioner(
        model,
        distributed=DistributedOptions(grad_worker_fraction=fraction) if world > 1 else False,
        **sc.kfac_options(),
    )
    if how == "dcp":
        dcp.load({"kfac": pre.dcp_state()}, checkpoint_id=path)
    else:
        pre.load_state_dict(torch.load(path, weights_only=True))
    held = {
        layer.name: (layer.A.clone() if layer.A is not None else None)
        for layer in internals.layers(pre)
    }
    moments = {
        layer.name: layer.decomposition.s.clone()
        for layer in internals.layers(pre)
        if layer.decomposition is not None and layer.decomposition.s is not None
    }
    return {"steps": pre.steps, "A": held, "s": moments, "state": pre.state_dict()}


def dead_after_backward(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 dies after its backward pass; rank 0's step() must fail with kfac_ef's error
    (within the process group's timeout)."""
    import os
    import time

    model = shard(make("mlp"), FSDPScenario("dead"))
    pre = seed_preconditioner(model, damping=0.1, factor_dtype=torch.float64)
    x, y = batch(0, 4 * world)
    x, y = _local(x, [4] * world, rank), _local(y, [4] * world, rank)
    backward_pass(pre, model, FSDPScenario("dead"), x, y, lambda v: v.mean(), x, None)
    if rank == 1:
        os._exit(0)
    start = time.monotonic()
    try:
        pre.step()
    except RuntimeError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


_TOKENS: dict[str, Any] = {"max_factor_dim": 8, "large_factor_block": 4, "other_params": "diagonal"}


def budget(rank: int, world: int) -> dict[str, Any]:
    """memory_budget is per rank: a budget between the largest rank's share under mem_opt and
    the whole state passes with mem_opt (each rank keeps its layers) and fails with comm_opt
    (each rank keeps everything)."""
    model = shard(make("mlp"), FSDPScenario("budget"))
    opts = {"damping": 0.1, "factor_dtype": torch.float64}
    comm = DistributedOptions(grad_worker_fraction="comm_opt")
    mem_opt = DistributedOptions(grad_worker_fraction="mem_opt")
    whole = KFACPreconditioner(model, distributed=comm, **opts)
    total = whole.summary().total_bytes
    whole.remove()
    share = KFACPreconditioner(model, distributed=mem_opt, **opts)
    largest = torch.tensor([share.summary().total_bytes])
    share.remove()
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    limit = (int(largest) + total) // 2
    mem = KFACPreconditioner(model, distributed=mem_opt, memory_budget=limit, **opts)
    mine = mem.summary().total_bytes
    mem.remove()
    try:
        KFACPreconditioner(model, distributed=comm, memory_budget=limit, **opts)
    except ValueError as exc:
        return {"total": total, "mine": mine, "limit": limit, "error": str(exc)}
    return {"total": total, "mine": mine, "limit": limit, "error": None}


# ---------------------------------------------------------------------- Hugging Face models

# Which submodules are FSDP's units (the decoder blocks), per zoo model.
ZOO_BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h"}
# GPT-2's position embedding is called with one row of positions for the whole batch
# (batch-shared): a distributed run refuses it, so it is left to the optimizer here.
ZOO_OPTIONS: dict[str, dict[str, Any]] = {
    "llama": {"other_params": "diagonal"},
    "gpt2": {"other_params": "diagonal", "skip_layers": ["transformer.wpe"]},
}


def zoo_run(rank: int, world: int, name: str, ranks: int = 2, steps: int = 3) -> dict[str, Any]:
    """A zoo model (float64) trained ``steps`` SGD steps with K-FAC on global batches of
    4·``ranks`` sequences; with world > 1 its blocks and root sharded by fully_shard, each
    rank on its slice (world 1: the one-process reference on the whole batch)."""
    from .zoo_models import ZOO

    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.build().double()
    if world > 1:
        blocks = model.get_submodule(ZOO_BLOCKS[name])
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    pre = seed_preconditioner(
        model, damping=0.1, factor_dtype=torch.float64, inv_update_steps=2, **ZOO_OPTIONS[name]
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    local = 4 * ranks // world
    params = []
    for step in range(steps):
        inputs = entry.batch(4 * ranks, torch.Generator().manual_seed(100 + step))
        mine = {k: v[rank * local : (rank + 1) * local] for k, v in inputs.items()}
        opt.zero_grad()
        entry.losses(model, mine).mean().backward()
        pre.step()
        opt.step()
        params.append(full_params(model))
    return {
        "params": params,
        "layers": sorted(layer.name for layer in internals.layers(pre)),
        "kinds": sorted({row.kind for row in pre.summary().layers}),
    }


def default_workers(rank: int, world: int) -> dict[str, Any]:
    """grad_worker_fraction left automatic: what each setup resolves to."""
    from torch.nn.parallel import DistributedDataParallel

    out: dict[str, Any] = {}
    for name, options in [
        ("fsdp", {}),
        ("fsdp ekfac", {"damping_mode": "ekfac"}),
        ("fsdp exact constraint", {"constraint": "exact", "target_loss_change": 0.1, "lr": 0.1,
                                   "loss_change_unit": "absolute"}),
    ]:  # fmt: skip
        model = shard(make("mlp"), FSDPScenario(name))
        pre = KFACPreconditioner(model, **options)
        assert pre.distributed is not None
        out[name] = pre.distributed.options.grad_worker_fraction
        pre.remove()
    pre = KFACPreconditioner(DistributedDataParallel(make("mlp")))
    assert pre.distributed is not None
    out["ddp"] = pre.distributed.options.grad_worker_fraction
    return out
