"""Step cost: SGD and AdamW alone vs with KFACPreconditioner, against the FLOP floor of the extra
work, for an MLP, a CNN and a GPT-style transformer.

Side by side in one run, on the same machine, with synthetic data (only time matters here):

- ``mlp``: MLP 784-1024-1024-10 (ReLU), batch 256;
- ``cnn``: two 3x3 convs (32, 64 channels) with pooling, then 4096-256-10, 32x32 RGB, batch 64;
- ``gpt``: tests/models.GPT (common.gpt: GPT-2's initialization) with two pre-norm blocks of
  scaled-dot-product attention, dim 128, a 512-token vocabulary with a tied head, 16
  sequences of 64 tokens;
  ``other_params="diagonal"`` (its LayerNorms get their diagonal empirical Fisher).

The preconditioner collects statistics every step (factor_update_steps=1) and recomputes its
decompositions every 10 steps. A step time is the mean over a window of 10 consecutive steps
(holding exactly one decomposition step, amortized as in training); each configuration runs
``--windows`` windows after one warm-up window, and the configurations run in ``--rounds``
interleaved rounds so that changes of the machine's load hit all of them alike. Reported: the
fastest round's median window (the round least disturbed by other load), and the process CPU
time per step of that round.

Floor of the extra work, from the layer shapes, divided by the float32 matmul rate measured in
the same run (per step; a factor stored as nb blocks of bs, rows = examples x positions):

- statistics: rows · nb · bs(bs+1) per factor (one multiply-add per entry of one triangle;
  an embedding's one-hot A costs none);
- preconditioning: "exact" two products per side with an eigenbasis, 2 · 2·bs·g·a each
  (4ga(g+a) for a dense layer); "pi" one product per side;
- decompositions, amortized over inv_update_steps: "exact" 9·bs³ per block (Golub & Van
  Loan's count for the symmetric eigenproblem with eigenvectors), "pi" bs³ (Cholesky d³/3,
  inverse from the factor 2d³/3).

What the floor leaves out (elementwise passes, gathers, im2col patches of convs, the diagonal
parameters, Python overhead) shows up in extra / floor. Prints a table and appends it to
benchmarks/results/step_overhead.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import RESULTS, append_csv, gpt, load1, machine, seed_options, set_threads, table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kfac_ef import KFACPreconditioner  # noqa: E402

INV_STEPS = 10


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


def gpt_model() -> nn.Module:
    return gpt(vocab=512, dim=128, context=64)


@dataclass(frozen=True)
class Bench:
    """A model, a batch of synthetic data and its loss."""

    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.device], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    kfac: dict[str, Any]
    describe: str


def _images(shape: tuple[int, ...]) -> Callable[[int, torch.device], tuple[Tensor, Tensor]]:
    def make(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return torch.randn(n, *shape, device=device), torch.randint(0, 10, (n,), device=device)

    return make


def _tokens(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, 512, (n, 65), device=device)
    return ids[:, :-1], ids[:, 1:]


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


MODELS: dict[str, tuple[Bench, int]] = {
    "mlp": (Bench(mlp, _images((784,)), F.cross_entropy, {}, "MLP 784-1024-1024-10"), 256),
    "cnn": (Bench(cnn, _images((3, 32, 32)), F.cross_entropy, {}, "CNN 32x32, 2 convs"), 64),
    "gpt": (
        Bench(gpt_model, _tokens, _lm_loss, {"other_params": "diagonal"}, "GPT dim 128, vocab 512"),
        16,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, n: int = 1024, reps: int = 20) -> float:
    """FLOP/s of a float32 n×n×n matmul (the fastest of ``reps``: the least disturbed)."""
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
    return 2 * n**3 / min(times)


def layer_rows(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Rows of the factor products per module (examples × positions), from one forward."""
    rows: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def record(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            if isinstance(mod, nn.Linear):
                rows[name] = args[0].numel() // mod.in_features
            elif isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                rows[name] = out.numel() // mod.out_channels
            elif isinstance(mod, nn.Embedding):
                rows[name] = args[0].numel()

        return record

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Embedding):
            handles.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return rows


def _blocks(storage: str, dim: int) -> tuple[int, int]:
    """(nb, bs) of a factor from its summary description."""
    if storage == "dense":
        return 1, dim
    if storage == "diagonal":
        return dim, 1
    nb, _, bs = storage.split()[:3]  # "N blocks of B"
    return int(nb), int(bs)


def floor_flops(
    precond: KFACPreconditioner, rows: dict[str, int], mode: str, inv_steps: int
) -> float:
    """FLOPs per step of the preconditioner's matmul-shaped work (see the module doc)."""
    total = 0.0
    for r in precond.summary().layers:
        n = rows.get(r.name, 0)
        a, g, blocks = r.a_shape[0], r.g_shape[0], r.blocks
        for dim, storage, one_hot in (
            (a, r.a_factor, r.kind == "Embedding"),
            (g, r.g_factor, False),
        ):
            nb, bs = _blocks(storage, dim)
            if not one_hot:
                total += blocks * n * nb * bs * (bs + 1)
            if bs > 1:
                products = 2 if mode == "exact" else 1
                total += blocks * products * 2 * bs * g * a
                total += blocks * nb * (9 if mode == "exact" else 1) * bs**3 / inv_steps
    return total


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-4)


