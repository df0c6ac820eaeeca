"""Triton kernels against torch eager and torch.compile, side by side in one run.

Three kernels (docs/kernels.md), and the whole ``step()``:

- ``factor_stats``: F ← β F + α X̃ᵀX̃ with the ones column (a layer with a bias), X of shape
  (rows, d) in float32 or bfloat16, F float32. Variants: ``triton``; ``eager`` (the torch
  reference: upcast copy, full-square baddbmm, border); ``compiled`` (torch.compile of the
  reference); ``addmm`` (torch.addmm on the full (d+1)² matrix from a float32 X̃ prepared
  outside the timing: the GEMM alone, the baseline of the 1.6x target); ``gemm_aligned``
  (torch.mm of X's d columns in X's dtype: a d² product with aligned leading dimensions,
  the cuBLAS ceiling beside the unaligned (d+1)² products; d = 2048 shows the Triton
  triangle's wave quantization, 136 tiles of 128 on 132 SMs).
- ``precondition_eigen``: 8 same-shaped blocks (d × (d+1)), float32. Variants: ``triton``
  (default precision tf32x3), ``triton_ieee``, ``eager`` (four bmm and the division),
  ``compiled``.
- ``precondition_factored`` (the "pi" chain): ``eager`` (two bmm, the dispatch's choice for
  blocks over 64) and ``compiled``; for small blocks (64 blocks of 32 × 33) also ``triton``.
- ``step`` (``--only step``): a steady-state ``KFACPreconditioner.step()`` with its
  statistics hooks (an MLP, decompositions amortized away) for backend "torch" and "auto",
  beside the optimizer step alone, timed on CUDA under
  ``torch.cuda.set_sync_debug_mode("error")``: a host-device synchronization fails the row.
  The first-use checks of "auto" run in the warm-up steps; their verdicts are printed.

CSV columns ``m``, ``n``: rows and columns of X for factor_stats (F is (n+1)²), the block
shape m × n for preconditioning. Each shape also times a plain GEMM of the kernel's operand
dtype and size (``gemm`` rows: torch.mm / torch.bmm) so that ``frac_gemm`` (executed FLOP/s
over the GEMM's FLOP/s) is measured in the same run. ``tflops`` counts the FLOPs each
variant executes: the triangle rows·d'(d'+1) for the Triton factor statistics, 2·rows·d'²
for the full products. ``programs``: the Triton factor-statistics launch's programs
(tiles × row splits) beside ``sms``, the device's multiprocessors.

Timings: ``triton.testing.do_bench`` median on CUDA; on the CPU (``--smoke``: tiny shapes
through Triton's interpreter, to keep this script runnable in CI) a median of wall times,
which says nothing about speed. Results are appended to a CSV with the machine's details.

    python benchmarks/kernels.py                        # CUDA: full set
    python benchmarks/kernels.py --only stats --no-compile
    python benchmarks/kernels.py --smoke --out /tmp/k.csv
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, machine, seed_options  # noqa: E402

FULL = {
    "stats_d": [1024, 2048, 4096],
    "stats_rows": [16384],
    "stats_dtypes": [torch.float32, torch.bfloat16],
    "precond_d": [1024, 4096],
    "precond_blocks": 8,
    "small": (64, 32, 33),  # (blocks, m, n) for the one-program-per-block kernels
    "step": {"width": 2048, "layers": 4, "batch": 1024, "steps": 20},
}
SMOKE = {
    "stats_d": [20, 40],
    "stats_rows": [70],
    "stats_dtypes": [torch.float32, torch.bfloat16],
    "precond_d": [20, 70],
    "precond_blocks": 2,
    "small": (3, 7, 9),
    "step": {"width": 24, "layers": 2, "batch": 16, "steps": 2},
}


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median time of ``fn`` in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def wall(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


class Bench:
    """Collects rows; every shape's rows go to the CSV as soon as they are measured."""

    def __init__(self, out: Path, device: torch.device, compile_: bool) -> None:
        self.out = out
        self.device = device
        self.compile = compile_ and device.type == "cuda"
        self.time = _timer(device)
        self.meta = machine()
        self._compiled: dict[str, Callable] = {}

    def compiled(self, name: str, fn: Callable) -> Callable | None:
        """torch.compile'd ``fn`` (dynamic shapes: one compilation per kernel and dtype)."""
        if not self.compile:
            return None
        if name not in self._compiled:
            self._compiled[name] = torch.compile(fn, dynamic=True)
        return self._compiled[name]

    def report(self, kernel: str, shape: dict[str, object], variants: dict[str, float],
               flops: dict[str, float], gemm_ms: float, gemm_flops: float) -> None:  # fmt: skip
        gemm_rate = gemm_flops / (gemm_ms * 1e-3) / 1e12
        base = variants.get("addmm", variants.get("eager"))
        rows = [
            {
                "kernel": kernel,
                **shape,
                "variant": "gemm",
                "ms": round(gemm_ms, 4),
                "tflops": round(gemm_rate, 2),
                "frac_gemm": 1.0,
                "speedup_vs_baseline": "",
                **self.meta,
            }
        ]
        for name, ms in variants.items():
            rate = flops[name] / (ms * 1e-3) / 1e12
            rows.append(
                {
                    "kernel": kernel,
                    **shape,
                    "variant": name,
                    "ms": round(ms, 4),
                    "tflops": round(rate, 2),
                    "frac_gemm": round(rate / gemm_rate, 3),
                    "speedup_vs_baseline": round(base / ms, 3) if base else "",
                    **self.meta,
                }
            )
        append_csv(self.out, rows)
        label = " ".join(f"{k}={v}" for k, v in shape.items())
        for r in rows:
            print(
                f"{kernel:22s} {label:50s} {r['variant']:12s} {r['ms']:>10} ms "
                f"{r['tflops']:>8} TFLOP/s  frac_gemm {r['frac_gemm']:<6} "
                f"speedup {r['speedup_vs_baseline']}",
                flush=True,
            )


