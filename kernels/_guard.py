"""The safety net around every Triton kernel: fallback on failure, check on first use.

Each public kernel function describes one call as a :class:`Job` (Triton on the real
outputs, Triton on scratch outputs, the reference, the reference in float64 on a few blocks)
and hands it to :func:`run`, which decides what runs:

- **Fallback.** Any exception from the Triton path (compilation: no C compiler, no
  writable cache, out of shared memory; launch: invalid argument) is caught; the call
  returns the reference's result, one :class:`KernelFallbackWarning` names the kernel, its
  variant, the device, the shapes and dtypes and the error, and that variant is disabled on
  that device for the rest of the process (never tried again).
- **First-use check** (``backend="auto"`` only). The first call of each variant on each
  device runs Triton into scratch outputs, the reference into the real ones, and the
  reference in float64 on the first and last block of the batch; Triton's error against the
  float64 result must be at most :data:`CHECK_ERROR_FACTOR` times the reference's own error
  (2¹³ times more for TF32 products, chosen with ``input_precision="tf32"``) plus
  :data:`CHECK_ATOL_EPS` machine epsilons of the output's scale. A mismatch disables
  the variant with a warning. Either way that call returns the reference's result, so state
  updated in place (``factor_stats`` folds β·F into ``out``) is updated exactly once. The
  check synchronizes once (one ``.tolist()``); a check whose float64 result is not finite
  (non-finite inputs) decides nothing and runs again on the next call of the variant.
  ``backend="triton"`` is the user's explicit choice: no check, the fallback still applies.

A variant is the kernel plus whatever selects a different compiled program or host-side
chain (dtypes, fused or tiled path, tile sizes, optional operands, precision), computed on
the host from shapes and arguments without touching tensor data. After the check, a call
costs that key and one dictionary lookup more than the bare launch, and never synchronizes.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from .. import _warn
from ._dispatch import ENV_VAR

# Triton's error against float64 may be this many times the reference's own error ...
CHECK_ERROR_FACTOR = 8.0
# ... plus this many machine epsilons (of the output dtype) times max |float64 result|.
CHECK_ATOL_EPS = 128.0
# Unit of TF32 arithmetic (10 explicit mantissa bits), for input_precision="tf32".
TF32_EPS = 2.0**-10
# Longest error text quoted in a warning (compiler errors run to pages).
_MAX_ERROR_CHARS = 800

_VERIFIED = "verified"
# (kernel, device, variant) -> _VERIFIED, or why the variant is disabled. Absent: not yet
# checked (or, for backend="triton", not yet failed).
_state: dict[tuple[str, str, tuple], str] = {}


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel variant failed or disagreed with its reference; the reference runs
    in its place on that device from now on."""


class PartialLaunchError(RuntimeError):
    """A launcher that writes its result chunk by chunk failed after its first ``done``
    blocks were written (those are complete; the others untouched)."""

    def __init__(self, done: int, cause: BaseException) -> None:
        super().__init__(f"{_describe_error(cause)} (after the first {done} blocks)")
        self.done = done


class Job:
    """One call of a kernel, as the guard sees it. Subclasses live beside their kernel."""

    kernel: str = ""
    batch: int = 0  # blocks in the batch (dimension 0 of every output)

    def variant(self) -> tuple[tuple[str, object], ...]:
        """(name, value) pairs naming the compiled program(s) this call runs."""
        raise NotImplementedError

    def describe(self) -> str:
        """Shapes, dtypes and scalar arguments, for the warning."""
        raise NotImplementedError

    def launch(self) -> Any:
        """Triton, writing the real outputs; returns the call's result."""
        raise NotImplementedError

    def launch_scratch(self) -> tuple[Tensor, ...]:
        """Triton into scratch outputs (real outputs and inputs untouched); the outputs
        to compare, in the order of :meth:`outputs`."""
        raise NotImplementedError

    def truth(self, blocks: list[int]) -> tuple[Tensor, ...]:
        """The reference in float64 on ``blocks`` of the batch, from the inputs and outputs
        as they are before :meth:`reference` runs; in the order of :meth:`outputs`."""
        raise NotImplementedError

    def reference(self) -> Any:
        """The reference, writing the real outputs; returns the call's result."""
        raise NotImplementedError

    def outputs(self, result: Any) -> tuple[Tensor, ...]:
        """The compared outputs of a result of :meth:`reference`."""
        raise NotImplementedError

    def arithmetic_eps(self) -> float | None:
        """Unit of the Triton path's arithmetic when coarser than the output dtype's (TF32
        products on request: ``input_precision="tf32"``), else None."""
        return None

    def recover(self, exc: BaseException) -> Any:
        """The reference after :meth:`launch` raised ``exc`` (default: all of it)."""
        return self.reference()


