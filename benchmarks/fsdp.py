"""K-FAC under FSDP2 (``fully_shard``): bytes per step beside FSDP's own, per-rank state, step time.

    python benchmarks/fsdp.py                        # sweep 1, 2, 4 ranks; appends CSV
    torchrun --nproc_per_node 2 benchmarks/fsdp.py   # one world size; prints a table

A GPT (dim 256, 4 blocks, 256-token vocabulary tied to the head, context 64; the
benchmarks' ``common.gpt``) trained on random tokens (only bytes, memory and time matter
here), each block sharded with ``fully_shard`` and then the root (embeddings, final norm,
head), gloo on the CPU, one thread per rank, a fixed local batch per rank. Side by side in
one run per world size: AdamW alone, then AdamW on K-FAC-preconditioned gradients with the
library's defaults under each sharded mode ("mem_opt": each layer's state and
preconditioning on one rank; "comm_opt": on every rank).

Bytes per rank and step, averaged over the timed steps (which include statistics and
decomposition steps at the defaults' cadence), and what each kind costs a rank's link:

- FSDP's own, measured by wrapping the collectives FSDP2 calls (``all_gather_single``,
  ``reduce_scatter_single``): an all-gather moves (W-1)/W of its output through each rank,
  a reduce-scatter (W-1)/W of its input.
- K-FAC's, from ``precond.distributed.communicated()``: "statistics" (the all-reduced
  buffer; a ring moves 2(W-1)/W of it), "statistics_to_owner" (buffers reduced to the rank
  that keeps their layers, "mem_opt"; a reduce moves at least (W-1)/W of it),
  "decompositions" (broadcast, bytes received), "gather" and "return" (the all-to-alls of
  gradients, bytes received from other ranks).

Per-rank state: ``summary().total_bytes`` (running factors, accumulators, decompositions
of the layers this rank keeps) and the largest whole-gradient staging of one step
(``staged_bytes``). Step time: per step the slowest rank, median over the timed steps;
noisy on this shared CPU, and at 4 ranks the processes share 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, gpt, machine, timing_args, torchrun_sweep  # noqa: E402

from kfac_ef import DistributedOptions, KFACPreconditioner  # noqa: E402

VOCAB, DIM, CONTEXT, BLOCKS = 256, 256, 64, 4
MODEL = f"gpt dim {DIM}, {BLOCKS} blocks, vocab {VOCAB}, context {CONTEXT}"
MODES = ["AdamW (FSDP)", "mem_opt", "comm_opt"]

# Bytes FSDP's own collectives moved through this rank's link, by kind.
_FSDP_BYTES: dict[str, float] = defaultdict(float)


def _count_fsdp_collectives() -> None:
    """Wrap the two collectives FSDP2 calls, to count the bytes of its own traffic."""
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def all_gather_single(output: torch.Tensor, input: torch.Tensor, *a: Any, **k: Any) -> Any:
        w = dist.get_world_size(k.get("group"))
        _FSDP_BYTES["all_gather"] += output.numel() * output.element_size() * (w - 1) / w
        return gather(output, input, *a, **k)

    def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, *a: Any, **k: Any) -> Any:
        w = dist.get_world_size(k.get("group"))
        _FSDP_BYTES["reduce_scatter"] += input.numel() * input.element_size() * (w - 1) / w
        return scatter(output, input, *a, **k)

    dist.all_gather_single = all_gather_single  # type: ignore[assignment]
    dist.reduce_scatter_single = reduce_scatter_single  # type: ignore[assignment]


def build(world: int) -> nn.Module:
    torch.manual_seed(0)
    model = gpt(VOCAB, DIM, CONTEXT, blocks=BLOCKS)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)
    return model


def run_one(mode: str, batch: int, warmup: int, steps: int) -> dict[str, object]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = build(world)
    pre = None
    if mode != MODES[0]:
        pre = KFACPreconditioner(
            model,
            distributed=DistributedOptions(grad_worker_fraction=mode) if world > 1 else False,
        )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, VOCAB, (batch, CONTEXT + 1), generator=gen)
    x, y = idx[:, :-1], idx[:, 1:]
    times: list[float] = []
    kfac_before: dict[str, int] = {}
    fsdp_before: dict[str, float] = {}
    for i in range(warmup + steps):
        if i == warmup:
            fsdp_before = dict(_FSDP_BYTES)
            if pre is not None and pre.distributed is not None:
                kfac_before = pre.distributed.communicated()
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).backward()
        if pre is not None:
            pre.step()
        opt.step()
        times.append(time.perf_counter() - t0)
    kinds = ["statistics", "statistics_to_owner", "decompositions", "gather", "return"]
    kfac = torch.zeros(len(kinds), dtype=torch.float64)
    if pre is not None and pre.distributed is not None:
        after = pre.distributed.communicated()
        kfac = torch.tensor(
            [after.get(k, 0) - kfac_before.get(k, 0) for k in kinds], dtype=torch.float64
        )
    fsdp = torch.tensor(
        [_FSDP_BYTES[k] - fsdp_before.get(k, 0.0) for k in ("all_gather", "reduce_scatter")],
        dtype=torch.float64,
    )
    timed = torch.tensor(times[warmup:], dtype=torch.float64)
    state = float(pre.summary().total_bytes) if pre is not None else 0.0
    staged = float(getattr(pre.distributed, "staged_bytes", 0)) if pre is not None else 0.0
    per_rank = torch.tensor([state, staged], dtype=torch.float64)
    max_rank = per_rank.clone()
    if world > 1:
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)
        for t in (kfac, fsdp, per_rank):
            dist.all_reduce(t)
        dist.all_reduce(max_rank, op=dist.ReduceOp.MAX)
        kfac /= world
        fsdp /= world
        per_rank /= world
    kfac /= steps
    fsdp /= steps
    link = {
        "statistics": 2 * (world - 1) / world,
        "statistics_to_owner": (world - 1) / world,
        "decompositions": 1.0,
        "gather": 1.0,
        "return": 1.0,
    }
    kfac_link = sum(float(v) * link[k] for k, v in zip(kinds, kfac.tolist()))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "world": world,
        "mode": mode,
        "median_step_ms": 1e3 * statistics.median(timed.tolist()),
        "mean_step_ms": 1e3 * statistics.fmean(timed.tolist()),
        "fsdp_all_gather_bytes_per_step": int(fsdp[0]),
        "fsdp_reduce_scatter_bytes_per_step": int(fsdp[1]),
        "fsdp_link_bytes_per_step": int(fsdp.sum()),
        **{f"kfac_{k}_bytes_per_step": int(v) for k, v in zip(kinds, kfac.tolist())},
        "kfac_link_bytes_per_step": int(kfac_link),
        "state_bytes_mean_rank": int(per_rank[0]),
        "state_bytes_max_rank": int(max_rank[0]),
        "staged_bytes_max_rank": int(max_rank[1]),
        "param_bytes": params if world == 1 else _full_bytes(model),
        "model": MODEL,
        "batch_per_rank": batch,
        "steps": steps,
    }


def _full_bytes(model: nn.Module) -> int:
    return sum(int(torch.Size(p.shape).numel()) * p.element_size() for p in model.parameters())


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        _count_fsdp_collectives()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    modes = MODES if world > 1 else MODES[:2]
    rows = [run_one(m, args.batch, args.warmup, args.steps) for m in modes]
    if world == 1:
        rows[1]["mode"] = "K-FAC, one process"
    if rank == 0:
        print_table(rows)
        if args.csv:
            meta = machine()
            append_csv(RESULTS / "fsdp.csv", [{**r, **meta} for r in rows])
    if dist.is_initialized():
        dist.barrier()  # every rank done with its collectives before the teardown
        dist.destroy_process_group()


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'ranks':>5} {'mode':<20} {'median ms':>9} {'FSDP KiB/step':>13} "
        f"{'K-FAC KiB/step':>14} {'state KiB/rank':>14} {'staged KiB':>10}"
    )
    for r in rows:
        print(
            f"{r['world']:>5} {r['mode']:<20} {r['median_step_ms']:>9.1f} "
            f"{r['fsdp_link_bytes_per_step'] / 1024:>13.1f} "
            f"{r['kfac_link_bytes_per_step'] / 1024:>14.1f} "
            f"{r['state_bytes_max_rank'] / 1024:>14.1f} {r['staged_bytes_max_rank'] / 1024:>10.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    timing_args(parser, batch=8, warmup=2, steps=20, note="2 decompositions")
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ or args.worlds == "":
        worker(args)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    if 1 in worlds:  # one process, without torchrun
        worker(argparse.Namespace(**{**vars(args), "csv": True}))
    rest = ",".join(str(w) for w in worlds if w != 1)
    if rest:
        torchrun_sweep(__file__, argparse.Namespace(**{**vars(args), "worlds": rest}))


if __name__ == "__main__":
    main()
