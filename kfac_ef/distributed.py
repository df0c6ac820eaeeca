"""Data-parallel K-FAC on torch.distributed: the public names. The machinery is in
``kfac_ef._distributed``, whose package docstring describes what is communicated."""

from ._distributed.data_parallel import Distributor
from ._distributed.options import (
    FACTOR_SYNCS,
    GRAD_WORKER_PRESETS,
    DistributedOptions,
    _check_supported,
    check_sharded_run,
    resolve,
    unwrap,
)
from ._distributed.plan import Grid, Plan, grad_workers, lpt

__all__ = [
    "FACTOR_SYNCS",
    "GRAD_WORKER_PRESETS",
    "DistributedOptions",
    "Distributor",
    "Grid",
    "Plan",
    "_check_supported",
    "check_sharded_run",
    "grad_workers",
    "lpt",
    "resolve",
    "unwrap",
]
