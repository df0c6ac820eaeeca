"""A published peer: ASDL's K-FAC with the empirical Fisher (PyPI ``asdfghjkl``) against kfac_ef,
on the digits autoencoder and digits classification (benchmarks/tasks.py).

Optional: ASDL is not a dependency of kfac_ef and not in the pinned development requirements.
Install it into the environment first (it pulls no new dependency beyond torch and numpy):

    .venv/bin/pip install asdfghjkl==0.1a5
    .venv/bin/python benchmarks/peer.py

Both run SGD (no momentum) on preconditioned gradients with statistics every step, the
preconditioner recomputed every 10 steps and running averages with decay 0.95, for
``--steps`` steps per run, over a grid of damping values and learning rates, on ``--seeds``
seeds:

- ``ASDL``: ``KfacGradientMaker(model, PreconditioningConfig(damping=ε, ...),
  fisher_type=FISHER_EMP)``: π-damped Kronecker factors inverted by Cholesky, ε absolute
  (ASDL's only rule);
- ``kfac_ef π``: ``damping_mode="pi"``, ε absolute: the same algorithm in this library;
- ``kfac_ef recipe``: relative ε and the exact-form trust region (docs/benchmarks.md).

A run is "crashed" when a step raises (ASDL's Cholesky factorization of an ill-conditioned
factor does), "diverged" when its metric becomes non-finite or 100x its initial value.
Reported per (method, ε): the best learning rate's final metric (mean ± std over the seeds
that finished), how many runs finished, and the steps per second.

ASDL 0.1a5 calls ``torch.cuda.nvtx`` unconditionally, which raises on CPU-only builds of
torch; this script replaces ``torch.cuda.nvtx.range`` by a no-op when CUDA is unavailable.

Appends to results/peer.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, load1, machine, set_threads, table  # noqa: E402
from tasks import TASKS, Method, Run, Stepper, Task, train  # noqa: E402
from tqdm import tqdm  # noqa: E402

DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LRS = {"autoencoder": (0.03, 0.1, 0.3), "classification": (0.01, 0.03, 0.1)}
COMMON = {"factor_update_steps": 1, "inv_update_steps": 10, "factor_decay": 0.95}
RECIPE_LRS = (0.3, 1.0)


class _NoRange(contextlib.ContextDecorator):
    def __enter__(self) -> _NoRange:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False


def import_asdl() -> Any:
    """The asdl module, or None when it is not installed."""
    if not torch.cuda.is_available():
        import torch.cuda.nvtx as nvtx

        nvtx.range = lambda *args, **kwargs: _NoRange()  # type: ignore[assignment]
    try:
        import asdl
    except ImportError:
        return None
    return asdl


class AsdlStepper:
    """One step of SGD on gradients preconditioned by ASDL's empirical-Fisher K-FAC."""

    def __init__(self, task: Task, model: nn.Module, method: Method) -> None:
        asdl = import_asdl()
        assert method.kfac is not None
        config = asdl.PreconditioningConfig(
            data_size=task.batch,
            damping=method.kfac["damping"],
            preconditioner_upd_interval=COMMON["inv_update_steps"],
            curvature_upd_interval=COMMON["factor_update_steps"],
            ema_decay=1.0 - COMMON["factor_decay"],
        )
        loss_type = asdl.LOSS_MSE if task.name == "autoencoder" else asdl.LOSS_CROSS_ENTROPY
        self.maker = asdl.KfacGradientMaker(
            model, config, fisher_type=asdl.FISHER_EMP, loss_type=loss_type
        )
        self.opt = torch.optim.SGD(model.parameters(), lr=method.lr)
        self.model = model
        self.loss = F.mse_loss if task.name == "autoencoder" else F.cross_entropy

    def step(self, x: Tensor, y: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        dummy = self.maker.setup_model_call(self.model, x)
        self.maker.setup_loss_call(self.loss, dummy, y)
        self.maker.forward_and_backward()
        self.opt.step()

    def close(self) -> None:
        pass


def _status(run: Run) -> str:
    if run.error:
        return "crashed"
    return "diverged" if run.diverged else "ok"


def configurations(
    task: str, dampings: tuple[float, ...] | list[float] = DAMPINGS, lrs: list[float] | None = None
) -> list[tuple[str, float, list[Method], Any]]:
    """(method name, ε, one Method per learning rate, stepper) for the task; ``lrs`` replaces
    every method's learning-rate grid."""
    out = []
    for damping in dampings:
        kw = {"damping": damping, **COMMON}
        out.append(
            (
                "ASDL",
                damping,
                [Method("ASDL", "sgd", lr, momentum=0.0, kfac=kw) for lr in lrs or LRS[task]],
                AsdlStepper,
            )
        )
        pi = {**kw, "damping_mode": "pi", "damping_unit": "absolute"}
        out.append(
            (
                "kfac_ef π",
                damping,
                [Method("kfac_ef π", "sgd", lr, momentum=0.0, kfac=pi) for lr in lrs or LRS[task]],
                Stepper,
            )
        )
        recipe = {
            **kw,
            "damping_unit": "relative",
            "max_loss_change": 1.0,
            "loss_change_unit": "spread",
        }
        out.append(
            (
                "kfac_ef recipe",
                damping,
                [
                    Method("kfac_ef recipe", "sgd", lr, momentum=0.0, kfac=recipe)
                    for lr in lrs or RECIPE_LRS
                ],
                Stepper,
            )
        )
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=["autoencoder", "classification"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dampings", type=float, nargs="*")
    parser.add_argument("--methods", nargs="*", help="only these methods (by name)")
    parser.add_argument("--lrs", type=float, nargs="*", help="this learning-rate grid instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "peer.csv")
    args = parser.parse_args(argv)
    asdl = import_asdl()
    if asdl is None:
        print(
            "asdl is not installed: `.venv/bin/pip install asdfghjkl==0.1a5`, then rerun "
            "(an optional comparison, not part of `make bench`)"
        )
        return []
    set_threads(args.threads)
    print(f"asdl {getattr(asdl, '__version__', '?')}, threads {torch.get_num_threads()}")
    rows, cells = [], []
    meta = machine()
    for task_name in args.tasks:
        task = TASKS[task_name]
        configs = [
            c
            for c in configurations(task_name, args.dampings or DAMPINGS, args.lrs)
            if not args.methods or c[0] in args.methods
        ]
        total = sum(len(m) for _, _, m, _ in configs) * args.seeds
        with tqdm(total=total, desc=f"peer {task_name}", unit="run", disable=None) as bar:
            for name, damping, methods, stepper in configs:
                by_lr: dict[float, list[Run]] = {}
                for method in methods:
                    for seed in range(args.seeds):
                        bar.set_postfix_str(f"{name} ε={damping:g} lr={method.lr:g} seed {seed}")
                        run = train(
                            task,
                            method,
                            seed,
                            budget_s=math.inf,
                            max_steps=args.steps,
                            stepper=stepper,
                        )
                        by_lr.setdefault(method.lr, []).append(run)
                        bar.update()
                        rows.append(
                            {
                                "task": task_name,
                                "method": name,
                                "damping": damping,
                                "lr": method.lr,
                                "seed": seed,
                                "steps": run.steps,
                                "status": _status(run),
                                "error": run.error,
                                "final": run.final,
                                "steps_per_s": run.steps_per_s,
                                "config": method.describe(),
                                **meta,
                                "load1": f"{load1():.2f}",
                            }
                        )

                def score(lr: float, by_lr: dict[float, list[Run]] = by_lr) -> float:
                    runs = by_lr[lr]
                    if any(_status(r) != "ok" for r in runs):
                        return math.inf
                    return statistics.mean(r.final for r in runs)

                best = min(by_lr, key=score)
                runs = by_lr[best]
                finished = [r for r in runs if _status(r) == "ok"]
                all_runs = [r for rs in by_lr.values() for r in rs]
                failures = [_status(r) for r in all_runs if _status(r) != "ok"]
                finals = [r.final for r in finished]
                cells.append(
                    [
                        task_name,
                        name,
                        f"{damping:g}",
                        f"{best:g}" if math.isfinite(score(best)) else "-",
                        (
                            f"{statistics.mean(finals):.4g}"
                            + (f" ± {statistics.stdev(finals):.2g}" if len(finals) > 1 else "")
                            if finals and math.isfinite(score(best))
                            else "-"
                        ),
                        f"{len(all_runs) - len(failures)}/{len(all_runs)}"
                        + (f" ({', '.join(sorted(set(failures)))})" if failures else ""),
                        f"{statistics.median(r.steps_per_s for r in all_runs if r.steps):.0f}",
                    ]
                )
                print("  ".join(cells[-1]), flush=True)
    header = ["task", "method", "damping", "best lr", "final metric", "runs finished", "steps/s"]
    print("\n" + "\n".join(table(header, cells)))
    append_csv(args.out, rows)
    print(f"\nappended to {args.out}")
    return rows


if __name__ == "__main__":
    main()
