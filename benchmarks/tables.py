"""The benchmark tables of README.md, docs/benchmarks.md, docs/guides/transformers.md and
docs/distributed.md, regenerated from the CSVs.

Every such table sits between two marker comments:

    <!-- tables:NAME:begin key=value ... -->
    | ... the table ... |

    <!-- tables:NAME:end -->

NAME picks the table (see TABLES below); the ``key=value`` arguments pick the run(s) it
shows, by the ``date`` or ``revision`` written beside every CSV row (a results CSV holds
every run ever appended to it, and the text around a table describes one of them). To show
a newer run, change the marker's argument and run this script.

    python benchmarks/tables.py            # rewrite the blocks in place
    python benchmarks/tables.py --check    # exit 1, printing the diff, if a block is stale

Rounding: a mean ± standard deviation (over seeds or rounds) gives the deviation two
significant digits, at most as many decimals as the mean's column (one significant digit if
that would round it to zero); the mean is rounded as its column says (fixed decimals or
significant digits). "–": nothing to show (no seed reached the target, no finished run).
"""

from __future__ import annotations

import argparse
import ast
import csv
import difflib
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FILES = [
    ROOT / "README.md",
    ROOT / "docs" / "benchmarks.md",
    ROOT / "docs" / "guides" / "transformers.md",
    ROOT / "docs" / "distributed.md",
]

MARKER = re.compile(
    r"<!-- tables:(?P<name>[\w-]+):begin(?P<args>[^>]*?)-->\n"
    r"(?P<body>.*?)"
    r"<!-- tables:(?P=name):end -->",
    re.DOTALL,
)
DASH = "–"

Row = dict[str, str]


# ------------------------------------------------------------------------------ reading
def read(results: Path, name: str) -> list[Row]:
    path = results / name
    if not path.exists():
        raise SystemExit(f"tables.py: {path} does not exist")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_of(rows: list[Row], run: str, what: str) -> list[Row]:
    """The rows of one run: those whose date or revision is ``run``."""
    picked = [r for r in rows if run in (r.get("date"), r.get("revision"))]
    if not picked:
        runs = sorted({r.get("revision") or r.get("date", "") for r in rows})
        raise SystemExit(f"tables.py: no rows of run {run!r} in {what} (runs: {runs})")
    return picked


def _runs(rows: list[Row], runs: str, what: str) -> list[Row]:
    """The rows of several runs (runs: comma-separated dates or revisions), in that order."""
    return [r for run in runs.split(",") for r in run_of(rows, run, what)]


def num(cell: str) -> float:
    return float(cell) if cell not in ("", None) else math.nan


def config_value(config: str, key: str) -> float:
    """``key``'s value in a "k=v, k=v" configuration string."""
    for part in config.split(", "):
        k, _, v = part.partition("=")
        if k == key:
            return float(v)
    raise KeyError(f"{key} not in {config!r}")


def unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


# ------------------------------------------------------------------------------ numbers
def sig_decimals(x: float, digits: int) -> int:
    """Decimals that show ``x`` with ``digits`` significant digits (negative: round to tens,
    hundreds, ...)."""
    if x == 0 or not math.isfinite(x):
        return 0
    return digits - 1 - math.floor(math.log10(abs(x)))


def fixed(x: float, decimals: int, group: bool = False) -> str:
    """``x`` rounded to ``decimals`` (negative: to tens, hundreds, ...); ``group``: digits of
    the integer part in groups of three (2 357, 14 170)."""
    text = f"{round(x, decimals):.{max(decimals, 0)}f}"
    if not group:
        return text
    whole, dot, frac = text.partition(".")
    return f"{int(whole):,}".replace(",", " ") + dot + frac


def sci(x: float, decimals: int, exponent: int | None = None) -> str:
    """``x`` as 1.1e-6 (no exponent padding), optionally at a given exponent."""
    if exponent is None:
        exponent = math.floor(math.log10(abs(x))) if x else 0
    return f"{x / 10**exponent:.{decimals}f}e{exponent}"


def short(x: float) -> str:
    """A learning rate or a damping as the docs write it: 0.03, 1, 1e-7, 1e-4."""
    text = f"{x:g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    return text


def eps(x: float) -> str:
    """A damping value: 1e-4 … 1e-1 as powers of ten, 1 and above as numbers."""
    if x < 1 and math.log10(x).is_integer():
        return f"1e{int(math.log10(x))}"
    return short(x)


def pm(
    values: list[float], decimals: int | None = None, sig: int | None = None, group: bool = False
) -> str:
    """Mean ± standard deviation (one value: the value), the mean at ``decimals`` (at least
    0) or at ``sig`` significant digits; ``group``: thousands grouped (see :func:`fixed`)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return DASH
    mean = statistics.mean(values)
    if decimals is None:
        decimals = max(0, sig_decimals(mean, sig or 3))
    if len(values) == 1:
        return fixed(mean, decimals, group)
    std = statistics.stdev(values)
    d_std = min(sig_decimals(std, 2), decimals)
    if round(std, d_std) == 0 and std > 0:
        d_std = sig_decimals(std, 1)
    return f"{fixed(mean, decimals, group)} ± {fixed(std, d_std, group)}"


def pm_sci(values: list[float], decimals: int = 1) -> str:
    """Mean ± standard deviation in the mean's power of ten: 1.1e-6 ± 0.3e-6."""
    mean = statistics.mean(values)
    exponent = math.floor(math.log10(abs(mean)))
    if len(values) == 1:
        return sci(mean, decimals, exponent)
    std = statistics.stdev(values)
    return f"{sci(mean, decimals, exponent)} ± {sci(std, decimals, exponent)}"


def bold(text: str) -> str:
    return f"**{text}**" if text and text != DASH else text


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    for row in rows:
        assert len(row) == len(header), (header, row)
    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)]) + "\n"


def reached(values: list[float], decimals: int = 0) -> str:
    """Steps (or seconds) to a target over seeds, "– (0/3)", "3190 (1/3)", "3097 ± 280 (3/3)"."""
    hit = [v for v in values if math.isfinite(v)]
    count = f"({len(hit)}/{len(values)})"
    return f"{pm(hit, decimals) if hit else DASH} {count}"


