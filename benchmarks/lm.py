"""Language models: AdamW, torch's Muon, SOAP and K-FAC (kfac_ef) side by side.

Two character-level GPTs on Python's standard-library source (benchmarks/tasks.py):

- ``chargpt``: dim 64, 2 blocks, context 64, batch 32 windows, 400 steps;
- ``lm256``: dim 256, 4 blocks, context 128, batch 8 windows, 300 steps (matrix work
  dominates the per-layer overhead).

Every method trains with linear warmup (the first 5 % of the steps) and cosine decay to 10 %
of its peak learning rate over the task's steps. Methods:

- ``AdamW``: torch.optim.AdamW (weight decay 0.01);
- ``Muon``: torch.optim.Muon on the blocks' 2-D matrices, AdamW (at AdamW's tuned rate) on
  the embeddings, the tied head, the norms and the biases, as Muon's documentation asks;
- ``SOAP``: SOAP from the published ``pytorch_optimizer`` package (the ``bench`` extra;
  skipped with a note when it is absent), all parameters;
- ``AdamW + K-FAC ...``: AdamW on gradients preconditioned by KFACPreconditioner, with the
  options named in METHODS.

``--tune`` runs every method's learning-rate grid (the same protocol for all: three values,
seed 0, final validation loss) and records it in results/lm_tuning.csv; the picked rates are
written in METHODS. A plain run trains every method at its rate for each seed, interleaved
(seed by seed, every method in turn), and reports per method: the final validation loss,
ms/step, the steps and the training seconds at which the loss first reaches the target
(AdamW's final validation loss on that seed), and the loss each method had when AdamW's
training time ran out (equal time). Rows go to results/lm.csv (one per run, with the
revision) and the curves to results/lm_curves.csv; ``--plot`` draws results/lm_<task>.png.

``--kfac NAME=JSON`` adds a method: preconditioner options, plus "lr", "optimizer" ("adamw",
"sgd", ...; default AdamW at the task's AdamW rate), "optimizer_options" (the optimizer's own
keyword arguments, e.g. {"momentum": 0} for SGD or {"betas": [0.9, 0.95]} for AdamW) and
"kfac": null for the optimizer alone. Optimizer "sgd+adamw": SGD with momentum on the
preconditioned parameters, AdamW (at "adamw_lr") on the others. With
``"constrained_step": "optimizer"`` or ``"precondition_update": true`` the preconditioner is
attached to the method's (first) optimizer (Muon's, for "muon").

Usage: python benchmarks/lm.py [--tasks chargpt lm256] [--seeds 3] [--tune] [--methods ...]
       [--kfac NAME=JSON] [--plot]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, load1, machine, read_csv, set_threads, table  # noqa: E402
from tasks import Run, Task, text_task, train  # noqa: E402

from kfac_ef import KFACPreconditioner  # noqa: E402

TASKS: dict[str, Task] = {
    "chargpt": text_task("chargpt", dim=64, blocks=2, context=64, batch=32),
    "lm256": text_task("lm256", dim=256, blocks=4, context=128, batch=8),
}
STEPS = {"chargpt": 400, "lm256": 300}
WARMUP = 0.05  # share of the steps with a linear warmup
FLOOR = 0.1  # the cosine decays to this share of the peak rate


@dataclass(frozen=True)
class LMMethod:
    """An optimizer (``adamw``, ``muon``, ``soap``, ``sgd``), optionally on gradients
    preconditioned with the options ``kfac``. ``adamw_lr``: Muon's AdamW part."""

    name: str
    optimizer: str
    lr: float
    kfac: dict[str, Any] | None = None
    adamw_lr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def with_lr(self, lr: float) -> LMMethod:
        return LMMethod(self.name, self.optimizer, lr, self.kfac, self.adamw_lr, self.extra)

    def describe(self) -> str:
        parts = [f"lr={self.lr:g}"]
        if self.adamw_lr is not None:
            parts.append(f"adamw_lr={self.adamw_lr:g}")
        parts += [f"{k}={v}" for k, v in (self.kfac or {}).items()]
        parts += [f"{k}={v}" for k, v in self.extra.items()]
        return ", ".join(parts)


# The K-FAC configurations measured here (docs/guides/transformers.md says what each did):
# KFACPreconditioner(model) under AdamW at AdamW's rate (the defaults), and the transformer
# recipe: Adam's second moment in K-FAC's eigenbasis (the default damping_mode) without
# grafting, under SGD with momentum 0.9 (the preconditioner is the adaptive part).
RECIPE: dict[str, Any] = {"damping_mode": "eigen_adam", "exponent": -0.5, "grafting": "none"}

