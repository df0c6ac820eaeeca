"""What a preconditioner covers on the models of the zoo (tests/zoo_models.py): one table row
per model, written to benchmarks/results/zoo_coverage.csv and printed as Markdown.

Each model is built from its config (tiny sizes), preconditioned with
other_params="diagonal", and trained for one step on a batch of 4 (so that decisions taken at
the first step, such as batch-shared position embeddings, show). The shares are computed here
from summary().unpreconditioned and the model's parameters, with the definitions of
kfac_ef/_coverage.py, so that the script also measures older versions of kfac_ef (run it with
PYTHONPATH pointing at another checkout and ``--label``). A second preconditioner with the
exact loss-change constraint takes one step too: the "exact step" column says whether it ran.

    python benchmarks/zoo_coverage.py --label after
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import warnings

import torch
from torch import nn

from kfac_ef import KFACPreconditioner

# The zoo comes from this checkout's tests (kfac_ef from wherever PYTHONPATH says).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "zoo_coverage.csv")
_POS = re.compile(r"pos(ition)?_?emb", re.IGNORECASE)


def _row(name: str, entry, label: str) -> dict[str, object]:
    import pytest

    try:
        model = entry.build()
    except pytest.skip.Exception as exc:
        return {"version": label, "model": name, "note": f"not run: {exc}"}
    model.train()
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre = KFACPreconditioner(model, other_params="diagonal")
        model.zero_grad()
        entry.losses(model, entry.batch(4, gen)).mean().backward()
        pre.step()
    left = dict(pre.summary().unpreconditioned)
    s = pre.summary()
    pre.remove()
    names: dict[int, str] = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            names.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    is_emb = {pid: pid in emb or bool(_POS.search(names[pid].rsplit(".", 1)[-1])) for pid in params}
    covered = {pid: names[pid] not in left for pid in params}
    mats = [
        pid for pid, p in params.items() if sum(d > 1 for d in p.shape) >= 2 and not is_emb[pid]
    ]

    def share(ids):
        total = sum(params[i].numel() for i in ids)
        return sum(params[i].numel() for i in ids if covered[i]) / total if total else 1.0

    exact = "ok"
    model2 = entry.build()
    model2.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pre2 = KFACPreconditioner(model2, target_loss_change=0.1, lr=0.1)
            losses = entry.losses(model2, entry.batch(4, gen))
            losses.mean().backward()
            pre2.step(loss=losses.detach())
            pre2.remove()
    except Exception as exc:  # noqa: BLE001 - the column reports it
        exact = f"error: {type(exc).__name__}"
    reasons = sorted({why.split(":")[0].split("(")[0].strip()[:40] for n, why in left.items()})
    return {
        "version": label,
        "model": name,
        "kronecker_layers": len(s.layers),
        "diagonal_params": len(s.diagonal),
        "weight_matrices": f"{sum(covered[i] for i in mats)}/{len(mats)}",
        "share_with_embeddings": f"{100 * share(list(params)):.1f}%",
        "share_without_embeddings": f"{100 * share([i for i in params if not is_emb[i]]):.1f}%",
        "exact_step": exact,
        "warnings": len({str(w.message)[:60] for w in caught if "kfac_ef" in str(w.message)}),
        "left_out": "; ".join(reasons),
        "note": "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    from tests.zoo_models import ZOO

    torch.manual_seed(0)
    rows = [_row(name, entry, args.label) for name, entry in ZOO.items()]
    fields = ["version", "model", "kronecker_layers", "diagonal_params", "weight_matrices",
              "share_with_embeddings", "share_without_embeddings", "exact_step", "warnings",
              "left_out", "note"]  # fmt: skip
    rows_old = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows_old = [r for r in csv.DictReader(f) if r["version"] != args.label]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows_old + rows)
    print("| " + " | ".join(fields[1:]) + " |")
    print("|" + " --- |" * (len(fields) - 1))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in fields[1:]) + " |")


if __name__ == "__main__":
    main()
