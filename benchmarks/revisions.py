"""Step cost of two revisions of kfac_ef, side by side: did a change make step() slower?

    python benchmarks/revisions.py OLD NEW [--models mlp cnn gpt] [--modes exact pi]

Each revision is checked out into a temporary git worktree; every measurement runs in a
fresh subprocess that imports kfac_ef from one worktree (the models, data and timing loop
of step_overhead.py, from this checkout, the same for both). The revisions alternate,
OLD NEW OLD NEW ..., ``--rounds`` times per configuration, so that changes of the machine's
load hit both alike. A measurement is the median over windows of 10 steps (SGD with
momentum + K-FAC, statistics every step, decompositions every 10) after a warm-up window.
Reported per configuration: each revision's median over rounds and NEW / OLD. Rows are
appended to benchmarks/results/revisions.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from common import RESULTS, append_csv, machine, table  # noqa: E402

_MEASURE = """
import json, sys, torch
sys.path.insert(0, {bench!r})
import step_overhead as so
from kfac_ef import KFACPreconditioner
torch.set_num_threads({threads})
torch.manual_seed(0)
bench, n = so.MODELS[{model!r}]
model = bench.build()
x, y = bench.batch(n, torch.device("cpu"))
pre = KFACPreconditioner(model, inv_update_steps=so.INV_STEPS, damping_mode={mode!r}, **bench.kfac)
wall, cpu = so.time_steps(model, "sgd", pre, bench, x, y, {windows}, torch.device("cpu"))
print(json.dumps({{"ms": 1e3 * wall, "cpu_ms": 1e3 * cpu}}))
"""


def _checkout(rev: str, where: Path) -> Path:
    path = where / rev.replace("/", "_")
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-f", str(path), rev],
        cwd=ROOT.parent,
        check=True,
        capture_output=True,
    )
    # The package maps kfac_ef.kernels to kernels/ (package-dir): the same on the path.
    (path / "kfac_ef" / "kernels").symlink_to(path / "kernels")
    return path


def _measure(tree: Path, model: str, mode: str, windows: int, threads: int) -> dict[str, Any]:
    code = _MEASURE.format(
        bench=str(ROOT), model=model, mode=mode, windows=windows, threads=threads
    )
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--models", nargs="*", default=["mlp", "gpt"])
    parser.add_argument("--modes", nargs="*", default=["exact"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "revisions.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # recorded by machine()

    resolved = {
        name: subprocess.run(
            ["git", "rev-parse", "--short", name],
            cwd=ROOT.parent,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for name in (args.old, args.new)
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: _checkout(rev, Path(tmp)) for rev in (args.old, args.new)}
        try:
            for model in args.models:
                for mode in args.modes:
                    times: dict[str, list[float]] = {args.old: [], args.new: []}
                    for _ in range(args.rounds):
                        for rev, tree in trees.items():
                            got = _measure(tree, model, mode, args.windows, args.threads)
                            times[rev].append(got["ms"])
                    old = statistics.median(times[args.old])
                    new = statistics.median(times[args.new])
                    rows.append(
                        {
                            **machine(),
                            "model": model,
                            "mode": mode,
                            "old": resolved[args.old],
                            "new": resolved[args.new],
                            "old_ms": round(old, 3),
                            "new_ms": round(new, 3),
                            "new_over_old": round(new / old, 4),
                            "old_rounds_ms": " ".join(f"{t:.2f}" for t in times[args.old]),
                            "new_rounds_ms": " ".join(f"{t:.2f}" for t in times[args.new]),
                        }
                    )
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)],
                    cwd=ROOT.parent,
                    capture_output=True,
                )
    cols = ["model", "mode", "old_ms", "new_ms", "new_over_old"]
    print("\n".join(table(cols, [[r[c] for c in cols] for r in rows])))
    append_csv(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
