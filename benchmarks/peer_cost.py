"""Step cost against a published K-FAC: kfac_ef's extra time per step beside ASDL's (PyPI
``asdfghjkl``, empirical Fisher), at the same cadence, on the same layers, in one run.

Optional, like benchmarks/peer.py: ASDL is not a dependency (``.venv/bin/pip install
asdfghjkl==0.1a5``). kfac-pytorch, the other peer the transformer issue names, is not on
PyPI; it is left out where it cannot be installed.

Models (synthetic data: only time matters here):

- ``mlp``: MLP 784-1024-1024-10 (ReLU), batch 256, every Linear preconditioned;
- ``lm256``: benchmarks/lm.py's larger model (common.gpt, dim 256, 4 pre-norm blocks, context
  128, a 96-token vocabulary with a tied head), batch 8; the blocks' Linear layers are
  preconditioned (ASDL's embedding layer takes one index per example, so the embeddings and
  the tied head are left to the optimizer by both libraries; so are the LayerNorms).

Every method runs SGD (momentum 0.9) on its gradients, statistics at every step, decompositions
or inverses every 10 steps, running averages with decay 0.95 (ASDL: ema_decay 0.05):

- ``SGD``: no preconditioner (the base of "extra");
- ``ASDL``: ``KfacGradientMaker(..., fisher_type=FISHER_EMP)``: π-damped factors inverted by
  Cholesky;
- ``kfac_ef exact`` / ``pi``: the seed's update, (G⊗A + εI)⁻¹ (exponent −1, absolute ε, no
  grafting), in the eigenbasis / with π-damped inverses (ASDL's algorithm);
- ``kfac_ef eigen_adam``: the defaults' update (Adam's second moment in the eigenbasis,
  exponent −1/2, relative ε, grafting) at this cadence;
- ``kfac_ef ekfac``: the per-example second moment in the eigenbasis (exponent −1, absolute ε).

Timing as benchmarks/step_overhead.py: a step time is the mean over a window of 10 steps (one
decomposition step, amortized); ``--windows`` windows after a warm-up window; the methods run in
``--rounds`` interleaved rounds; reported: each method's fastest round (its median window),
and "extra" = that minus SGD's fastest round. Appends to results/peer_cost.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import RESULTS, append_csv, gpt, load1, machine, set_threads, table  # noqa: E402
from peer import import_asdl  # noqa: E402
from step_overhead import mlp  # noqa: E402

from kfac_ef import KFACPreconditioner  # noqa: E402

INV_STEPS = 10
DECAY = 0.95
DAMPING = 1.0  # large: ASDL's Cholesky must not fail on synthetic data (time is what counts)
LR = 1e-5
VOCAB, DIM, CONTEXT, BLOCKS = 96, 256, 128, 4


def _lm256() -> nn.Module:
    return gpt(VOCAB, DIM, CONTEXT, blocks=BLOCKS)


def _images(n: int) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 784), torch.randint(0, 10, (n,))


def _tokens(n: int) -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, VOCAB, (n, CONTEXT + 1))
    return ids[:, :-1], ids[:, 1:]


def _ce(out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    # ASDL calls the loss with its own ``reduction``.
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction=reduction)


# name: (model, batch maker, batch size, description, kfac_ef's skip_layers, ASDL's ignored)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Any], int, str, list, list]] = {
    "mlp": (mlp, _images, 256, "MLP 784-1024-1024-10", [], []),
    "lm256": (
        _lm256,
        _tokens,
        8,
        "char-level GPT, dim 256 × 4 blocks",
        ["wte", "wpe", "head"],
        [nn.Embedding, nn.LayerNorm, "head"],
    ),
}

KFAC_EF: dict[str, dict[str, Any]] = {
    "kfac_ef exact": {"damping_mode": "exact"},
    "kfac_ef pi": {"damping_mode": "pi"},
    "kfac_ef eigen_adam": {"damping_mode": "eigen_adam", "exponent": -0.5,
                           "damping_unit": "relative", "grafting": "gradient", "damping": 1e-2},
    "kfac_ef ekfac": {"damping_mode": "ekfac"},
}  # fmt: skip
SEED_UPDATE = {"exponent": -1.0, "damping_unit": "absolute", "grafting": "none"}


class Runner:
    """One method on its own copy of the model: ``steps(k)`` trains k steps."""

    def __init__(self, model_name: str, method: str) -> None:
        build, make, batch, _, skip, ignore = MODELS[model_name]
        torch.manual_seed(0)
        self.model = build()
        self.x, self.y = make(batch)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9)
        self.pre: KFACPreconditioner | None = None
        self.maker: Any = None
        if method == "ASDL":
            asdl = import_asdl()
            config = asdl.PreconditioningConfig(
                data_size=batch,
                damping=DAMPING,
                preconditioner_upd_interval=INV_STEPS,
                curvature_upd_interval=1,
                ema_decay=1.0 - DECAY,
                ignore_modules=ignore or None,
            )
            self.maker = asdl.KfacGradientMaker(
                self.model, config, fisher_type=asdl.FISHER_EMP, loss_type=asdl.LOSS_CROSS_ENTROPY
            )
        elif method != "SGD":
            options = {**SEED_UPDATE, "damping": DAMPING, **KFAC_EF[method]}
            self.pre = KFACPreconditioner(
                self.model,
                factor_update_steps=1,
                inv_update_steps=INV_STEPS,
                factor_decay=DECAY,
                skip_layers=skip,
                **options,
            )

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        if self.maker is not None:
            dummy = self.maker.setup_model_call(self.model, self.x)
            self.maker.setup_loss_call(_ce, dummy, self.y)
            self.maker.forward_and_backward()
        else:
            _ce(self.model(self.x), self.y).backward()
            if self.pre is not None:
                self.pre.step()
        self.opt.step()

    def time(self, windows: int) -> float:
        """Median seconds per step over ``windows`` windows of INV_STEPS steps (after one
        warm-up window)."""
        times = []
        for w in range(windows + 1):
            t0 = time.perf_counter()
            for _ in range(INV_STEPS):
                self.step()
            if w:
                times.append((time.perf_counter() - t0) / INV_STEPS)
        return statistics.median(times)

    def preconditioned(self) -> int:
        """Parameters whose gradients the method rewrites (a check that both libraries cover
        the same layers)."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
        if self.pre is not None:
            layers = self.pre.summary().layers
            return sum(named[p].numel() for layer in layers for p in layer.parameters)
        if self.maker is not None:
            modules = self.maker.modules_for(self.maker.fisher_shape[0])
            return sum(p.numel() for m in modules for p in m.parameters(recurse=False))
        return 0


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=["SGD", "ASDL", *KFAC_EF])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "peer_cost.csv")
    args = parser.parse_args(argv)
    if import_asdl() is None:
        print("asdl is not installed: `.venv/bin/pip install asdfghjkl==0.1a5`, then rerun")
        return []
    set_threads(args.threads)
    methods = ["SGD", *(m for m in args.methods if m != "SGD")]
    print(f"threads {torch.get_num_threads()}, load {load1():.2f}")
    rows: list[dict[str, Any]] = []
    cells = []
    meta = machine()
    for name in args.models:
        runners = {m: Runner(name, m) for m in methods}
        rounds: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.rounds):
            for m, runner in runners.items():
                rounds[m].append(runner.time(args.windows))
                print(f"{name} round {r} {m}: {rounds[m][-1] * 1e3:.1f} ms/step", flush=True)
        base = min(rounds["SGD"])
        asdl_extra = min(rounds["ASDL"]) - base if "ASDL" in rounds else float("nan")
        for m in methods:
            wall = min(rounds[m])
            extra = wall - base
            row = {
                "model": name,
                "describe": MODELS[name][3],
                "method": m,
                "batch": MODELS[name][2],
                "ms_per_step": wall * 1e3,
                "extra_ms": extra * 1e3,
                "extra_over_asdl": extra / asdl_extra,
                "preconditioned_params": runners[m].preconditioned(),
                "round_spread": max(rounds[m]) / wall,
                "rounds": args.rounds,
                "factor_update_steps": 1,
                "inv_update_steps": INV_STEPS,
                **meta,
            }
            rows.append(row)
            cells.append(
                [
                    MODELS[name][3],
                    m,
                    f"{wall * 1e3:.1f}",
                    f"{extra * 1e3:.1f}" if m != "SGD" else "",
                    f"{extra / asdl_extra:.2f}" if m != "SGD" else "",
                    str(row["preconditioned_params"]),
                ]
            )
    print(
        "\n".join(
            table(["model", "method", "ms/step", "extra ms", "extra / ASDL's", "params"], cells)
        )
    )
    append_csv(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
