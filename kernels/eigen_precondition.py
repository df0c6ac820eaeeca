"""Eigenbasis preconditioning of Kronecker-factored blocks.

For each block b of a batch: with A = Q_A diag(λ_A) Q_Aᵀ, G = Q_G diag(λ_G) Q_Gᵀ and the
gradient matrix ∇ (g_dim × a_dim, torch order), computes

    V = Q_Gᵀ ∇ Q_A,   V ⊘= (λ_G λ_Aᵀ + ε)   (or  V ⊘= (S + ε)  when a scale matrix S is given),
    result = Q_G V Q_Aᵀ,

which is (G⊗A + εI)⁻¹ vec(∇) (resp. the eigenvalue-corrected form) without forming G⊗A.
``precondition_eigen_with_form`` also returns, per block, the quadratic form
Σ_ij K_ij Ṽ_ij² = ∇̃ᵀ C ∇̃ of the result under the undamped curvature
C = (Q_G⊗Q_A) diag(vec K) (Q_G⊗Q_A)ᵀ, K = λ_G λ_Aᵀ (or S), Ṽ = V ⊘ (K + ε) = Q_Gᵀ ∇̃ Q_A: a
sum of non-negative terms over a tensor the chain computes anyway.

Two Triton paths, both covering every block of the batch in each launch (grouped form):

- small blocks (m, n ≤ 64): one program per block runs the whole chain, four products and the
  division, with every operand in registers: one launch for the batch, ∇ read once, the
  result written once, no intermediate in memory (with the form: one more reduction of the
  tile in registers and one value stored per block).
- larger blocks: four launches of one batched GEMM kernel (grid = tiles × blocks), the second
  of which divides its accumulator by λ_G λ_Aᵀ + ε (or S + ε) before storing it, so V makes
  no extra trip through memory and no (B, m, n) matrix of eigenvalue products is formed
  (the form is then one reduction over the stored Ṽ).

float32 operands use ``tl.dot(input_precision="tf32x3")`` by default: three TF32
tensor-core products per multiply, about float32 accuracy at several times the float32 FMA
rate. Other dtypes (float64 factors) run the reference.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ._dispatch import (
    batch_chunks,
    device_guard,
    interpreter_enabled,
    multiprocessors,
    triton_mode,
)
from ._guard import TF32_EPS, Job, pick, run

DEFAULT_PRECISION = "tf32x3"
# Largest padded block side handled by the one-program-per-block kernel (its four operand
# tiles live in registers).
FUSED_MAX = 64

# ---------------------------------------------------------------------------------- kernel
tl: Any = None  # bound by _build(): Triton resolves names through the module's globals


@functools.cache
def _build() -> SimpleNamespace:
    global tl, _eigen_fused_kernel, _eigen_gemm_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _eigen_fused_kernel(
        g_ptr, qg_ptr, lg_ptr, qa_ptr, la_ptr, s_ptr, out_ptr, form_ptr,
        m, n,
        stride_gb, stride_gm, stride_gn,
        stride_qgb, stride_qgr, stride_qgc,
        stride_lgb, stride_lgi,
        stride_qab, stride_qar, stride_qac,
        stride_lab, stride_lai,
        stride_sb, stride_sm, stride_sn,
        stride_ob, stride_om, stride_on,
        stride_fb,
        damping,
        HAS_SCALE: tl.constexpr,
        HAS_FORM: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One program per block b: out = Q_G [(Q_Gᵀ ∇ Q_A) ⊘ (λ_G λ_Aᵀ + ε)] Q_Aᵀ.
        # Padding rows/columns load as 0, so they contribute nothing to the products.
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
        qg_base = qg_ptr + b * stride_qgb
        qg_mask = mm[:, None] & mm[None, :]
        qg = tl.load(qg_base + rm[:, None] * stride_qgr + rm[None, :] * stride_qgc, qg_mask, 0.0)
        qg_t = tl.load(qg_base + rm[:, None] * stride_qgc + rm[None, :] * stride_qgr, qg_mask, 0.0)
        qa_base = qa_ptr + b * stride_qab
        qa_mask = mn[:, None] & mn[None, :]
        qa = tl.load(qa_base + rn[:, None] * stride_qar + rn[None, :] * stride_qac, qa_mask, 0.0)
        qa_t = tl.load(qa_base + rn[:, None] * stride_qac + rn[None, :] * stride_qar, qa_mask, 0.0)

        v = tl.dot(qg_t, grad, input_precision=INPUT_PRECISION)
        v = tl.dot(v, qa, input_precision=INPUT_PRECISION)
        if HAS_SCALE:
            s = tl.load(
                s_ptr + b * stride_sb + rm[:, None] * stride_sm + rn[None, :] * stride_sn,
                mask=mm[:, None] & mn[None, :],
                other=1.0,
            )
            v = v / (s + damping)
            if HAS_FORM:  # Σ S Ṽ² (padding: Ṽ = 0)
                form = tl.sum(tl.sum(s * v * v, axis=1), axis=0)
                tl.store(form_ptr + b * stride_fb, form)
        else:
            lg = tl.load(lg_ptr + b * stride_lgb + rm * stride_lgi, mask=mm, other=1.0)
            la = tl.load(la_ptr + b * stride_lab + rn * stride_lai, mask=mn, other=1.0)
            k = lg[:, None] * la[None, :]
            v = v / (k + damping)
            if HAS_FORM:  # Σ λ_G λ_Aᵀ Ṽ²
                form = tl.sum(tl.sum(k * v * v, axis=1), axis=0)
                tl.store(form_ptr + b * stride_fb, form)
        w = tl.dot(qg, v, input_precision=INPUT_PRECISION)
        w = tl.dot(w, qa_t, input_precision=INPUT_PRECISION)
        tl.store(
            out_ptr + b * stride_ob + rm[:, None] * stride_om + rn[None, :] * stride_on,
            w,
            mask=mm[:, None] & mn[None, :],
        )

    @triton.jit
    def _eigen_gemm_kernel(
        a_ptr, b_ptr, c_ptr, lg_ptr, la_ptr, s_ptr,
        M, N, K,
        stride_ab, stride_am, stride_ak,
        stride_bb, stride_bk, stride_bn,
        stride_cb, stride_cm, stride_cn,
        stride_lgb, stride_lgi,
        stride_lab, stride_lai,
        stride_sb, stride_sm, stride_sn,
        damping,
        EPILOGUE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # C[b] = A[b] B[b] for every b of the batch (grid = (tiles, batch)); transposes are
        # strides. EPILOGUE: 0 stores C; 1 stores C ⊘ (λ_G λ_Aᵀ + ε); 2 stores C ⊘ (S + ε).
        pid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        # Grouped tile order: GROUP_M row tiles sweep the column tiles together, so the
        # programs running at once share their A rows and B columns in L2.
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_size
        pid_n = (pid % in_group) // group_size

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + bid * stride_ab + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + bid * stride_bb + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        mask_m = offs_m[:, None] < M
        mask_n = offs_n[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=mask_m & ((k + offs_k)[None, :] < K), other=0.0)
            b = tl.load(b_ptrs, mask=((k + offs_k)[:, None] < K) & mask_n, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        mask = mask_m & mask_n
        if EPILOGUE == 1:
            lg = tl.load(
                lg_ptr + bid * stride_lgb + offs_m * stride_lgi, mask=offs_m < M, other=1.0
            )
            la = tl.load(
                la_ptr + bid * stride_lab + offs_n * stride_lai, mask=offs_n < N, other=1.0
            )
            acc = acc / (lg[:, None] * la[None, :] + damping)
        elif EPILOGUE == 2:
            s_ptrs = (
                s_ptr + bid * stride_sb + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn
            )
            acc = acc / (tl.load(s_ptrs, mask=mask, other=1.0) + damping)
        c_ptrs = c_ptr + bid * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc, mask=mask)

    return SimpleNamespace(fused=_eigen_fused_kernel, gemm=_eigen_gemm_kernel)


# -------------------------------------------------------------------------------- launcher
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def _gemm_config(m: int, n: int, nb: int, device: torch.device) -> dict[str, int]:
    if interpreter_enabled():
        # Serial numpy programs: large tiles are faster, 64 still tiles the test shapes.
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    bm = 128 if m > 64 else 64
    bn = 128 if n > 64 else 64
    if device.type == "cuda" and nb * _cdiv(m, bm) * _cdiv(n, bn) < multiprocessors(device):
        bm = bn = 64  # too few 128-tiles to fill the GPU: four times as many programs
    warps = 8 if bm * bn > 64 * 64 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, GROUP_M=8, num_warps=warps, num_stages=3)


def triton_supports(grad: Tensor, qg: Tensor, lg: Tensor, qa: Tensor, la: Tensor) -> str | None:
    """Why the Triton kernels do not take these tensors (None when they do)."""
    if any(t.dtype != torch.float32 for t in (grad, qg, lg, qa, la)):
        return "the kernels take float32 operands"
    if max(t.numel() for t in (grad, qg, qa)) > 2**31 - 1:
        return "a tensor has more than 2**31 elements (32-bit offsets)"
    return None


def _gemm(
    kern: Any,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    precision: str,
    epilogue: int = 0,
    lg: Tensor | None = None,
    la: Tensor | None = None,
    scale: Tensor | None = None,
    damping: float = 0.0,
) -> None:
    """c[i] = a[i] @ b[i] (+ the division epilogue) for every i: one launch, or one per
    chunk of ``GRID_YZ_LIMIT`` blocks (the batch sits on grid axis 1)."""
    nb, m, k = a.shape
    n = b.shape[2]
    cfg = _gemm_config(m, n, nb, a.device)
    tiles = _cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"])
    lg_ = lg if lg is not None else c
    la_ = la if la is not None else c
    s_ = scale if scale is not None else c
    lg_strides = lg.stride() if lg is not None else (0, 0)
    la_strides = la.stride() if la is not None else (0, 0)
    s_strides = scale.stride() if scale is not None else (0, 0, 0)
    for start, stop in batch_chunks(nb):
        sl = slice(start, stop)
        kern[(tiles, stop - start)](
            a[sl], b[sl], c[sl], lg_[sl], la_[sl], s_[sl],
            m, n, k,
            *a.stride(), *b.stride(), *c.stride(),
            *lg_strides, *la_strides, *s_strides,
            float(damping),
            EPILOGUE=epilogue, INPUT_PRECISION=precision, **cfg,
        )  # fmt: skip


def precondition_eigen_triton(
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float,
    scale: Tensor | None = None,
    *,
    input_precision: str | None = None,
    fused: bool | None = None,
    out: Tensor | None = None,
    form: Tensor | None = None,
) -> Tensor:
    """Launch the Triton kernels (checked inputs: see ``precondition_eigen``).

    ``fused`` forces (True) or forbids (False) the one-program-per-block kernel; by default
    it runs when both padded block sides are at most ``FUSED_MAX``. ``out`` (float32, shape
    of ``grad``) receives the result when given; ``form`` (float32, ``(B,)``) receives the
    quadratic form of each block when given (see the module docstring).
    """
    reason = triton_supports(grad, qg, lg, qa, la)
    if reason is None and scale is not None and scale.dtype != torch.float32:
        reason = "the kernels take a float32 scale matrix"
    if reason is not None:
        raise ValueError(f"precondition_eigen: the Triton kernels cannot run: {reason}")
    if form is not None and (
        form.shape != (grad.shape[0],) or form.dtype != torch.float32 or form.device != grad.device
    ):
        raise ValueError("precondition_eigen: form must be a float32 tensor of shape (B,)")
    with device_guard(grad.device):
        return _launch(
            _build(), grad, qg, lg, qa, la, damping, scale, input_precision, fused, out, form
        )


def _launch(
    kernels: SimpleNamespace,
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float,
    scale: Tensor | None,
    input_precision: str | None,
    fused: bool | None,
    out: Tensor | None,
    form: Tensor | None = None,
) -> Tensor:
    precision = input_precision or DEFAULT_PRECISION
    nb, m, n = grad.shape
    if out is None:
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    elif out.shape != grad.shape or out.dtype != torch.float32 or out.device != grad.device:
        raise ValueError("precondition_eigen: out must be a float32 tensor shaped like grad")
    if nb == 0 or m == 0 or n == 0:
        if form is not None:
            form.zero_()
        return out
    bm, bn = _pad(m), _pad(n)
    if fused is None:
        fused = max(bm, bn) <= FUSED_MAX
    if fused:
        s_ = scale if scale is not None else grad
        s_strides = scale.stride() if scale is not None else (0, 0, 0)
        f_ = form if form is not None else out
        kernels.fused[(nb,)](
            grad, qg, lg, qa, la, s_, out, f_,
            m, n,
            *grad.stride(), *qg.stride(), *lg.stride(), *qa.stride(), *la.stride(),
            *s_strides, *out.stride(), form.stride(0) if form is not None else 0,
            float(damping),
            HAS_SCALE=scale is not None, HAS_FORM=form is not None, BM=bm, BN=bn,
            INPUT_PRECISION=precision,
            num_warps=4 if max(bm, bn) <= 32 else 8,
        )  # fmt: skip
        return out
    # Four grouped GEMMs; the division rides on the second one's epilogue.
    t = torch.empty_like(grad, memory_format=torch.contiguous_format)
    v = torch.empty_like(t)
    gemm = kernels.gemm
    _gemm(gemm, qg.transpose(1, 2), grad, t, precision)  # T = Q_Gᵀ ∇
    if scale is None:  # V = (T Q_A) ⊘ (λ_G λ_Aᵀ + ε)
        _gemm(gemm, t, qa, v, precision, epilogue=1, lg=lg, la=la, damping=damping)
    else:  # V = (T Q_A) ⊘ (S + ε)
        _gemm(gemm, t, qa, v, precision, epilogue=2, scale=scale, damping=damping)
    if form is not None:
        form.copy_(_form(v, lg, la, scale))
    _gemm(gemm, qg, v, t, precision)  # T = Q_G V
    _gemm(gemm, t, qa.transpose(1, 2), out, precision)  # out = T Q_Aᵀ
    return out


# ------------------------------------------------------------------------------- reference
def _check(
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    scale: Tensor | None,
    damping: float | Tensor = 0.0,
) -> None:
    if grad.dim() != 3:
        raise ValueError(f"precondition_eigen: grad must be (B, m, n), got {tuple(grad.shape)}")
    b, m, n = grad.shape
    expected = {"qg": (b, m, m), "lg": (b, m), "qa": (b, n, n), "la": (b, n)}
    tensors = {"qg": qg, "lg": lg, "qa": qa, "la": la}
    if scale is not None:
        expected["scale"] = (b, m, n)
        tensors["scale"] = scale
    if isinstance(damping, Tensor):
        expected["damping"] = (b,)
        tensors["damping"] = damping
    for name, t in tensors.items():
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"precondition_eigen: {name} has shape {tuple(t.shape)}, expected "
                f"{expected[name]} for a gradient batch of shape {(b, m, n)}"
            )
        if t.device != grad.device:
            raise ValueError(
                f"precondition_eigen: {name} is on {t.device} but grad on {grad.device}"
            )


def _form(v: Tensor, lg: Tensor, la: Tensor, scale: Tensor | None) -> Tensor:
    """Σ_ij K_ij Ṽ_ij² per block from Ṽ ``(B, m, n)``, K = S or λ_G λ_Aᵀ (never formed)."""
    sq = v.square()
    if scale is not None:
        return (scale * sq).sum(dim=(1, 2))
    return (lg.unsqueeze(1) @ sq @ la.unsqueeze(2)).reshape(-1)


def precondition_eigen_reference(
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float | Tensor,
    scale: Tensor | None = None,
    form: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Pure-torch reference: four batched products and one fused division (``form``, when
    given, receives the quadratic form of each block). ``damping``: a number, or one ε per
    block ``(B,)``. ``out`` (optional, shaped like ``grad``, may be ``grad`` itself)
    receives the result. Shapes are not checked here (``precondition_eigen`` does)."""
    eps = damping.view(-1, 1, 1) if isinstance(damping, Tensor) else damping
    v = torch.bmm(torch.bmm(qg.transpose(1, 2), grad), qa)
    v.div_((lg.unsqueeze(2) * la.unsqueeze(1)).add_(eps) if scale is None else scale + eps)
    if form is not None:
        form.copy_(_form(v, lg, la, scale))
    return torch.bmm(torch.bmm(qg, v), qa.transpose(1, 2), out=out)


