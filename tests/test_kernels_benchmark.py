"""benchmarks/kernels.py runs end to end (tiny shapes through Triton's interpreter)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


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
    ]:
        assert (kernel, variant) in seen
    assert all(float(r["ms"]) > 0 and r["device"] for r in rows)