# ------------------------------------------------------------------------------ README
DEMO_LABELS = {"SGD": "SGD (momentum 0.9)"}  # benchmarks/demo.py: SGD with momentum 0.9


def demo(results: Path, date: str) -> str:
    """`make demo`: one row per optimizer."""
    rows = []
    for r in run_of(read(results, "demo.csv"), date, "demo.csv"):
        label = DEMO_LABELS.get(r["optimizer"], r["optimizer"])
        if r["kfac"]:
            label += f" (ε = {short(ast.literal_eval(r['kfac'])['damping'])})"
        rows.append(
            [
                label,
                short(num(r["lr"])),
                f"{num(r['train_loss']):.2g}",
                f"{num(r['test_acc']):.4f}",
                f"{num(r['seconds']):.2f}",
            ]
        )
    return markdown(["optimizer", "lr", "train loss", "test acc", "wall (s)"], rows)


# The models of benchmarks/step_overhead.py and memory.py (older rows have no description).
MODEL_LABELS = {
    "mlp-784-1024-1024-10": "MLP 784-1024-1024-10",
    "cnn-32x32": "CNN 32×32",
    "mlp": "MLP 784-1024-1024-10",
    "cnn": "CNN 32×32, 2 convs",
    "gpt": "GPT dim 128, vocab 512",
}
GPT_TOKENS = 64  # step_overhead.py: the GPT's sequences of 64 tokens
OPTIMIZERS = {"sgd": "SGD", "adamw": "AdamW"}


def model_label(r: Row, batch: bool = True) -> str:
    label = r.get("describe") or MODEL_LABELS[r["model"]]
    label = re.sub(r"(\d)x(\d)", r"\1×\2", label)
    if batch:
        label += f", batch {r['batch']}"
        if r["model"] == "gpt":
            label += f" × {GPT_TOKENS}"
    return label


def step_overhead_readme(results: Path, date: str) -> str:
    """An early run of step_overhead.py (SGD only, per damping mode)."""
    rows = [
        [
            model_label(r),
            r["mode"],
            *(f"{num(r[k]):.2f}" for k in ("sgd_ms", "kfac_ms", "extra_ms", "floor_ms")),
            f"{num(r['extra_over_floor']):.2f}",
        ]
        for r in run_of(read(results, "step_overhead.csv"), date, "step_overhead.csv")
    ]
    header = ["model", "mode", "SGD ms", "+K-FAC ms", "extra ms", "floor ms", "extra/floor"]
    return markdown(header, rows)


def transformer(results: Path, date: str) -> str:
    """benchmarks/transformer.py: AdamW alone and with K-FAC at several cadences."""
    rows = []
    for r in run_of(read(results, "transformer.csv"), date, "transformer.csv"):
        if r["config"] == "adamw":
            label = "AdamW"
        else:
            label = f"+ K-FAC, inv_update_steps={r['inv_update_steps']}"
            if r["factor_update_steps"] not in ("", "1"):
                label += f", factor_update_steps={r['factor_update_steps']}"
        planned = num(r["planned_state_mib"])
        rows.append(
            [
                label,
                f"{num(r['ms_per_step']):.1f}",
                f"{num(r['cpu_ms_per_step']):.1f}",
                f"{num(r['peak_extra_mib']):.0f} MiB",
                f"{planned:.1f} MiB" if planned else "—",
            ]
        )
    header = ["configuration", "ms/step", "CPU ms/step", "peak memory growth",
              "planned K-FAC state"]  # fmt: skip
    return markdown(header, rows)


# ------------------------------------------------------------------------------ time to target
BASELINE, KFAC = "AdamW", "SGD + K-FAC"
TASK_LABELS = {
    "autoencoder": "digits autoencoder",
    "classification": "digits classification",
    "chargpt": "char-level GPT",
    "lm256": "char-level GPT, dim 256 × 4 blocks",
    "gpt50k": "GPT, 50 257-token vocabulary (one batch)",
}
METRIC_UNITS = {"autoencoder": "MSE", "classification": "loss", "chargpt": "nats/char"}
METHOD_LABELS = {
    "SGD + K-FAC (pi)": "SGD + K-FAC, π-damping",
    "SGD + K-FAC (EKFAC)": "SGD + K-FAC, EKFAC",
}


def final_metric(task: str, values: list[float], spread: bool = True) -> str:
    """A task's metric as the docs write it: MSE at 5 decimals, the classification loss in
    powers of ten, nats per character at 3 decimals."""
    if task == "classification":
        return pm_sci(values) if spread else sci(statistics.mean(values), 1)
    decimals = 5 if task == "autoencoder" else 3
    return pm(values, decimals) if spread else fixed(statistics.mean(values), decimals)


def _ttt(results: Path, run: str) -> list[Row]:
    return run_of(read(results, "time_to_target.csv"), run, "time_to_target.csv")


def _col(rows: list[Row], key: str) -> list[float]:
    return [num(r[key]) for r in rows]


def time_to_target(results: Path, revision: str) -> str:
    """One run of time_to_target.py: every task, every method, mean ± std over seeds."""
    all_rows = _ttt(results, revision)
    out = []
    for task in unique(r["task"] for r in all_rows):
        task_rows = [r for r in all_rows if r["task"] == task]
        methods = unique(r["method"] for r in task_rows)
        by = {m: [r for r in task_rows if r["method"] == m] for m in methods}
        finals = {m: statistics.mean(_col(by[m], "final")) for m in methods}
        ratios = {
            m: statistics.mean([v for v in _col(by[m], "time_over_baseline") if math.isfinite(v)])
            for m in methods
            if m != BASELINE and any(r["time_over_baseline"] for r in by[m])
        }
        for m in methods:
            rows = by[m]
            sps = _col(rows, "steps_per_s")
            hit = [r for r in rows if r["target_seconds"]]
            if m == BASELINE:
                ratio = "1"
            else:
                ratio = pm([num(r["time_over_baseline"]) for r in hit], 2) if hit else DASH
                if ratios and m == min(ratios, key=ratios.__getitem__):
                    ratio = bold(ratio)
            final = final_metric(task, _col(rows, "final"))
            out.append(
                [
                    task,
                    METHOD_LABELS.get(m, m),
                    short(num(rows[0]["lr"])),
                    bold(final) if m == min(finals, key=finals.__getitem__) else final,
                    pm(sps, sig=3),
                    pm(_col(hit, "target_seconds"), 2) if hit else DASH,
                    pm(_col(hit, "target_steps"), 0, group=True) if hit else DASH,
                    f"{len(hit)}/{len(rows)}",
                    ratio,
                ]
            )
    header = ["task", "method", "lr", "final metric", "steps/s", "s to target",
              "steps to target", "reached", f"time / {BASELINE}"]  # fmt: skip
    return markdown(header, out)


