"""Compiled Triton kernels on a CUDA device (skipped without one; run by benchmarks/gpu_check.sh).

Run with TRITON_INTERPRET=0: tests/conftest.py switches the interpreter on unless the
variable is set, and interpreted kernels would not test the compiled code.

The kernels are called with backend="triton" (unchecked: the kernel's own result); the
safety net of backend="auto" has its own tests here (every variant passes its first-use
check; launches over CUDA's grid limit). A fallback warning fails any test of this file.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_ef.kernels import (
    disabled_kernels,
    factor_stats,
    precondition_eigen,
    precondition_eigen_with_form,
    precondition_factored,
    verified_kernels,
)
from kfac_ef.kernels._dispatch import GRID_YZ_LIMIT, interpreter_enabled
from kfac_ef.kernels.eigen_precondition import precondition_eigen_triton
from kfac_ef.kernels.factor_stats import factor_stats_triton

from .helpers import seed_preconditioner
from .kernel_checks import (
    assert_within_bound,
    eigen_truth,
    eigenbasis,
    gram_torch,
    gram_truth,
    ill_conditioned_eigenbasis,
)
from .reference import mse_per_example

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("error::kfac_ef.kernels.KernelFallbackWarning"),
]
CUDA = torch.device("cuda")
REL_ATOL = 1e-7


@pytest.fixture(autouse=True)
def _compiled_kernels():
    if interpreter_enabled():
        pytest.fail("TRITON_INTERPRET=1: run the GPU tests with TRITON_INTERPRET=0")
    # The float32 comparisons below are against full-precision float32 GEMMs.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 4099, 1025), (3, 333, 257), (1, 32768, 64), (8, 1000, 33), (64, 77, 10)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("append_ones", [False, True], ids=["plain", "ones"])
def test_factor_stats_cuda_within_bound(dtype, shape, append_ones):
    _check_factor_stats(dtype, shape, append_ones, None)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_factor_stats_cuda_float32_precisions(precision):
    _check_factor_stats(torch.float32, (2, 2049, 300), True, precision)


def _check_factor_stats(dtype, shape, append_ones, precision):
    b, rows, d = shape
    x = torch.randn(b, rows, d, device=CUDA).to(dtype)
    dim = d + append_ones
    f0 = torch.randn(b, dim, dim, device=CUDA)
    f0 = f0 + f0.transpose(1, 2)
    for beta in (0.0, 0.95):
        out = torch.full_like(f0, float("nan")) if beta == 0.0 else f0.clone()
        factor_stats(
            x, out, alpha=0.5, beta=beta, append_ones=append_ones, backend="triton",
            input_precision=precision,
        )  # fmt: skip
        truth = gram_truth(x.cpu(), f0.cpu(), 0.5, beta, append_ones)
        same = gram_torch(x, f0, 0.5, beta, append_ones).cpu()
        assert_within_bound(out.cpu(), same, truth, REL_ATOL)


def test_factor_stats_cuda_split_rows_is_deterministic():
    x = torch.randn(1, 50_000, 48, device=CUDA, dtype=torch.bfloat16)
    outs = []
    for _ in range(2):
        out = torch.empty(1, 49, 49, device=CUDA)
        factor_stats_triton(x, out, alpha=1.0, beta=0.0, append_ones=True, splits=16)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "shape", [(8, 7, 33), (16, 64, 64), (8, 129, 257), (2, 513, 1025)], ids=str
)
@pytest.mark.parametrize("with_scale", [False, True], ids=["eigenvalues", "scale"])
def test_precondition_eigen_cuda_within_bound(shape, with_scale):
    _check_eigen(shape, with_scale, None)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_precondition_eigen_cuda_other_precisions(precision):
    """ieee meets the float32 bound; tf32 (opt-in, 10-bit mantissa) a loose one."""
    _check_eigen((8, 100, 300), False, precision, rel_atol=1e-7 if precision == "ieee" else 1e-2)


@pytest.mark.parametrize("shape", [(8, 7, 33), (16, 64, 64), (8, 129, 257)], ids=str)
@pytest.mark.parametrize("damping", [1e-3, 1e-6])
def test_precondition_eigen_cuda_ill_conditioned(shape, damping):
    """Eigenvalues spread over 1e-8 ... 1e2 (tests/test_kernels_precondition.py's rule)."""
    _check_eigen(shape, False, None, rel_atol=8 * torch.finfo(torch.float32).eps,
                 basis=ill_conditioned_eigenbasis, damping=damping)  # fmt: skip


def _check_eigen(shape, with_scale, precision, rel_atol=REL_ATOL, basis=eigenbasis, damping=1e-3):
    b, m, n = shape
    qg, lg = basis(b, m)
    qa, la = basis(b, n)
    grad = torch.randn(b, m, n)
    scale = torch.rand(b, m, n) if with_scale else None
    cuda = [t.to(CUDA) if t is not None else None for t in (grad, qg, lg, qa, la, scale)]
    got = precondition_eigen(
        *cuda[:5], damping, cuda[5], input_precision=precision, backend="triton"
    )
    truth = eigen_truth(grad, qg, lg, qa, la, damping, scale)
    same = eigen_truth(*cuda[:5], damping, cuda[5], dtype=torch.float32).cpu()
    assert_within_bound(got.cpu(), same, truth, rel_atol)
    if max(m, n) <= 64 and precision is None:  # the tiled path on small blocks too
        tiled = precondition_eigen_triton(*cuda[:5], damping, cuda[5], fused=False)
        assert_within_bound(tiled.cpu(), same, truth, rel_atol)


def test_precondition_factored_cuda_within_bound():
    b, m, n = 32, 24, 57
    ig = torch.linalg.inv(_spd(b, m))
    ia = torch.linalg.inv(_spd(b, n))
    grad = torch.randn(b, m, n)
    got = precondition_factored(grad.to(CUDA), ig.to(CUDA), ia.to(CUDA), backend="triton")
    truth = ig.double() @ grad.double() @ ia.double()
    same = (ig.to(CUDA) @ grad.to(CUDA) @ ia.to(CUDA)).cpu()
    assert_within_bound(got.cpu(), same, truth, REL_ATOL)


def _spd(b, n):
    x = torch.randn(b, n, n + 3)
    return x @ x.transpose(1, 2) / (n + 3) + 0.1 * torch.eye(n)


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, groups=3),
        nn.Tanh(),
        nn.Conv2d(12, 16, 3, stride=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 300),
        nn.Tanh(),
        nn.Linear(300, 300, bias=False),
        nn.Tanh(),
        nn.Linear(300, 300, bias=False),
        nn.Tanh(),
        nn.Linear(300, 10),
    )


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_preconditioner_cuda_triton_matches_cpu_reference(mode):
    torch.manual_seed(0)
    cpu_model = _model()
    gpu_model = _model().to(CUDA)
    gpu_model.load_state_dict(cpu_model.state_dict())
    kw = dict(damping=1e-2, damping_mode=mode, inv_update_steps=2)
    pre_cpu = seed_preconditioner(cpu_model, backend="torch", **kw)
    pre_gpu = seed_preconditioner(gpu_model, backend="triton", **kw)
    for _ in range(3):
        x, y = torch.randn(32, 3, 16, 16), torch.randn(32, 10)
        for model, pre, dev in ((cpu_model, pre_cpu, "cpu"), (gpu_model, pre_gpu, CUDA)):
            model.zero_grad()
            mse_per_example(model(x.to(dev)), y.to(dev)).mean().backward()
            pre.step()
        for (name, p_cpu), p_gpu in zip(cpu_model.named_parameters(), gpu_model.parameters()):
            scale = p_cpu.grad.abs().max().item()
            torch.testing.assert_close(
                p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-4 * scale, msg=name
            )
    for name, (a, g) in pre_cpu.factors().items():
        a_gpu, g_gpu = pre_gpu.factors()[name]
        torch.testing.assert_close(a_gpu.cpu(), a, rtol=1e-4, atol=1e-5 * a.abs().max().item())
        torch.testing.assert_close(g_gpu.cpu(), g, rtol=1e-4, atol=1e-5 * g.abs().max().item())


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_steady_state_step_does_not_synchronize(mode, backend):
    """Statistics (in the hooks) and step() between decompositions: no host-device sync."""
    model = _model().to(CUDA)
    pre = seed_preconditioner(model, damping_mode=mode, inv_update_steps=100, backend=backend)
    x, y = torch.randn(32, 3, 16, 16, device=CUDA), torch.randn(32, 10, device=CUDA)

    def one_step() -> None:
        model.zero_grad(set_to_none=False)
        mse_per_example(model(x), y).mean().backward()
        pre.step()

    # Step 0 decomposes (synchronizes by design); kernels compile; "auto" checks each
    # variant once against the reference (one synchronization per variant).
    for _ in range(2):
        one_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            one_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_auto_first_use_checks_pass_on_cuda():
    """backend="auto": every variant family, at sizes that take the real configurations
    (128-wide tiles, row splits, the tiled and fused eigenbasis paths, ill-conditioned
    eigenbases), passes its first-use check (a failure would warn: an error here); the calls
    after the check launch Triton."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, d in ((4099, 1025), (32768, 64)):
            x = torch.randn(2, rows, d, device=CUDA).to(dtype)
            out = torch.zeros(2, d + 1, d + 1, device=CUDA)
            for beta in (0.0, 0.95, 0.95):
                factor_stats(x, out, alpha=0.5, beta=beta, append_ones=True)
    for b, m, n in ((8, 7, 33), (8, 129, 257), (2, 513, 1025)):
        for basis in (eigenbasis, ill_conditioned_eigenbasis):
            qg, lg = basis(b, m)
            qa, la = basis(b, n)
            args = [t.to(CUDA) for t in (torch.randn(b, m, n), qg, lg, qa, la)]
            scale = torch.rand(b, m, n, device=CUDA)
            eps = torch.logspace(-5, -2, b, device=CUDA)
            for _ in range(2):
                precondition_eigen(*args, 1e-3)
                precondition_eigen(*args, 1e-3, scale)
                precondition_eigen_with_form(*args, eps)
    ig, ia = torch.randn(32, 24, 24, device=CUDA), torch.randn(32, 57, 57, device=CUDA)
    for _ in range(2):
        precondition_factored(torch.randn(32, 24, 57, device=CUDA), ig, ia)
    torch.cuda.synchronize()
    assert not disabled_kernels()
    assert len(verified_kernels()) >= 10, verified_kernels()


def test_launches_beyond_the_grid_limit():
    """More same-shaped blocks than CUDA allows on grid axis 1 (65 535): chunked launches."""
    nb = GRID_YZ_LIMIT + 1000
    x = torch.randn(nb, 3, 5, device=CUDA)
    f0 = torch.randn(nb, 6, 6, device=CUDA)
    for splits in (1, 2):
        out = f0.clone()
        factor_stats_triton(x, out, alpha=0.5, beta=0.9, append_ones=True, splits=splits)
        truth = gram_truth(x.cpu(), f0.cpu(), 0.5, 0.9, True)
        same = gram_torch(x, f0, 0.5, 0.9, True).cpu()
        assert_within_bound(out.cpu(), same, truth, REL_ATOL)
    qg, lg = eigenbasis(nb, 8)
    qa, la = eigenbasis(nb, 9)
    grad = torch.randn(nb, 8, 9)
    cuda = [t.to(CUDA) for t in (grad, qg, lg, qa, la)]
    got = precondition_eigen_triton(*cuda, 1e-3, fused=False)
    truth = eigen_truth(grad, qg, lg, qa, la, 1e-3)
    same = eigen_truth(*cuda, 1e-3, dtype=torch.float32).cpu()
    assert_within_bound(got.cpu(), same, truth, REL_ATOL)