def time_steps(
    model: nn.Module,
    optimizer: str,
    precond: KFACPreconditioner | None,
    bench: Bench,
    x: Tensor,
    y: Tensor,
    windows: int,
    device: torch.device,
) -> tuple[float, float]:
    """(median wall seconds per step over the windows, CPU seconds per step)."""
    opt = make_optimizer(optimizer, model.parameters())
    times = []
    cpu0 = 0.0
    for w in range(windows + 1):  # the first window warms up
        sync(device)
        t0 = time.perf_counter()
        if w == 1:
            cpu0 = time.process_time()
        for _ in range(INV_STEPS):
            opt.zero_grad(set_to_none=False)
            bench.loss(model(x), y).backward()
            if precond is not None:
                precond.step()
            opt.step()
        sync(device)
        if w > 0:
            times.append((time.perf_counter() - t0) / INV_STEPS)
    cpu = (time.process_time() - cpu0) / (windows * INV_STEPS)
    return statistics.median(times), cpu


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=3, help="timed windows of 10 steps")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--optimizers", nargs="*", default=["sgd", "adamw"])
    parser.add_argument("--modes", nargs="*", default=["exact"], choices=["exact", "pi"])
    parser.add_argument("--batch-scale", type=float, default=1.0, help="scale every batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "step_overhead.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    threads = set_threads(args.threads)
    rate = matmul_rate(device)
    print(
        f"device {device}, {threads} threads, load {load1():.2f}, matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s (float32 1024^3)"
    )
    # Every configuration, built once; rounds interleave them.
    configs: list[dict[str, Any]] = []
    for name in args.models:
        bench, batch = MODELS[name]
        batch = max(1, int(batch * args.batch_scale))
        torch.manual_seed(0)
        x, y = bench.batch(batch, device)
        for optimizer in args.optimizers:
            for mode in [None, *args.modes]:
                torch.manual_seed(0)
                model = bench.build().to(device)
                pre = None
                if mode is not None:
                    pre = KFACPreconditioner(
                        model,
                        **seed_options(
                            damping=1e-2,
                            damping_mode=mode,
                            factor_update_steps=1,
                            inv_update_steps=INV_STEPS,
                            **bench.kfac,
                        ),
                    )
                configs.append(
                    {
                        "name": name,
                        "bench": bench,
                        "batch": batch,
                        "optimizer": optimizer,
                        "mode": mode,
                        "model": model,
                        "pre": pre,
                        "x": x,
                        "y": y,
                        "rounds": [],
                    }
                )
    with tqdm(
        total=args.rounds * len(configs), desc="step cost", unit="config", disable=None
    ) as bar:
        for _ in range(args.rounds):
            for c in configs:
                bar.set_postfix_str(f"{c['name']} {c['optimizer']} {c['mode'] or 'alone'}")
                c["rounds"].append(
                    time_steps(
                        c["model"],
                        c["optimizer"],
                        c["pre"],
                        c["bench"],
                        c["x"],
                        c["y"],
                        args.windows,
                        device,
                    )
                )
                bar.update()
    meta = machine()
    out_rows: list[dict[str, Any]] = []
    cells = []
    base: dict[tuple[str, str], tuple[float, float]] = {}
    for c in configs:
        wall, cpu = min(c["rounds"])
        spread = max(r[0] for r in c["rounds"]) / wall
        key = (c["name"], c["optimizer"])
        if c["mode"] is None:
            base[key] = (wall, cpu)
            continue
        b_wall, b_cpu = base[key]
        rows = layer_rows(c["model"], c["x"])
        floor = floor_flops(c["pre"], rows, c["mode"], INV_STEPS) / rate
        extra = wall - b_wall
        opt_name = "AdamW" if c["optimizer"] == "adamw" else "SGD"
        cells.append(
            [
                f"{c['bench'].describe}, batch {c['batch']}",
                opt_name,
                c["mode"],
                f"{b_wall * 1e3:.2f}",
                f"{wall * 1e3:.2f}",
                f"{extra * 1e3:.2f}",
                f"{floor * 1e3:.2f}",
                f"{extra / floor:.2f}",
                f"{wall / b_wall:.2f}",
                f"{spread:.2f}",
            ]
        )
        out_rows.append(
            {
                "model": c["name"],
                "describe": c["bench"].describe,
                "optimizer": c["optimizer"],
                "mode": c["mode"],
                "batch": c["batch"],
                "base_ms": b_wall * 1e3,
                "kfac_ms": wall * 1e3,
                "extra_ms": extra * 1e3,
                "floor_ms": floor * 1e3,
                "extra_over_floor": extra / floor,
                "slowdown": wall / b_wall,
                "base_cpu_ms": b_cpu * 1e3,
                "kfac_cpu_ms": cpu * 1e3,
                "rounds": args.rounds,
                "round_spread": spread,
                "matmul_gflops": rate / 1e9,
                "backend": "auto",
                "device_kind": device.type,
                **meta,
            }
        )
    header = [
        "model",
        "optimizer",
        "mode",
        "alone ms",
        "+K-FAC ms",
        "extra ms",
        "floor ms",
        "extra/floor",
        "slowdown",
        "slowest/fastest round",
    ]
    print("\n" + "\n".join(table(header, cells)))
    append_csv(args.out, out_rows)
    print(f"\nappended to {args.out}")
    for c in configs:
        if c["pre"] is not None:
            c["pre"].remove()
    return out_rows


if __name__ == "__main__":
    main()
