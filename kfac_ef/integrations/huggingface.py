"""``KFACCallback`` for Hugging Face transformers' ``Trainer``.

Where step() runs: in ``on_pre_optimizer_step``, once per optimizer step, i.e. after the
backward passes of all ``gradient_accumulation_steps`` micro-batches and before
``optimizer.step()``. By then the Trainer has

- unscaled the gradients of fp16 mixed precision (its gradient-norm computation unscales
  them through accelerate's GradScaler; the callback passes that scaler to the
  preconditioner, which unscales its statistics by the same scale, and unscales the
  gradients itself if they are not yet),
- clipped them if ``max_grad_norm > 0`` (the Trainer's default is 1.0): the raw gradient is
  clipped, then preconditioned. Set ``max_grad_norm=0`` to precondition the unclipped
  gradient (the loss-change constraint of kfac_ef bounds the step in its own way).

Gradient accumulation: the micro-batches are separate passes of one step (their examples
add up in the factors), and the Trainer's division of the loss over the accumulated batch
is the "mean" reduction over all of its examples (``loss_reduction="mean"``, the default).

DDP: the Trainer runs the callback on every rank with the unwrapped model, so every rank
builds the preconditioner and steps in step (``distributed=None`` turns the distributed
mode on when torch.distributed is initialized with several ranks).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from ..preconditioner import KFACPreconditioner
from . import callback_options

__all__ = ["KFACCallback"]


def _scaler_of(optimizer: Any) -> torch.amp.GradScaler | None:
    """The GradScaler accelerate attached to the optimizer (fp16), if any."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)


class KFACCallback(TrainerCallback):  # type: ignore[misc]
    """Precondition the Trainer's gradients with K-FAC before each optimizer step.

    Example::

        from kfac_ef.integrations.huggingface import KFACCallback

        callback = KFACCallback(damping=1e-3, other_params="diagonal")
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
        trainer.train()
        print(callback.preconditioner.summary())

    Args:
        **options: keyword arguments of :class:`~kfac_ef.KFACPreconditioner` (all but
            ``model`` and ``grad_scaler``, which the callback takes from the Trainer).

    Attributes:
        preconditioner: the preconditioner, built at the start of training (None before).
    """

    def __init__(self, **options: Any) -> None:
        self.options = callback_options(options)
        self.preconditioner: KFACPreconditioner | None = None

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        if self.preconditioner is not None:
            return  # a resumed or second train() keeps the factors
        if model is None:
            raise RuntimeError("KFACCallback: the Trainer passed no model to on_train_begin")
        self.preconditioner = KFACPreconditioner(
            model, grad_scaler=_scaler_of(optimizer), **self.options
        )

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if self.preconditioner is None:
            raise RuntimeError("KFACCallback: on_pre_optimizer_step before on_train_begin")
        scaler = _scaler_of(optimizer)
        if scaler is not None:
            inner = _inner(optimizer)
            # Unscaled already when the Trainer computed the gradient norm; unscale_ raises
            # if called twice, so ask the scaler's record for this optimizer.
            stage = scaler._per_optimizer_states[id(inner)].get("stage")
            if stage is None or getattr(stage, "name", "") != "UNSCALED":
                scaler.unscale_(inner)
        self.preconditioner.step()

    def remove(self) -> None:
        """Detach the preconditioner's hooks (the model is as before)."""
        if self.preconditioner is not None:
            self.preconditioner.remove()
