"""What the empirical Fisher does: K-FAC / EKFAC / MC K-FAC, with and without the seed's
loss-change constraint, on two digits tasks; per-example loss changes measured along the way.

Tasks (scikit-learn's digits, 1347 train / 450 test images, batch 64, seed 0):
  demo         MLP 64-128-128-10 (tanh), cross-entropy (the `make demo` task);
  autoencoder  MLP 64-128-64-16-64-128-64 (tanh, linear output), MSE over the 64 pixels (the
               classic K-FAC autoencoder benchmark, scaled to 8x8 digits).

Every K-FAC run uses SGD *without* momentum, so the step the optimizer takes is exactly
Δθ = -lr·ν·∇̃ and the constraint holds exactly (to first order in the loss). Baselines: AdamW
and SGD with momentum 0.9.

Probes (not timed): every --probe-every steps the per-example gradients g_n of the batch are
taken with torch.func before the step (tests/reference.py), and after it

    predicted  Δℓ_n = g_nᵀ Δθ               realized  Δℓ_n = ℓ_n(θ + Δθ) - ℓ_n(θ)

are summarized (mean, std, fraction rising, RMS). The full vectors at three moments of
training feed the distribution plot.

Modes:
  python benchmarks/loss_change.py --sweep   grid over the constraint's forms and targets and
                                             the unconstrained learning rates
                                             -> results/loss_change_sweep.csv
  python benchmarks/loss_change.py           the comparison -> results/loss_change.csv (summary,
                                             appended), loss_change_curves.csv,
                                             loss_change_probes.csv, loss_change_<task>.png,
                                             loss_change_dist_<task>.png
  python benchmarks/loss_change.py --match RE --out NAME.csv
                                             some configs only, summary appended to
                                             results/NAME.csv (no curves or plots)

Timings on a shared CPU are noisy: compare at equal steps (left panels) as well as wall time;
the tables give the median step time, which load spikes disturb less than the total.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import RESULTS, append_csv, digits, machine, mlp, seed_options  # noqa: E402

from kfac_ef import KFACPreconditioner, mc_backward  # noqa: E402
from tests.reference import per_example_grads  # noqa: E402


@dataclass(frozen=True)
class Task:
    name: str
    sizes: list[int]
    loss: str  # "ce" or "mse"
    epochs: int
    damping: float
    lr: float  # unconstrained K-FAC learning rate (picked by --sweep)
    adamw_lr: float
    sgd_lr: float

    def per_example(self, out: Tensor, target: Tensor) -> Tensor:
        """ℓ_n: cross-entropy against labels, or MSE over the pixels against the input."""
        if self.loss == "ce":
            return F.cross_entropy(out, target, reduction="none")
        return (out - target).square().mean(1)

    def target(self, x: Tensor, y: Tensor) -> Tensor:
        return y if self.loss == "ce" else x


TASKS = {
    "demo": Task("demo", [64, 128, 128, 10], "ce", 30, 0.1, 0.1, 1e-2, 0.3),
    "autoencoder": Task(
        "autoencoder", [64, 128, 64, 16, 64, 128, 64], "mse", 60, 0.1, 0.3, 3e-3, 1.0
    ),
}


@dataclass(frozen=True)
class Config:
    name: str
    optimizer: str  # "adamw", "sgd" (momentum 0.9), "kfac" (K-FAC, then `base`)
    lr: float | None = None  # None: the task's tuned rate
    kfac: dict[str, Any] = field(default_factory=dict)
    base: str = "sgd"  # under K-FAC: "sgd" (no momentum), "momentum" (0.9) or "adam"

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kfac.items())


# Best constraint found by --sweep (see docs/empirical_fisher.md): relative to the loss.
BEST = {"constraint": "exact", "loss_change_unit": "spread", "target_loss_change": 1.0}


def comparison(task: Task) -> list[Config]:
    return [
        Config("AdamW", "adamw", task.adamw_lr),
        Config("SGD (momentum 0.9)", "sgd", task.sgd_lr),
        Config("EF K-FAC", "kfac"),
        Config("EF K-FAC + constraint", "kfac", kfac=BEST),
        Config("EF EKFAC", "kfac", kfac={"damping_mode": "ekfac"}),
        Config("EF EKFAC + constraint", "kfac", kfac={"damping_mode": "ekfac", **BEST}),
        Config("MC K-FAC", "kfac", kfac={"fisher_type": "mc"}),
        Config("MC K-FAC + constraint", "kfac", kfac={"fisher_type": "mc", **BEST}),
        # How the constraint composes with other optimizers (docs/empirical_fisher.md).
        Config("EF K-FAC + constraint, momentum 0.9", "kfac", kfac=BEST, base="momentum"),
        Config("EF K-FAC + constraint, Adam", "kfac", 1e-3, kfac=BEST, base="adam"),
    ]


def sweep(task: Task) -> list[Config]:
    out = [Config(f"EF K-FAC lr={lr:g}", "kfac", lr) for lr in (0.03, 0.1, 0.3)]
    grid = {
        ("exact", "loss"): (0.1, 0.3, 1.0),
        ("exact", "spread"): (0.1, 0.3, 1.0, 3.0, 10.0),
        ("exact", "absolute"): (1e-3, 1e-2),
        ("kronecker", "loss"): (1e-4, 1e-3),
        ("kronecker", "spread"): (3e-3, 1e-2, 3e-2, 0.1, 0.3),
        ("kronecker", "absolute"): (1e-3, 1e-2),
    }
    for (form, unit), values in grid.items():
        for c in values:
            kw = {"constraint": form, "loss_change_unit": unit, "target_loss_change": c}
            out.append(Config(f"{form} c={c:g} ({unit})", "kfac", kfac=kw))
    # Trust region: at the tuned rate, and at a rate too large without it.
    for lr in (0.1, 0.3):
        for form, values in (("exact", (0.1, 1.0)), ("kronecker", (1e-3, 1e-2))):
            for c in values:
                kw = {"constraint": form, "loss_change_unit": "loss", "max_loss_change": c}
                out.append(Config(f"{form} max c={c:g} (loss), lr={lr:g}", "kfac", lr, kw))
    for lr in (0.3, 1.0):
        for form, c in (("exact", 1.0), ("kronecker", 0.03)):
            kw = {"constraint": form, "loss_change_unit": "spread", "max_loss_change": c}
            out.append(Config(f"{form} max c={c:g} (spread), lr={lr:g}", "kfac", lr, kw))
    return out


def train(task: Task, cfg: Config, data, seed: int, probe_every: int, keep_at: set[int]):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = mlp(task.sizes)
    lr = cfg.lr if cfg.lr is not None else task.lr
    precond = None
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        if cfg.base == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=lr)
        else:
            opt = torch.optim.SGD(
                model.parameters(), lr=lr, momentum=0.9 if cfg.base == "momentum" else 0.0
            )
        kw = {"damping": task.damping, "inv_update_steps": 10, **cfg.kfac}
        if kw.get("constraint", "none") != "none":
            kw["lr"] = lr
        precond = KFACPreconditioner(model, **seed_options(**kw))
    mc = precond is not None and precond.options.fisher_type == "mc"
    likelihood = "categorical" if task.loss == "ce" else "gaussian"
    variance = 1.0 if task.loss == "ce" else x_tr.shape[1] / 2  # mean over D pixels: σ² = D/2
    gen = torch.Generator().manual_seed(seed)
    mc_gen = torch.Generator().manual_seed(seed + 1)
    batch = 64
    steps_per_epoch = (len(x_tr) + batch - 1) // batch
    curve: list[dict[str, float]] = []
    probes: list[dict[str, float]] = []
    kept: dict[int, dict[str, Tensor]] = {}
    elapsed, step = 0.0, 0
    step_times: list[float] = []

    def full_loss(xx: Tensor, yy: Tensor) -> float:
        with torch.no_grad():
            return float(task.per_example(model(xx), task.target(xx, yy)).mean())

    curve.append({"epoch": 0, "step": 0, "seconds": 0.0, "train_loss": full_loss(x_tr, y_tr)})
    diverged = False
    for epoch in range(1, task.epochs + 1):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            xb, yb = x_tr[idx], y_tr[idx]
            probe = step % probe_every == 0
            if probe:
                before = {k: p.detach().clone() for k, p in model.named_parameters()}
                pe = per_example_grads(model, task.per_example, xb, task.target(xb, yb))
                with torch.no_grad():
                    l0 = task.per_example(model(xb), task.target(xb, yb))
            t0 = time.perf_counter()
            opt.zero_grad()
            out = model(xb)
            losses = task.per_example(out, task.target(xb, yb))
            loss = losses.mean()
            if mc:
                assert precond is not None
                mc_backward(
                    precond, loss, out, likelihood=likelihood, variance=variance, generator=mc_gen
                )
            else:
                loss.backward()
            if precond is not None:
                precond.step(loss=losses.detach())
            opt.step()
            step_times.append(time.perf_counter() - t0)
            elapsed += step_times[-1]
            if probe:
                with torch.no_grad():
                    l1 = task.per_example(model(xb), task.target(xb, yb))
                delta = {k: p.detach() - before[k] for k, p in model.named_parameters()}
                pred = sum(pe[k].reshape(len(xb), -1) @ d.reshape(-1) for k, d in delta.items())
                real = l1 - l0
                row = {
                    "step": step,
                    **_stats("predicted", pred),
                    **_stats("realized", real),
                    **_stats("ef_damped", _exact_ef_changes(pe, task.damping)),
                    **_stats("ef_undamped", _exact_ef_changes(pe, 1e-10)),
                    "batch_loss": float(l0.mean()),
                    "kronecker_form": _kronecker_form(precond, model, delta),
                }
                if precond is not None and precond.options.constraint != "none":
                    row["target"] = precond.diagnostics().target
                probes.append(row)
                if step in keep_at:
                    kept[step] = {"predicted": pred.clone(), "realized": real.clone()}
            step += 1
        train_loss = full_loss(x_tr, y_tr)
        curve.append({"epoch": epoch, "step": step, "seconds": elapsed, "train_loss": train_loss})
        if not math.isfinite(train_loss) or train_loss > 1e3:
            diverged = True
            break
    with torch.no_grad():
        out_te = model(x_te)
        if task.loss == "ce":
            test = float((out_te.argmax(1) == y_te).float().mean())
        else:
            test = float(task.per_example(out_te, task.target(x_te, y_te)).mean())
    if precond is not None:
        precond.remove()
    return {
        "curve": curve,
        "probes": probes,
        "kept": kept,
        "train_loss": curve[-1]["train_loss"],
        "best_train_loss": min(c["train_loss"] for c in curve),
        "test": test,
        "seconds": elapsed,
        "median_step_ms": 1e3 * statistics.median(step_times),
        "steps": step,
        "diverged": diverged,
    }


def _kronecker_form(precond: KFACPreconditioner | None, model: nn.Module, delta) -> float:
    """Σ_layers ⟨ΔW, G ΔW A⟩ of the step taken, with the running factors (per example)."""
    if precond is None:
        return float("nan")
    total = 0.0
    for name, (a, g) in precond.factors().items():
        m = model.get_submodule(name)
        dw = delta[f"{name}.weight"]
        dm = torch.cat([dw, delta[f"{name}.bias"][:, None]], 1) if m.bias is not None else dw
        total += float((dm * (g @ dm @ a)).sum())
    return total


def _stats(prefix: str, v: Tensor) -> dict[str, float]:
    """Mean, std, RMS, fraction rising, and the share of Σ Δℓ² carried by the top 10% of the
    examples (0.1 when all change alike; 1 when one example carries everything)."""
    v = v.double()
    sq = v.square().sort(descending=True).values
    top = max(1, len(v) // 10)
    return {
        f"{prefix}_mean": float(v.mean()),
        f"{prefix}_std": float(v.std(correction=0)),
        f"{prefix}_rms": float(sq.mean().sqrt()),
        f"{prefix}_rising": float((v > 0).double().mean()),
        f"{prefix}_top10": float(sq[:top].sum() / sq.sum().clamp_min(1e-300)),
    }


def _exact_ef_changes(pe: dict[str, Tensor], damping: float) -> Tensor:
    """Per-example changes of the step -(C + εI)⁻¹ḡ with the exact empirical Fisher of the
    batch, up to the step length: with J the (N, P) per-example gradients and K = J Jᵀ / N,
    g_nᵀ (C + εI)⁻¹ ḡ = [K (K + εI)⁻¹ 1]_n (push-through identity), so Δℓ ∝ -K (K + εI)⁻¹ 1."""
    n = next(iter(pe.values())).shape[0]
    j = torch.cat([g.reshape(n, -1) for g in pe.values()], 1).double()
    k = j @ j.T / n
    ones = torch.ones(n, 1, dtype=k.dtype)
    return -(k @ torch.linalg.solve(k + damping * torch.eye(n, dtype=k.dtype), ones))[:, 0]


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / max(1, len(rows))


def summarize(task: Task, cfg: Config, r: dict[str, Any]) -> dict[str, Any]:
    probes = r["probes"]
    return {
        "task": task.name,
        "config": cfg.name,
        "optimizer": cfg.optimizer if cfg.optimizer != "kfac" else f"kfac+{cfg.base}",
        "lr": cfg.lr if cfg.lr is not None else (task.lr if cfg.optimizer == "kfac" else ""),
        "kfac": cfg.describe(),
        "epochs": task.epochs,
        "steps": r["steps"],
        "train_loss": r["train_loss"],
        "best_train_loss": r["best_train_loss"],
        "test": r["test"],
        "test_metric": "accuracy" if task.loss == "ce" else "mse",
        "seconds": round(r["seconds"], 3),
        "median_step_ms": round(r["median_step_ms"], 3),
        "diverged": r["diverged"],
        "pred_rising": _mean(probes, "predicted_rising"),
        "real_rising": _mean(probes, "realized_rising"),
        "pred_top10": _mean(probes, "predicted_top10"),
        "real_top10": _mean(probes, "realized_top10"),
        # The same batches under the exact EF step, damped (ε of the run) and undamped.
        "ef_damped_rising": _mean(probes, "ef_damped_rising"),
        "ef_damped_top10": _mean(probes, "ef_damped_top10"),
        "ef_undamped_rising": _mean(probes, "ef_undamped_rising"),
        "ef_undamped_top10": _mean(probes, "ef_undamped_top10"),
        # Spread of the per-example changes relative to their mean (0: all examples alike).
        "pred_std_over_mean": _mean(
            [{"v": p["predicted_std"] / max(1e-30, abs(p["predicted_mean"]))} for p in probes], "v"
        ),
        "real_std_over_mean": _mean(
            [{"v": p["realized_std"] / max(1e-30, abs(p["realized_mean"]))} for p in probes], "v"
        ),
        # Predicted over realized mean change, as a ratio of sums (first-order accuracy).
        "pred_over_real": sum(p["predicted_mean"] for p in probes)
        / (sum(p["realized_mean"] for p in probes) or float("nan")),
        # E[(Δℓ)²] of the step taken by the empirical Fisher over its Kronecker form.
        "exact_over_kronecker": _mean(
            [{"v": p["predicted_rms"] ** 2 / p["kronecker_form"]} for p in probes], "v"
        ),
        # E[(Δℓ)²] of the step taken over the constraint's target c (1 for SGD, exact form).
        "exact_over_target": _mean(
            [{"v": p["predicted_rms"] ** 2 / p["target"]} for p in probes if p.get("target")],
            "v",
        )
        if any(p.get("target") for p in probes)
        else float("nan"),
    }


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names, restval="")
        w.writeheader()
        w.writerows(rows)


def _smooth(v: list[float], k: int = 5) -> list[float]:
    return [
        sum(v[max(0, i - k + 1) : i + 1]) / len(v[max(0, i - k + 1) : i + 1]) for i in range(len(v))
    ]


def plot(task: Task, results: dict[str, dict[str, Any]], path: Path, dist_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax_step, ax_wall, ax_rise, ax_top = axes.flat
    for name, r in results.items():
        style = "--" if "constraint" in name else "-"
        steps = [c["step"] for c in r["curve"]]
        secs = [c["seconds"] for c in r["curve"]]
        losses = [c["train_loss"] for c in r["curve"]]
        ax_step.semilogy(steps, losses, style, label=name)
        ax_wall.semilogy(secs, losses, style, label=name)
        pr = r["probes"]
        at = [p["step"] for p in pr]
        ax_rise.plot(at, _smooth([p["realized_rising"] for p in pr]), style, label=name)
        ax_top.plot(at, _smooth([p["predicted_top10"] for p in pr]), style, label=name)
    ref = results.get("EF K-FAC")
    if ref is not None:  # the exact EF step on the same batches
        at = [p["step"] for p in ref["probes"]]
        for key, label in (("ef_undamped", "exact EF, ε → 0"), ("ef_damped", "exact EF, same ε")):
            ax_top.plot(at, _smooth([p[f"{key}_top10"] for p in ref["probes"]]), ":", color="k",
                        lw=2 if key == "ef_damped" else 1, label=label)  # fmt: skip
    ax_step.set_xlabel("step")
    ax_wall.set_xlabel("training wall time (s; shared 2-core CPU, noisy)")
    for ax in (ax_step, ax_wall):
        ax.set_ylabel(f"train loss ({'cross-entropy' if task.loss == 'ce' else 'MSE'})")
        ax.grid(True, which="both", alpha=0.3)
    ax_rise.set_ylabel("fraction of the batch whose loss rose (realized)")
    ax_top.set_ylabel("share of Σ Δℓ² carried by the top 10% (predicted)")
    for ax in (ax_rise, ax_top):
        ax.set_xlabel("step (moving average of 5 probes)")
        ax.grid(True, alpha=0.3)
    ax_step.legend(fontsize=7)
    ax_top.legend(fontsize=7)
    fig.suptitle(f"digits {task.name}: {'-'.join(map(str, task.sizes))}, batch 64, seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

    names = list(results)
    moments = sorted({s for r in results.values() for s in r["kept"]})
    fig, axes = plt.subplots(len(moments), 1, figsize=(12, 3.6 * len(moments)), squeeze=False)
    for ax, s in zip(axes[:, 0], moments):
        data, labels = [], []
        for name in names:
            kept = results[name]["kept"].get(s)
            if kept is None:
                continue
            v = kept["predicted"]
            rms = float(v.square().mean().sqrt()) or 1.0
            data.append((v / rms).numpy())
            labels.append(name)
        if not data:
            continue
        ax.violinplot(data, showmedians=True)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=20, ha="right")
        ax.set_ylabel("Δℓ_n / RMS(Δℓ)")
        ax.set_title(
            f"predicted per-example loss changes at step {s}, scaled by their RMS "
            "(all equal: every point at -1)"
        )
    fig.tight_layout()
    fig.savefig(dist_path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--sweep", action="store_true", help="grid of constraint forms / targets")
    parser.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    parser.add_argument("--probe-every", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 (plots: seed 0)")
    parser.add_argument("--match", default=None, help="only configs whose name matches (regex)")
    parser.add_argument(
        "--out",
        default=None,
        help="CSV name under results/ (sweep: its CSV; comparison: append the summary rows "
        "there only, without curves, probes or plots, for partial reruns)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust on a shared CPU)"
    )
    args = parser.parse_args()
    # Small models: one thread is as fast, and two processes spinning on two shared cores
    # each would inflate every step by orders of magnitude.
    torch.set_num_threads(args.threads)
    data = digits()
    meta = machine()
    curves, probe_rows, summary = [], [], []
    for tname in args.tasks:
        task = TASKS[tname]
        if args.epochs is not None:
            task = Task(**{**task.__dict__, "epochs": args.epochs})
        configs = sweep(task) if args.sweep else comparison(task)
        if args.match is not None:
            configs = [c for c in configs if re.search(args.match, c.name)]
        steps = task.epochs * ((len(data[0]) + 63) // 64)
        keep_at = {
            round(steps * f / args.probe_every) * args.probe_every for f in (0.05, 0.5, 0.95)
        }
        results = {}
        for cfg in configs:
            finals = []
            for seed in range(args.seeds):
                r = train(task, cfg, data, seed, args.probe_every, keep_at)
                if seed == 0:
                    results[cfg.name] = r
                row = {**summarize(task, cfg, r), "seed": seed}
                summary.append({**row, **meta})
                finals.append(row["train_loss"])
                print(
                    f"{tname:<12}{cfg.name:<38}seed {seed} loss {row['train_loss']:<10.5g}"
                    f"best {row['best_train_loss']:<10.5g}test {row['test']:<8.4f}"
                    f"{row['seconds']:>7.2f}s {row['median_step_ms']:>6.2f}ms/step "
                    f"rising {row['real_rising']:.2f}"
                    f"{'  DIVERGED' if r['diverged'] else ''}",
                    flush=True,
                )
                tag = {"task": tname, "config": cfg.name, "seed": seed}
                curves += [{**tag, **c} for c in r["curve"]]
                if seed == 0:  # the plotted run
                    probe_rows += [{**tag, **p} for p in r["probes"]]
            if args.seeds > 1:
                print(f"{'':<12}{'':<38}median {statistics.median(finals):.5g}", flush=True)
        if not args.sweep and args.out is None:
            plot(
                task,
                results,
                RESULTS / f"loss_change_{tname}.png",
                RESULTS / f"loss_change_dist_{tname}.png",
            )
    if args.sweep:
        out = RESULTS / (args.out or "loss_change_sweep.csv")
        write_rows(out, summary)
        print(f"\nsweep: {out}")
        return
    if args.out is not None:
        append_csv(RESULTS / args.out, summary)
        print(f"\nsummary: {RESULTS / args.out}")
        return
    append_csv(RESULTS / "loss_change.csv", summary)
    write_rows(RESULTS / "loss_change_curves.csv", curves)
    write_rows(RESULTS / "loss_change_probes.csv", probe_rows)
    print(
        f"\nresults under {RESULTS}: loss_change.csv, loss_change_curves.csv, "
        "loss_change_probes.csv, loss_change_<task>.png, loss_change_dist_<task>.png"
    )


if __name__ == "__main__":
    main()
