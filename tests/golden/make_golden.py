"""Writes the golden checkpoints of tests/test_golden_checkpoint.py (run once per format).

    python tests/golden/make_golden.py

For each configuration: a float64 model with every kind of preconditioned state (a grouped
conv, a linear, a tied-free head without bias, a LayerNorm preconditioned diagonally), trained
for five steps with statistics every 2 steps and decompositions every 3, then saved with the
batch of the next step and the gradients and state that step gives. The files are the
reference of the checkpoint format: a later version must load them and continue the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from kfac_ef import KFACPreconditioner  # noqa: E402
from tests.golden.spec import CONFIGS, batches, make_model, train_step  # noqa: E402


def main() -> None:
    torch.set_default_dtype(torch.float64)
    for name, options in CONFIGS.items():
        model = make_model()
        pre = KFACPreconditioner(model, **options)
        data = batches(6)
        for x, y in data[:5]:
            train_step(model, pre, x, y, options)
        model_state = {k: v.clone() for k, v in model.state_dict().items()}
        saved = {"model": model_state, "kfac": pre.state_dict()}
        x, y = data[5]
        grads = train_step(model, pre, x, y, options)
        torch.save(
            {**saved, "batch": (x, y), "grads": grads, "after": pre.state_dict()},
            HERE / f"{name}.pt",
        )
        print(f"wrote {name}.pt")


if __name__ == "__main__":
    main()
