"""Calls held from the backward pass until step(), by hooked module.

EKFAC's scale needs the calls of the backward that feeds the factors ("fisher"), the exact
loss-change form those of the user's loss ("loss"); with the empirical Fisher they are the
same calls. Each held call is a copy of what the forward call saved (a batch buffer refilled
in place before step() must not change what step() computes), its output gradient and its
pass. They pile up with backward passes that come without step(): one warning says so.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from torch import Tensor

from . import _warn
from ._constraint import Held
from ._model import snapshot
from ._options import KFACOptions

# Backward passes whose calls may be held until step() before a warning (gradient
# accumulation over more micro-batches than this is unusual; a loop without step() is a bug).
PASSES_WARNING = 64


class HeldCalls:
    """The held calls of one step (``fisher`` and ``loss``, by module name)."""

    def __init__(self, options: KFACOptions) -> None:
        self.options = options
        self.fisher: dict[str, list[Held]] = defaultdict(list)
        self.loss: dict[str, list[Held]] = defaultdict(list)
        self._passes = 0
        self._last_pass = -1
        self._warned = False

    def call(self, saved: Any, grad: Tensor, pass_id: int) -> Held:
        """A held copy of one call (made once per call by the caller)."""
        self._note(pass_id)
        return (snapshot(saved), grad.detach(), pass_id)

    def clear(self) -> None:
        self.fisher.clear()
        self.loss.clear()
        self._passes = 0
        self._last_pass = -1

    def _note(self, pass_id: int) -> None:
        if pass_id == self._last_pass:
            return
        self._last_pass = pass_id
        self._passes += 1
        if self._passes > PASSES_WARNING and not self._warned:
            self._warned = True
            _warn.warn(
                f"{self._passes} backward passes since the last step(): with "
                f"{self._reason()} the preconditioner keeps every pass's layer inputs "
                "and output gradients until step(), so memory grows with each pass. Call "
                "precond.step() once per optimizer step (or per accumulated batch)."
            )

    def _reason(self) -> str:
        opts = self.options
        if opts.damping_mode == "ekfac":
            return 'damping_mode="ekfac"'
        if opts.constraint == "exact":
            return 'constraint="exact"'
        return "track_loss_changes=True"
