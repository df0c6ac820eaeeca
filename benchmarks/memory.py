"""Memory overhead: SGD and AdamW alone vs with KFACPreconditioner, on step_overhead.py's models.

Every configuration runs in a fresh process (so that allocations of one do not hide those of
another) and trains ``--steps`` steps on synthetic data, one of them a decomposition step.
Reported per configuration:

- the bytes of the parameters and of the optimizer's state (AdamW: two moments per
  parameter; SGD with momentum: one buffer);
- the preconditioner's planned state (``summary().total_bytes``: running factors, statistics
  accumulators, eigenbases and eigenvalues, diagonal Fishers) and the bytes of the tensors it
  actually holds after training (counted from its ``state_dict()`` plus the accumulators);
- the peak memory of the training steps above the memory after building model and
  optimizer: on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the growth of the peak
  resident set size (includes the allocator's caching and the transient step workspace:
  approximate, and it counts the first step's one-time allocations).

Prints a table and appends it to benchmarks/results/memory.csv.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import RESULTS, append_csv, machine, seed_options, set_threads, table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tests import internals  # noqa: E402

MiB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process: returns its byte counts."""
    from step_overhead import INV_STEPS, MODELS, make_optimizer

    from kfac_ef import KFACPreconditioner

    set_threads(config["threads"])
    device = torch.device(config["device"])
    bench, batch = MODELS[config["model"]]
    batch = max(1, int(batch * config["batch_scale"]))
    torch.manual_seed(0)
    model = bench.build().to(device)
    x, y = bench.batch(batch, device)
    opt = make_optimizer(config["optimizer"], model.parameters())
    pre = None
    planned = 0
    if config["kfac"]:
        pre = KFACPreconditioner(
            model, **seed_options(damping=1e-2, inv_update_steps=INV_STEPS, **bench.kfac)
        )
        planned = pre.summary().total_bytes
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    base_rss = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    for _ in range(config["steps"]):
        opt.zero_grad(set_to_none=True)
        bench.loss(model(x), y).backward()
        if pre is not None:
            pre.step()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base_cuda
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    held = 0
    if pre is not None:
        held = _tensor_bytes(pre.state_dict())
        held += sum(layer.stats.nbytes() for layer in internals.layers(pre))  # accumulators
        pre.remove()
    return {
        "params_mib": params / MiB,
        "optimizer_state_mib": _tensor_bytes(opt.state_dict()["state"]) / MiB,
        "kfac_planned_mib": planned / MiB,
        "kfac_held_mib": held / MiB,
        "peak_growth_mib": peak / MiB,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from step_overhead import MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--optimizers", nargs="*", default=["sgd", "adamw"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.csv")
    args = parser.parse_args(argv)
    configs = [
        {
            "model": m,
            "optimizer": o,
            "kfac": k,
            "device": args.device,
            "steps": args.steps,
            "threads": args.threads,
            "batch_scale": args.batch_scale,
        }
        for m in args.models
        for o in args.optimizers
        for k in (False, True)
    ]
    ctx = mp.get_context("spawn")
    results = []
    for config in tqdm(configs, desc="memory", unit="config", disable=None):
        with ctx.Pool(1) as pool:
            results.append(pool.apply(measure, (config,)))
    meta = machine()
    rows, cells = [], []
    for i in range(0, len(configs), 2):
        alone, kfac = results[i], results[i + 1]
        c = configs[i]
        extra = kfac["peak_growth_mib"] - alone["peak_growth_mib"]
        name = "AdamW" if c["optimizer"] == "adamw" else "SGD"
        cells.append(
            [
                MODELS[c["model"]][0].describe,
                name,
                f"{alone['params_mib']:.1f}",
                f"{alone['optimizer_state_mib']:.1f}",
                f"{kfac['kfac_planned_mib']:.1f}",
                f"{kfac['kfac_held_mib']:.1f}",
                f"{alone['peak_growth_mib']:.1f}",
                f"{kfac['peak_growth_mib']:.1f}",
                f"{extra:.1f}",
            ]
        )
        rows.append(
            {
                "model": c["model"],
                "optimizer": c["optimizer"],
                "batch": max(1, int(MODELS[c["model"]][1] * args.batch_scale)),
                "params_mib": alone["params_mib"],
                "optimizer_state_mib": alone["optimizer_state_mib"],
                "kfac_planned_mib": kfac["kfac_planned_mib"],
                "kfac_held_mib": kfac["kfac_held_mib"],
                "peak_alone_mib": alone["peak_growth_mib"],
                "peak_kfac_mib": kfac["peak_growth_mib"],
                "peak_extra_mib": extra,
                "steps": args.steps,
                "device_kind": args.device,
                **meta,
            }
        )
    header = [
        "model",
        "optimizer",
        "params MiB",
        "opt. state MiB",
        "K-FAC planned MiB",
        "K-FAC held MiB",
        "peak alone MiB",
        "peak +K-FAC MiB",
        "extra peak MiB",
    ]
    print("\n".join(table(header, cells)))
    append_csv(args.out, rows)
    print(f"\nappended to {args.out}")
    return rows


if __name__ == "__main__":
    main()
