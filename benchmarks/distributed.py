"""Distributed K-FAC: step time and bytes communicated per step, by strategy and world size.

    python benchmarks/distributed.py                     # sweep 1, 2, 4 ranks; appends CSV
    torchrun --nproc_per_node 2 benchmarks/distributed.py   # one world size; prints a table

Data-parallel training of an MLP 256-512-512-10 on synthetic data (only time and traffic
matter here), a fixed local batch per rank (weak scaling), DDP averaging the gradients, gloo
on the CPU with one thread per rank. Side by side in one run per world size: DDP + SGD alone,
then SGD + K-FAC for each strategy (comm_opt, mem_opt, hybrid; factor statistics reduced on
every step, or only before decompositions). factor_update_steps=1, inv_update_steps=10.

Step time: each rank times every step; per step the slowest rank counts; reported are the
median (a step without decomposition) and the mean (decompositions amortized) over the timed
steps. Bytes per step and rank (mean over ranks and timed steps), from
kfac_ef.distributed.Distributor.communicated(): the buffers K-FAC all-reduces, and what the
rank receives through broadcasts; beside them the gradient bytes DDP all-reduces. At 1 rank,
K-FAC runs without distribution.

Each world size runs in its own torchrun; the sweep appends one row per (world, strategy) to
benchmarks/results/distributed.csv. On a machine with fewer cores than ranks (this
repository's 2-core CPU box) the ranks share cores: times at 4 ranks include that contention.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    append_csv,
    machine,
    mlp,
    seed_options,
    timing_args,
    torchrun_sweep,
)

from kfac_ef import DistributedOptions, KFACPreconditioner  # noqa: E402

SIZES = [256, 512, 512, 10]
MODEL = "mlp-" + "-".join(map(str, SIZES))
STRATEGIES = [
    # name, grad_worker_fraction, factor_sync
    ("comm_opt", "comm_opt", "update"),
    ("mem_opt", "mem_opt", "update"),
    ("hybrid", "hybrid", "update"),
    ("comm_opt, factors synced at decompositions", "comm_opt", "decomposition"),
]


def run_one(
    strategy: str | None,
    fraction: str,
    factor_sync: str,
    batch: int,
    warmup: int,
    steps: int,
) -> dict[str, object]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    model: nn.Module = mlp(SIZES)
    if world > 1:
        model = DistributedDataParallel(model)
    pre = None
    if strategy is not None:
        dist_opts = (
            DistributedOptions(grad_worker_fraction=fraction, factor_sync=factor_sync)
            if world > 1
            else False
        )
        pre = KFACPreconditioner(
            model, distributed=dist_opts, **seed_options(damping=0.1, inv_update_steps=10)
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, SIZES[0], generator=gen)
    y = torch.randint(0, SIZES[-1], (batch,), generator=gen)
    times = []
    sent_before: dict[str, int] = {}
    for i in range(warmup + steps):
        if i == warmup and pre is not None and pre.distributed is not None:
            sent_before = pre.distributed.communicated()
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if pre is not None:
            pre.step()
        opt.step()
        times.append(time.perf_counter() - t0)
    timed = torch.tensor(times[warmup:], dtype=torch.float64)
    kinds = ["statistics", "factors", "decompositions", "gradients"]
    sent = torch.zeros(len(kinds), dtype=torch.float64)
    if pre is not None and pre.distributed is not None:
        after = pre.distributed.communicated()
        sent = torch.tensor(
            [after.get(k, 0) - sent_before.get(k, 0) for k in kinds], dtype=torch.float64
        )
    if world > 1:
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)  # per step, the slowest rank
        dist.all_reduce(sent)
        sent /= world
    sent /= steps
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    workers = ""
    if pre is not None and pre.distributed is not None:
        workers = str(pre.distributed.grid.rows)
    return {
        "world": world,
        "strategy": "SGD (DDP)" if strategy is None else strategy,
        "grad_workers": workers,
        "median_step_ms": 1e3 * statistics.median(timed.tolist()),
        "mean_step_ms": 1e3 * statistics.fmean(timed.tolist()),
        **{f"{k}_bytes_per_step": int(v) for k, v in zip(kinds, sent.tolist())},
        "kfac_bytes_per_step": int(sent.sum()),
        "ddp_grad_bytes_per_step": grads if world > 1 else 0,
        "model": MODEL,
        "batch_per_rank": batch,
        "steps": steps,
    }


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    runs: list[tuple[str | None, str, str]] = [(None, "", "")]
    if world == 1:
        runs.append(("K-FAC, one process", "", ""))
    else:
        runs += STRATEGIES
    rows = [run_one(s, f, sync, args.batch, args.warmup, args.steps) for s, f, sync in runs]
    if rank == 0:
        print_table(rows)
        if args.csv:
            meta = machine()
            append_csv(RESULTS / "distributed.csv", [{**r, **meta} for r in rows])
    if dist.is_initialized():
        dist.destroy_process_group()


def print_table(rows: list[dict[str, object]]) -> None:
    print(
        f"{'ranks':>5} {'strategy':<44} {'n_g':>3} {'median ms':>9} {'mean ms':>8} "
        f"{'K-FAC KiB/step':>14} {'DDP KiB/step':>12}"
    )
    for r in rows:
        print(
            f"{r['world']:>5} {r['strategy']!s:<44} {r['grad_workers']!s:>3} "
            f"{r['median_step_ms']:>9.2f} {r['mean_step_ms']:>8.2f} "
            f"{int(r['kfac_bytes_per_step']) / 1024:>14.1f} "  # type: ignore[call-overload]
            f"{int(r['ddp_grad_bytes_per_step']) / 1024:>12.1f}"  # type: ignore[call-overload]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    timing_args(parser, batch=128, warmup=10, steps=30, note="3 decompositions")
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ or args.worlds == "":
        worker(args)
        return
    torchrun_sweep(__file__, args)  # one torchrun per world size, each appending its rows


if __name__ == "__main__":
    main()
