"""Compile the Triton kernels for an H100 (sm_90) without a GPU and report what was built.

Run as a script in a process *without* TRITON_INTERPRET (tests/test_kernels_compile.py does):
the CPU test suite runs the kernels through Triton's interpreter, which never compiles them,
so this is CI's check that the GPU code builds. It uses Triton's own compiler and the ptxas
shipped in the triton wheel. Arguments are specialized the way Triton specializes them at
launch for contiguous float32/bfloat16 tensors (integers equal to 1 become constants,
pointers and multiples of 16 get a divisibility hint), so the pipelining seen here is the
one a launch gets.

Prints one JSON line per kernel configuration: name, constants, shared memory bytes and
counts of Hopper tensor-core dots (``warp_group_dot``), other dots and pipelined async copies.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _types(x_dtype: str):
    def of(name: str) -> str:
        if name == "x_ptr":
            return f"*{x_dtype}"
        if name.endswith("_ptr"):
            return "*fp32"
        if name in ("alpha", "beta", "damping"):
            return "fp32"
        return "i32"

    return of


def _loop_spills(cubin: bytes) -> int | None:
    """Local-memory loads/stores (register spills) inside loops that run tensor-core MMAs.

    Reads the SASS with the cuobjdump shipped in the triton wheel (None without it): a loop
    is a backward branch; spills there would slow every K-step, spills elsewhere only once.
    """
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [str(tool), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    line_of = {}
    for i, line in enumerate(sass):
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        if m:
            line_of[int(m.group(1), 16)] = i
    mma = [i for i, line in enumerate(sass) if "HGMMA" in line or "HMMA" in line]
    spills = [i for i, line in enumerate(sass) if re.search(r"\b(LDL|STL)\b", line)]
    total = 0
    for i, line in enumerate(sass):
        m = re.match(r"\s*/\*([0-9a-f]+)\*/.*\bBRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            start = line_of.get(int(m.group(2), 16), i)
            if any(start <= k <= i for k in mma):
                total += sum(start <= k <= i for k in spills)
    return total


def compile_one(fn, x_dtype: str, consts: dict, values: dict, num_warps: int, num_stages: int):
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    constants = dict(consts)
    types = _types(x_dtype)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif values.get(name) == 1:
            sig[name] = "constexpr"
            constants[name] = 1
        else:
            sig[name] = types(name)
            if sig[name].startswith("*") or values.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn, sig, constants, attrs),
        target=TARGET,
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ttgir = kernel.asm["ttgir"]
    return {
        "loop_spills": _loop_spills(kernel.asm["cubin"]),
        "kernel": fn.__name__,
        "x_dtype": x_dtype,
        "consts": {k: v for k, v in consts.items()},
        "num_warps": num_warps,
        "shared": kernel.metadata.shared,
        "wgmma": len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
        "dot": len(re.findall(r"tt\.dot ", ttgir)),
        "async_copies": len(re.findall(r"ttg\.async_copy_global_to_local", ttgir)),
    }


def main() -> None:
    stats = importlib.import_module("kfac_ef.kernels.factor_stats")
    eigen = importlib.import_module("kfac_ef.kernels.eigen_precondition")
    factored = importlib.import_module("kfac_ef.kernels.factored_precondition")
    ks, ke, kf = stats._build(), eigen._build(), factored._build()

    rows, d = 32768, 4096
    stats_values = {
        "rows": rows, "d": d, "rows_per_split": rows,
        "stride_xb": rows * d, "stride_xr": d, "stride_xd": 1,
        "stride_ob": (d + 1) ** 2, "stride_or": d + 1, "stride_oc": 1,
    }  # fmt: skip
    for x_dtype, precision, block_k in (("bf16", "tf32", 64), ("fp32", "tf32x3", 32)):
        variants = ((True, False, False), (False, True, False), (True, True, True))
        for ones, beta_zero, partial in variants:
            consts = dict(
                APPEND_ONES=ones, BETA_ZERO=beta_zero, PARTIAL=partial, BLOCK=128,
                BLOCK_K=block_k, DOT_FP32=False, INPUT_PRECISION=precision,
            )  # fmt: skip
            print(json.dumps(compile_one(ks.main, x_dtype, consts, stats_values, 8, 3)))
    consts = dict(APPEND_ONES=True, BETA_ZERO=False, BLOCK=128)
    print(json.dumps(compile_one(ks.reduce, "fp32", consts, stats_values, 8, 3)))

    m, n = 1024, 1025
    gemm_values = {
        "M": m, "N": n, "K": m,
        "stride_ab": m * m, "stride_am": 1, "stride_ak": m,  # Q_Gᵀ: a transposed view
        "stride_bb": m * n, "stride_bk": n, "stride_bn": 1,
        "stride_cb": m * n, "stride_cm": n, "stride_cn": 1,
        "stride_lgb": m, "stride_lgi": 1, "stride_lab": n, "stride_lai": 1,
        "stride_sb": m * n, "stride_sm": n, "stride_sn": 1,
    }  # fmt: skip
    for epilogue in (0, 1, 2):
        consts = dict(EPILOGUE=epilogue, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8,
                      INPUT_PRECISION="tf32x3")  # fmt: skip
        print(json.dumps(compile_one(ke.gemm, "fp32", consts, gemm_values, 8, 3)))
    consts = dict(
        EPILOGUE=1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, INPUT_PRECISION="tf32x3"
    )
    print(json.dumps(compile_one(ke.gemm, "fp32", consts, gemm_values, 4, 3)))

    bm, bn, m, n = 64, 64, 60, 61
    fused_values = {
        "m": m, "n": n,
        "stride_gb": m * n, "stride_gm": n, "stride_gn": 1,
        "stride_qgb": m * m, "stride_qgr": m, "stride_qgc": 1, "stride_lgb": m, "stride_lgi": 1,
        "stride_qab": n * n, "stride_qar": n, "stride_qac": 1, "stride_lab": n, "stride_lai": 1,
        "stride_sb": m * n, "stride_sm": n, "stride_sn": 1,
        "stride_ob": m * n, "stride_om": n, "stride_on": 1, "stride_fb": 1,
        "stride_igb": m * m, "stride_igr": m, "stride_igc": 1,
        "stride_iab": n * n, "stride_iar": n, "stride_iac": 1,
    }  # fmt: skip
    for has_scale, has_form in ((False, False), (True, False), (False, True), (True, True)):
        consts = dict(
            HAS_SCALE=has_scale, HAS_FORM=has_form, BM=bm, BN=bn, INPUT_PRECISION="tf32x3"
        )
        print(json.dumps(compile_one(ke.fused, "fp32", consts, fused_values, 8, 1)))
    consts = dict(BM=bm, BN=bn, INPUT_PRECISION="tf32x3")
    print(json.dumps(compile_one(kf.fused, "fp32", consts, fused_values, 8, 1)))


if __name__ == "__main__":
    main()
