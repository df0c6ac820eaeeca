"""Which implementation runs: the Triton kernel or its pure-torch reference.

Triton is imported lazily, on the first request for a Triton kernel, so a CPU-only install
without triton imports and runs. On the CPU, Triton kernels run only through Triton's
interpreter, which must be switched on (TRITON_INTERPRET=1) before triton is imported.

The environment variable ``KFAC_EF_BACKEND`` (``auto``, ``torch`` or ``triton``) overrides
the ``backend`` argument of every kernel, hence the preconditioner's ``backend`` option: for
users who cannot change the code that builds the preconditioner. It is read on every call
(one dictionary lookup), so it can be changed between runs of a process's phases.

Also here: the launch-grid limit shared by the launchers (:data:`GRID_YZ_LIMIT`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "KFAC_EF_BACKEND"

# The Triton implementations exist (see each kernel file); the dispatch point is independent
# of them so that "auto" and "torch" never depend on triton.
TRITON_KERNELS_IMPLEMENTED = True

# Device types on which "auto" picks Triton. Only CUDA: the interpreter is a test vehicle.
# Tests add "cpu" (with TRITON_INTERPRET=1) to run the code path "auto" takes on CUDA, the
# first-use check included (tests/test_kernels_fallback.py).
AUTO_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

# CUDA limits grid dimensions 1 and 2 to 65 535 programs (dimension 0 to 2**31 - 1); a
# launch beyond fails with "invalid argument". Launchers that put a batch on axis 1 split it
# into chunks of at most this many blocks (see batch_chunks). Read at each launch, so a test
# can lower it.
GRID_YZ_LIMIT = 65535


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


def batch_chunks(nb: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(nb)``, each at most :data:`GRID_YZ_LIMIT`
    long: one launch each when a batch of ``nb`` blocks sits on grid axis 1.

    Chunks start at multiples of 16 (when the limit allows): a slice ``t[start:stop]`` then
    keeps the 16-byte alignment of ``t``'s data pointer, which Triton specializes on, so every
    chunk runs the program the first one compiled.
    """
    limit = GRID_YZ_LIMIT
    step = limit - limit % 16 if limit >= 16 else max(1, limit)
    for start in range(0, nb, step):
        yield start, min(nb, start + step)


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


def resolve_backend(backend: str) -> str:
    """The backend in force: ``KFAC_EF_BACKEND`` when set (non-empty), else ``backend``.

    Raises:
        ValueError: ``backend`` or the variable is not one of :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend={backend!r}: must be one of {BACKENDS}")
    env = os.environ.get(ENV_VAR)
    if not env:
        return backend
    value = env.strip().lower()
    if value not in BACKENDS:
        raise ValueError(
            f"Invalid environment variable {ENV_VAR}={env!r}: must be one of {BACKENDS} "
            f"(it overrides the backend option) or unset"
        )
    return value


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ``ValueError`` if ``backend`` (or ``KFAC_EF_BACKEND``) cannot run on ``device``."""
    resolved = resolve_backend(backend)
    if resolved == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            source = f"{ENV_VAR}=triton" if os.environ.get(ENV_VAR) else "backend='triton'"
            raise ValueError(f"{source} cannot run: {reason}")


def triton_mode(backend: str, device: torch.device) -> str | None:
    """How a kernel call on ``device`` runs: None for the torch reference, "auto" for Triton
    checked once per variant against the reference (kernels/_guard.py), "triton" for Triton
    as the user chose it. ``KFAC_EF_BACKEND`` overrides ``backend``."""
    resolved = resolve_backend(backend)
    if resolved == "torch":
        return None
    if resolved == "triton":
        check_backend(backend, device)
        return "triton"
    # auto: Triton for CUDA tensors when it imports; the reference everywhere else. The
    # device type first: the availability probe imports triton.
    if device.type in AUTO_DEVICE_TYPES and triton_unavailable_reason(device) is None:
        return "auto"
    return None


def use_triton(backend: str, device: torch.device) -> bool:
    """Resolve ``backend`` for a tensor on ``device``: True for Triton, False for torch."""
    return triton_mode(backend, device) is not None
