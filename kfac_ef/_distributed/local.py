"""The communicator of one process, and the protocol every communicator follows.

The estimator, the constraint and the checkpoint code call the same methods whether the run
is distributed or not; in one process every exchange is the identity and no collective runs
(:class:`Local`), across processes :class:`~kfac_ef._distributed.data_parallel.Distributor`
does the communication. This module imports no torch.distributed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from .._blocks import DiagonalParam, Layer, Results
from .._options import KFACOptions
from .._scaling import Scale, g_scale
from .packing import DiagTaken, KronTaken


class Communicator(Protocol):
    """What the single-process code asks of the processes it runs with."""

    distributed: bool
    sharded: bool
    world: int

    def on_call(self, name: str, pass_id: int) -> None: ...

    def on_record(self, name: str, pass_id: int) -> None: ...

    def reduce_statistics(
        self, scale_on: Callable[[torch.device], Tensor | None]
    ) -> tuple[KronTaken, DiagTaken]: ...

    def global_examples(self, local: float, previous: float | Tensor) -> float | Tensor: ...

    def reduce_scales(
        self, items: list[tuple[Layer, Tensor | None, int]], sigma: Tensor | None
    ) -> list[tuple[Layer, Tensor, Scale, Tensor | None]]: ...

    def sync_factors(self) -> None: ...

    def owns(self, layer: Layer, side: str) -> bool: ...

    def exchange(self, results: Results, ready: list[Layer]) -> Results: ...

    def after_decompose(self) -> None: ...

    def preconditions(self, layer: Layer) -> bool: ...

    def share_gradients(self) -> None: ...

    def preconditioned_layers(self, local: list[Layer]) -> list[Layer]: ...

    def sum_over_columns(self, t: Tensor) -> Tensor: ...

    def sum_over_ranks(self, t: Tensor) -> Tensor: ...

    def after_load(self, missing: bool) -> bool: ...

    def gradients(self) -> contextlib.AbstractContextManager[None]: ...

    def all_finite(self, flag: Tensor | None) -> Tensor | None: ...

    def complete_state(self, layers: dict[str, Any]) -> dict[str, Any]: ...

    def keeps(self, unit: Layer | DiagonalParam) -> bool: ...


class Whole:
    """Gradients are whole on every rank (one process, DDP): step() works on ``p.grad``
    itself, each rank's finite check is every rank's, each rank's state is complete."""

    sharded = False

    def gradients(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def all_finite(self, flag: Tensor | None) -> Tensor | None:
        return flag

    def complete_state(self, layers: dict[str, Any]) -> dict[str, Any]:
        return layers

    def keeps(self, unit: Layer | DiagonalParam) -> bool:
        """Whether this rank holds the running factors of a layer (or the Fisher of a
        diagonal parameter): folds its reduced statistics, checkpoints it."""
        return True


class Local(Whole):
    """One process: this step's own statistics, every decomposition here, sums as they are."""

    distributed = False
    world = 1

    def __init__(
        self, layers: list[Layer], diagonal: list[DiagonalParam], options: KFACOptions
    ) -> None:
        self._layers = layers
        self._diagonal = diagonal
        self._options = options

    def on_call(self, name: str, pass_id: int) -> None:
        return None

    def on_record(self, name: str, pass_id: int) -> None:
        return None

    def reduce_statistics(
        self, scale_on: Callable[[torch.device], Tensor | None]
    ) -> tuple[KronTaken, DiagTaken]:
        """The statistics of this process's batch, scaled (``LayerStatistics.take``)."""
        reduction = self._options.loss_reduction
        kron: KronTaken = [
            (layer, layer.take(reduction, scale_on(layer.adapter.weight.device)), None)
            for layer in self._layers
            if not layer.stats.empty
        ]
        diag: DiagTaken = [
            (entry, entry.take(reduction, scale_on(entry.param.device)), None)
            for entry in self._diagonal
            if not entry.stats.empty
        ]
        return kron, diag

    def global_examples(self, local: float, previous: float | Tensor) -> float | Tensor:
        """This step's examples, or those of the last step that had some."""
        return local if local > 0 else previous

    def reduce_scales(
        self, items: list[tuple[Layer, Tensor | None, int]], sigma: Tensor | None
    ) -> list[tuple[Layer, Tensor, Scale, Tensor | None]]:
        """EKFAC: each layer's second moment with its scale (``g_scale``)."""
        opts = self._options
        out: list[tuple[Layer, Tensor, Scale, Tensor | None]] = []
        for layer, raw, n in items:
            if raw is None:
                continue
            s = None if sigma is None else sigma.to(raw.device, raw.dtype)
            out.append(
                (layer, raw, g_scale(n, opts.loss_reduction, s, opts.fisher_type == "mc"), None)
            )
        return out

    def sync_factors(self) -> None:
        return None

    def owns(self, layer: Layer, side: str) -> bool:
        return True

    def exchange(self, results: Results, ready: list[Layer]) -> Results:
        return results

    def after_decompose(self) -> None:
        return None

    def preconditions(self, layer: Layer) -> bool:
        return True

    def share_gradients(self) -> None:
        return None

    def preconditioned_layers(self, local: list[Layer]) -> list[Layer]:
        return local

    def sum_over_columns(self, t: Tensor) -> Tensor:
        return t

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        return t

    def after_load(self, missing: bool) -> bool:
        return missing
