"""``precondition_update``: the optimizer's update preconditioned once more.

step() keeps the parameters of the layers (and diagonal entries) it preconditioned. The
optimizer's step pre-hook copies them; its post-hook puts the change Δθ the optimizer made
where their gradients are, runs the same preconditioning as step() (grafted: each block
rescaled to the norm of its Δθ, so that the optimizer's step size holds) and sets
θ ← θ_before + (C + εI)^p Δθ for the parameters the optimizer holds. The others (a bias left
to another optimizer) are unchanged; every gradient is restored afterwards. Under Muon,
whose update is orth(M) of what step() gave it, C^p M, the step becomes
C^p orth(C^p M): Muon's steepest descent under the spectral norm measured in K-FAC's
geometry (for p = -1/2 and the Kronecker factors).

Under DDP every rank has the same Δθ (the same averaged gradients, the same optimizer): every
rank calls the same preconditioning, whose workers compute and share the results as in
step(), and every rank writes them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._blocks import DiagonalParam, Layer
from ._estimator import Estimator
from ._grads import grad_of
from ._model import unique_parameters


class UpdatePreconditioner:
    """The two step hooks of one optimizer and what step() left for them."""

    def __init__(self, est: Estimator, optimizer: torch.optim.Optimizer) -> None:
        self.est = est
        self.optimizer = optimizer
        self.params: list[nn.Parameter] | None = None  # step()'s preconditioned parameters
        self.before: list[Tensor] | None = None

    def hold(self, done: list[Layer], done_diag: list[DiagonalParam]) -> None:
        """After step(): the parameters whose update the next optimizer step should see
        (distributed, those of the layers any rank preconditioned: the same on every rank)."""
        params = unique_parameters(self.est.comm.preconditioned_layers(done), done_diag)
        self.params = [p for p in params if grad_of(p) is not None]
        self.before = None

    def before_update(self) -> None:
        if self.params is not None:
            self.before = [p.detach().clone() for p in self.params]

    def after_update(self) -> None:
        params, before = self.params, self.before
        self.params = self.before = None
        if params is None or before is None:
            return  # no step() since the last update, or no pre-hook call
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        mine = [id(p) in held for p in params]
        saved = [p.grad for p in params]
        with torch.no_grad():
            try:
                for p, b, m in zip(params, before, mine):
                    p.grad = p.detach() - b if m else torch.zeros_like(p)
                self.est.precondition(False, graft=True)
                for p, b, m in zip(params, before, mine):
                    if m:
                        update = grad_of(p)
                        assert update is not None
                        p.copy_(b.add_(update))
            finally:
                for p, g in zip(params, saved):
                    p.grad = g
