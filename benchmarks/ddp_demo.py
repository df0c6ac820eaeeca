"""Data-parallel training with K-FAC: DistributedDataParallel + KFACPreconditioner on the CPU.

    torchrun --nproc_per_node 2 benchmarks/ddp_demo.py [--strategy mem_opt] [--epochs 10]

Trains the demo's MLP (64-128-128-10) on scikit-learn's digits: each rank takes its share of
every global batch (DistributedSampler), DDP averages the gradients, and the preconditioner
averages the factor statistics and splits the decompositions across the ranks
(docs/distributed.md). Rank 0 prints the loss and test accuracy per epoch, the assignment of
decompositions to ranks and the bytes K-FAC communicated; at the end every rank checks that
its parameters are bit-for-bit those of rank 0.

Without torchrun it runs as one process (torch.distributed not initialized).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_setup, digits, mlp, seed_options  # noqa: E402

from kfac_ef import DistributedOptions, KFACPreconditioner  # noqa: E402


def main() -> None:
    args, distributed, world, rank = demo_setup(
        __doc__.split("\n")[0], "comm_opt", "comm_opt, mem_opt, hybrid"
    )

    x_tr, y_tr, x_te, y_te = digits()
    train = TensorDataset(x_tr, y_tr)
    sampler = DistributedSampler(train, seed=0) if distributed else None
    loader = DataLoader(
        train, batch_size=args.batch // world, sampler=sampler, shuffle=sampler is None
    )

    torch.manual_seed(0)
    model: torch.nn.Module = mlp([64, 128, 128, 10])
    if distributed:
        model = DistributedDataParallel(model)
    options = DistributedOptions(grad_worker_fraction=args.strategy) if distributed else False
    precond = KFACPreconditioner(
        model, distributed=options, **seed_options(damping=0.1, inv_update_steps=10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if rank == 0 and precond.distributed is not None:
        print(precond.distributed.describe())

    start = time.perf_counter()
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        total = torch.zeros(2, dtype=torch.float64)  # loss sum, examples
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            precond.step()
            opt.step()
            total += torch.tensor([loss.item() * len(xb), len(xb)], dtype=torch.float64)
        if distributed:
            dist.all_reduce(total)
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1:>2}: train loss {total[0] / total[1]:.4f}, test acc {acc:.4f}")
    elapsed = time.perf_counter() - start

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    if distributed:
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
    else:
        same = True
    if rank == 0:
        print(f"{world} rank(s), {elapsed:.1f} s; parameters identical on every rank: {same}")
        if precond.distributed is not None:
            sent = precond.distributed.communicated()
            print("bytes K-FAC handed to collectives on rank 0:", dict(sorted(sent.items())))
    if distributed:
        dist.destroy_process_group()
    if not same:
        raise SystemExit("parameters differ across ranks")


if __name__ == "__main__":
    main()
