"""Plots of the benchmark CSVs (benchmarks/results/*.csv -> PNGs beside them).

Each plot shows the most recent run recorded in its CSV (rows sharing the latest date of a
task, model or damping rule):

- time_to_target_<task>.png: the metric against training wall time and against steps, one
  line per seed, per method, with the target (AdamW's best within the budget) as dotted lines;
- step_cost.png: milliseconds per step of SGD and AdamW alone and with the preconditioner,
  per model, with the FLOP floor of the extra work stacked on the optimizer alone;
- memory.png: parameters, optimizer state, the preconditioner's state and the measured extra
  peak, per model;
- autoencoder_damping.png: the damping sweep of benchmarks/autoencoder.py (final MSE per
  damping, best learning rate, per damping rule; diverged and crashed runs marked);
- lm_<task>.png: benchmarks/lm.py's validation loss against steps and time, per method.

The PNGs are also copied to docs/img/, where docs/benchmarks.md shows them (``--no-docs``
leaves docs/ alone).

Usage: python benchmarks/plot.py [--results DIR] [--no-docs]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, read_csv  # noqa: E402

COLORS = {"AdamW": "tab:blue", "SGD": "tab:orange", "SGD + K-FAC": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latest(rows: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    """The rows of the most recent date for every value of ``key``."""
    latest: dict[str, str] = {}
    for r in rows:
        latest[r[key]] = max(latest.get(r[key], ""), r["date"])
    return [r for r in rows if r["date"] == latest[r[key]]]


def _color(name: str, i: int) -> str:
    return COLORS.get(name, f"C{(i + 3) % 10}")


def time_to_target(results: Path) -> list[Path]:
    curves = _latest(read_csv(results / "time_to_target_curves.csv"), "task")
    summary = read_csv(results / "time_to_target.csv")
    out = []
    by_task: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in curves:
        by_task[r["task"]].append(r)
    plt = _plt()
    for task, rows in by_task.items():
        date = rows[0]["date"]
        mine = [r for r in summary if r["task"] == task and r["date"] == date]
        targets = sorted({float(r["target"]) for r in mine if r["method"] == "AdamW"})
        metric = next((r.get("metric_name", "") for r in mine), "")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        runs: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
        for r in rows:
            runs[(r["method"], r["seed"])].append(
                (float(r["step"]), float(r["seconds"]), float(r["metric"]))
            )
        methods = list(dict.fromkeys(m for m, _ in runs))
        for (method, seed), points in runs.items():
            steps, secs, values = zip(*[p for p in points if math.isfinite(p[2])])
            color = _color(method, methods.index(method))
            label = method if seed == "0" else None
            axes[0].plot(secs, values, color=color, lw=1, alpha=0.8, label=label)
            axes[1].plot(steps, values, color=color, lw=1, alpha=0.8, label=label)
        for ax, xlabel in zip(axes, ("training wall time (s)", "steps")):
            for t in targets:
                ax.axhline(t, color="gray", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric or "metric")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        axes[1].set_xscale("log")
        fig.suptitle(f"{task}: one line per seed; dotted: AdamW's best per seed ({date[:10]})")
        out.append(_save(plt, fig, results / f"time_to_target_{task}.png"))
    return out


def step_cost(results: Path) -> list[Path]:
    rows = _latest(read_csv(results / "step_overhead.csv"), "model")
    rows = [r for r in rows if r.get("optimizer") and r.get("mode") == "exact"]
    if not rows:
        return []
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4))
    axes = [axes] if len(models) == 1 else list(axes)
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        labels, alone, kfac, floor = [], [], [], []
        for r in mine:
            labels.append("AdamW" if r["optimizer"] == "adamw" else "SGD")
            alone.append(float(r["base_ms"]))
            kfac.append(float(r["kfac_ms"]))
            floor.append(float(r["floor_ms"]))
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], alone, width=0.4, label="alone", color="tab:blue")
        ax.bar([i + 0.2 for i in x], kfac, width=0.4, label="+ K-FAC", color="tab:green")
        ax.bar(
            [i + 0.2 for i in x],
            floor,
            width=0.4,
            bottom=alone,
            fill=False,
            hatch="//",
            edgecolor="k",
            label="alone + FLOP floor of the extra work",
        )
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("ms per step")
        ax.set_title(f"{mine[0].get('describe') or model}, batch {mine[0]['batch']}", fontsize=9)
    axes[0].legend(fontsize=8)
    meta = rows[0]
    fig.suptitle(f"Step cost ({meta['device']}, {meta['threads']} thread(s), {meta['date'][:10]})")
    return [_save(plt, fig, results / "step_cost.png")]


def memory(results: Path) -> list[Path]:
    rows = _latest(read_csv(results / "memory.csv"), "model")
    rows = [r for r in rows if r["optimizer"] == "adamw"]
    if not rows:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["model"] for r in rows]
    x = list(range(len(rows)))
    series = [
        ("parameters", "params_mib"),
        ("AdamW state", "optimizer_state_mib"),
        ("K-FAC state (planned)", "kfac_planned_mib"),
        ("extra peak with K-FAC (measured)", "peak_extra_mib"),
    ]
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        ax.bar(
            [v + (i - 1.5) * width for v in x], [float(r[key]) for r in rows], width, label=label
        )
    ax.set_xticks(x, names)
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8)
    ax.set_title(f"Memory with AdamW ({rows[0]['device_kind']}, {rows[0]['date'][:10]})")
    return [_save(plt, fig, results / "memory.png")]


def autoencoder_damping(results: Path) -> list[Path]:
    rows = read_csv(results / "autoencoder_damping.csv")
    if not rows:
        return []
    rows = _latest(rows, "rule")  # each rule's most recent sweep
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    for i, rule in enumerate(rules):
        mine = [r for r in rows if r["rule"] == rule]
        best: dict[float, float] = {}
        failed: dict[float, int] = defaultdict(int)
        for r in mine:
            d = float(r["damping"])
            value = float(r["final"]) if r["status"] == "ok" else math.inf
            failed[d] += r["status"] != "ok"
            best[d] = min(best.get(d, math.inf), value)
        ds = sorted(best)
        finite = [(d, best[d]) for d in ds if math.isfinite(best[d])]
        if finite:
            ax.plot(*zip(*finite), marker="o", color=f"C{i}", label=rule)
        for d in ds:
            if not math.isfinite(best[d]):
                ax.axvline(d, color=f"C{i}", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("damping")
    ax.set_ylabel("train MSE after the step budget (best lr)")
    ax.set_title("Digits autoencoder: damping sweep (dashed: every lr diverged)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(plt, fig, results / "autoencoder_damping.png")]


def language_models(results: Path) -> list[Path]:
    """lm_<task>.png for every task of results/lm_curves.csv (benchmarks/lm.py draws them)."""
    if not (results / "lm_curves.csv").exists():
        return []
    import lm

    tasks = unique_tasks(read_csv(results / "lm_curves.csv"))
    return [p for t in tasks if (p := lm.plot(t, results)) is not None]


def unique_tasks(rows: list[dict[str, str]]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in rows))


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true", help="do not copy into docs/img/")
    args = parser.parse_args(argv)
    paths = []
    for plot in (time_to_target, step_cost, memory, autoencoder_damping, language_models):
        paths += plot(args.results)
    for p in paths:
        print(p)
    if not args.no_docs:
        docs = Path(__file__).resolve().parents[1] / "docs" / "img"
        docs.mkdir(exist_ok=True)
        for p in paths:
            shutil.copyfile(p, docs / p.name)
    return paths


if __name__ == "__main__":
    main()
