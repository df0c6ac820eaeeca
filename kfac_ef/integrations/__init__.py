"""Callbacks that run ``KFACPreconditioner.step()`` inside other libraries' training loops.

- :mod:`kfac_ef.integrations.huggingface`: ``KFACCallback`` for transformers' ``Trainer``;
- :mod:`kfac_ef.integrations.lightning`: ``KFACCallback`` for Lightning's ``Trainer``.

Each module imports its library; this package imports neither (kfac_ef's own dependencies
stay torch, opt_einsum and triton). docs/integrations.md says where each callback calls
step() relative to unscaling, gradient clipping and gradient accumulation.
"""

from __future__ import annotations

from typing import Any


def callback_options(options: dict[str, Any]) -> dict[str, Any]:
    """A callback's preconditioner options: everything but what it takes from the Trainer."""
    for key in ("model", "grad_scaler"):
        if key in options:
            raise TypeError(f"KFACCallback takes {key!r} from the Trainer, not as an option")
    return options
