"""Where a K-FAC step's time goes on benchmarks/lm.py's models: per kind of step (a plain
step, a statistics step, a statistics + decomposition step), the forward and backward passes
(with the statistics hooks), ``precond.step()`` and the optimizer's step, medians over 30
steps after 10 of warmup, one thread. Rows go to results/lm_cost.csv.

Usage: python benchmarks/lm_cost.py [--tasks lm256 chargpt] [--kfac JSON]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, machine, set_threads, table  # noqa: E402
from lm import TASKS  # noqa: E402
from tasks import data_of  # noqa: E402

from kfac_ef import KFACPreconditioner  # noqa: E402


def measure(task_name: str, options: dict | None, steps: int = 40) -> dict[str, dict[str, float]]:
    task = TASKS[task_name]
    data = data_of(task)
    torch.manual_seed(0)
    model = task.build(data)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pre = KFACPreconditioner(model, **options) if options is not None else None
    every = (pre.options.factor_update_steps, pre.options.inv_update_steps) if pre else (0, 0)
    times: dict[str, dict[str, list[float]]] = {}
    for i in range(steps):
        x, y = task.sample(data, task.batch, gen, i)
        t0 = time.perf_counter()
        opt.zero_grad()
        task.losses(model(x), y).mean().backward()
        t1 = time.perf_counter()
        if pre is not None:
            pre.step()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i < 10:
            continue
        kind = "plain"
        if pre is not None and i % every[1] == 0:
            kind = "decomposition"
        elif pre is not None and i % every[0] == 0:
            kind = "statistics"
        parts = times.setdefault(kind, {"forward+backward": [], "step()": [], "optimizer": []})
        parts["forward+backward"].append(t1 - t0)
        parts["step()"].append(t2 - t1)
        parts["optimizer"].append(t3 - t2)
    return {k: {p: 1000 * statistics.median(v) for p, v in d.items()} for k, d in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["lm256", "chargpt"], choices=list(TASKS))
    ap.add_argument("--kfac", default="{}", help="options as JSON ({}: the defaults)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    set_threads(1)
    stamp = machine()
    rows, lines = [], []
    for task in args.tasks:
        for label, options in (("AdamW", None), ("AdamW + K-FAC", json.loads(args.kfac))):
            for kind, parts in measure(task, options).items():
                rows.append({**stamp, "task": task, "method": label, "options": args.kfac
                             if options is not None else "", "step": kind,
                             **{k: round(v, 2) for k, v in parts.items()}})  # fmt: skip
                lines.append([task, label, kind, *(f"{v:.1f}" for v in parts.values())])
    append_csv(args.out / "lm_cost.csv", rows)
    header = ["task", "method", "step", "forward+backward ms", "step() ms", "optimizer ms"]
    print("\n".join(table(header, lines)))


if __name__ == "__main__":
    main()