def run(job: Job, mode: str, device: torch.device) -> Any:
    """Run ``job`` through Triton or the reference; ``mode`` from ``triton_mode``."""
    key = (job.kernel, str(device), job.variant())
    state = _state.get(key)
    if state is not None and state != _VERIFIED:
        return job.reference()
    if mode == "auto" and state is None:
        return _first_use(job, key)
    try:
        return job.launch()
    except Exception as exc:  # noqa: BLE001 (any Triton failure falls back)
        _disable(job, key, f"failed ({_describe_error(exc)})")
        return job.recover(exc)


def disabled_kernels() -> dict[str, str]:
    """Kernel variants disabled in this process: ``"kernel[variant] on device"`` -> why."""
    return {_name(k): why for k, why in _state.items() if why != _VERIFIED}


def verified_kernels() -> list[str]:
    """Kernel variants that passed their first-use check in this process."""
    return [_name(k) for k, why in _state.items() if why == _VERIFIED]


def _reset() -> None:
    """Forget every verdict (tests)."""
    _state.clear()


def _first_use(job: Job, key: tuple[str, str, tuple]) -> Any:
    try:
        got = job.launch_scratch()
    except Exception as exc:  # noqa: BLE001
        _disable(job, key, f"failed ({_describe_error(exc)})")
        return job.reference()
    try:
        blocks = sorted({0, job.batch - 1}) if job.batch > 0 else []
        truth = job.truth(blocks)
    except Exception as exc:  # noqa: BLE001 (e.g. out of memory for the float64 copies)
        _disable(job, key, f"could not be checked on first use ({_describe_error(exc)})")
        return job.reference()
    result = job.reference()
    try:
        verdict = _compare(got, job.outputs(result), truth, blocks, job.arithmetic_eps())
    except Exception as exc:  # noqa: BLE001
        _disable(job, key, f"could not be checked on first use ({_describe_error(exc)})")
        return result
    if verdict == "":
        _state[key] = _VERIFIED
    elif verdict is not None:
        _disable(job, key, f"disagrees with the torch reference on its first use ({verdict})")
    return result


def _compare(
    got: tuple[Tensor, ...],
    same: tuple[Tensor, ...],
    truth: tuple[Tensor, ...],
    blocks: list[int],
    arithmetic_eps: float | None = None,
) -> str | None:
    """The verdict on ``got`` (Triton) against ``truth`` (float64) on ``blocks``, next to
    ``same`` (the reference): an empty string when every output is within the bound, a
    description of the misses when one is not, None when the float64 result is empty or not
    finite (nothing decided).

    A Triton path with coarser arithmetic than the reference (``arithmetic_eps``: TF32
    products) may err that many times more than the reference's error.
    """
    if not blocks:
        return None
    rows, eps = [], []
    for g, s, t in zip(got, same, truth):
        if t.numel() == 0:
            continue
        eps.append(torch.finfo(s.dtype).eps)
        g, s = pick(g, blocks).double(), pick(s, blocks).double()
        rows.append(
            torch.stack(
                [
                    (g - t).abs().max(),
                    (s - t).abs().max(),
                    t.abs().max(),
                    torch.isfinite(t).all().double(),
                ]
            )
        )
    if not rows:
        return None
    stats = torch.stack(rows).tolist()  # the check's one synchronization
    if not all(finite for *_, finite in stats):
        return None
    misses = []
    for i, ((err, ref_err, scale, _), eps_i) in enumerate(zip(stats, eps)):
        factor = CHECK_ERROR_FACTOR * max(1.0, (arithmetic_eps or eps_i) / eps_i)
        bound = factor * ref_err + CHECK_ATOL_EPS * eps_i * scale
        if not err <= bound:  # NaN fails
            misses.append(
                f"output {i}: max error {err:.3g} against float64, bound {bound:.3g} = "
                f"{factor:g} x the reference's {ref_err:.3g} + "
                f"{CHECK_ATOL_EPS:g} eps x max |float64 result| {scale:.3g}"
            )
    return "; ".join(misses)


def pick(t: Tensor, blocks: list[int]) -> Tensor:
    """The ``blocks`` of ``t`` along dimension 0, stacked (slices: no index tensor to copy
    to the device)."""
    return torch.cat([t[b : b + 1] for b in blocks])


def _name(key: tuple[str, str, tuple]) -> str:
    kernel, device, variant = key
    return f"{kernel}[{', '.join(f'{k}={v}' for k, v in variant)}] on {device}"


def _describe_error(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}").strip()
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text


def _disable(job: Job, key: tuple[str, str, tuple], why: str) -> None:
    _state[key] = why
    _warn.warn(
        f"kfac_ef: the Triton kernel {_name(key)} {why}, for {job.describe()}. The torch "
        f"reference ({job.kernel}_reference) runs in its place for this variant on this "
        f"device from now on; training goes on. {ENV_VAR}=torch skips the Triton kernels "
        "altogether. Please report this message.",
        KernelFallbackWarning,
    )
