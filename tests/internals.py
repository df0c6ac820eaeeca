"""The one place where tests look inside a KFACPreconditioner (its layers and their
decompositions, the calls it holds, its pending recomputation). When the internals move,
this file changes, not the tests."""

from __future__ import annotations

from typing import Any

from kfac_ef import KFACPreconditioner


def layers(pre: KFACPreconditioner) -> list[Any]:
    """The Kronecker layers (``Layer``: ``name``, ``decomposition``, ``updates``, ...)."""
    return pre._est.layers


def layer(pre: KFACPreconditioner, name: str) -> Any:
    return pre._est.by_name[name]


def layer_names(pre: KFACPreconditioner) -> list[str]:
    return [la.name for la in pre._est.layers]


def held_loss_calls(pre: KFACPreconditioner) -> dict[str, list[Any]]:
    """Calls held until step() for the exact loss-change form."""
    return pre._held.loss


def decomposes_next_step(pre: KFACPreconditioner) -> bool:
    """Whether the next step() recomputes decompositions whatever its cadence."""
    return pre._est.force_decompose


def decompose_now(pre: KFACPreconditioner) -> None:
    """Recompute every decomposition now (benchmarks time it)."""
    pre._est.decompose(pre.steps)