def summary(results: Path, style: str = "docs", **runs: str) -> str:
    """K-FAC against AdamW per task, each task from the run named for it (task=run)."""
    docs = style == "docs"
    out = []
    for task, run in runs.items():
        rows = [r for r in _ttt(results, run) if r["task"] == task]
        if not rows:
            raise SystemExit(f"tables.py: no {task} rows in run {run!r} of time_to_target.csv")
        base = [r for r in rows if r["method"] == BASELINE]
        kfac = [r for r in rows if r["method"] == KFAC]
        hit = [r for r in kfac if r["target_seconds"]]
        ratios = _col(hit, "time_over_baseline")
        label = f"{TASK_LABELS[task]} ({num(rows[0]['budget_s']):g} s)"
        base_s = _col(base, "target_seconds")
        if hit:
            kfac_s = pm(_col(hit, "target_seconds"), sig=3) + " s"
            ratio = pm(ratios, 2)
            if docs:
                ratio = bold(ratio) if statistics.mean(ratios) <= 0.5 else ratio
                ratio += (
                    f" (max {max(ratios):.2f}, {len(ratios)} seeds)"
                    if len(ratios) > 3
                    else f" ({', '.join(f'{v:.2f}' for v in ratios)})"
                )
        else:
            kfac_s = "not reached" + (f" (0/{len(kfac)})" if docs else "")
            ratio = DASH

        def steps(rs: list[Row]) -> str:
            hit_steps = [v for v in _col(rs, "target_steps") if math.isfinite(v)]
            return fixed(statistics.mean(hit_steps), -1, group=True) if hit_steps else DASH

        f_base, f_kfac = statistics.mean(_col(base, "final")), statistics.mean(_col(kfac, "final"))
        if docs:
            cells = [final_metric(task, [f_base], False), final_metric(task, [f_kfac], False)]
            cells[int(f_kfac < f_base)] = bold(cells[int(f_kfac < f_base)])
        else:
            cells = [
                final_metric(task, [f], False) if task != "chargpt" else f"{f:.2f}"
                for f in (f_base, f_kfac)
            ]
        out.append(
            [
                label,
                pm(base_s, sig=3) + " s",
                kfac_s,
                ratio,
                f"{steps(base)} / {steps(kfac)}",
                f"{cells[0]} / {cells[1]} {METRIC_UNITS[task]}",
            ]
        )
    if docs:
        header = ["task (budget)", "AdamW: time to its best", "SGD + K-FAC: time to AdamW's best",
                  "ratio (per seed)", "steps to it: AdamW / K-FAC",
                  "final metric: AdamW / K-FAC"]  # fmt: skip
    else:
        header = ["task (budget)", "AdamW to its best", "SGD + K-FAC to AdamW's best",
                  "K-FAC / AdamW time", "steps AdamW / K-FAC",
                  "final metric AdamW / K-FAC"]  # fmt: skip
    return markdown(header, out)


def ttt_revisions(results: Path, **runs: str) -> str:
    """The autoencoder, one run per revision (label=revision): steps/s and per-seed ratios."""
    out = []
    means = []
    for label, run in runs.items():
        rows = [r for r in _ttt(results, run) if r["task"] == "autoencoder"]
        base = [r for r in rows if r["method"] == BASELINE]
        kfac = sorted((r for r in rows if r["method"] == KFAC), key=lambda r: int(r["seed"]))
        ratios = [num(r["time_over_baseline"]) for r in kfac]
        means.append(statistics.mean(ratios))
        out.append(
            [
                f"{label} ({run})",
                f"{statistics.mean(_col(base, 'steps_per_s')):.0f}",
                f"{statistics.mean(_col(kfac, 'steps_per_s')):.0f}",
                ", ".join(f"{v:.2f}" if math.isfinite(v) else DASH for v in ratios),
                ", ".join(r["target_steps"] or DASH for r in kfac),
            ]
        )
    best = means.index(min(means))
    out[best][3] = bold(out[best][3])
    seeds = ", ".join(r["seed"] for r in kfac)
    header = ["revision", "AdamW steps/s", "SGD + K-FAC steps/s",
              f"K-FAC time / AdamW time, seeds {seeds}", "steps to target, K-FAC"]  # fmt: skip
    return markdown(header, out)


SEED_TABLE_METHODS = {
    "SGD + K-FAC": "SGD + K-FAC (the recipe)",
    "SGD + K-FAC (EKFAC)": "SGD + K-FAC, EKFAC",
    "SGD + K-FAC (pi)": "SGD + K-FAC, π-damping",
}


def ttt_per_seed(results: Path, runs: str, bar: str = "0.5") -> str:
    """The autoencoder's time over AdamW's per seed, from several runs (runs=A,B: a later
    run's seed replaces an earlier one's), and how many seeds are at most ``bar``."""
    rows = [r for r in _runs(read(results, "time_to_target.csv"), runs, "time_to_target.csv")
            if r["task"] == "autoencoder"]  # fmt: skip
    seeds = sorted({int(r["seed"]) for r in rows})
    out = []
    for method, label in SEED_TABLE_METHODS.items():
        ratio = {
            int(r["seed"]): num(r["time_over_baseline"]) for r in rows if r["method"] == method
        }
        if not ratio:
            continue
        cells = [
            f"{ratio[s]:.2f}" if math.isfinite(ratio.get(s, math.nan)) else DASH for s in seeds
        ]
        met = sum(v <= float(bar) for v in ratio.values())
        out.append([label, *cells, f"{met} of {len(ratio)}"])
    return markdown(["method", *(f"seed {s}" for s in seeds), f"≤ {bar}"], out)


