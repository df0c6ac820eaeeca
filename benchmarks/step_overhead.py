"""Step cost of SGD alone vs SGD + KFACPreconditioner, against the FLOP floor of the extra work.

Side by side in one run, on the same machine: an MLP 784-1024-1024-10 at batch 256 and a small
CNN at batch 128 (synthetic data: only time matters here), factor_update_steps=1 and
inv_update_steps=10. Step times are medians over windows of `inv_update_steps` consecutive
steps (each window holds exactly one decomposition step, so decompositions are amortized as
they are in training).

Floor of the extra work, from the layer shapes, divided by the matmul rate measured here:
  - factor statistics: rows · d(d+1) per factor (one multiply-add per entry of one triangle);
  - preconditioning: 4 products per layer for "exact" (4 · 2·g·a·(g+a)/2 = 4ga(g+a) FLOPs),
    2 for "pi" (2ga(g+a));
  - decompositions, amortized over inv_update_steps: "exact" needs eigenbases, 9d³ per factor
    (Golub & Van Loan's count for the symmetric eigenproblem with eigenvectors); "pi" needs
    damped inverses, d³ per factor (Cholesky d³/3, inverse from the factor 2d³/3).

Prints a table and appends it to benchmarks/results/step_overhead.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, machine  # noqa: E402

from kfac_ef import KFACPreconditioner  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


MODELS = {
    "mlp-784-1024-1024-10": (mlp, (784,), 256),
    "cnn-32x32": (cnn, (3, 32, 32), 128),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, n: int = 1024, reps: int = 20) -> float:
    """FLOP/s of a float32 n×n×n matmul (median of `reps`)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def layer_rows(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Rows of the factor products per layer (examples × positions), from one forward."""
    rows: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(
                m.register_forward_hook(
                    lambda mod, a, o, name=name: rows.__setitem__(
                        name, a[0].numel() // mod.in_features
                    )
                )
            )
        elif isinstance(m, nn.Conv2d):
            handles.append(
                m.register_forward_hook(
                    lambda mod, a, o, name=name: rows.__setitem__(
                        name, o.numel() // mod.out_channels
                    )
                )
            )
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return rows


def floor_flops(
    precond: KFACPreconditioner, rows: dict[str, int], mode: str, inv_steps: int
) -> float:
    total = 0.0
    for r in precond.summary().layers:
        a, g, b = r.a_shape[0], r.g_shape[0], r.blocks
        n = rows[r.name]
        total += b * n * (a * (a + 1) + g * (g + 1))
        total += b * (4 if mode == "exact" else 2) * g * a * (g + a)
        decomposition = (9 if mode == "exact" else 1) * (a**3 + g**3)
        total += b * decomposition / inv_steps
    return total


def time_steps(
    model: nn.Module,
    precond: KFACPreconditioner | None,
    x,
    y,
    steps: int,
    window: int,
    device: torch.device,
) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    windows = []
    for i in range(steps + window):  # the first window warms up
        if i % window == 0:
            sync(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        if precond is not None:
            precond.step()
        opt.step()
        if i % window == window - 1:
            sync(device)
            if i >= window:
                windows.append((time.perf_counter() - t0) / window)
    return statistics.median(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=5, help="timed windows of 10 steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    device = torch.device(args.device)
    inv_steps = 10
    rate = matmul_rate(device)
    print(
        f"device {device}, {torch.get_num_threads()} threads, matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s (float32 1024^3)"
    )
    meta = machine()
    rows_out = []
    header = (
        f"{'model':<22}{'mode':<7}{'SGD ms':>9}{'+KFAC ms':>10}{'extra ms':>10}"
        f"{'floor ms':>10}{'extra/floor':>12}"
    )
    lines = [header, "-" * len(header)]
    for name in args.models:
        build, in_shape, batch = MODELS[name]
        torch.manual_seed(0)
        x = torch.randn(batch, *in_shape, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        base_model = build().to(device)
        t_sgd = time_steps(base_model, None, x, y, args.windows * inv_steps, inv_steps, device)
        for mode in ("exact", "pi"):
            torch.manual_seed(0)
            model = build().to(device)
            pre = KFACPreconditioner(
                model,
                damping=1e-2,
                damping_mode=mode,
                factor_update_steps=1,
                inv_update_steps=inv_steps,
            )
            t_kfac = time_steps(model, pre, x, y, args.windows * inv_steps, inv_steps, device)
            floor = floor_flops(pre, layer_rows(model, x), mode, inv_steps) / rate
            extra = t_kfac - t_sgd
            lines.append(
                f"{name:<22}{mode:<7}{t_sgd * 1e3:>9.2f}{t_kfac * 1e3:>10.2f}"
                f"{extra * 1e3:>10.2f}{floor * 1e3:>10.2f}{extra / floor:>12.2f}"
            )
            print(lines[-1], flush=True)
            rows_out.append(
                {
                    "model": name,
                    "mode": mode,
                    "batch": batch,
                    "sgd_ms": t_sgd * 1e3,
                    "kfac_ms": t_kfac * 1e3,
                    "extra_ms": extra * 1e3,
                    "floor_ms": floor * 1e3,
                    "extra_over_floor": extra / floor,
                    "matmul_gflops": rate / 1e9,
                    "backend": "auto",
                    "device_kind": device.type,
                    **meta,
                }
            )
            pre.remove()
    print("\n" + "\n".join(lines))
    append_csv(RESULTS / "step_overhead.csv", rows_out)
    print(f"\nappended to {RESULTS / 'step_overhead.csv'}")


if __name__ == "__main__":
    main()
