"""The defaults, as a new user meets them: ``KFACPreconditioner(model)`` with no option, under
AdamW and under SGD with momentum 0.9, at 0.3×, 1× and 3× each optimizer's tuned learning
rate, on every benchmark task, beside the optimizer alone.

Tasks: the digits autoencoder and classifier and the character-level GPT of
benchmarks/tasks.py, the larger character-level GPT of benchmarks/lm.py (``lm256``), and
``gpt50k``: a GPT with GPT-2's 50 257-token vocabulary (tied head) and two
``nn.TransformerEncoderLayer`` blocks memorizing one batch (the case where the previous
defaults reached NaN). Every task runs a fixed number of steps with a constant learning rate.

A run diverged when its metric became non-finite or 100× its initial value, or its step
raised. Rows (diverged ones included) go to results/defaults.csv; the table gives, per task,
optimizer and learning-rate factor, the final metric alone and with the preconditioner.

Usage: python benchmarks/defaults.py [--tasks ...] [--seeds 1] [--kfac JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, machine, set_threads, table  # noqa: E402
from lm import TASKS as LM_TASKS  # noqa: E402
from tasks import TASKS, Data, Method, Task, train  # noqa: E402


# ---------------------------------------------------------------------------------- gpt50k
class _GPT50k(nn.Module):
    """GPT-2's vocabulary, dim 64, two pre-norm ``nn.TransformerEncoderLayer`` blocks (causal),
    the head tied to the token embedding; GPT-2's initialization."""

    def __init__(self, vocab: int = 50257, dim: int = 64, context: int = 32) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        layer = lambda: nn.TransformerEncoderLayer(  # noqa: E731
            dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.ModuleList([layer(), layer()])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device).expand_as(idx)
        x = self.wte(idx) + self.wpe(pos)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.ln(x))


def _gpt50k_data() -> Data:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 50257, (4, 33), generator=gen)
    return Data({"ids": ids}, {"ids": ids})


def _memorize_losses(logits: Tensor, targets: Tensor) -> Tensor:
    n, t, v = logits.shape
    ce = nn.functional.cross_entropy(
        logits.reshape(n * t, v), targets.reshape(-1), reduction="none"
    )
    return ce.view(n, t).mean(1)


GPT50K = Task(
    "gpt50k",
    batch=4,
    budget_s=math.inf,
    eval_every=5,
    metric="training loss (one batch)",
    build=lambda data: _GPT50k(),
    load=_gpt50k_data,
    sample=lambda data, batch, gen, step: (data.train["ids"][:, :-1], data.train["ids"][:, 1:]),
    losses=_memorize_losses,
    evaluate=lambda model, data: float(
        _memorize_losses(model(data.eval["ids"][:, :-1]), data.eval["ids"][:, 1:]).mean()
    ),
)

ALL: dict[str, Task] = {**TASKS, "lm256": LM_TASKS["lm256"], "gpt50k": GPT50K}
# Steps per run, and each optimizer's tuned learning rate on the task (time_to_target.py's
# and lm.py's tuning; gpt50k: the rates of the issue that reported the divergence).
STEPS = {"autoencoder": 400, "classification": 300, "chargpt": 300, "lm256": 100, "gpt50k": 30}
TUNED = {
    "autoencoder": {"adamw": 3e-3, "sgd": 1.0},
    "classification": {"adamw": 1e-2, "sgd": 0.3},
    "chargpt": {"adamw": 3e-3, "sgd": 0.1},
    "lm256": {"adamw": 1e-3, "sgd": 0.1},
    "gpt50k": {"adamw": 1e-3, "sgd": 0.05},
}
FACTORS = (0.3, 1.0, 3.0)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(ALL), choices=list(ALL))
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "sgd"])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--kfac", default="{}", help="options as JSON ({}: the defaults)")
    ap.add_argument("--label", default="defaults")
    ap.add_argument("--steps", type=int, default=None, help="override the tasks' step counts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    options = json.loads(args.kfac)
    stamp = machine()  # one date and revision for the run (tables.py picks runs by them)
    rows: list[dict[str, Any]] = []
    lines: list[list[object]] = []
    for name in args.tasks:
        task = ALL[name]
        for opt in args.optimizers:
            for factor in FACTORS:
                lr = TUNED[name][opt] * factor
                for seed in range(args.seeds):
                    result = {}
                    for with_kfac in (False, True):
                        method = Method(
                            f"{opt}{' + K-FAC' if with_kfac else ''}",
                            opt,
                            lr,
                            kfac=dict(options) if with_kfac else None,
                            library_defaults=True,
                        )
                        steps = args.steps or STEPS[name]
                        run = train(task, method, seed, budget_s=math.inf, max_steps=steps)
                        bad = run.diverged or bool(run.error)
                        result[with_kfac] = run
                        rows.append(
                            {
                                **stamp,
                                "threads": threads,
                                "task": name,
                                "optimizer": opt,
                                "lr_factor": factor,
                                "lr": lr,
                                "seed": seed,
                                "kfac": args.label if with_kfac else "",
                                "options": json.dumps(options) if with_kfac else "",
                                "steps": run.steps,
                                "initial": run.curve[0][2],
                                "final": run.final,
                                "best": run.best,
                                "diverged": int(bad),
                                "error": run.error,
                            }
                        )
                    alone, pre = result[False], result[True]
                    lines.append(
                        [name, opt, f"{factor:g}× ({lr:g})", seed, _metric(alone), _metric(pre)]
                    )
                    print(" ".join(map(str, lines[-1])), flush=True)
    append_csv(args.out / "defaults.csv", rows)
    header = ["task", "optimizer", "lr", "seed", "alone", f"+ K-FAC ({args.label})"]
    print("\n".join(table(header, lines)))
    return rows


def _metric(run: Any) -> str:
    if run.error:
        return "error"
    if run.diverged:
        return f"diverged (step {run.steps})"
    return f"{run.final:.4g}"


if __name__ == "__main__":
    main()
