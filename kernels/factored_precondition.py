"""Factored ("pi") preconditioning of Kronecker-factored blocks.

For each block b of a batch, with the damped inverses I_G = (G + c_G I)⁻¹ (m × m) and
I_A = (A + c_A I)⁻¹ (n × n) and the gradient matrix ∇ (m × n, torch order):

    result = I_G ∇ I_A.

The Triton kernel handles small blocks (both padded sides ≤ 64, e.g. the groups of a
grouped conv or narrow layers): one program per block computes both products with all
three operands in registers, so the batch takes one launch, reads ∇ once, writes the result
once, and the intermediate I_G ∇ never reaches memory. Larger blocks keep the two batched
cuBLAS products of the reference: the chain is two plain GEMMs with nothing between them to
fuse, its arithmetic intensity (about (m + n)/4 FLOP per byte of the intermediate's round
trip) makes it compute-bound from a few hundred columns on, and a Triton GEMM does not beat
cuBLAS at the same precision (docs/kernels.md has the numbers and the reasoning).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ._dispatch import device_guard, triton_mode
from ._guard import TF32_EPS, Job, pick, run

DEFAULT_PRECISION = "tf32x3"
FUSED_MAX = 64  # largest padded block side of the one-program-per-block kernel

# ---------------------------------------------------------------------------------- kernel
tl: Any = None  # bound by _build(): Triton resolves names through the module's globals


@functools.cache
def _build() -> SimpleNamespace:
    global tl, _factored_fused_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _factored_fused_kernel(
        g_ptr, ig_ptr, ia_ptr, out_ptr,
        m, n,
        stride_gb, stride_gm, stride_gn,
        stride_igb, stride_igr, stride_igc,
        stride_iab, stride_iar, stride_iac,
        stride_ob, stride_om, stride_on,
        BM: tl.constexpr,
        BN: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One program per block b: out = I_G ∇ I_A; padding loads as 0.
        b = tl.program_id(0).to(tl.int64)
        rm = tl.arange(0, BM)
        rn = tl.arange(0, BN)
        mm = rm < m
        mn = rn < n
        grad = tl.load(
            g_ptr + b * stride_gb + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
            mask=mm[:, None] & mn[None, :],
            other=0.0,
        )
        ig = tl.load(
            ig_ptr + b * stride_igb + rm[:, None] * stride_igr + rm[None, :] * stride_igc,
            mask=mm[:, None] & mm[None, :],
            other=0.0,
        )
        ia = tl.load(
            ia_ptr + b * stride_iab + rn[:, None] * stride_iar + rn[None, :] * stride_iac,
            mask=mn[:, None] & mn[None, :],
            other=0.0,
        )
        w = tl.dot(ig, grad, input_precision=INPUT_PRECISION)
        w = tl.dot(w, ia, input_precision=INPUT_PRECISION)
        tl.store(
            out_ptr + b * stride_ob + rm[:, None] * stride_om + rn[None, :] * stride_on,
            w,
            mask=mm[:, None] & mn[None, :],
        )

    return SimpleNamespace(fused=_factored_fused_kernel)


# -------------------------------------------------------------------------------- launcher
def _pad(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def triton_supports(grad: Tensor, ig: Tensor, ia: Tensor) -> str | None:
    """Why the Triton kernel does not take these tensors (None when it does)."""
    if any(t.dtype != torch.float32 for t in (grad, ig, ia)):
        return "the kernel takes float32 operands"
    m, n = grad.shape[1], grad.shape[2]
    if max(_pad(m), _pad(n)) > FUSED_MAX:
        return f"blocks of {m} x {n} exceed the fused kernel's {FUSED_MAX} x {FUSED_MAX}"
    if max(t.numel() for t in (grad, ig, ia)) > 2**31 - 1:
        return "a tensor has more than 2**31 elements (32-bit offsets)"
    return None


def precondition_factored_triton(
    grad: Tensor,
    ig: Tensor,
    ia: Tensor,
    *,
    input_precision: str | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Launch the fused kernel (checked inputs: see ``precondition_factored``)."""
    reason = triton_supports(grad, ig, ia)
    if reason is not None:
        raise ValueError(f"precondition_factored: the Triton kernel cannot run: {reason}")
    kernels = _build()
    nb, m, n = grad.shape
    if out is None:
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    elif out.shape != grad.shape or out.dtype != torch.float32 or out.device != grad.device:
        raise ValueError("precondition_factored: out must be a float32 tensor shaped like grad")
    if nb == 0 or m == 0 or n == 0:
        return out
    bm, bn = _pad(m), _pad(n)
    with device_guard(grad.device):
        kernels.fused[(nb,)](
            grad, ig, ia, out,
            m, n,
            *grad.stride(), *ig.stride(), *ia.stride(), *out.stride(),
            BM=bm, BN=bn, INPUT_PRECISION=input_precision or DEFAULT_PRECISION,
            num_warps=4 if max(bm, bn) <= 32 else 8,
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------------- reference
def _check(grad: Tensor, ig: Tensor, ia: Tensor) -> None:
    if grad.dim() != 3:
        raise ValueError(f"precondition_factored: grad must be (B, m, n), got {tuple(grad.shape)}")
    b, m, n = grad.shape
    for name, t, shape in (("ig", ig, (b, m, m)), ("ia", ia, (b, n, n))):
        if tuple(t.shape) != shape:
            raise ValueError(
                f"precondition_factored: {name} has shape {tuple(t.shape)}, expected {shape} "
                f"for a gradient batch of shape {(b, m, n)}"
            )
        if t.device != grad.device:
            raise ValueError(
                f"precondition_factored: {name} is on {t.device} but grad on {grad.device}"
            )


def precondition_factored_reference(grad: Tensor, ig: Tensor, ia: Tensor) -> Tensor:
    """Pure-torch reference: two batched products."""
    return ig @ grad @ ia


# ---------------------------------------------------------------------------------- public
def precondition_factored(
    grad: Tensor,
    ig: Tensor,
    ia: Tensor,
    *,
    backend: str = "auto",
    input_precision: str | None = None,
) -> Tensor:
    """I_G ∇ I_A for a batch of same-shaped blocks (the "pi" damping mode).

    Args:
        grad: ``(B, m, n)`` gradient matrices.
        ig: ``(B, m, m)`` damped inverses of G.
        ia: ``(B, n, n)`` damped inverses of A.
        backend: "auto" (Triton for CUDA tensors when triton imports), "torch" or "triton".
        input_precision: Triton's ``tl.dot`` precision: "tf32x3" (default), "ieee" or
            "tf32".

    Returns:
        A new ``(B, m, n)`` tensor.

    The Triton kernel takes float32 blocks with both padded sides ≤ 64; other blocks and
    dtypes run the reference (two batched cuBLAS products on a GPU) whatever the backend.
    The kernel runs under the safety net of ``_guard`` (fallback to the reference on failure,
    a first-use check with "auto"); ``KFAC_EF_BACKEND`` overrides ``backend``.
    """
    _check(grad, ig, ia)
    mode = triton_mode(backend, grad.device)
    if mode is None or triton_supports(grad, ig, ia) is not None:
        return precondition_factored_reference(grad, ig, ia)
    return run(_FactoredJob(grad, ig, ia, input_precision), mode, grad.device)


class _FactoredJob(Job):
    """One ``precondition_factored`` call for the safety net (kernels/_guard.py)."""

    kernel = "precondition_factored"

    def __init__(self, grad: Tensor, ig: Tensor, ia: Tensor, precision: str | None) -> None:
        self.args = (grad, ig, ia)
        self.precision, self.batch = precision, grad.shape[0]

    def variant(self) -> tuple[tuple[str, object], ...]:
        m, n = self.args[0].shape[1:]
        return (
            ("BM", _pad(m)),
            ("BN", _pad(n)),
            ("precision", self.precision or DEFAULT_PRECISION),
        )

    def describe(self) -> str:
        names = ("grad", "ig", "ia")
        return ", ".join(f"{k} {tuple(t.shape)} {t.dtype}" for k, t in zip(names, self.args))

    def launch(self) -> Tensor:
        return precondition_factored_triton(*self.args, input_precision=self.precision)

    def launch_scratch(self) -> tuple[Tensor, ...]:
        return (self.launch(),)

    def truth(self, blocks: list[int]) -> tuple[Tensor, ...]:
        return (precondition_factored_reference(*(pick(t, blocks).double() for t in self.args)),)

    def reference(self) -> Tensor:
        return precondition_factored_reference(*self.args)

    def arithmetic_eps(self) -> float | None:
        return TF32_EPS if self.precision == "tf32" else None

    def outputs(self, result: Tensor) -> tuple[Tensor, ...]:
        return (result,)