def ttt_seeds(results: Path, revision: str) -> str:
    """One run of the autoencoder over many seeds: one column per seed."""
    rows = [r for r in _ttt(results, revision) if r["task"] == "autoencoder"]
    base = {int(r["seed"]): r for r in rows if r["method"] == BASELINE}
    kfac = {int(r["seed"]): r for r in rows if r["method"] == KFAC}
    seeds = sorted(kfac)

    def cells(src: dict[int, Row], key: str, fmt: Callable[[float], str]) -> list[str]:
        return [fmt(num(src[s][key])) if src[s][key] else DASH for s in seeds]

    out = [
        ["AdamW: s to its best", *cells(base, "target_seconds", lambda v: f"{v:.1f}")],
        ["K-FAC: s to AdamW's best", *cells(kfac, "target_seconds", lambda v: f"{v:.2f}")],
        ["K-FAC: steps to it", *cells(kfac, "target_steps", lambda v: f"{v:.0f}")],
        [
            bold(f"time / {BASELINE}"),
            *cells(kfac, "time_over_baseline", lambda v: bold(f"{v:.2f}")),
        ],
    ]
    return markdown(["seed", *map(str, seeds)], out)


# ------------------------------------------------------------------------------ autoencoder
COST_LABELS = {
    "K-FAC, relative ε, no trust region": "SGD + K-FAC, relative ε, no trust region (cadence 5/20)",
    "K-FAC recipe, Kronecker-form trust region": (
        "the recipe with the trust region on the Kronecker form"
    ),
    "K-FAC recipe (exact-form trust region)": (
        "the recipe (trust region on the exact per-example form)"
    ),
    "K-FAC recipe, no statistics or decompositions after step 0": (
        "the recipe without statistics or decompositions after step 0"
    ),
}


def _cost(results: Path, run: str) -> dict[str, float]:
    """Fastest ms per step of each configuration over the rows of a date or revision."""
    best: dict[str, float] = {}
    for r in run_of(read(results, "autoencoder_cost.csv"), run, "autoencoder_cost.csv"):
        c = r["configuration"]
        best[c] = min(best.get(c, math.inf), num(r["ms_per_step"]))
    return best


def autoencoder_cost(results: Path, date: str) -> str:
    """autoencoder.py --cost: ms per step per configuration (the fastest round)."""
    rows = [[COST_LABELS.get(c, c), f"{ms:.2f}"] for c, ms in _cost(results, date).items()]
    return markdown(["configuration", "ms per step"], rows)


def autoencoder_cost_revisions(results: Path, before: str, after: str) -> str:
    """autoencoder.py --cost on two revisions, each the fastest of its runs."""
    b, a = _cost(results, before), _cost(results, after)
    rows = [[COST_LABELS.get(c, c), f"{b[c]:.2f}", f"{a[c]:.2f}"] for c in b if c in a]
    return markdown(["configuration", "before, ms per step", "after, ms per step"], rows)


def autoencoder_radius(results: Path, date: str) -> str:
    """autoencoder.py --radius: per trust-region size c, over the seeds."""
    rows = run_of(read(results, "autoencoder_radius.csv"), date, "autoencoder_radius.csv")
    sizes = sorted({num(r["max_loss_change"]) for r in rows})
    out, worst = [], []
    for c in sizes:
        mine = sorted(
            (r for r in rows if num(r["max_loss_change"]) == c), key=lambda r: int(r["seed"])
        )
        steps = _col(mine, "reference_steps")
        all_hit = all(math.isfinite(v) for v in steps)
        worst.append(max(steps) if all_hit else math.inf)
        hit = [v for v in steps if math.isfinite(v)]
        out.append(
            [
                short(c),
                pm(_col(mine, "final"), 5),
                pm(hit, 0) if hit else DASH,
                f"({len(hit)}/{len(steps)})",
                f"{max(steps):.0f}" if all_hit else DASH,
                ", ".join(f"{v:.0f}" if math.isfinite(v) else DASH for v in steps),
            ]
        )
    best = worst.index(min(worst))  # the most reliable size: the fewest steps on its worst seed
    for i in (0, 1, 2, 4):
        out[best][i] = bold(out[best][i])
    rows_md = [[r[0], r[1], f"{r[2]} {r[3]}", r[4], r[5]] for r in out]
    reference = short(num(rows[0]["reference"]))
    seeds = ", ".join(str(s) for s in sorted({int(r["seed"]) for r in rows}))
    header = ["c", f"MSE after {rows[0]['steps']} steps", f"steps to {reference}", "worst seed",
              f"seeds {seeds}"]  # fmt: skip
    return markdown(header, rows_md)


LEVER_LABELS = {
    "fixed ε=0.1": "fixed ε = 0.1",
    "fixed ε=0.1, warm-up 50": "fixed ε = 0.1, warm-up 50",
    "fixed ε=0.1, trust region": "fixed ε = 0.1, trust region",
    "relative ε=0.01": "relative ε = 0.01",
    "relative, trust region (Kronecker form)": "relative, trust region on the Kronecker form",
    "relative, trust region": "relative, trust region (exact form)",
}


