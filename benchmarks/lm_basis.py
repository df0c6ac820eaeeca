"""Which part of SOAP matters on the language models: its basis or its arrangement of Adam?

An experiment, not a method of the library: a minimal SOAP-style optimizer for the blocks'
2-D weights (AdamW at AdamW's tuned rate on everything else, as benchmarks/lm.py's Muon), with

- ``--basis shampoo``: SOAP's own Kronecker factors, running averages of ∇∇ᵀ and ∇ᵀ∇ of the
  minibatch gradient ∇ (d_out × d_in);
- ``--basis kfac``: K-FAC's factors, running averages of Σ_t g_t g_tᵀ (output gradients) and
  Σ_t a_t a_tᵀ (inputs, no bias coordinate) over every token of the batch (the "expand"
  statistics of kfac_ef), from module hooks;

both updated every ``--statistics-every`` steps with decay 0.95 and eigendecomposed (float64
``eigh``) every 10 steps; Adam's second moment v of the rotated gradient Q_Gᵀ∇Q_A (β2 = 0.95,
bias-corrected, kept when the basis changes, as SOAP keeps it), and

- ``--arrangement adam`` (SOAP's): the first moment m of the raw gradient (β1 = 0.95), the
  step Q_G [(Q_Gᵀ m Q_A) / (√v + 1e-8)] Q_Aᵀ;
- ``--arrangement normalize-first`` (kfac_ef's ``eigen_adam`` under a momentum optimizer):
  the step is the running average (β1 = 0.95) of Q_G [(Q_Gᵀ∇Q_A) / (√v + 1e-8)] Q_Aᵀ;
- ``--arrangement spectral``: Muon's step taken in the factors' geometry. The steepest
  descent under the spectral norm of L^(1/2) Δ R^(1/2) (L, R: the two factors, damped by
  ``--damping`` × their mean eigenvalue) is Δ = L^(-1/2) orth(L^(-1/2) M R^(-1/2)) R^(-1/2),
  with M torch's Muon's Nesterov momentum of ∇ and orth its Newton–Schulz iteration; Δ is
  scaled to the norm of orth(·) and applied as torch's Muon applies its update (its rate
  adjustment, weight decay 0.1). ``--power`` replaces the 1/2 of both roots; ``--basis
  identity`` (L = R = I) is torch's Muon itself.

Weight decay 0.01 (spectral: 0.1), benchmarks/lm.py's warmup and cosine schedule and step
count, one seed per run. Rows (final validation loss, the curve at every evaluation,
ms/step) go to results/lm_basis.csv; benchmarks/tables.py's ``lm-spectral`` reads from the
curve the steps to AdamW's final loss on the same seed in results/lm.csv.

Usage: python benchmarks/lm_basis.py --basis kfac --arrangement adam [--lr 3e-3]
       [--statistics-every 1] [--task lm256] [--seed 0] [--damping 1e-2] [--power 0.5]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim._muon import _zeropower_via_newtonschulz

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, machine, set_threads  # noqa: E402
from lm import STEPS, TASKS, LMMethod, _hidden_matrices, _schedule  # noqa: E402
from tasks import Task, train  # noqa: E402

DECAY = 0.95  # the factors' running averages
BETAS = (0.95, 0.95)
BASIS_EVERY = 10
WEIGHT_DECAY = 0.01


class SoapStyle:
    """One step: forward, backward, the SOAP-style step on the hidden matrices, AdamW."""

    def __init__(self, task: Task, model: nn.Module, args: argparse.Namespace) -> None:
        self.task, self.model, self.args = task, model, args
        self.hidden, rest = _hidden_matrices(model)
        steps = args.steps or STEPS[task.name]
        self.adamw = torch.optim.AdamW(rest, lr=TASKS_ADAMW_LR[task.name])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.adamw, _schedule(steps))
        self.factor = _schedule(steps)
        self.t = 0
        self.state: dict[int, dict[str, Any]] = {id(p): {} for p in self.hidden}
        self.hooks = []
        if args.basis == "kfac":
            mine = {id(p) for p in self.hidden}
            for m in model.modules():
                if isinstance(m, nn.Linear) and id(m.weight) in mine:
                    st = self.state[id(m.weight)]
                    self.hooks.append(m.register_forward_hook(self._inputs(st)))
                    self.hooks.append(m.register_full_backward_hook(self._grads(st)))

    def _collect(self) -> bool:
        return self.model.training and self.t % self.args.statistics_every == 0

    def _inputs(self, st: dict[str, Any]):
        def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            if self._collect():
                a = inp[0].detach().reshape(-1, inp[0].shape[-1])
                st["R_new"] = a.T @ a

        return hook

    def _grads(self, st: dict[str, Any]):
        def hook(mod: nn.Module, gin: tuple, gout: tuple) -> None:
            if self._collect():
                g = gout[0].detach().reshape(-1, gout[0].shape[-1])
                st["L_new"] = g.T @ g

        return hook

    def step(self, x: Tensor, y: Tensor) -> None:
        self.adamw.zero_grad(set_to_none=True)
        for p in self.hidden:
            p.grad = None
        self.task.losses(self.model(x), y).mean().backward()
        with torch.no_grad():
            lr = self.args.lr * self.factor(self.t)
            for p in self.hidden:
                self._update(p, self.state[id(p)], lr)
        self.adamw.step()
        self.sched.step()
        self.t += 1

    def _update(self, p: Tensor, st: dict[str, Any], lr: float) -> None:
        g = p.grad
        assert g is not None
        b1, b2 = BETAS
        if "L" not in st:  # (the hooks may have left this step's statistics already)
            st.update(L=g.new_zeros(g.shape[0], g.shape[0]), R=g.new_zeros(g.shape[1], g.shape[1]),
                      m=torch.zeros_like(g), v=torch.zeros_like(g), n=0)  # fmt: skip
        if self.args.basis == "shampoo":
            if self.t % self.args.statistics_every == 0:
                st["L"].mul_(DECAY).add_(g @ g.T, alpha=1 - DECAY)
                st["R"].mul_(DECAY).add_(g.T @ g, alpha=1 - DECAY)
        elif "L_new" in st:
            st["L"].mul_(DECAY).add_(st.pop("L_new"), alpha=1 - DECAY)
            st["R"].mul_(DECAY).add_(st.pop("R_new"), alpha=1 - DECAY)
        if self.args.arrangement == "spectral":
            self._spectral(p, g, st, lr)
            return
        if self.t % BASIS_EVERY == 0:
            st["QL"] = torch.linalg.eigh(st["L"].double()).eigenvectors.to(g.dtype)
            st["QR"] = torch.linalg.eigh(st["R"].double()).eigenvectors.to(g.dtype)
            if self.t == 0:
                return  # the first step only builds the basis (as SOAP)
        ql, qr = st["QL"], st["QR"]
        st["n"] += 1
        n = st["n"]
        rotated = ql.T @ g @ qr
        st["v"].mul_(b2).addcmul_(rotated, rotated, value=1 - b2)
        denom = (st["v"] / (1 - b2**n)).sqrt_().add_(1e-8)
        if self.args.arrangement == "adam":
            st["m"].mul_(b1).add_(g, alpha=1 - b1)
            step = ql @ ((ql.T @ st["m"] @ qr) / denom) @ qr.T / (1 - b1**n)
        else:
            st["m"].mul_(b1).add_(ql @ (rotated / denom) @ qr.T, alpha=1 - b1)
            step = st["m"] / (1 - b1**n)
        p.mul_(1 - lr * WEIGHT_DECAY).add_(step, alpha=-lr)

    def _spectral(self, p: Tensor, g: Tensor, st: dict[str, Any], lr: float) -> None:
        """Muon's step in the factors' geometry: the steepest descent under the spectral norm
        of L^(1/2) Δ R^(1/2) is Δ ∝ L^(-1/2) orth(L^(-1/2) M R^(-1/2)) R^(-1/2)."""
        st["m"].lerp_(g, 1 - MUON_MOMENTUM)
        update = g.lerp(st["m"], MUON_MOMENTUM)  # Nesterov, as torch's Muon
        if self.args.basis != "identity":
            if "eig" not in st or self.t % BASIS_EVERY == 0:  # the damped inverse roots
                st["eig"] = [self._root(st[k]).to(g.dtype) for k in ("L", "R")]
            left, right = st["eig"]
            update = left @ update @ right
        ortho = _zeropower_via_newtonschulz(update, NS_COEFFICIENTS, NS_STEPS, 1e-7).to(g.dtype)
        if self.args.basis != "identity":
            step = left @ ortho @ right
            ortho = step * (ortho.norm() / step.norm().clamp_min(1e-30))  # Muon's size
        p.mul_(1 - lr * MUON_WEIGHT_DECAY)
        p.add_(ortho, alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))

    def _root(self, factor: Tensor) -> Tensor:
        """(F + δ mean(λ) I)^(-power), from float64 eigh."""
        lam, q = torch.linalg.eigh(factor.double())
        lam = lam.clamp_min(0)
        lam = lam + self.args.damping * lam.mean().clamp_min(1e-30)
        return (q * lam.pow(-self.args.power)) @ q.T

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


# The spectral arrangement's momentum, weight decay and Newton–Schulz iteration: torch's Muon's
MUON_MOMENTUM, MUON_WEIGHT_DECAY = 0.95, 0.1
NS_COEFFICIENTS, NS_STEPS = (3.4445, -4.775, 2.0315), 5

# AdamW's tuned rate per task (benchmarks/lm.py's METHODS): the rest of the parameters.
TASKS_ADAMW_LR = {"chargpt": 3e-3, "lm256": 1e-3}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--basis", choices=["shampoo", "kfac", "identity"], required=True)
    ap.add_argument(
        "--arrangement", choices=["adam", "normalize-first", "spectral"], default="adam"
    )
    ap.add_argument("--damping", type=float, default=1e-2, help="spectral: relative δ")
    ap.add_argument("--power", type=float, default=0.5, help="spectral: the factors' power")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--statistics-every", type=int, default=1)
    ap.add_argument("--task", choices=list(TASKS), default="lm256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "lm_basis.csv")
    args = ap.parse_args(argv)
    set_threads(1)
    task = TASKS[args.task]
    steps = args.steps or STEPS[args.task]
    name = f"{args.basis} basis, {args.arrangement}, statistics every {args.statistics_every}"
    method = LMMethod(name, "soap-style", args.lr)
    run = train(task, method, args.seed, budget_s=math.inf, max_steps=steps,  # type: ignore[arg-type]
                stepper=lambda t, m, _: SoapStyle(t, m, args))  # fmt: skip
    curve = {s: v for s, _, v in run.curve}
    spectral = args.arrangement == "spectral"
    row = {
        **machine(),
        "task": args.task,
        "basis": args.basis,
        "arrangement": args.arrangement,
        "statistics_every": args.statistics_every,
        "lr": args.lr,
        "seed": args.seed,
        **({"damping": args.damping, "power": args.power} if spectral else {}),
        "steps": run.steps,
        "ms_per_step": round(1000 * run.seconds / max(1, run.steps), 1),
        "final": run.final,
        "curve": " ".join(f"{s}:{curve[s]:.3f}" for s in sorted(curve)),
        "error": run.error,
    }
    print(f"{name}: final {run.final:.4f}, {row['ms_per_step']} ms/step, {row['curve']}")
    append_csv(args.out, [row])
    return row


if __name__ == "__main__":
    main()
