"""Kernels of kfac_ef (installed as ``kfac_ef.kernels``).

Each kernel file holds, in this order, the Triton kernel, its launcher, the pure-torch
reference and one public function that dispatches between them (see ``_dispatch``).
Triton is imported on the first launch of a Triton kernel, never at import.
"""

from ._dispatch import check_backend, triton_unavailable_reason, use_triton
from .eigen_precondition import (
    precondition_eigen,
    precondition_eigen_reference,
    precondition_eigen_with_form,
)
from .factor_stats import factor_stats, factor_stats_reference
from .factored_precondition import precondition_factored, precondition_factored_reference

__all__ = [
    "check_backend",
    "factor_stats",
    "factor_stats_reference",
    "precondition_eigen",
    "precondition_eigen_reference",
    "precondition_eigen_with_form",
    "precondition_factored",
    "precondition_factored_reference",
    "triton_unavailable_reason",
    "use_triton",
]