def autoencoder_levers(results: Path, date: str) -> str:
    """autoencoder.py --levers: each lever over the seeds."""
    rows = run_of(read(results, "autoencoder_levers.csv"), date, "autoencoder_levers.csv")
    levers = unique(r["lever"] for r in rows)
    finals = {
        lever: statistics.mean(_col([r for r in rows if r["lever"] == lever], "final"))
        for lever in levers
    }
    finite = {k: v for k, v in finals.items() if math.isfinite(v)}
    best = min(finite, key=finite.__getitem__)
    steps = max(int(r["steps"]) for r in rows)
    out = []
    for lever in levers:
        mine = [r for r in rows if r["lever"] == lever]
        label = [LEVER_LABELS.get(lever, lever), short(config_value(mine[0]["config"], "lr"))]
        diverged = [r for r in mine if r["status"] == "diverged"]
        if len(diverged) == len(mine):
            within = max(int(r["steps"]) for r in mine)
            out.append(
                [*label, f"diverged ({len(diverged)}/{len(mine)}, within {within} steps)"]
                + [""] * 4
            )
            continue
        hit = [r for r in mine if r["reference_steps"]]
        seconds = [num(r["reference_steps"]) / num(r["steps_per_s"]) for r in hit]
        final = pm(_col(mine, "final"), sig=3)
        out.append(
            [
                *label,
                pm(_col(mine, "mse_1000"), sig=3),
                bold(final) if lever == best else final,
                reached([num(r["reference_steps"]) for r in mine]),
                pm(_col(mine, "steps_per_s"), 0),
                pm(seconds, 0),
            ]
        )
    reference = short(num(rows[0]["reference"]))
    header = ["configuration", "lr", "MSE @1000", f"MSE @{steps}", f"steps to {reference}",
              "steps/s", f"s to {reference}"]  # fmt: skip
    return markdown(header, out)


DAMPING_LABELS = {
    "relative ε + trust region": "relative ε + trust region + cadence",
    "relative ε + trust region c=0.5": "the same with c = 0.5",
}


def autoencoder_damping(results: Path, runs: str) -> str:
    """autoencoder.py --damping (runs=A,B: the runs shown): per rule and ε, the lr grid on
    seed 0, then the best lr on the other seeds. Bold: the best ε of each relative-ε rule
    (the rules the text compares)."""
    rows = _runs(read(results, "autoencoder_damping.csv"), runs, "autoencoder_damping.csv")
    out: list[list[str]] = []
    previous_grid: list[float] = []
    for rule in unique(r["rule"] for r in rows):
        first = len(out)
        means = []
        for d in unique(r["damping"] for r in rows if r["rule"] == rule):
            mine = [r for r in rows if r["rule"] == rule and r["damping"] == d]
            grid_rows = [r for r in mine if r["part"] == "grid"]
            grid = [num(r["lr"]) for r in grid_rows]
            ok = [num(r["lr"]) for r in grid_rows if r["status"] == "ok"]
            bad = [num(r["lr"]) for r in grid_rows if r["status"] != "ok"]
            kind = {r["status"] for r in grid_rows if r["status"] != "ok"}
            failure = "crashed" if kind == {"crashed"} else "diverged"
            listed = ", ".join(short(v) for v in grid)
            if not bad:
                cell = "all ok" if grid == previous_grid else f"{listed}: all ok"
            elif not ok:
                cell = f"{listed}: all {failure}"
            else:
                cell = (
                    f"{', '.join(short(v) for v in ok)} ok; "
                    f"{', '.join(short(v) for v in bad)} {failure}"
                )
            previous_grid = grid
            best_rows = [r for r in mine if r["part"] == "best lr"]
            if ok:
                best_lr = num(best_rows[0]["lr"]) if best_rows else ok[0]
                seed_rows = [r for r in grid_rows if num(r["lr"]) == best_lr] + best_rows
            else:
                best_lr, seed_rows = math.nan, [r for r in grid_rows[:1]] + best_rows
            good = [num(r["final"]) for r in seed_rows if r["status"] == "ok"]
            means.append(statistics.mean(good) if good else math.inf)
            out.append(
                [
                    DAMPING_LABELS.get(rule, rule),
                    eps(float(d)),
                    cell,
                    short(best_lr) if ok else DASH,
                    pm(good, 4) if good else DASH,
                    f"{len(good)}/{len(seed_rows)}",
                ]
            )
        if "relative" in rule:
            i = first + means.index(min(means))
            out[i][4] = bold(out[i][4])
    header = ["rule", "ε", "lr grid (seed 0)", "best lr", "final MSE, 3 seeds", "seeds ok"]
    return markdown(header, out)


PEER_METHODS = {"ASDL": True, "kfac_ef π": False, "kfac_ef recipe": False}  # cell names its lr


def peer(results: Path, runs: str) -> str:
    """peer.py (runs=A,B: the runs shown): per ε and library, the best learning rate's final
    MSE over the seeds and how many of the runs at that ε (every lr × seed) finished."""
    rows = _runs(read(results, "peer.csv"), runs, "peer.csv")
    grids = {
        m: unique(r["lr"] for r in rows if r["method"] == m and r["damping"] == rows[0]["damping"])
        for m in PEER_METHODS
    }
    cells: dict[tuple[str, str], tuple[str, float]] = {}
    for m, d in unique((r["method"], r["damping"]) for r in rows):
        mine = [r for r in rows if r["method"] == m and r["damping"] == d]
        n_ok = sum(r["status"] == "ok" for r in mine)
        best, best_mean = None, math.inf
        for lr in unique(r["lr"] for r in mine):
            finals = [num(r["final"]) for r in mine if r["lr"] == lr and r["status"] == "ok"]
            if finals and statistics.mean(finals) < best_mean:
                best, best_mean = lr, statistics.mean(finals)
        if best is None:
            cells[m, d] = (f"diverged (0/{len(mine)})", math.inf)
            continue
        finals = [num(r["final"]) for r in mine if r["lr"] == best and r["status"] == "ok"]
        at = f" at lr {short(num(best))}" if PEER_METHODS[m] else ""
        cells[m, d] = (f"{pm(finals, 4)}{at} ({n_ok}/{len(mine)})", best_mean)
    top = min(cells, key=lambda k: cells[k][1])
    out = []
    for d in sorted(unique(r["damping"] for r in rows), key=float):
        label = eps(float(d))
        for m in PEER_METHODS:
            lrs = unique(r["lr"] for r in rows if r["method"] == m and r["damping"] == d)
            if lrs and lrs != grids[m]:
                label += f" (lr {', '.join(short(num(v)) for v in lrs)})"
                break
        row = [label]
        for m in PEER_METHODS:
            text, _ = cells.get((m, d), ("", math.inf))
            if (m, d) == top:
                value, _, rest = text.partition(" (")
                text = f"{bold(value)} ({rest}"
            row.append(text)
        out.append(row)
    header = ["ε"] + [
        f"{m} (lr {', '.join(short(num(v)) for v in grids[m])})" for m in PEER_METHODS
    ]
    return markdown(header, out)


