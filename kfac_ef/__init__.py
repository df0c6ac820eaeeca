"""kfac_ef: Kronecker-factored preconditioning with the empirical Fisher.

precond = KFACPreconditioner(model, damping=1e-3)
loss.backward()
precond.step()        # rewrites p.grad in place
optimizer.step()      # any torch optimizer
"""

from ._options import KFACOptions
from .distributed import DistributedOptions
from .preconditioner import KFACPreconditioner
from .summary import DiagonalSummary, LayerSummary, Summary

__version__ = "0.1.0"

__all__ = [
    "DiagonalSummary",
    "DistributedOptions",
    "KFACOptions",
    "KFACPreconditioner",
    "LayerSummary",
    "Summary",
    "__version__",
]
