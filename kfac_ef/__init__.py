"""kfac_ef: Kronecker-factored preconditioning with the empirical Fisher.

precond = KFACPreconditioner(model)
loss.backward()
precond.step()        # rewrites p.grad in place
optimizer.step()      # any torch optimizer

The seed's loss-change constraint (``target_loss_change``, ``lr``), EKFAC
(``damping_mode="ekfac"``) and the true Fisher (``fisher_type="mc"`` with ``mc_backward``) are
described in docs/empirical_fisher.md.
"""

from ._constraint import LossChangeDiagnostics
from ._coverage import Coverage
from ._options import KFACOptions
from .distributed import DistributedOptions
from .layers.rules import ModuleRule, register_module, unregister_module
from .mc import mc_backward
from .preconditioner import Faults, KFACPreconditioner
from .summary import DiagonalSummary, LayerSummary, Summary

__version__ = "0.1.0"

__all__ = [
    "Coverage",
    "DiagonalSummary",
    "DistributedOptions",
    "Faults",
    "KFACOptions",
    "KFACPreconditioner",
    "LayerSummary",
    "LossChangeDiagnostics",
    "ModuleRule",
    "Summary",
    "__version__",
    "mc_backward",
    "register_module",
    "unregister_module",
]
