"""The autoencoder and time-to-target benchmark scripts run end to end on tiny budgets.

Each runs in a subprocess, as `make bench` runs it (the scripts put benchmarks/ on sys.path
and fix torch's thread count), and writes into a temporary results folder. Smoke tests:
well-formed rows and finite numbers, no bound on how well anything trains. Marked slow (each
trains for seconds to a minute): `make test` runs them, `make test-fast` does not.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, out: Path) -> None:
    cmd = [sys.executable, str(BENCH / script), *args, "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_autoencoder_radius_sweep(tmp_path):
    _run(
        "autoencoder.py",
        *("--radius", "--steps", "30", "--seeds", "0", "1", "--radii", "0.5", "2"),
        out=tmp_path,
    )
    rows = _rows(tmp_path / "autoencoder_radius.csv")
    assert sorted((float(r["max_loss_change"]), int(r["seed"])) for r in rows) == [
        (0.5, 0),
        (0.5, 1),
        (2.0, 0),
        (2.0, 1),
    ]
    for r in rows:
        assert r["status"] == "ok" and int(r["steps"]) == 30
        assert f"max_loss_change={float(r['max_loss_change'])}" in r["config"]
        # A smoke test: well-formed rows and finite numbers. How well a configuration
        # trains is the benchmark's to measure, not a bound to hold on every CPU.
        assert math.isfinite(float(r["final"])) and float(r["final"]) > 0
        assert r["reference_steps"] == "" or int(r["reference_steps"]) > 0


def test_autoencoder_cost_runs_stay_finite(tmp_path):
    # Every configuration is timed on training steps, not on a run that diverged during
    # the 100 warm-up steps (whose statistics would be skipped).
    _run("autoencoder.py", "--cost", "--cost-steps", "5", "--rounds", "1", out=tmp_path)
    rows = _rows(tmp_path / "autoencoder_cost.csv")
    assert len(rows) == 6
    for r in rows:
        assert r["finite"] == "True", r["configuration"]
        assert float(r["ms_per_step"]) > 0


def test_time_to_target_autoencoder(tmp_path):
    # 1 s per method: long enough for K-FAC to reach AdamW's best on most machines (which
    # the ratio check below then covers), not a requirement.
    _run(
        "time_to_target.py",
        *("--tasks", "autoencoder", "--seeds", "1", "--budget-scale", "0.05"),
        *("--methods", "SGD + K-FAC"),
        out=tmp_path,
    )
    summary = _rows(tmp_path / "time_to_target.csv")
    rows = {r["method"]: r for r in summary}
    assert set(rows) == {"AdamW", "SGD + K-FAC"}
    kfac, adamw = rows["SGD + K-FAC"], rows["AdamW"]
    assert kfac["status"] == "ok"
    assert "max_loss_change=0.5" in kfac["config"]
    # The target is AdamW's best (of the same seed), which AdamW reaches within its run.
    assert float(kfac["target"]) == float(adamw["target"]) == float(adamw["best"])
    base = float(adamw["target_seconds"])
    assert 0 <= base <= float(adamw["seconds"])
    assert 0 <= int(adamw["target_steps"]) <= int(adamw["steps"])
    # time_over_baseline: a method's seconds to the target over AdamW's, as written in the
    # same rows; empty where the target was not reached within the tiny budget (or AdamW's
    # best was its initial metric, at 0 s).
    for r in rows.values():
        reached = r["target_seconds"] != ""
        assert reached == (float(r["best"]) <= float(r["target"])), r
        if reached and base > 0:
            expected = float(r["target_seconds"]) / base
            assert float(r["time_over_baseline"]) == pytest.approx(expected, rel=1e-12), r
        else:
            assert r["time_over_baseline"] == "", r
    for r in rows.values():
        assert int(r["steps"]) > 0 and math.isfinite(float(r["final"]))
    # plot.py pairs a run's curves with its targets by the date of the rows.
    curves = _rows(tmp_path / "time_to_target_curves.csv")
    assert {r["date"] for r in curves} == {r["date"] for r in summary}
    assert {r["method"] for r in curves} == set(rows)


def test_demo_runs_end_to_end(tmp_path):
    """`make demo`, the README's main job, on one epoch: every optimizer trains, the table
    is written, the numbers are finite."""
    cmd = [
        sys.executable,
        str(BENCH / "demo.py"),
        *("--epochs", "1", "--out", str(tmp_path / "demo.csv")),
        *("--plot", str(tmp_path / "demo.png")),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = _rows(tmp_path / "demo.csv")
    assert len(rows) == 3 and any(r["kfac"] for r in rows)
    for r in rows:
        assert int(r["epochs"]) == 1
        assert math.isfinite(float(r["train_loss"])) and 0 <= float(r["test_acc"]) <= 1
    assert (tmp_path / "demo.png").stat().st_size > 0


def _script(script: str, *args: str) -> str:
    cmd = [sys.executable, str(BENCH / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_lm_benchmark_runs_every_method(tmp_path):
    """benchmarks/lm.py end to end for a few steps: every method's row (--kfac given twice:
    both methods), the curves, the plot, and the table tables.py makes from them."""
    extra = ['SGD0={"lr": 0.001, "optimizer": "sgd", "optimizer_options": {"momentum": 0}}',
             'AdamW b0={"kfac": null, "optimizer_options": {"betas": [0, 0.95]}}',
             'Muon KU={"optimizer": "muon", "damping_mode": "pi",'
             ' "precondition_update": true}']  # fmt: skip
    _script("lm.py", "--tasks", "chargpt", "--seeds", "1", "--steps", "3", "--out",
            str(tmp_path), "--plot", "--kfac", extra[0], "--kfac", *extra[1:])  # fmt: skip
    rows = _rows(tmp_path / "lm.csv")
    names = {r["method"] for r in rows}
    assert {"AdamW", "Muon", "AdamW + K-FAC (defaults)", "SGD + K-FAC (eigen_adam recipe)",
            "SGD0", "AdamW b0", "Muon KU"} <= names  # fmt: skip
    assert all(int(r["steps"]) == 3 and math.isfinite(float(r["final"])) for r in rows)
    assert not any(r["error"] for r in rows), [r["error"] for r in rows]
    options = {r["method"]: r["options"] for r in rows}
    assert "momentum=0" in options["SGD0"] and "betas=(0.0, 0.95)" in options["AdamW b0"]
    assert (tmp_path / "lm_chargpt.png").exists()
    assert {r["method"] for r in _rows(tmp_path / "lm_curves.csv")} == names
    sys.path.insert(0, str(BENCH))
    try:
        import tables
    finally:
        sys.path.remove(str(BENCH))
    table = tables.lm(tmp_path, task="chargpt", run=rows[0]["date"])
    assert table.count("\n") == len(names) + 2  # a header, its rule and a row per method


def test_defaults_benchmark_compares_alone_and_with(tmp_path):
    _script("defaults.py", "--tasks", "classification", "--optimizers", "sgd", "--steps", "3",
            "--out", str(tmp_path))  # fmt: skip
    rows = _rows(tmp_path / "defaults.csv")
    assert len(rows) == 6  # three learning rates, alone and with the preconditioner
    assert sorted({r["kfac"] for r in rows}) == ["", "defaults"]
    assert all(math.isfinite(float(r["final"])) for r in rows)


@pytest.mark.distributed
def test_fsdp_demo_matches_one_process_under_torchrun():
    """benchmarks/fsdp_demo.py on 2 ranks (torchrun, gloo): it trains, and its own check
    (the gathered parameters against a one-process run, within float32 rounding) passes."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(BENCH / "fsdp_demo.py"), "--epochs", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    gap = [line for line in proc.stdout.splitlines() if "largest parameter difference" in line]
    assert len(gap) == 1 and float(gap[0].rsplit(" ", 1)[1]) < 1e-3, proc.stdout[-2000:]
