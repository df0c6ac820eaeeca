"""``KFACCallback`` for Lightning's ``Trainer`` (automatic optimization).

Where step() runs: in ``on_before_optimizer_step``, which Lightning calls once per optimizer
step, after the backward passes of all ``accumulate_grad_batches`` batches, after unscaling
the gradients of 16-bit mixed precision (its GradScaler, passed to the preconditioner so the
statistics are unscaled too), and *before* its gradient clipping (``gradient_clip_val``):
the clipping applies to the preconditioned gradient, which is what the optimizer steps on.

Gradient accumulation: Lightning divides each batch's loss by ``accumulate_grad_batches``,
the "mean" reduction over the accumulated batch (``loss_reduction="mean"``, the default).
DDP: the callback runs on every rank with the LightningModule (unwrapped).
Manual optimization: call ``callback.preconditioner.step()`` yourself between
``manual_backward`` and ``optimizer.step()``.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback  # type: ignore[no-redef]

from ..preconditioner import KFACPreconditioner
from . import callback_options

__all__ = ["KFACCallback"]


class KFACCallback(Callback):  # type: ignore[misc]
    """Precondition the LightningModule's gradients with K-FAC before each optimizer step.

    Example::

        from kfac_ef.integrations.lightning import KFACCallback

        trainer = L.Trainer(callbacks=[KFACCallback(damping=1e-3)], accumulate_grad_batches=4)
        trainer.fit(module, loader)

    Args:
        **options: keyword arguments of :class:`~kfac_ef.KFACPreconditioner` (all but
            ``model`` and ``grad_scaler``, which the callback takes from the Trainer).

    Attributes:
        preconditioner: the preconditioner, built when fitting starts (None before).
    """

    def __init__(self, **options: Any) -> None:
        self.options = callback_options(options)
        self.preconditioner: KFACPreconditioner | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.preconditioner is not None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not isinstance(scaler, torch.amp.GradScaler):
            scaler = None
        self.preconditioner = KFACPreconditioner(pl_module, grad_scaler=scaler, **self.options)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.preconditioner is None:
            raise RuntimeError("KFACCallback: on_before_optimizer_step before on_fit_start")
        self.preconditioner.step()

    def remove(self) -> None:
        """Detach the preconditioner's hooks (the model is as before)."""
        if self.preconditioner is not None:
            self.preconditioner.remove()
