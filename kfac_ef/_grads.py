"""Where step() reads and writes a parameter's gradient.

In one process and under DistributedDataParallel that is ``p.grad``. Under FSDP2
(``fully_shard``) ``p.grad`` is a DTensor holding this rank's rows; for the duration of one
step() the sharded distributor stages the whole gradient of each parameter this rank
preconditions (``staged``), and every read and write of step() goes to that tensor instead.
Outside a staging, a sharded gradient reads as its local rows (what this rank owns).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping

from torch import Tensor, nn

# id(parameter) -> the whole gradient standing in for p.grad during one step().
_STAGED: dict[int, Tensor] = {}


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed.tensor)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """A DTensor's local tensor (its storage, not a copy), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]


def grad_of(p: nn.Parameter) -> Tensor | None:
    """The gradient step() works on: the staged whole gradient, else ``p.grad`` (its local
    rows when it is sharded), or None."""
    staged = _STAGED.get(id(p))
    if staged is not None:
        return staged
    g = p.grad
    return None if g is None else local(g)


@contextlib.contextmanager
def staged(grads: Mapping[int, Tensor]) -> Iterator[None]:
    """Make ``grads`` (by parameter id) what :func:`grad_of` returns inside the block."""
    _STAGED.update(grads)
    try:
        yield
    finally:
        for key in grads:
            _STAGED.pop(key, None)
