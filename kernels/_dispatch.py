"""Which implementation runs: the Triton kernel or its pure-torch reference.

Triton is imported lazily, on the first request for a Triton kernel, so a CPU-only install
without triton imports and runs. On the CPU, Triton kernels run only through Triton's
interpreter, which must be switched on (TRITON_INTERPRET=1) before triton is imported.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")

# The Triton implementations exist (see each kernel file); the dispatch point is independent
# of them so that "auto" and "torch" never depend on triton.
TRITON_KERNELS_IMPLEMENTED = True


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: no query per launch)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (None when they can)."""
    if not TRITON_KERNELS_IMPLEMENTED:
        return "this version of kfac_ef ships no Triton kernels yet; use backend='torch' or 'auto'"
    # The device first: probing the import would import triton, and triton must not be
    # imported before TRITON_INTERPRET is set (its own jitted helpers are built at import).
    if not (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())):
        return (
            f"Triton kernels run on CUDA tensors (got device {device}); on the CPU only "
            "through Triton's interpreter, enabled by TRITON_INTERPRET=1 set before triton is "
            "imported. Use backend='torch' or 'auto' here"
        )
    err = _triton_import_error()
    if err is not None:
        return f"triton does not import ({err}); install triton or use backend='torch'"
    return None


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ``ValueError`` if ``backend`` cannot run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend={backend!r}: must be one of {BACKENDS}")
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run: {reason}")


def use_triton(backend: str, device: torch.device) -> bool:
    """Resolve ``backend`` for a tensor on ``device``: True for Triton, False for torch."""
    if backend == "torch":
        return False
    if backend == "triton":
        check_backend(backend, device)
        return True
    # auto: Triton for CUDA tensors when it imports; the reference everywhere else.
    return device.type == "cuda" and triton_unavailable_reason(device) is None