def _stats_shape(b: Bench, dtype: torch.dtype, rows: int, d: int) -> None:
    from kfac_ef.kernels import factor_stats, factor_stats_reference

    dev = b.device
    x = torch.randn(1, rows, d, device=dev).to(dtype)
    dim = d + 1
    out = torch.zeros(1, dim, dim, device=dev)
    xt = torch.cat([x.float(), torch.ones(1, rows, 1, device=dev)], dim=2)[0]
    full = 2.0 * rows * dim * dim
    kw = dict(alpha=0.05, beta=0.95, append_ones=True)
    xa = x[0]  # X's d columns in its own dtype: the aligned d² product
    variants = {
        "triton": b.time(lambda: factor_stats(x, out, backend="triton", **kw)),
        "eager": b.time(lambda: factor_stats_reference(x, out, **kw)),
        "addmm": b.time(lambda: out[0].addmm_(xt.T, xt, beta=0.95, alpha=0.05)),
        "gemm_aligned": b.time(lambda: torch.mm(xa.T, xa)),
    }
    comp = b.compiled(f"stats-{dtype}", factor_stats_reference)
    if comp is not None:
        variants["compiled"] = b.time(lambda: comp(x, out, **kw))
    flops = {k: full for k in variants}
    flops["triton"] = float(rows) * dim * (dim + 1)  # the triangle
    flops["gemm_aligned"] = 2.0 * rows * d * d
    # The GEMM rate of the kernel's operand dtype: X̃ᵀX̃ as a plain matrix product.
    xg = xt.to(dtype)
    gemm_ms = b.time(lambda: torch.mm(xg.T, xg))
    shape = {"dtype": str(dtype).removeprefix("torch."), "blocks": 1, "m": rows, "n": d,
             "path": "triangle", **_stats_programs(x)}  # fmt: skip
    b.report("factor_stats", shape, variants, flops, gemm_ms, full)