# ------------------------------------------------------------------------------ step cost, memory
def step_cost(results: Path, date: str) -> str:
    """step_overhead.py: per model and optimizer, alone and with K-FAC, against the floor."""
    rows = run_of(read(results, "step_overhead.csv"), date, "step_overhead.csv")
    out = [
        [
            model_label(r),
            OPTIMIZERS[r["optimizer"]],
            *(f"{num(r[k]):.1f}" for k in ("base_ms", "kfac_ms", "extra_ms", "floor_ms")),
            f"{num(r['extra_over_floor']):.2f}",
            f"{num(r['slowdown']):.1f}×",
        ]
        for r in rows
    ]
    header = ["model", "optimizer", "alone ms", "+ K-FAC ms", "extra ms", "floor ms",
              "extra / floor", "slowdown"]  # fmt: skip
    return markdown(header, out)


def peer_cost(results: Path, run: str) -> str:
    """peer_cost.py: ms per step and the extra over SGD alone, beside ASDL's extra."""
    out = []
    for r in run_of(read(results, "peer_cost.csv"), run, "peer_cost.csv"):
        base = r["method"] == "SGD"
        out.append([
            f"{r['describe']}, batch {r['batch']}",
            r["method"],
            f"{num(r['ms_per_step']):.1f}",
            "" if base else f"{num(r['extra_ms']):.1f}",
            "" if base else f"{num(r['extra_over_asdl']):.2f}",
        ])  # fmt: skip
    header = ["model", "method", "ms/step", "extra ms", "extra / ASDL's extra"]
    return markdown(header, out)


def memory(results: Path, date: str) -> str:
    """memory.py: parameters, optimizer state, K-FAC's planned and held state, extra peak."""
    keys = ["params_mib", "optimizer_state_mib", "kfac_planned_mib", "kfac_held_mib",
            "peak_extra_mib"]  # fmt: skip
    out = [
        [model_label(r, batch=False), OPTIMIZERS[r["optimizer"]]]
        + [f"{num(r[k]):.1f}" for k in keys]
        for r in run_of(read(results, "memory.csv"), date, "memory.csv")
    ]
    header = ["model", "optimizer", "params MiB", "optimizer state MiB", "K-FAC planned MiB",
              "K-FAC held MiB", "extra peak MiB"]  # fmt: skip
    return markdown(header, out)


