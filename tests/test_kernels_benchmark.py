"""benchmarks/kernels.py runs end to end (tiny shapes through Triton's interpreter), and
benchmarks/gpu_check.sh parses and dry-runs without a GPU."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "kernels.py"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def test_kernel_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("kernels_benchmark", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--smoke", "--out", str(tmp_path / "k.csv")])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    seen = {(r["kernel"], r["variant"]) for r in rows}
    for kernel, variant in [
        ("factor_stats", "triton"),
        ("factor_stats", "addmm"),
        ("precondition_eigen", "triton"),
        ("precondition_eigen", "eager"),
        ("precondition_factored", "triton"),
        ("precondition_factored", "gemm"),
        ("factor_stats", "gemm_aligned"),
        ("step", "torch"),
        ("step", "auto"),
    ]:
        assert (kernel, variant) in seen
    assert all(float(r["ms"]) > 0 and r["device"] for r in rows)


def test_gpu_check_script_parses_and_dry_runs(tmp_path):
    """The one-shot GPU script: bash syntax, then its --dry-run on the CPU (the kernels
    import, the GPU tests collect, the benchmark parses its arguments and runs its step()
    phase on tiny shapes), writing dated files under $OUT/benchmarks/results/."""
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KFAC_EF_BACKEND")}
    env.update(PYTHON=sys.executable, OUT=str(tmp_path))
    res = subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    files = sorted(p.name for p in (tmp_path / "benchmarks" / "results").iterdir())
    for suffix in ("env.txt", "summary.txt", "step.log", "kernels.csv", "tests_factor_stats.log"):
        assert any(f.startswith("gpu_check_20") and f.endswith(suffix) for f in files), files
    assert "tests collected" in res.stdout and "step: exit 0" in res.stdout
