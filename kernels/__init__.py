"""Kernels of kfac_ef (installed as ``kfac_ef.kernels``).

Each kernel file holds, in this order, the Triton kernel, its launcher, the pure-torch
reference and one public function that dispatches between them (see ``_dispatch``), the
Triton side under the safety net of ``_guard`` (fallback on failure, first-use check).
Triton is imported on the first launch of a Triton kernel, never at import.
"""

from ._dispatch import check_backend, resolve_backend, triton_unavailable_reason, use_triton
from ._guard import KernelFallbackWarning, disabled_kernels, verified_kernels
from .eigen_precondition import (
    precondition_eigen,
    precondition_eigen_reference,
    precondition_eigen_with_form,
)
from .factor_stats import factor_stats, factor_stats_reference
from .factored_precondition import precondition_factored, precondition_factored_reference

__all__ = [
    "KernelFallbackWarning",
    "check_backend",
    "disabled_kernels",
    "factor_stats",
    "factor_stats_reference",
    "precondition_eigen",
    "precondition_eigen_reference",
    "precondition_eigen_with_form",
    "precondition_factored",
    "precondition_factored_reference",
    "resolve_backend",
    "triton_unavailable_reason",
    "use_triton",
    "verified_kernels",
]
