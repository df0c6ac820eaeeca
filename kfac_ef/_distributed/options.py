"""Options of data-parallel K-FAC, and how the preconditioner turns ``distributed=`` and a
DistributedDataParallel wrapper into them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._options import KFACOptions
from .plan import grad_workers

GRAD_WORKER_PRESETS = ("comm_opt", "mem_opt", "hybrid")
FACTOR_SYNCS = ("update", "decomposition")


@dataclass(frozen=True)
class DistributedOptions:
    """How a :class:`~kfac_ef.KFACPreconditioner` splits its work across processes.

    Attributes:
        process_group: the ranks that train together (default: all). K-FAC communicates on
            a copy of it, created at construction (every rank of the group must construct
            its preconditioner at the same point of the program).
        grad_worker_fraction: "comm_opt", "mem_opt", "hybrid", or a number f in (0, 1]: the
            fraction of ranks that hold each layer's decomposition and precondition its
            gradient (rounded to the nearest divisor of the group size). None (default):
            "comm_opt" under DistributedDataParallel; under FSDP2 "mem_opt" (a layer's
            state on one rank, measured faster and lighter: docs/distributed.md), or
            "comm_opt" when damping_mode="ekfac" or the exact loss-change form needs every
            layer on every rank.
        factor_sync: "update" (default): all-reduce the statistics on every statistics
            step, so the running factors are those of the global batch; "decomposition":
            keep per-rank running factors and average them only before decompositions
            (less traffic; exact when every rank has the same local batch size).
        bucket_cap_mb: approximate size of one all-reduce of statistics, in MiB.
        overlap: launch the all-reduce of a bucket of statistics during backward, as soon
            as its layers' statistics are complete. Needs every rank to run the same layers
            the same number of times per pass; set it to False for models whose executed
            layers depend on the data (reductions then all start in ``step()``).
    """

    process_group: Any = None
    grad_worker_fraction: float | str | None = None
    factor_sync: str = "update"
    bucket_cap_mb: float = 25.0
    overlap: bool = True

    def __post_init__(self) -> None:
        f = self.grad_worker_fraction
        if f is None:
            pass  # automatic (resolved by the distributor: ``with_workers``)
        elif isinstance(f, str):
            if f not in GRAD_WORKER_PRESETS:
                raise ValueError(
                    f"Invalid grad_worker_fraction={f!r}: must be one of "
                    f"{', '.join(map(repr, GRAD_WORKER_PRESETS))} or a number in (0, 1]"
                )
        elif isinstance(f, bool) or not isinstance(f, int | float) or not (0 < f <= 1):
            raise ValueError(
                f"Invalid grad_worker_fraction={f!r}: must be a number in (0, 1] or one of "
                f"{', '.join(map(repr, GRAD_WORKER_PRESETS))}"
            )
        if self.factor_sync not in FACTOR_SYNCS:
            raise ValueError(
                f"Invalid factor_sync={self.factor_sync!r}: must be one of "
                f"{', '.join(map(repr, FACTOR_SYNCS))}"
            )
        cap = self.bucket_cap_mb
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not (0 < cap < math.inf):
            raise ValueError(f"Invalid bucket_cap_mb={cap!r}: must be a finite number > 0")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"Invalid overlap={self.overlap!r}: must be True or False")
        pg = self.process_group
        if pg is not None and not isinstance(pg, dist.ProcessGroup):
            raise TypeError(
                f"Invalid process_group={pg!r}: must be a torch.distributed ProcessGroup "
                "(from torch.distributed.new_group) or None for all ranks"
            )


def with_workers(
    options: DistributedOptions, kfac: KFACOptions, sharded: bool
) -> DistributedOptions:
    """``options`` with an automatic ``grad_worker_fraction`` (None) resolved (see
    DistributedOptions)."""
    if options.grad_worker_fraction is not None:
        return options
    every_rank = kfac.damping_mode == "ekfac" or kfac.needs_loss_records
    fraction = "mem_opt" if sharded and not every_rank else "comm_opt"
    return dataclasses.replace(options, grad_worker_fraction=fraction)


def unwrap(model: nn.Module) -> tuple[nn.Module, DistributedDataParallel | None]:
    """The model inside a DistributedDataParallel wrapper (layer names without ``module.``)."""
    if isinstance(model, DistributedDataParallel):
        return model.module, model
    return model, None


def resolve(distributed: bool | DistributedOptions | None) -> DistributedOptions | None:
    """The distributed options in force, or None for a single-process preconditioner.

    ``None`` (automatic) turns distribution on when torch.distributed is initialized with
    more than one rank; ``True`` or a DistributedOptions require it to be initialized.
    """
    if distributed is False:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is None:
        if not initialized or dist.get_world_size() < 2:
            return None
        return DistributedOptions()
    if distributed is True:
        opts = DistributedOptions()
    elif isinstance(distributed, DistributedOptions):
        opts = distributed
    else:
        raise TypeError(
            f"Invalid distributed={distributed!r}: must be None (automatic), True, False or "
            "a kfac_ef.DistributedOptions"
        )
    if not initialized:
        raise RuntimeError(
            "distributed K-FAC needs torch.distributed to be initialized: call "
            "torch.distributed.init_process_group() before building the preconditioner "
            "(or pass distributed=False)"
        )
    return opts


def check_sharded_run(sharded: bool, options: DistributedOptions | None) -> None:
    """A model sharded over several ranks needs distributed K-FAC: each rank holds only its
    rows of every gradient."""
    if sharded and options is None and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            "distributed=False with a model sharded by fully_shard over several ranks: "
            "each rank holds a shard of every gradient, so K-FAC must run distributed "
            "(distributed=None or True)"
        )


def _check_supported(
    kfac: KFACOptions, options: DistributedOptions, world: int, sharded: bool = False
) -> None:
    """Combinations of K-FAC and distribution options that cannot be computed exactly.

    EKFAC's S is the second moment of every example's gradient projected onto the eigenbases:
    each rank projects its own examples, so every rank needs every eigenbasis (one column:
    "comm_opt", or a fraction that rounds to every rank), and the running S must follow the
    global batch at every statistics step (factor_sync="update"), as the preconditioner uses
    S itself, not a decomposition of it.
    """
    options = with_workers(options, kfac, sharded)
    n_g = grad_workers(options.grad_worker_fraction, world)
    if sharded:
        _check_sharded(kfac, options, world, n_g)
    if kfac.damping_mode == "eigen_adam":
        # Sharded, a layer's gradient workers precondition its whole gathered gradient:
        # with one worker per layer ("mem_opt") that one rank keeps the moment alone.
        if n_g != world and not (sharded and n_g == 1):
            raise ValueError(
                f"damping_mode='eigen_adam' with grad_worker_fraction="
                f"{options.grad_worker_fraction!r}: the second moment in each eigenbasis is "
                "updated by the ranks that precondition the layer, so every rank must hold "
                "every eigenbasis; use grad_worker_fraction='comm_opt' (the default), or "
                "damping_mode='exact'"
            )
        return
    if kfac.damping_mode != "ekfac":
        return
    if options.factor_sync != "update":
        raise ValueError(
            f"damping_mode='ekfac' with factor_sync={options.factor_sync!r}: the EKFAC scale S "
            "is used directly at every step, so per-rank running statistics would make the "
            "ranks precondition differently; use factor_sync='update' (the default)"
        )
    if grad_workers(options.grad_worker_fraction, world) != world:
        raise ValueError(
            f"damping_mode='ekfac' with grad_worker_fraction="
            f"{options.grad_worker_fraction!r}: S projects every rank's examples onto each "
            "layer's eigenbases, so every rank must hold every eigenbasis; use "
            "grad_worker_fraction='comm_opt' (the default), or damping_mode='exact'"
        )


def _check_sharded(kfac: KFACOptions, options: DistributedOptions, world: int, n_g: int) -> None:
    """What FSDP2 adds to the conditions above: every gradient worker of a layer gathers its
    whole gradient, so the grid must be one row ("mem_opt": each layer on one rank) or one
    column ("comm_opt": every layer on every rank); the running factors of a layer live on
    its workers only, so they must follow the global batch at every statistics step; the
    exact form sums per-example directions over every layer on every rank."""
    where = f"under FSDP (fully_shard) with grad_worker_fraction={options.grad_worker_fraction!r}"
    if n_g not in (1, world):
        raise ValueError(
            f"{where}: a sharded model's layers are preconditioned by one rank each "
            "('mem_opt', the per-rank state falls as 1/W) or by every rank ('comm_opt'); "
            "use one of those"
        )
    if options.factor_sync != "update":
        raise ValueError(
            f"factor_sync={options.factor_sync!r} under FSDP (fully_shard): a layer's running "
            "factors live on the ranks that precondition it, so the statistics are reduced "
            "at every statistics step; use factor_sync='update' (the default)"
        )
    if kfac.needs_loss_records and n_g != world:
        raise ValueError(
            f"constraint='exact' (or track_loss_changes) {where}: the exact form needs every "
            "layer's preconditioned gradient on every rank (each rank measures its own "
            "examples); use "
            "grad_worker_fraction='comm_opt' (the default) or constraint='kronecker'"
        )