# ------------------------------------------------------------------------------ language models
def lm(results: Path, task: str, run: str) -> str:
    """benchmarks/lm.py: one task of a run (date or revision; several, comma-separated, for
    seeds run in parallel processes), per method over the seeds."""
    rows = [r for r in _runs(read(results, "lm.csv"), run, "lm.csv") if r["task"] == task]
    out = []
    for method in unique(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        steps = [num(r["steps_to_target"]) if r["steps_to_target"] else math.inf for r in mine]
        secs = [num(r["seconds_to_target"]) if r["seconds_to_target"] else math.inf for r in mine]
        base = {r["seed"]: r for r in rows if r["method"] == "AdamW"}
        step_ratio = [v / num(base[r["seed"]]["steps"]) for v, r in zip(steps, mine)]
        time_ratio = [v / num(base[r["seed"]]["seconds"]) for v, r in zip(secs, mine)]
        hit = [v for v in step_ratio if math.isfinite(v)]
        out.append(
            [
                method,
                short(num(mine[0]["lr"])),
                pm(_col(mine, "final"), 3),
                pm(_col(mine, "loss_at_adamw_time"), 3),
                f"{pm(hit, 2) if hit else DASH} ({len(hit)}/{len(mine)})",
                pm([v for v in time_ratio if math.isfinite(v)], 2) if hit else DASH,
                pm(_col(mine, "ms_per_step"), 1),
                str(sum(int(r["diverged"]) or bool(r["error"]) for r in mine)),
            ]
        )
    header = ["method", "lr", "final loss", "loss at AdamW's time", "steps to target / AdamW's",
              "time to target / AdamW's", "ms/step", "diverged"]  # fmt: skip
    return markdown(header, out)


def lm_levers(results: Path) -> str:
    """results/lm_levers.csv: the single-seed exploration on chargpt (400 steps, seed 0),
    every configuration tried, the full preconditioner options of each (repeated baselines
    once)."""
    out, seen = [], set()
    for r in read(results, "lm_levers.csv"):
        opts = dict(p.split("=", 1) for p in r["kfac_options"].split(", ") if "=" in p)
        opt = {"adamw": "AdamW", "sgd": "SGD (momentum 0.9)", "muon": "Muon"}[r["optimizer"]]
        lr = short(num(r["lr"]))
        if opts:
            eps = f"{short(num(opts['damping']))} {opts['damping_unit']}"
            cadence = f"{opts['factor_update_steps']}/{opts['inv_update_steps']}"
            cells = [opts["damping_mode"], opts["exponent"], eps, opts["grafting"], cadence]
        else:
            cells = ["(alone)", "", "", "", ""]
        row = [opt, lr, *cells]
        if tuple(row) in seen:
            continue
        seen.add(tuple(row))
        final = num(r["final"])
        out.append([*row, f"{final:.3f}" if math.isfinite(final) else "diverged"])
    header = ["optimizer", "lr", "damping_mode", "exponent", "ε", "grafting",
              "statistics / decomposition every", "final loss"]  # fmt: skip
    return markdown(header, out)


def lm_runs(results: Path) -> str:
    """results/lm_single_runs.csv: single runs of benchmarks/lm.py (seed 0, one thread) with
    the options given on its command line; a repeated baseline shown once, a diverged run as
    such."""
    out, seen = [], set()
    for r in read(results, "lm_single_runs.csv"):
        key = (r["task"], r["method"], r["options"], r["final"])
        if key in seen:
            continue
        seen.add(key)
        final = num(r["final"])
        ms = num(r["ms_per_step"]) if r["ms_per_step"] else math.nan
        if r["error"]:
            result = f"failed ({r['error']})"
        else:
            result = f"{final:.3f}" if r["diverged"] == "0" else "diverged"
        out.append([TASK_LABELS.get(r["task"], r["task"]), r["method"], r["optimizer"],
                    r["options"], result, f"{ms:.0f}" if math.isfinite(ms) else DASH,
                    r["revision"], r["note"]])  # fmt: skip
    header = ["task", "method", "optimizer", "options", "final loss", "ms/step", "revision",
              "note"]  # fmt: skip
    return markdown(header, out)


def lm_basis(results: Path, run: str) -> str:
    """benchmarks/lm_basis.py: the SOAP-style experiment's runs (``run``: their revision)."""
    out, seen = [], set()
    keys = ("task", "basis", "arrangement", "statistics_every", "lr", "seed")
    rows = run_of(read(results, "lm_basis.csv"), run, "lm_basis.csv")
    for r in sorted(rows, key=lambda r: tuple(r[k] for k in keys)):
        if tuple(r[k] for k in keys) in seen:  # a configuration run twice: the first shown
            continue
        seen.add(tuple(r[k] for k in keys))
        curve = dict(pair.split(":") for pair in r["curve"].split())
        out.append([TASK_LABELS.get(r["task"], r["task"]), r["basis"], r["arrangement"],
                    r["statistics_every"], short(num(r["lr"])), r["seed"],
                    *(f"{num(curve[s]):.2f}" for s in ("100", "200")),
                    f"{num(r['final']):.3f}"])  # fmt: skip
    header = ["task", "basis", "arrangement", "statistics every", "lr", "seed",
              "loss at step 100", "at 200", "final loss"]  # fmt: skip
    return markdown(header, out)


def lm_spectral(results: Path, run: str, min_seeds: str = "1") -> str:
    """benchmarks/lm_basis.py --arrangement spectral: one row per configuration of ``run``
    (runs: comma-separated revisions or dates) run on at least ``min_seeds`` seeds, mean ± sd
    over them."""
    rows = [r for r in _runs(read(results, "lm_basis.csv"), run, "lm_basis.csv")
            if r["arrangement"] == "spectral"]  # fmt: skip
    keys = ("task", "basis", "power", "damping", "statistics_every", "lr")
    adamw = {(r["task"], r["seed"], r["steps"]): num(r["final"])  # the latest run's
             for r in read(results, "lm.csv") if r["method"] == "AdamW"}  # fmt: skip
    groups: dict[tuple[str, ...], list[Row]] = {}
    for r in rows:  # a configuration run twice on a seed: the first run shown
        group = groups.setdefault(tuple(r[k] for k in keys), [])
        if r["seed"] not in {x["seed"] for x in group}:
            group.append(r)
    out = []
    for key, rs in sorted(groups.items()):
        if len(rs) < int(min_seeds):
            continue
        task, basis, power, damping, every, lr = key
        identity = basis == "identity"
        curves = [dict(pair.split(":") for pair in r["curve"].split()) for r in rs]
        # steps to AdamW's final loss on the same seed and step count (benchmarks/lm.py's
        # latest such run), from curves evaluated every 25 steps (older rows kept every 50th)
        reached, targets = [], 0
        for r, curve in zip(rs, curves):
            target = adamw.get((task, r["seed"], r["steps"]), math.nan)
            if "25" not in curve or not math.isfinite(target):
                continue
            targets += 1
            hit = [int(s) for s, v in curve.items() if num(v) <= target]
            if hit:
                reached.append(min(hit) / int(r["steps"]))
        out.append([
            TASK_LABELS.get(task, task), "none (torch's Muon)" if identity else basis,
            DASH if identity else short(num(power)), DASH if identity else short(num(damping)),
            every if not identity else DASH, short(num(lr)), str(len(rs)),
            pm([num(c["100"]) for c in curves], 2), pm([num(r["final"]) for r in rs], 3),
            f"{pm(reached, 2)} ({len(reached)}/{targets})" if targets else DASH,
            pm([num(r["ms_per_step"]) for r in rs], 0),
        ])  # fmt: skip
    header = ["task", "factors", "power q", "damping", "statistics every", "lr", "seeds",
              "loss at step 100", "final loss", "steps to AdamW's loss / AdamW's",
              "ms/step"]  # fmt: skip
    return markdown(header, out)


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def lm_cost(results: Path, run: str) -> str:
    """benchmarks/lm_cost.py: milliseconds per kind of step and part of it (``run``: one or
    several runs, comma-separated)."""
    out, seen = [], set()
    for r in _runs(read(results, "lm_cost.csv"), run, "lm_cost.csv"):
        parts = [num(r[k]) for k in ("forward+backward", "step()", "optimizer")]
        given = json.loads(r["options"]) if r["options"] else {}
        method = r["method"] + (f" ({_options_text(given)})" if given else "")
        if (r["task"], method, r["step"]) in seen:  # each run's baseline: the first shown
            continue
        seen.add((r["task"], method, r["step"]))
        out.append([TASK_LABELS.get(r["task"], r["task"]), method, r["step"],
                    *(f"{v:.1f}" for v in parts), f"{sum(parts):.1f}"])  # fmt: skip
    header = ["task", "method", "step", "forward + backward (hooks) ms", "precond.step() ms",
              "optimizer ms", "total ms"]  # fmt: skip
    return markdown(header, out)


def defaults(results: Path, run: str) -> str:
    """benchmarks/defaults.py: per task and optimizer (and seed, and preconditioner options,
    when the runs have several), the final metric at 0.3×, 1×, 3× the tuned learning rate,
    alone / with the preconditioner."""
    rows = _runs(read(results, "defaults.csv"), run, "defaults.csv")
    seeds = unique(r["seed"] for r in rows)
    configs = unique((r["kfac"], r["options"]) for r in rows if r["kfac"])
    out = []
    for task in unique(r["task"] for r in rows):
        for opt in unique(r["optimizer"] for r in rows if r["task"] == task):
            for seed in seeds:
                for label, options in configs:
                    mine = [r for r in rows if (r["task"], r["optimizer"], r["seed"]) == (
                        task, opt, seed) and r["kfac"] in ("", label)]  # fmt: skip
                    cells = []
                    for factor in unique(r["lr_factor"] for r in rows):
                        pair = {}
                        for r in mine:
                            if r["lr_factor"] == factor:
                                value = num(r["final"])
                                diverged = int(r["diverged"])
                                pair[bool(r["kfac"])] = "diverged" if diverged else f"{value:.3g}"
                        cells.append(f"{pair.get(False, DASH)} / {pair.get(True, DASH)}")
                    name = {"adamw": "AdamW", "sgd": "SGD (momentum 0.9)"}[opt]
                    first = [TASK_LABELS.get(task, task), name]
                    first += [seed] if len(seeds) > 1 else []
                    if len(configs) > 1:
                        first.append(_options_text(json.loads(options)) or "{}")
                    out.append([*first, *cells])
    factors = [f"{short(num(f))}× lr" for f in unique(r["lr_factor"] for r in rows)]
    head = ["task", "optimizer"] + (["seed"] if len(seeds) > 1 else [])
    head += ["options"] if len(configs) > 1 else []
    return markdown([*head, *factors], out)


def fsdp(results: Path, run: str) -> str:
    """benchmarks/fsdp.py: per world size and mode, bytes through each rank's link per step
    (FSDP's own collectives, K-FAC's by kind), per-rank state and staging, step time."""
    rows = run_of(read(results, "fsdp.csv"), run, "fsdp.csv")

    def mib(r: Row, key: str) -> str:
        return f"{num(r[key]) / 2**20:.2f}" if r.get(key) not in (None, "") else DASH

    out = []
    for r in rows:
        alone = r["mode"].startswith("AdamW")  # the optimizer alone: no K-FAC columns
        sharded = r["world"] != "1"
        fsdp_bytes = num(r["fsdp_link_bytes_per_step"])
        kfac = num(r["kfac_link_bytes_per_step"])
        kinds = ["statistics", "statistics_to_owner", "gather", "return", "decompositions"]
        out.append(
            [
                r["world"],
                r["mode"] if sharded else r["mode"].replace(" (FSDP)", ""),
                fixed(num(r["median_step_ms"]), 0),
                mib(r, "fsdp_link_bytes_per_step") if sharded else DASH,
                *[
                    mib(r, f"kfac_{k}_bytes_per_step") if sharded and not alone else DASH
                    for k in kinds
                ],
                f"{kfac / fsdp_bytes:.2f}" if sharded and not alone else DASH,
                mib(r, "state_bytes_max_rank") if not alone else DASH,
                mib(r, "staged_bytes_max_rank") if sharded and not alone else DASH,
            ]
        )
    header = [
        "ranks", "mode", "median ms", "FSDP MiB/step", "statistics", "to owners", "gather",
        "return", "decompositions", "K-FAC / FSDP", "state MiB (max rank)", "staged MiB",
    ]  # fmt: skip
    return markdown(header, out)


TABLES: dict[str, Callable[..., str]] = {
    "fsdp": fsdp,
    "demo": demo,
    "lm": lm,
    "lm-levers": lm_levers,
    "lm-runs": lm_runs,
    "lm-cost": lm_cost,
    "lm-basis": lm_basis,
    "lm-spectral": lm_spectral,
    "defaults": defaults,
    "step-overhead-2threads": step_overhead_readme,
    "transformer": transformer,
    "summary": summary,
    "time-to-target": time_to_target,
    "time-to-target-revisions": ttt_revisions,
    "time-to-target-per-seed": ttt_per_seed,
    "time-to-target-seeds": ttt_seeds,
    "autoencoder-cost": autoencoder_cost,
    "autoencoder-cost-revisions": autoencoder_cost_revisions,
    "autoencoder-radius": autoencoder_radius,
    "autoencoder-levers": autoencoder_levers,
    "autoencoder-damping": autoencoder_damping,
    "peer": peer,
    "step-cost": step_cost,
    "peer-cost": peer_cost,
    "memory": memory,
}


# ------------------------------------------------------------------------------ files
def render(text: str, results: Path, where: str = "") -> str:
    """``text`` with every marked block regenerated from the CSVs in ``results``."""
    begins = re.findall(r"<!-- tables:([\w-]+):begin", text)
    blocks = list(MARKER.finditer(text))
    if len(begins) != len(blocks):
        raise SystemExit(f"tables.py: {where}: a 'tables:NAME:begin' marker has no matching end")

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"tables.py: {where}: unknown table {name!r} (known: {list(TABLES)})")
        kwargs = dict(arg.split("=", 1) for arg in match["args"].split())
        body = TABLES[name](results, **kwargs)
        # The blank line ends the table for every Markdown flavour (in GitHub's, a line after a
        # table that does not start a block of its own would be one more row).
        return f"<!-- tables:{name}:begin{match['args']}-->\n{body}\n<!-- tables:{name}:end -->"

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a table is stale"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSVs")
    parser.add_argument("files", nargs="*", type=Path, default=FILES, help="markdown files")
    args = parser.parse_args(argv)
    stale = []
    for path in args.files:
        old = path.read_text(encoding="utf-8")
        new = render(old, args.results, str(path))
        if new == old:
            continue
        stale.append(path)
        if args.check:
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(keepends=True),
                    new.splitlines(keepends=True),
                    f"{path} (committed)",
                    f"{path} (from {args.results})",
                )
            )
        else:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote the tables of {path}")
    if args.check and stale:
        print(f"stale tables in: {', '.join(map(str, stale))} (run python benchmarks/tables.py)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
