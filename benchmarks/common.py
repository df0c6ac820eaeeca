"""Data, models and bookkeeping shared by the demo and the benchmarks.

Every data set here ships inside an installed package (no downloads): scikit-learn's digits
and the source code of Python's standard library.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def stdlib_text(chars: int = 400_000) -> str:
    """About ``chars`` characters of Python source from the standard library, ASCII only.

    The modules are fixed (large, stable pure-Python files present in every CPython 3.10+),
    read in this order and concatenated; non-ASCII characters are dropped so that the
    vocabulary is at most 128 symbols.
    """
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    modules = [
        "argparse.py",
        "inspect.py",
        "typing.py",
        "dataclasses.py",
        "functools.py",
        "collections/__init__.py",
        "enum.py",
        "pathlib.py",
        "subprocess.py",
        "threading.py",
        "tarfile.py",
        "zipfile.py",
        "email/message.py",
        "http/client.py",
        "logging/__init__.py",
    ]
    parts: list[str] = []
    total = 0
    for name in modules:
        path = root / name
        if not path.is_file():  # e.g. pathlib/ became a package in 3.13
            path = root / name.removesuffix(".py") / "__init__.py"
            if not path.is_file():
                continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        text = text.encode("ascii", errors="ignore").decode("ascii")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


def load1() -> float:
    """The 1-minute load average of the machine (other processes disturb timings)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return float("nan")


# The seed's update, (G⊗A + εI)⁻¹ with a fixed ε and statistics at every step: the defaults
# before the transformer measurements (docs/guides/transformers.md). The benchmarks that
# measured it fill the options they do not set from here, so that their recorded results stay
# the results of what they run; lm.py and defaults.py measure the library's defaults.
SEED_UPDATE: dict[str, object] = {
    "damping": 1e-3,
    "damping_unit": "absolute",
    "damping_mode": "exact",
    "exponent": -1.0,
    "grafting": "none",
    "factor_update_steps": 1,
    "wide_layers": "diagonal",
}


def seed_options(**options: object) -> dict[str, object]:
    """``options`` over the seed's update (SEED_UPDATE)."""
    return {**SEED_UPDATE, **options}


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (recorded with every result); returns it."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def gpt(vocab: int, dim: int, context: int, heads: int = 4, blocks: int = 2) -> nn.Module:
    """tests/models.GPT (pre-norm blocks of scaled-dot-product attention and MLP, tied head)
    with GPT-2's initialization: weights N(0, 0.02), biases 0.

    The test suite's default initialization (embeddings N(0, 1)) gives logits of size ~dim
    through the tied head: a saturated softmax, a loss far above log(vocab), and denormal
    floats that slow CPU steps tenfold; training benchmarks start from a trainable model.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.models import GPT

    model = GPT(vocab=vocab, dim=dim, heads=heads, context=context, attention=("sdpa",) * blocks)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def machine() -> dict[str, str]:
    """Who measured and when: device, threads, torch version, date and the machine's load
    (written beside every CSV row; call it when the rows are written)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {
        "device": device or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host_cpus": str(os.cpu_count()),
        "load1": f"{load1():.2f}",
        "revision": revision(),
    }


def revision() -> str:
    """The commit of the measured code (short hash), with "+changes" when the package, the
    kernels or the benchmark scripts differ from it; empty outside a git checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(proc.stderr)
        return proc.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "kfac_ef", "kernels", "benchmarks/*.py")
    except OSError:
        return ""
    return head + ("+changes" if changed else "")


def demo_setup(description: str, strategy: str, strategies: str) -> tuple[Any, bool, int, int]:
    """The data-parallel demos' options and process group (ddp_demo.py, fsdp_demo.py):
    ``(args, distributed, world, rank)``; one thread per rank, gloo under torchrun."""
    import argparse

    import torch.distributed as dist

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--strategy", default=strategy, help=strategies)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.03)
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} ranks")
    return args, distributed, world, rank


def timing_args(parser: Any, batch: int, warmup: int, steps: int, note: str) -> None:
    """The options of the distributed timing scripts (distributed.py, fsdp.py)."""
    parser.add_argument("--batch", type=int, default=batch, help="local batch per rank")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--steps", type=int, default=steps, help=f"timed steps ({note})")
    parser.add_argument("--worlds", default="1,2,4", help="sweep: world sizes")
    parser.add_argument("--csv", action="store_true", help="append rows to the results CSV")


def torchrun_sweep(script: str, args: Any) -> None:
    """Run ``script`` under one torchrun per world size of ``args.worlds``, each appending
    its rows to the CSV (``--csv``) with the same batch, warmup and steps."""
    for world in [int(w) for w in args.worlds.split(",")]:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", script, "--csv", f"--batch={args.batch}",
            f"--warmup={args.warmup}", f"--steps={args.steps}",
        ]  # fmt: skip
        subprocess.run(cmd, check=True)


def append_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """Append rows to a CSV, writing the header for a new file.

    Rows may have different keys (the header is their union, in order of appearance). When
    the file exists with other columns, it is rewritten with the union of both headers (the
    old rows get empty cells for the new columns), so results of several versions of a
    script stay in one readable table.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    old_rows: list[dict[str, str]] = []
    old_fields: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            if old_fields != fields and set(fields) - set(old_fields):
                old_rows = list(reader)
    if path.exists() and not old_rows and not set(fields) - set(old_fields):
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=old_fields, restval="")
            writer.writerows(rows)
        return
    header = old_fields + [k for k in fields if k not in old_fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    """All rows of a results CSV (an empty list when it does not exist)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A plain-text table: columns as wide as their widest cell, first column left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    out = [line(cells[0]), "-" * len(line(cells[0]))]
    return out + [line(r) for r in cells[1:]]