# ---------------------------------------------------------------------------------- public
def precondition_eigen(
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float | Tensor,
    scale: Tensor | None = None,
    *,
    backend: str = "auto",
    input_precision: str | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Precondition a batch of same-shaped blocks in the Kronecker eigenbasis.

    Args:
        grad: ``(B, m, n)`` gradient matrices, in the dtype of the factors.
        qg, lg: eigenvectors ``(B, m, m)`` and eigenvalues ``(B, m)`` of G.
        qa, la: eigenvectors ``(B, n, n)`` and eigenvalues ``(B, n)`` of A.
        damping: ε added to every eigenvalue product (or to S): a number, or one ε > 0 per
            block, ``(B,)``.
        scale: optional ``(B, m, n)`` matrix S replacing λ_G λ_Aᵀ (EKFAC).
        backend: "auto" (Triton for CUDA tensors when triton imports), "torch" or "triton".
        input_precision: Triton's ``tl.dot`` precision: "tf32x3" (default), "ieee" or
            "tf32".
        out: optional ``(B, m, n)`` tensor (``grad`` itself allowed) that the torch path
            writes the result into; the Triton path returns a new tensor.

    Returns:
        The ``(B, m, n)`` result: ``out`` when the torch path used it, else a new tensor.

    The Triton path takes float32 operands; other dtypes run the reference whatever the
    backend. It runs under the safety net of ``_guard`` (fallback to the reference on
    failure, a first-use check with "auto"); ``KFAC_EF_BACKEND`` overrides ``backend``.
    """
    args = (grad, qg, lg, qa, la, damping, scale)
    return _dispatch(*args, backend=backend, input_precision=input_precision, out=out)


def precondition_eigen_with_form(
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float | Tensor,
    scale: Tensor | None = None,
    *,
    backend: str = "auto",
    input_precision: str | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``precondition_eigen`` and, per block, the quadratic form ∇̃ᵀ C ∇̃ of its result.

    With C = (Q_G⊗Q_A) diag(vec K) (Q_G⊗Q_A)ᵀ the undamped curvature (K = λ_G λ_Aᵀ, or the
    scale S) and Ṽ = V ⊘ (K + ε) = Q_Gᵀ ∇̃ Q_A, ∇̃ᵀ C ∇̃ = Σ_ij K_ij Ṽ_ij²: computed from Ṽ
    in the same chain (same arguments as ``precondition_eigen``).

    Returns:
        The preconditioned ``(B, m, n)`` gradients and the ``(B,)`` forms (dtype of ``grad``).
    """
    form = torch.empty(grad.shape[0], dtype=grad.dtype, device=grad.device)
    args = (grad, qg, lg, qa, la, damping, scale)
    return _dispatch(
        *args, backend=backend, input_precision=input_precision, out=out, form=form
    ), form


def _dispatch(
    grad: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float | Tensor,
    scale: Tensor | None,
    *,
    backend: str,
    input_precision: str | None,
    out: Tensor | None,
    form: Tensor | None = None,
) -> Tensor:
    """Check, then run the reference, or the Triton kernels under the safety net of
    ``_guard`` (``KFAC_EF_BACKEND`` overrides ``backend``)."""
    _check(grad, qg, lg, qa, la, scale, damping)
    mode = triton_mode(backend, grad.device)
    if mode is None or not _triton_takes(grad, qg, lg, qa, la, scale):
        return precondition_eigen_reference(grad, qg, lg, qa, la, damping, scale, form, out)
    job = _EigenJob(grad, qg, lg, qa, la, damping, scale, input_precision, out, form)
    return run(job, mode, grad.device)


class _EigenJob(Job):
    """One ``precondition_eigen(_with_form)`` call for the safety net (kernels/_guard.py)."""

    kernel = "precondition_eigen"

    def __init__(
        self,
        grad: Tensor,
        qg: Tensor,
        lg: Tensor,
        qa: Tensor,
        la: Tensor,
        damping: float | Tensor,
        scale: Tensor | None,
        precision: str | None,
        out: Tensor | None,
        form: Tensor | None,
    ) -> None:
        self.args = (grad, qg, lg, qa, la)
        self.damping, self.scale, self.precision = damping, scale, precision
        self.out, self.form, self.batch = out, form, grad.shape[0]

    def variant(self) -> tuple[tuple[str, object], ...]:
        grad = self.args[0]
        nb, m, n = grad.shape
        bm, bn = _pad(m), _pad(n)
        if max(bm, bn) <= FUSED_MAX:
            path: tuple[tuple[str, object], ...] = (("path", "fused"), ("BM", bm), ("BN", bn))
        else:
            cfg = _gemm_config(m, n, nb, grad.device)
            path = (("path", "tiled"), ("BLOCK_M", cfg["BLOCK_M"]), ("BLOCK_N", cfg["BLOCK_N"]))
        return (
            *path,
            ("scale", self.scale is not None),
            ("form", self.form is not None),
            ("per_block_damping", isinstance(self.damping, Tensor)),
            ("precision", self.precision or DEFAULT_PRECISION),
        )

    def describe(self) -> str:
        names = ("grad", "qg", "lg", "qa", "la", "scale")
        tensors = (*self.args, self.scale)
        shapes = ", ".join(
            f"{k} {tuple(t.shape)} {t.dtype}" for k, t in zip(names, tensors) if t is not None
        )
        eps = f"({self.damping.shape[0]},)" if isinstance(self.damping, Tensor) else self.damping
        return f"{shapes}, damping {eps}"

    def _triton(self, form: Tensor | None) -> Tensor:
        """The Triton kernels (a new tensor); a per-block ε reaches the scalar-ε kernels
        through :func:`_per_block`."""
        grad, qg, lg, qa, la = self.args
        damping, scale, precision = self.damping, self.scale, self.precision
        if not isinstance(damping, Tensor):
            return precondition_eigen_triton(
                grad, qg, lg, qa, la, damping, scale, input_precision=precision, form=form
            )
        lg, scale, d = _per_block(lg, scale, damping)
        result = precondition_eigen_triton(
            grad, qg, lg, qa, la, 1.0, scale, input_precision=precision, form=form
        )
        if form is not None:
            form.div_(d.view(-1))
        return result.div_(d)

    def launch(self) -> Tensor:
        return self._triton(self.form)

    def launch_scratch(self) -> tuple[Tensor, ...]:
        if self.form is None:
            return (self._triton(None),)
        form = torch.full_like(self.form, float("nan"))
        return self._triton(form), form

    def truth(self, blocks: list[int]) -> tuple[Tensor, ...]:
        grad, qg, lg, qa, la = (pick(t, blocks).double() for t in self.args)
        eps = self.damping
        if isinstance(eps, Tensor):
            eps = pick(eps, blocks).double()
        scale = pick(self.scale, blocks).double() if self.scale is not None else None
        form = None
        if self.form is not None:
            form = torch.empty(len(blocks), dtype=torch.float64, device=self.form.device)
        result = precondition_eigen_reference(grad, qg, lg, qa, la, eps, scale, form)
        return (result,) if form is None else (result, form)

    def reference(self) -> Tensor:
        return precondition_eigen_reference(
            *self.args, self.damping, self.scale, self.form, self.out
        )

    def arithmetic_eps(self) -> float | None:
        return TF32_EPS if self.precision == "tf32" else None

    def outputs(self, result: Tensor) -> tuple[Tensor, ...]:
        return (result,) if self.form is None else (result, self.form)


def _per_block(
    lg: Tensor, scale: Tensor | None, damping: Tensor
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-block ε through the scalar-ε kernels: with d_b the block's ε,
    (λ_G/d_b) λ_Aᵀ + 1 = (λ_G λ_Aᵀ + d_b)/d_b (and S/d_b + 1 likewise), so the kernels run with
    ε = 1 on λ_G/d_b (or S/d_b) and their result, d_b times the wanted one, is divided by d_b
    (the quadratic form too: K/d_b · (d_b Ṽ)² = d_b K Ṽ²). Returns the scaled λ_G, scaled
    S and d as ``(B, 1, 1)``."""
    d = damping.to(lg.dtype).view(-1, 1, 1)
    if scale is not None:
        return lg, scale / d, d
    return lg / d.view(-1, 1), None, d


def _triton_takes(
    grad: Tensor, qg: Tensor, lg: Tensor, qa: Tensor, la: Tensor, scale: Tensor | None
) -> bool:
    return triton_supports(grad, qg, lg, qa, la) is None and (
        scale is None or scale.dtype == torch.float32
    )
