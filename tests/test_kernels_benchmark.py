"""benchmarks/kernels.py runs end to end (tiny shapes through Triton's interpreter), and
benchmarks/gpu_check.sh parses and dry-runs without a GPU."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "kernels.py"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _expected_rows(cfg: dict) -> list[tuple[str, str, str, str, str]]:
    """(kernel, variant, dtype, m, n) of every row --smoke writes without CUDA (no compiled
    variants there), from the script's own shape lists."""
    rows = []
    for dtype in cfg["stats_dtypes"]:
        name = str(dtype).removeprefix("torch.")
        for d in cfg["stats_d"]:
            for m in cfg["stats_rows"]:
                for variant in ("gemm", "triton", "eager", "addmm", "gemm_aligned"):
                    rows.append(("factor_stats", variant, name, str(m), str(d)))
    shapes = [(d, d + 1, "tiled") for d in cfg["precond_d"]] + [(*cfg["small"][1:], "fused")]
    for m, n, path in shapes:
        for variant in ("gemm", "triton", "triton_ieee", "eager"):
            rows.append(("precondition_eigen", variant, "float32", str(m), str(n)))
        for variant in ("gemm", "eager") + (("triton",) if path == "fused" else ()):
            rows.append(("precondition_factored", variant, "float32", str(m), str(n)))
    step = cfg["step"]
    for variant in ("none", "torch", "auto"):
        rows.append(("step", variant, "float32", str(step["batch"]), str(step["width"])))
    return rows


def test_kernel_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("kernels_benchmark", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--smoke", "--out", str(tmp_path / "k.csv")])
    printed = capsys.readouterr().out
    with open(out) as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    assert {"kernel", "variant", "dtype", "blocks", "m", "n", "path", "ms", "tflops",
            "frac_gemm", "speedup_vs_baseline", "device", "date"} <= columns  # fmt: skip
    # Exactly one row per (kernel, variant, shape) of the smoke configuration.
    got = sorted((r["kernel"], r["variant"], r["dtype"], r["m"], r["n"]) for r in rows)
    assert got == sorted(_expected_rows(module.SMOKE))
    for r in rows:
        assert r["device"] and r.get("error", "") == "", r
        assert math.isfinite(float(r["ms"])) and float(r["ms"]) > 0, r
        if r["kernel"] == "step":
            continue
        assert r["path"] in ("triangle", "tiled", "fused") and int(r["blocks"]) > 0, r
        assert math.isfinite(float(r["tflops"])) and float(r["tflops"]) >= 0, r
        if r["variant"] == "gemm":
            assert float(r["frac_gemm"]) == 1.0 and r["speedup_vs_baseline"] == "", r
            continue
        # Rounded to 3 decimals: the interpreted Triton kernels may show 0.0 on the CPU.
        assert math.isfinite(float(r["frac_gemm"])) and float(r["frac_gemm"]) >= 0, r
        speedup = float(r["speedup_vs_baseline"])
        baseline = "addmm" if r["kernel"] == "factor_stats" else "eager"
        assert speedup == 1.0 if r["variant"] == baseline else speedup >= 0, r
    # The printed table has the same rows (one line each, then the step lines).
    kernel_lines = [line for line in printed.splitlines() if line.split(" ", 1)[0] in
                    ("factor_stats", "precondition_eigen", "precondition_factored")]  # fmt: skip
    assert len(kernel_lines) == sum(r["kernel"] != "step" for r in rows)
    assert sum(line.startswith("step ") for line in printed.splitlines()) == 3


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
