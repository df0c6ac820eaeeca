"""Sharded training with K-FAC: FSDP2's fully_shard + KFACPreconditioner on the CPU.

    torchrun --nproc_per_node 2 benchmarks/fsdp_demo.py [--strategy comm_opt] [--epochs 10]

Trains the demo's MLP (64-128-128-10) on scikit-learn's digits with every Linear sharded by
``fully_shard`` (then the root): each rank holds its rows of every weight and of every
gradient. K-FAC averages the factor statistics across ranks as under DDP, gathers each
layer's gradient to the rank that preconditions it ("mem_opt", the default here: each
layer's factors and decompositions on one rank) and sends every rank its rows back
(docs/distributed.md, "FSDP2"). Rank 0 prints the loss and test accuracy per epoch, the
assignment, the per-rank state and the bytes K-FAC communicated. At the end the sharded
parameters are gathered and compared with a one-process run of the same training on the
same global batches (equal up to float32 rounding, which the script prints).

Without torchrun it runs as one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_setup, digits, mlp, seed_options  # noqa: E402

from kfac_ef import DistributedOptions, KFACPreconditioner  # noqa: E402


def train(
    model: nn.Module, precond: KFACPreconditioner, args: argparse.Namespace, rank: int, world: int
) -> list[tuple[float, float]]:
    """Epochs of SGD + K-FAC; each rank takes its slice of every global batch."""
    x_tr, y_tr, x_te, y_te = digits()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    local = args.batch // world
    out = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(epoch))
        total = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[start + rank * local : start + (rank + 1) * local]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            precond.step()
            opt.step()
            total += torch.tensor([loss.item() * len(idx), len(idx)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(total)
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        out.append((float(total[0] / total[1]), acc))
    return out


def whole(model: nn.Module) -> Tensor:
    """Every parameter, whole (a sharded one is all-gathered: every rank calls this)."""
    parts = []
    for p in model.parameters():
        t = p.detach()
        parts.append(t.full_tensor().flatten() if hasattr(t, "full_tensor") else t.flatten())
    return torch.cat(parts)


def build(sharded: bool) -> nn.Module:
    torch.manual_seed(0)
    model = mlp([64, 128, 128, 10])
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


def main() -> None:
    args, distributed, world, rank = demo_setup(
        __doc__.split("\n")[0], "mem_opt", "mem_opt or comm_opt"
    )
    options = seed_options(damping=0.1, inv_update_steps=10)

    model = build(sharded=distributed)
    strategy = DistributedOptions(grad_worker_fraction=args.strategy) if distributed else False
    precond = KFACPreconditioner(model, distributed=strategy, **options)
    if rank == 0 and precond.distributed is not None:
        print(precond.distributed.describe())
        print(f"K-FAC state on rank 0: {precond.summary().total_bytes / 1024:.1f} KiB")
    start = time.perf_counter()
    history = train(model, precond, args, rank, world)
    elapsed = time.perf_counter() - start
    if rank == 0:
        for epoch, (loss, acc) in enumerate(history):
            print(f"epoch {epoch + 1:>2}: train loss {loss:.4f}, test acc {acc:.4f}")
    params = whole(model)
    if rank == 0:
        print(f"{world} rank(s), {elapsed:.1f} s")
        if precond.distributed is not None:
            sent = precond.distributed.communicated()
            print("bytes K-FAC communicated on rank 0:", dict(sorted(sent.items())))
            # The same training in one process, on the same global batches.
            ref = build(sharded=False)
            one = KFACPreconditioner(ref, distributed=False, **options)
            train(ref, one, args, 0, 1)
            gap = (params - whole(ref)).abs().max().item()
            print(f"largest parameter difference from one process: {gap:.2e}")
            if gap > 1e-3:
                raise SystemExit("the sharded run left the one-process run")
    if distributed:
        # The other ranks wait for rank 0's one-process reference: a rank that tore its
        # process group down while rank 0 still held the connection aborted at exit under load.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
