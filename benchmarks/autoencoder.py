"""The digits deep autoencoder: what it takes to make K-FAC with the empirical Fisher robust and
fast, lever by lever, and the damping sweep.

Task: benchmarks/tasks.py's ``autoencoder`` (MLP 64-128-64-16-64-128-64, tanh, MSE over the
pixels of scikit-learn's digits, batch 128). Two parts, each runnable alone:

``--levers`` (default): every configuration for ``--steps`` steps on ``--seeds`` seeds,
interleaved; reported: the training MSE at 1000 steps and at the end (mean ± std), the steps
at which the MSE first reaches ``--reference`` (default 0.0022, about AdamW's best within 20 s
on this machine, see time_to_target.py), the steps per second measured in the same run, and
the time to reach the reference those two imply. Configurations, from the published recipe to
this library's:

- fixed ε: K-FAC as published packages run it, absolute damping (ε = 0.1, the smallest that
  trains) and SGD; then the same with statistics collected for 50 steps before the first use
  ("warm-up");
- relative ε: ε in units of each layer's mean curvature eigenvalue (``damping_unit=
  "relative"``), without and with a loss-change constraint: the trust region
  ``max_loss_change`` on the exact (per-example) and on the Kronecker form;
- cadence: statistics every 5 steps, decompositions every 20, factor_decay 0.99 (the
  per-step overhead);
- EKFAC (``damping_mode="ekfac"``) and π-damping (``"pi"``) on top.

``--damping``: for each damping rule (fixed ε without and with the trust region; relative ε
with the trust region and the cadence above, at c = 1 and at c = 0.5) and each
ε in 1e-4 ... 1e-1, the learning rate grid on seed 0 for ``--sweep-steps`` steps; the best
rate is then run on every seed. A run is "diverged" when its MSE becomes non-finite or 100x
its initial value, "crashed" when step() raises. Appends to results/autoencoder_damping.csv
(plot: benchmarks/plot.py).

``--radius``: the trust region's size c (``max_loss_change``, spread units) over ``--radii``
with the rest of the recipe fixed, ``--steps`` steps on ``--seeds`` seeds: the steps each needs
to reach ``--reference``. With the trust region binding on nearly every step, c (not the
learning rate) sets the step length. Appends to results/autoencoder_radius.csv.

``--cost``: milliseconds per step of AdamW, SGD and the recipe taken apart (no trust region,
the Kronecker-form trust region, the exact form, the exact form without statistics or
decompositions after step 0), ``--cost-steps`` steps after 100 warm-up steps, the configurations
interleaved over ``--rounds`` rounds; the fastest round's time. Appends to
results/autoencoder_cost.csv.

Results: results/autoencoder_levers.csv, results/autoencoder_damping.csv,
results/autoencoder_radius.csv, results/autoencoder_cost.csv.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, load1, machine, set_threads, table  # noqa: E402
from tasks import TASKS, Method, Run, Stepper, data_of, train  # noqa: E402
from tqdm import tqdm  # noqa: E402

TASK = TASKS["autoencoder"]
TRUST = {"max_loss_change": 1.0, "loss_change_unit": "spread"}
CADENCE = {"factor_update_steps": 5, "inv_update_steps": 20, "factor_decay": 0.99}
RELATIVE = {"damping": 1e-2, "damping_unit": "relative"}
FIXED = {"damping": 0.1, "damping_unit": "absolute"}
RECIPE = {**RELATIVE, **TRUST, **CADENCE}

# name -> (method, what it adds). Learning rates picked on {0.03, 0.1, 0.3, 1} at 2000 steps.
LEVERS: list[tuple[str, Method]] = [
    ("AdamW", Method("AdamW", "adamw", 3e-3)),
    ("fixed ε=0.1", Method("fixed", "sgd", 0.1, momentum=0.0, kfac=FIXED)),
    (
        "fixed ε=0.1, warm-up 50",
        Method("warm-up", "sgd", 0.1, momentum=0.0, kfac=FIXED, warmup=50),
    ),
    (
        "fixed ε=0.1, trust region",
        Method("fixed+TR", "sgd", 1.0, momentum=0.0, kfac={**FIXED, **TRUST}),
    ),
    ("relative ε=0.01", Method("relative", "sgd", 1e-7, momentum=0.0, kfac=RELATIVE)),
    (
        "relative, trust region (Kronecker form)",
        Method(
            "relative+TR kron",
            "sgd",
            1.0,
            momentum=0.0,
            kfac={**RELATIVE, "constraint": "kronecker", **TRUST},
        ),
    ),
    (
        "relative, trust region",
        Method("relative+TR", "sgd", 1.0, momentum=0.0, kfac={**RELATIVE, **TRUST}),
    ),
    ("+ cadence 5/20, decay 0.99", Method("recipe", "sgd", 1.0, momentum=0.0, kfac=RECIPE)),
    (
        "+ EKFAC",
        Method("ekfac", "sgd", 1.0, momentum=0.0, kfac={**RECIPE, "damping_mode": "ekfac"}),
    ),
    ("+ π-damping", Method("pi", "sgd", 1.0, momentum=0.0, kfac={**RECIPE, "damping_mode": "pi"})),
]

RULES: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "fixed ε": ({"damping_unit": "absolute"}, (0.01, 0.03, 0.1, 0.3)),
    "fixed ε + trust region": ({"damping_unit": "absolute", **TRUST}, (0.1, 0.3, 1.0)),
    "relative ε + trust region": (
        {"damping_unit": "relative", **TRUST, **CADENCE},
        (0.1, 0.3, 1.0),
    ),
    # The trust-region size time_to_target.py uses on this task (see --radius).
    "relative ε + trust region c=0.5": (
        {"damping_unit": "relative", **TRUST, "max_loss_change": 0.5, **CADENCE},
        (0.1, 0.3, 1.0),
    ),
}
DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
RADII = (0.25, 0.5, 1.0, 2.0)


_NO_TR = {k: v for k, v in RECIPE.items() if k not in TRUST}
# Without the trust region, or with it on the Kronecker form, relative ε diverges at any
# useful learning rate (levers table); these two are timed at 1e-7, where they stay finite
# (their work per step does not depend on the rate; a diverged run would time NaN steps,
# whose statistics are skipped).
COSTS: list[tuple[str, Method]] = [
    ("AdamW", Method("AdamW", "adamw", 3e-3)),
    ("SGD", Method("SGD", "sgd", 1.0, momentum=0.0)),
    ("K-FAC, relative ε, no trust region", Method("no TR", "sgd", 1e-7, momentum=0.0, kfac=_NO_TR)),
    (
        "K-FAC recipe, Kronecker-form trust region",
        Method("kron TR", "sgd", 1e-7, momentum=0.0, kfac={**RECIPE, "constraint": "kronecker"}),
    ),
    (
        "K-FAC recipe (exact-form trust region)",
        Method("recipe", "sgd", 1.0, momentum=0.0, kfac=RECIPE),
    ),
    (
        "K-FAC recipe, no statistics or decompositions after step 0",
        Method(
            "recipe frozen",
            "sgd",
            1.0,
            momentum=0.0,
            kfac={**RECIPE, "factor_update_steps": 10**9, "inv_update_steps": 10**9},
        ),
    ),
]


def cost(args: argparse.Namespace) -> None:
    """ms per step of each configuration, interleaved rounds, the fastest round."""
    data = data_of(TASK)
    gen = torch.Generator().manual_seed(0)
    batches = [TASK.sample(data, TASK.batch, gen, i) for i in range(100 + args.cost_steps)]
    times: dict[str, list[float]] = {name: [] for name, _ in COSTS}
    finite: dict[str, bool] = {name: True for name, _ in COSTS}
    with tqdm(total=args.rounds * len(COSTS), desc="cost", unit="run", disable=None) as bar:
        for _ in range(args.rounds):
            for name, method in COSTS:
                torch.manual_seed(0)
                stepper = Stepper(TASK, TASK.build(data), method)
                for x, y in batches[:100]:
                    stepper.step(x, y)
                t0 = time.perf_counter()
                for x, y in batches[100:]:
                    stepper.step(x, y)
                times[name].append((time.perf_counter() - t0) / args.cost_steps * 1e3)
                # A run that diverged timed steps unlike training ones: flagged in the CSV.
                finite[name] &= all(bool(p.isfinite().all()) for p in stepper.params)
                stepper.close()
                bar.update()
    meta = machine()
    rows, cells = [], []
    for name, method in COSTS:
        best = min(times[name])
        flag = "" if finite[name] else " (diverged)"
        cells.append([name + flag, f"{best:.2f}", f"{max(times[name]) / best:.2f}"])
        rows.append(
            {
                "configuration": name,
                "config": method.describe(),
                "ms_per_step": best,
                "slowest_over_fastest": max(times[name]) / best,
                "finite": finite[name],
                "steps": args.cost_steps,
                "rounds": args.rounds,
                **meta,
                "load1": f"{load1():.2f}",
            }
        )
    print("\n".join(table(["configuration", "ms/step", "slowest/fastest round"], cells)))
    append_csv(args.out_dir / "autoencoder_cost.csv", rows)
    print(f"\nappended to {args.out_dir / 'autoencoder_cost.csv'}")


def _status(run: Run) -> str:
    if run.error:
        return "crashed"
    return "diverged" if run.diverged else "ok"


def _at(run: Run, step: int) -> float:
    for s, _, m in run.curve:
        if s >= step:
            return m
    return math.nan


def _ms(values: list[float], fmt: str = ".4g") -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):.2g}"


def _run_row(
    r: Run, hit: tuple[float, int] | None, reference: float, meta: dict[str, str]
) -> dict[str, Any]:
    """The CSV fields every run of --levers and --radius has (``hit``: its reach of the
    reference)."""
    return {
        "config": r.method.describe(),
        "seed": r.seed,
        "steps": r.steps,
        "status": _status(r),
        "error": r.error,
        "final": r.final,
        "reference": reference,
        "reference_steps": hit[1] if hit else "",
        "steps_per_s": r.steps_per_s,
        **meta,
        "load1": f"{r.extra['load1']:.2f}",
    }


def levers(args: argparse.Namespace) -> None:
    runs: list[tuple[str, Run]] = []
    chosen = [(n, m) for n, m in LEVERS if not args.only or n in args.only]
    with tqdm(total=len(chosen) * len(args.seeds), desc="levers", unit="run", disable=None) as bar:
        for seed in args.seeds:
            for name, method in chosen:
                bar.set_postfix_str(f"{name}, seed {seed}")
                run = train(TASK, method, seed, budget_s=math.inf, max_steps=args.steps)
                run.extra["load1"] = load1()
                runs.append((name, run))
                bar.update()
    meta = machine()
    rows, cells = [], []
    for name, method in chosen:
        mine = [r for n, r in runs if n == name]
        hits = [r.reach(args.reference) for r in mine]
        steps = [h[1] for h in hits if h is not None]
        sps = [r.steps_per_s for r in mine]
        implied = [
            h[1] / r.steps_per_s for h, r in zip(hits, mine) if h is not None and r.steps_per_s
        ]
        failed = [_status(r) for r in mine if _status(r) != "ok"]
        cells.append(
            [
                name,
                f"{method.lr:g}",
                _ms([_at(r, 1000) for r in mine]),
                _ms([r.final for r in mine]) + (f" ({len(failed)} {failed[0]})" if failed else ""),
                f"{_ms(steps, '.0f')} ({len(steps)}/{len(mine)})",
                _ms(sps, ".0f"),
                _ms(implied, ".3g"),
            ]
        )
        for r, h in zip(mine, hits):
            rows.append(
                {
                    "lever": name,
                    "method": method.name,
                    **_run_row(r, h, args.reference, meta),
                    "mse_1000": _at(r, 1000),
                }
            )
    header = [
        "configuration",
        "lr",
        "MSE @1000",
        f"MSE @{args.steps}",
        f"steps to {args.reference:g}",
        "steps/s",
        f"s to {args.reference:g}",
    ]
    print("\n".join(table(header, cells)))
    append_csv(args.out_dir / "autoencoder_levers.csv", rows)
    print(f"\nappended to {args.out_dir / 'autoencoder_levers.csv'}")


def radius_sweep(args: argparse.Namespace) -> None:
    """The recipe at each trust-region size c: steps to the reference on every seed."""
    runs: dict[float, list[Run]] = {c: [] for c in args.radii}
    total = len(args.radii) * len(args.seeds)
    with tqdm(total=total, desc="trust-region size", unit="run", disable=None) as bar:
        for seed in args.seeds:
            for c in args.radii:
                bar.set_postfix_str(f"c={c:g}, seed {seed}")
                method = Method(
                    f"c={c:g}", "sgd", 3.0, momentum=0.0, kfac={**RECIPE, "max_loss_change": c}
                )
                run = train(TASK, method, seed, budget_s=math.inf, max_steps=args.steps)
                run.extra["load1"] = load1()
                runs[c].append(run)
                bar.update()
    meta = machine()
    rows, cells = [], []
    for c, mine in runs.items():
        hits = [r.reach(args.reference) for r in mine]
        steps = [h[1] for h in hits if h is not None]
        per_seed = " ".join(str(h[1]) if h else "-" for h in hits)
        cells.append(
            [
                f"{c:g}",
                _ms([r.final for r in mine]),
                f"{_ms(steps, '.0f')} ({len(steps)}/{len(mine)})",
                str(max(steps)) if len(steps) == len(mine) else "-",
                per_seed,
            ]
        )
        for r, h in zip(mine, hits):
            rows.append(
                {
                    "max_loss_change": c,
                    **_run_row(r, h, args.reference, meta),
                    "best": r.best,
                }
            )
    header = [
        "c",
        f"MSE @{args.steps}",
        f"steps to {args.reference:g}",
        "worst seed",
        "per seed (" + ", ".join(str(s) for s in args.seeds) + ")",
    ]
    print("\n".join(table(header, cells)))
    append_csv(args.out_dir / "autoencoder_radius.csv", rows)
    print(f"\nappended to {args.out_dir / 'autoencoder_radius.csv'}")


def damping_sweep(args: argparse.Namespace) -> None:
    rows, cells = [], []
    rules = {k: v for k, v in RULES.items() if not args.rules or k in args.rules}
    total = sum(len(lrs) + len(args.seeds) - 1 for _, lrs in rules.values()) * len(args.dampings)
    meta_date = machine()["date"]
    with tqdm(total=total, desc="damping sweep", unit="run", disable=None) as bar:
        for rule, (extra, lrs) in rules.items():
            for damping in args.dampings:
                kfac = {"damping": damping, **extra}
                results: dict[float, Run] = {}
                for lr in lrs:
                    bar.set_postfix_str(f"{rule}, ε={damping:g}, lr={lr:g}")
                    method = Method(rule, "sgd", lr, momentum=0.0, kfac=kfac)
                    results[lr] = train(
                        TASK, method, args.seeds[0], budget_s=math.inf, max_steps=args.sweep_steps
                    )
                    bar.update()
                ok = {lr: r for lr, r in results.items() if _status(r) == "ok"}
                best_lr = min(ok, key=lambda lr: ok[lr].final) if ok else lrs[0]
                runs = [results[best_lr]]
                for seed in args.seeds[1:]:
                    method = Method(rule, "sgd", best_lr, momentum=0.0, kfac=kfac)
                    runs.append(
                        train(TASK, method, seed, budget_s=math.inf, max_steps=args.sweep_steps)
                    )
                    bar.update()
                grid = ", ".join(f"{lr:g}: {_status(r)}" for lr, r in results.items())
                statuses = [_status(r) for r in runs]
                cells.append(
                    [
                        rule,
                        f"{damping:g}",
                        grid,
                        f"{best_lr:g}" if ok else "-",
                        _ms([r.final for r in runs if _status(r) == "ok"]),
                        f"{statuses.count('ok')}/{len(runs)}",
                    ]
                )
                for lr, r in results.items():
                    rows.append(_sweep_row(rule, damping, lr, r, "grid", meta_date))
                for r in runs[1:]:
                    rows.append(_sweep_row(rule, damping, best_lr, r, "best lr", meta_date))
    header = ["rule", "damping", "lr grid (seed 0)", "best lr", "final MSE (seeds)", "seeds ok"]
    print("\n".join(table(header, cells)))
    append_csv(args.out_dir / "autoencoder_damping.csv", rows)
    print(f"\nappended to {args.out_dir / 'autoencoder_damping.csv'}")


def _sweep_row(rule: str, damping: float, lr: float, r: Run, part: str, date: str) -> dict:
    return {
        "rule": rule,
        "damping": damping,
        "lr": lr,
        "part": part,
        "seed": r.seed,
        "steps": r.steps,
        "status": _status(r),
        "error": r.error,
        "final": r.final,
        "config": r.method.describe(),
        **machine(),
        "date": date,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levers", action="store_true", help="the levers table (default)")
    parser.add_argument("--damping", action="store_true", help="the damping sweep")
    parser.add_argument("--radius", action="store_true", help="the trust region's size")
    parser.add_argument("--radii", type=float, nargs="*", default=list(RADII))
    parser.add_argument("--cost", action="store_true", help="the step cost taken apart")
    parser.add_argument("--cost-steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4000, help="steps per lever run")
    parser.add_argument("--sweep-steps", type=int, default=1500, help="steps per sweep run")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--dampings", type=float, nargs="*", default=list(DAMPINGS))
    parser.add_argument("--reference", type=float, default=0.0022)
    parser.add_argument("--only", nargs="*", help="only these levers (by name)")
    parser.add_argument("--rules", nargs="*", help="only these damping rules (by name)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    print(f"threads {threads}, load {load1():.2f}")
    if args.levers or not (args.damping or args.cost or args.radius):
        levers(args)
    if args.damping:
        damping_sweep(args)
    if args.radius:
        radius_sweep(args)
    if args.cost:
        cost(args)


if __name__ == "__main__":
    main()
