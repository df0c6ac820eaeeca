"""Data and models shared by the demo and the benchmarks (data ships inside scikit-learn)."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
from pathlib import Path

import torch
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"


def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1797 images, bundled with the package), scaled to [0, 1].

    Returns x_train, y_train, x_test, y_test as float32 / int64 tensors (x flattened to 64).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def machine() -> dict[str, str]:
    """Who measured: device, torch version, date (written beside every CSV row)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {
        "device": device or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host_cpus": str(os.cpu_count()),
    }


def append_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """Append rows (dicts with the same keys) to a CSV, writing the header for a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