# Learning rates picked by --tune (seed 0; results/lm_tuning.csv).
METHODS: dict[str, list[LMMethod]] = {
    "chargpt": [
        LMMethod("AdamW", "adamw", 3e-3),
        LMMethod("Muon", "muon", 3e-2, adamw_lr=3e-3),
        LMMethod("SOAP", "soap", 2.7e-2),
        LMMethod("AdamW + K-FAC (defaults)", "adamw", 9e-3, kfac={}),
        LMMethod("SGD + K-FAC (eigen_adam recipe)", "sgd", 1e-3, kfac=RECIPE),
    ],
    "lm256": [
        LMMethod("AdamW", "adamw", 1e-3),
        LMMethod("Muon", "muon", 3e-2, adamw_lr=1e-3),
        LMMethod("SOAP", "soap", 3e-3),
        LMMethod("AdamW + K-FAC (defaults)", "adamw", 3e-3, kfac={}),
        LMMethod("SGD + K-FAC (eigen_adam recipe)", "sgd", 1e-3 / 9, kfac=RECIPE),
    ],
}
# Learning-rate grids of --tune, around each method's rate above (the same three factors).
GRID = (1 / 3, 1.0, 3.0)
BASELINE = "AdamW"


def _schedule(steps: int):
    warm = max(1, round(WARMUP * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, steps - warm))
        return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _hidden_matrices(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The blocks' 2-D weights (Muon's) and every other parameter (AdamW's)."""
    hidden, rest = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (hidden if p.ndim == 2 and name.startswith("blocks.") else rest).append(p)
    return hidden, rest


def soap_class() -> Any:
    """The published SOAP (pytorch_optimizer), or None when the package is absent."""
    try:
        from pytorch_optimizer import SOAP
    except ImportError:
        return None
    return SOAP


def _preconditioned(model: nn.Module, pre: KFACPreconditioner) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters the preconditioner rewrites and every other one."""
    named = dict(model.named_parameters(remove_duplicate=False))
    mine = {id(named[p]) for layer in pre.summary().layers for p in layer.parameters}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in mine], [p for p in params if id(p) not in mine]


def make_optimizers(
    model: nn.Module, method: LMMethod, pre: KFACPreconditioner | None = None
) -> list[torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    kind = method.optimizer
    if kind == "adamw":
        return [torch.optim.AdamW(params, lr=method.lr, **method.extra)]
    if kind == "sgd":
        return [torch.optim.SGD(params, lr=method.lr, **{"momentum": 0.9, **method.extra})]
    if kind == "sgd+adamw":
        # SGD with momentum on the preconditioned parameters (the preconditioner is the
        # adaptive part), AdamW on the others (norms, what it leaves out), as Muon's setup
        if pre is None:
            raise ValueError("optimizer 'sgd+adamw' needs K-FAC options")
        mine, rest = _preconditioned(model, pre)
        adamw_lr = method.adamw_lr if method.adamw_lr is not None else method.lr
        sgd = torch.optim.SGD(mine, lr=method.lr, **{"momentum": 0.9, **method.extra})
        return [sgd, torch.optim.AdamW(rest, lr=adamw_lr)]
    if kind == "muon":
        hidden, rest = _hidden_matrices(model)
        adamw_lr = method.adamw_lr if method.adamw_lr is not None else method.lr
        return [torch.optim.Muon(hidden, lr=method.lr), torch.optim.AdamW(rest, lr=adamw_lr)]
    if kind == "soap":
        soap = soap_class()
        if soap is None:
            raise RuntimeError("SOAP needs pytorch_optimizer (pip install '.[bench]')")
        return [soap(params, lr=method.lr)]
    raise ValueError(f"unknown optimizer {kind!r}")


class LMStepper:
    """One step: forward, backward, precondition (optional), every optimizer, the schedule."""

    def __init__(self, task: Task, model: nn.Module, method: LMMethod, steps: int) -> None:
        self.task, self.model = task, model
        self.pre = None if method.kfac is None else KFACPreconditioner(model, **method.kfac)
        self.opts = make_optimizers(model, method, self.pre)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, _schedule(steps)) for o in self.opts]
        if self.pre is not None and (
            self.pre.options.constrained_step == "optimizer" or self.pre.options.precondition_update
        ):
            self.pre.attach(self.opts[0])  # the constraint on, or preconditioning of, its step

    def step(self, x: Tensor, y: Tensor) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        self.task.losses(self.model(x), y).mean().backward()
        if self.pre is not None:
            self.pre.step()
        for opt, sched in zip(self.opts, self.scheds):
            opt.step()
            sched.step()

    def close(self) -> None:
        if self.pre is not None:
            self.pre.remove()


def run_one(task: Task, method: LMMethod, seed: int, steps: int) -> Run:
    return train(
        task,
        method,  # type: ignore[arg-type]  # train only stores and hands it on
        seed,
        budget_s=math.inf,
        max_steps=steps,
        stepper=lambda t, m, meth: LMStepper(t, m, meth, steps),
    )


# ---------------------------------------------------------------------------------- results
def loss_at(run: Run, seconds: float) -> float:
    """The validation loss of the last evaluation at or before ``seconds`` of training."""
    value = math.nan
    for _, t, metric in run.curve:
        if t <= seconds:
            value = metric
    return value


def _fmt(values: list[float], digits: int = 3) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def summarize(task: str, runs: list[Run], stamp: dict[str, str]) -> tuple[list[str], list[dict]]:
    """The table of a task and its CSV rows (targets: AdamW's final loss on each seed)."""
    target = {r.seed: r.final for r in runs if r.method.name == BASELINE}
    base_time = {r.seed: r.seconds for r in runs if r.method.name == BASELINE}
    base_steps = {r.seed: r.steps for r in runs if r.method.name == BASELINE}
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        by_method.setdefault(r.method.name, []).append(r)
    rows, csv_rows = [], []
    for name, rs in by_method.items():
        reach = [(r, r.reach(target[r.seed])) if r.seed in target else (r, None) for r in rs]
        hit = [(r, x) for r, x in reach if x is not None]
        step_ratio = [x[1] / base_steps[r.seed] for r, x in hit]
        time_ratio = [x[0] / base_time[r.seed] for r, x in hit]
        at_time = [loss_at(r, base_time[r.seed]) for r in rs if r.seed in base_time]
        ms = [1000 * r.seconds / r.steps for r in rs if r.steps]
        rows.append(
            [
                name,
                _fmt([r.final for r in rs]),
                _fmt(at_time),
                f"{len(hit)}/{len(rs)}",
                _fmt(step_ratio, 2),
                _fmt(time_ratio, 2),
                _fmt(ms, 1),
                sum(r.diverged or bool(r.error) for r in rs),
            ]
        )
        for r in rs:
            x = r.reach(target[r.seed]) if r.seed in target else None
            csv_rows.append(
                {
                    **stamp,
                    "task": task,
                    "method": name,
                    "optimizer": r.method.optimizer,
                    "options": r.method.describe(),
                    "lr": r.method.lr,
                    "seed": r.seed,
                    "steps": r.steps,
                    "seconds": round(r.seconds, 3),
                    "ms_per_step": round(1000 * r.seconds / r.steps, 2) if r.steps else "",
                    "final": r.final,
                    "best": r.best,
                    "target": target.get(r.seed, ""),
                    "steps_to_target": x[1] if x else "",
                    "seconds_to_target": round(x[0], 3) if x else "",
                    "loss_at_adamw_time": loss_at(r, base_time[r.seed])
                    if r.seed in base_time
                    else "",
                    "diverged": int(r.diverged),
                    "error": r.error,
                }
            )
    header = [
        "method",
        "final loss",
        "loss at AdamW's time",
        "reached",
        "steps / AdamW's",
        "time / AdamW's",
        "ms/step",
        "diverged",
    ]
    return table(header, rows), csv_rows


def curve_rows(task: str, runs: list[Run], stamp: dict[str, str]) -> list[dict]:
    return [
        {**stamp, "task": task, "method": r.method.name, "seed": r.seed, "step": s, "seconds": t,
         "loss": m}
        for r in runs
        for s, t, m in r.curve
    ]  # fmt: skip


def plot(task: str, results: Path = RESULTS) -> Path | None:
    """results/lm_<task>.png: validation loss against steps and against training time, the
    latest run's curves (one line per seed and method), with those of the runs at the same
    revision with the same methods (seeds run as several processes)."""
    rows = [r for r in read_csv(results / "lm_curves.csv") if r["task"] == task]
    if not rows:
        return None
    latest = max(r["date"] for r in rows)
    last = [r for r in rows if r["date"] == latest]
    methods = {r["method"] for r in last}
    runs = {r["date"] for r in rows if r["revision"] == last[0]["revision"]}
    runs = {d for d in runs if {r["method"] for r in rows if r["date"] == d} == methods}
    rows = [r for r in rows if r["date"] in runs]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors: dict[str, Any] = {}
    curves: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        curves.setdefault((r["method"], r["seed"]), []).append(r)
    for (method, _), pts in curves.items():
        color = colors.setdefault(method, f"C{len(colors)}")
        label = method if method not in [h.get_label() for h in axes[0].lines] else None
        steps = [int(p["step"]) for p in pts]
        secs = [float(p["seconds"]) for p in pts]
        loss = [float(p["loss"]) for p in pts]
        axes[0].plot(steps, loss, color=color, alpha=0.8, lw=1, label=label)
        axes[1].plot(secs, loss, color=color, alpha=0.8, lw=1)
    finals = [float(p["loss"]) for p in rows]
    low = min(v for v in finals if math.isfinite(v))
    axes[0].set_ylim(low - 0.05, min(4.0, max(v for v in finals if math.isfinite(v))))
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds (1 thread)")
    axes[0].set_ylabel("validation loss (nats/char)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}: equal steps (left), equal time (right)")
    fig.tight_layout()
    path = results / f"lm_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- main
def _methods(
    task: str, names: list[str] | None, extra: list[str], baseline: bool = True
) -> list[LMMethod]:
    """The task's methods (``names``: those, and AdamW with ``baseline``), then ``extra``."""
    methods = list(METHODS[task])
    if names:
        methods = [m for m in methods if m.name in names or (baseline and m.name == BASELINE)]
    base = METHODS[task][0].lr  # the baseline's rate, whichever methods were picked
    for spec in extra:  # NAME=JSON: K-FAC options, plus "lr" and "optimizer" (default: AdamW
        # at the task's AdamW rate); "kfac": null runs the optimizer alone
        name, _, options = spec.partition("=")
        opts = json.loads(options)
        lr = opts.pop("lr", base)
        optimizer = opts.pop("optimizer", "adamw")
        adamw_lr = opts.pop("adamw_lr", None)
        given = {  # e.g. {"betas": [0, 0.95]}: JSON's integers as the floats torch wants
            k: tuple(float(x) for x in v) if isinstance(v, list) else v
            for k, v in opts.pop("optimizer_options", {}).items()
        }
        kfac = opts if opts.pop("kfac", True) is not None else None
        methods.append(LMMethod(name, optimizer, lr, kfac=kfac, adamw_lr=adamw_lr, extra=given))
    if soap_class() is None:
        print("SOAP skipped: pip install pytorch_optimizer (the bench extra)")
        methods = [m for m in methods if m.optimizer != "soap"]
    return methods


def main(argv: list[str] | None = None) -> list[Run]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the tasks' step counts")
    ap.add_argument("--methods", nargs="*", default=None, help="names (AdamW always runs)")
    ap.add_argument(
        "--kfac",
        nargs="*",
        action="extend",
        default=[],
        help="NAME=JSON extra K-FAC methods (the flag may repeat)",
    )
    ap.add_argument("--tune", action="store_true", help="the learning-rate grids, seed 0")
    ap.add_argument("--grid", nargs="+", type=float, default=list(GRID),
                    help="factors of each method's rate that --tune tries")  # fmt: skip
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = {**machine(), "threads": str(threads)}
    all_runs: list[Run] = []
    for task_name in args.tasks:
        task = TASKS[task_name]
        steps = args.steps or STEPS[task_name]
        methods = _methods(task_name, args.methods, args.kfac, baseline=not args.tune)
        if args.tune:
            runs = []
            for m in methods:
                for f in args.grid:
                    run = run_one(task, m.with_lr(m.lr * f), 0, steps)
                    runs.append(run)
                    print(f"{task_name} {m.name} lr={run.method.lr:g}: final {run.final:.4f}")
            append_csv(
                out / "lm_tuning.csv",
                [
                    {**stamp, "task": task_name, "method": r.method.name,
                     "options": r.method.describe(), "lr": r.method.lr, "steps": r.steps,
                     "final": r.final, "diverged": int(r.diverged), "error": r.error,
                     "load1": load1()}
                    for r in runs
                ],
            )  # fmt: skip
            all_runs += runs
            continue
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for m in methods:
                run = run_one(task, m, seed, steps)
                runs.append(run)
                print(
                    f"{task_name} seed {seed} {m.name}: final {run.final:.4f} "
                    f"({1000 * run.seconds / max(run.steps, 1):.1f} ms/step)"
                    + (" diverged" if run.diverged else "")
                    + (f" {run.error}" if run.error else "")
                )
        lines, rows = summarize(task_name, runs, stamp)
        print(f"\n{task_name} ({steps} steps, {args.seeds} seeds; target: AdamW's final loss)")
        print("\n".join(lines))
        append_csv(out / "lm.csv", rows)
        append_csv(out / "lm_curves.csv", curve_rows(task_name, runs, stamp))
        all_runs += runs
    if args.plot:
        for task_name in args.tasks:
            path = plot(task_name, out)
            if path is not None:
                print(f"wrote {path}")
    return all_runs


if __name__ == "__main__":
    main()
