"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreted tests check what the kernels compute; this checks that the GPU code builds,
fits in shared memory, runs its products on Hopper's tensor cores (warpgroup MMA, also for
float32 through tf32x3), pipelines its loads and spills no register inside its K loops, for
the configurations a launch on large contiguous inputs gets. It compiles in a subprocess
without TRITON_INTERPRET (tests/aot_compile.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "aot_compile.py"
H100_SHARED = 227 * 1024  # opt-in shared memory per block on sm_90


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900
    )
    assert res.returncode == 0, res.stderr[-4000:]
    built = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    names = {b["kernel"] for b in built}
    assert names == {
        "_factor_stats_kernel",
        "_factor_stats_reduce_kernel",
        "_eigen_gemm_kernel",
        "_eigen_fused_kernel",
        "_factored_fused_kernel",
    }
    for b in built:
        assert 0 < b["shared"] <= H100_SHARED, b
        if b["kernel"] == "_factor_stats_reduce_kernel":
            continue
        assert b["wgmma"] > 0 and b["dot"] == 0, f"not on warpgroup MMA: {b}"
        if b["kernel"] in ("_factor_stats_kernel", "_eigen_gemm_kernel"):
            assert b["async_copies"] > 0, f"loads not pipelined: {b}"
            assert b["loop_spills"] in (0, None), f"register spills in the K loop: {b}"
