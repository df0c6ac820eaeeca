"""The main job (`make demo`): train an MLP on scikit-learn's digits with AdamW, SGD and
SGD + KFACPreconditioner, side by side, and report train loss, test accuracy and wall time.

Writes a PNG of the loss curves (path printed at the end) and appends the final table to
benchmarks/results/demo.csv. Learning rates were picked on a small grid (see --help).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, digits, machine, mlp, seed_options  # noqa: E402

from kfac_ef import KFACPreconditioner  # noqa: E402


@dataclass
class Run:
    name: str
    optimizer: str
    lr: float
    kfac: dict | None = None


# Tuned on lr grids {1e-3, 3e-3, 1e-2} (AdamW), {0.03, 0.1, 0.3} (SGD, momentum 0.9) and
# {0.01, 0.03, 0.1} x damping {1e-3, 1e-2, 0.1} (SGD + K-FAC), 20 epochs, seed 0.
RUNS = [
    Run("AdamW", "adamw", 1e-2),
    Run("SGD", "sgd", 0.3),
    Run("SGD + K-FAC", "sgd", 0.03, {"damping": 0.1, "inv_update_steps": 10}),
]


def train(run: Run, data, epochs: int, batch: int, seed: int) -> dict:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = mlp([64, 128, 128, 10])
    if run.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9)
    precond = (
        KFACPreconditioner(model, **seed_options(**run.kfac)) if run.kfac is not None else None
    )
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x_tr) + batch - 1) // batch
    curve: list[tuple[float, float]] = []  # (seconds, full train loss) after each epoch
    elapsed = 0.0
    bar = tqdm(range(epochs), desc=f"{run.name:<12}", unit="epoch", leave=True)
    for _ in bar:
        perm = torch.randperm(len(x_tr), generator=gen)
        t0 = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            if precond is not None:
                precond.step()
            opt.step()
        elapsed += time.perf_counter() - t0
        with torch.no_grad():
            loss = F.cross_entropy(model(x_tr), y_tr).item()
        curve.append((elapsed, loss))
        bar.set_postfix(train_loss=f"{loss:.4f}")
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {"curve": curve, "train_loss": curve[-1][1], "test_acc": acc, "seconds": elapsed}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        secs, losses = zip(*r["curve"])
        axes[0].semilogy(range(1, len(losses) + 1), losses, label=name)
        axes[1].semilogy(secs, losses, label=name)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("train loss (cross-entropy)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("MLP 64-128-128-10 on scikit-learn digits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=RESULTS / "demo_digits.png")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo.csv", help="CSV to append to")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = digits()
    print(
        f"digits: {len(data[0])} train / {len(data[2])} test images, batch {args.batch}, "
        f"{args.epochs} epochs"
    )
    results = {run.name: train(run, data, args.epochs, args.batch, args.seed) for run in RUNS}

    header = f"{'optimizer':<14}{'lr':>8}{'train loss':>12}{'test acc':>10}{'wall (s)':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    meta = machine()
    rows = []
    for run in RUNS:
        r = results[run.name]
        print(
            f"{run.name:<14}{run.lr:>8g}{r['train_loss']:>12.5f}{r['test_acc']:>10.4f}"
            f"{r['seconds']:>10.2f}"
        )
        rows.append(
            {
                "optimizer": run.name,
                "lr": run.lr,
                "kfac": run.kfac or "",
                "epochs": args.epochs,
                "batch": args.batch,
                "seed": args.seed,
                "train_loss": r["train_loss"],
                "test_acc": r["test_acc"],
                "seconds": r["seconds"],
                **meta,
            }
        )
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.plot)
    append_csv(args.out, rows)
    print(f"\nloss curves: {args.plot}\ntable appended to: {RESULTS / 'demo.csv'}")


if __name__ == "__main__":
    main()
