"""What a factor costs by width: the measurements behind max_factor_dim and large_factor_block.

Part 1, dense factors of width d: bytes of the state one factor keeps (running factor,
statistics accumulator, eigenbasis and eigenvalues: 3d² + d floats) and the time of its
eigendecomposition (float32, one matrix, fastest of a few) and of its damped inverse
(Cholesky, damping_mode="pi").

Part 2, a vocabulary-sized output layer (Linear(dim, vocab), G over the vocabulary): its G
kept diagonal (large_factor_block=1) or block-diagonal with blocks of b, through the real
preconditioner: planned bytes of the layer's state, time of one statistics + preconditioning
step, and of one decomposition step, for ``--rows`` tokens per batch.

Prints tables and appends them to benchmarks/results/factor_sizes.csv. Timings on a shared CPU
are noisy: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, append_csv, machine, seed_options  # noqa: E402

from kfac_ef import KFACPreconditioner  # noqa: E402
from tests import internals  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, reps: int, device: torch.device) -> float:
    """Least disturbed of ``reps`` timings (after one warm-up call): the minimum, as timeit
    reports it. On a shared CPU the median mostly measures the other load."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def dense_factors(dims: list[int], reps: int, device: torch.device) -> list[dict[str, object]]:
    rows = []
    print(f"{'d':>6}{'state MiB':>11}{'eigh s':>9}{'chol inv s':>12}")
    for d in dims:
        x = torch.randn(2 * d, d, device=device)
        m = x.T @ x / (2 * d)
        eye = torch.eye(d, device=device)
        t_eigh = _best_time(lambda m=m: torch.linalg.eigh(m), reps, device)
        t_chol = _best_time(
            lambda m=m, eye=eye: torch.cholesky_inverse(torch.linalg.cholesky(m + 1e-3 * eye)),
            reps,
            device,
        )
        state = 4 * (3 * d * d + d)
        print(f"{d:>6}{state / 2**20:>11.1f}{t_eigh:>9.3f}{t_chol:>12.4f}", flush=True)
        rows.append(
            {"part": "dense", "d": d, "state_bytes": state, "eigh_s": t_eigh, "chol_inv_s": t_chol}
        )
    return rows


def vocab_head(
    vocab: int, dim: int, tokens: int, blocks: list[int], reps: int, device: torch.device
) -> list[dict[str, object]]:
    rows = []
    print(f"\nLinear({dim}, {vocab}), {tokens} tokens per batch, G over the vocabulary")
    print(f"{'block':>7}{'G storage':>22}{'state MiB':>11}{'step s':>9}{'decomp. s':>11}")
    x = torch.randn(tokens, dim, device=device)
    y = torch.randint(0, vocab, (tokens,), device=device)
    for block in blocks:
        torch.manual_seed(0)
        model = nn.Linear(dim, vocab, bias=False).to(device)
        pre = KFACPreconditioner(
            model,
            **seed_options(
                max_factor_dim=max(dim, block), large_factor_block=block, inv_update_steps=10**9
            ),
        )
        row = pre.summary().layers[0]

        def step(pre=pre, model=model) -> None:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()

        step()  # step 0 decomposes
        t_step = _best_time(step, reps, device)

        def decompose(pre=pre) -> None:
            internals.decompose_now(pre)

        t_dec = _best_time(decompose, max(1, reps // 2), device)
        print(
            f"{block:>7}{row.g_factor:>22}{row.total_bytes / 2**20:>11.1f}{t_step:>9.3f}"
            f"{t_dec:>11.3f}",
            flush=True,
        )
        rows.append(
            {
                "part": "vocab_head",
                "d": vocab,
                "dim": dim,
                "tokens": tokens,
                "block": block,
                "g_storage": row.g_factor,
                "state_bytes": row.total_bytes,
                "step_s": t_step,
                "decompose_s": t_dec,
            }
        )
        pre.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dims", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1024, help="tokens per batch (part 2)")
    parser.add_argument("--blocks", type=int, nargs="*", default=[1, 256, 1024])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads")
    rows = dense_factors(args.dims, args.reps, device)
    rows += vocab_head(args.vocab, args.dim, args.rows, args.blocks, args.reps, device)
    meta = machine()
    keys = sorted({k for r in rows for k in r})
    append_csv(RESULTS / "factor_sizes.csv", [{k: r.get(k, "") for k in keys} | meta for r in rows])
    print(f"\nappended to {RESULTS / 'factor_sizes.csv'}")


if __name__ == "__main__":
    main()