def _stats_programs(x: torch.Tensor) -> dict[str, object]:
    """Programs of the Triton factor-statistics launch and the device's multiprocessors."""
    if x.device.type != "cuda":
        return {"programs": "", "sms": ""}
    stats = importlib.import_module("kfac_ef.kernels.factor_stats")
    blk, _, _, _, splits, _ = stats._plan(x)
    n_tiles = -(-x.shape[2] // blk)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return {"programs": n_tiles * (n_tiles + 1) // 2 * splits * x.shape[0], "sms": sms}


def bench_factor_stats(b: Bench, cfg: dict) -> None:
    for dtype in cfg["stats_dtypes"]:
        for d in cfg["stats_d"]:
            for rows in cfg["stats_rows"]:
                _stats_shape(b, dtype, rows, d)
                if b.device.type == "cuda":
                    torch.cuda.empty_cache()


def _precondition_shape(b: Bench, nb: int, m: int, n: int, path: str) -> None:
    from kfac_ef.kernels import (
        precondition_eigen,
        precondition_eigen_reference,
        precondition_factored,
        precondition_factored_reference,
    )

    dev = b.device
    # Timing does not depend on the values: scaled Gaussian stand-ins for the eigenbases
    # (a QR of 8 × 4096² would take longer than the whole benchmark).
    qg = torch.randn(nb, m, m, device=dev) / m**0.5
    qa = torch.randn(nb, n, n, device=dev) / n**0.5
    lg = torch.rand(nb, m, device=dev)
    la = torch.rand(nb, n, device=dev)
    grad = torch.randn(nb, m, n, device=dev)
    chain = 2.0 * nb * (m * m * n + m * n * n)  # two products
    gemm_ms = b.time(lambda: torch.bmm(qg, grad))
    gemm_flops = 2.0 * nb * m * m * n
    shape = {"dtype": "float32", "blocks": nb, "m": m, "n": n, "path": path}

    args = (grad, qg, lg, qa, la, 1e-3)
    variants = {
        "triton": b.time(lambda: precondition_eigen(*args, backend="triton")),
        "triton_ieee": b.time(
            lambda: precondition_eigen(*args, backend="triton", input_precision="ieee")
        ),
        "eager": b.time(lambda: precondition_eigen_reference(*args)),
    }
    comp = b.compiled("eigen", precondition_eigen_reference)
    if comp is not None:
        variants["compiled"] = b.time(lambda: comp(*args))
    flops = {k: 2 * chain for k in variants}
    b.report("precondition_eigen", shape, variants, flops, gemm_ms, gemm_flops)

    ig, ia = qg, qa  # stand-ins for the damped inverses, as above
    variants = {"eager": b.time(lambda: precondition_factored_reference(grad, ig, ia))}
    if path == "fused":
        variants["triton"] = b.time(lambda: precondition_factored(grad, ig, ia, backend="triton"))
    comp = b.compiled("factored", precondition_factored_reference)
    if comp is not None:
        variants["compiled"] = b.time(lambda: comp(grad, ig, ia))
    flops = {k: chain for k in variants}
    b.report("precondition_factored", shape, variants, flops, gemm_ms, gemm_flops)


def bench_precondition(b: Bench, cfg: dict) -> None:
    nb = cfg["precond_blocks"]
    shapes = [(nb, d, d + 1, "tiled") for d in cfg["precond_d"]] + [(*cfg["small"], "fused")]
    for shape in shapes:
        _precondition_shape(b, *shape)
        if b.device.type == "cuda":
            torch.cuda.empty_cache()


def bench_step(b: Bench, cfg: dict) -> bool:
    """Steady-state step() per backend, under sync debug mode "error" on CUDA; returns
    False when a step synchronized (or failed)."""
    from torch import nn

    from kfac_ef import KFACPreconditioner
    from kfac_ef.kernels import disabled_kernels, verified_kernels

    c, dev = cfg["step"], b.device
    sizes = [c["width"]] * (c["layers"] + 1) + [10]
    torch.manual_seed(0)
    x = torch.randn(c["batch"], c["width"], device=dev)
    y = torch.randint(0, 10, (c["batch"],), device=dev)
    ok = True
    for backend in ("none", "torch", "auto"):
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(fan_in, fan_out)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
        model = nn.Sequential(*layers).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        pre = None
        if backend != "none":
            # Decompositions on step 0 only: the timed steps are statistics + preconditioning.
            pre = KFACPreconditioner(
                model, **seed_options(inv_update_steps=10_000, backend=backend)
            )

        def one_step(model=model, opt=opt, pre=pre) -> None:
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            if pre is not None:
                pre.step()
            opt.step()

        for _ in range(3):  # step 0 decomposes; compilation and first-use checks
            one_step()
        row = {"kernel": "step", "dtype": "float32", "blocks": c["layers"] + 1,
               "m": c["batch"], "n": c["width"], "path": "steady", "variant": backend}  # fmt: skip
        try:
            row["ms"] = round(_time_steps(one_step, c["steps"], dev), 4)
        except RuntimeError as exc:  # e.g. "called a synchronizing CUDA operation"
            ok = False
            row["ms"] = ""
            row["error"] = str(exc).splitlines()[0][:200]
        append_csv(b.out, [{**row, **b.meta}])
        print(f"step {backend:6s} {row['ms']} ms {row.get('error', '')}", flush=True)
        if pre is not None:
            pre.remove()
    verified, disabled = verified_kernels(), disabled_kernels()
    print(f"first-use checks passed: {len(verified)}", *verified, sep="\n  ", flush=True)
    if disabled:
        ok = False
        print("DISABLED kernel variants:", *disabled.items(), sep="\n  ", flush=True)
    return ok


def _time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Mean milliseconds per step over ``n`` steps; on CUDA under sync debug mode "error"
    (events are recorded, not waited for, inside the timed region)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t0) * 1e3 / n
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        start.record()
        for _ in range(n):
            step()
        end.record()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes; without CUDA through Triton's interpreter",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "kernels.csv", help="CSV to append to"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    parser.add_argument(
        "--only", choices=["stats", "precond", "step"], help="run one group (default: all)"
    )
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    if not cuda:
        if not args.smoke:
            parser.error("without CUDA only --smoke runs (Triton's interpreter on tiny shapes)")
        # Before triton is first imported (kfac_ef imports it lazily).
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 baselines at float32 precision
    cfg = SMOKE if args.smoke else FULL
    bench = Bench(args.out, device, compile_=not args.no_compile)
    print(f"device: {bench.meta['device']}  torch {torch.__version__}  -> {args.out}", flush=True)
    torch.manual_seed(0)
    ok = True
    with torch.no_grad():
        if args.only in (None, "stats"):
            bench_factor_stats(bench, cfg)
        if args.only in (None, "precond"):
            bench_precondition(bench, cfg)
    if args.only in (None, "step"):
        ok = bench_step(bench, cfg)
    if not ok:
        raise SystemExit(f"step(): a timed step synchronized or failed, or a kernel variant "
                         f"was disabled (see above; rows in {args.out})")  # fmt: skip
    return args.out


if __name__ == "__main__":
    main()
