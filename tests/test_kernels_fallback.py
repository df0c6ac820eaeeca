"""The safety net around the Triton kernels (kernels/_guard.py), through Triton's interpreter.

"auto" picks Triton only for CUDA tensors; the fixture ``auto_on_cpu`` adds the CPU to the
device types "auto" takes Triton on (``_dispatch.AUTO_DEVICE_TYPES``), so that these tests run
the code path a CUDA user gets: the first-use check, then the unchecked launches. Faults are
injected by replacing a jitted kernel in the namespace its launcher launches from
(``_build()``): the launcher, the chunking and the guard all run for real.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from kfac_ef.kernels import (
    KernelFallbackWarning,
    check_backend,
    disabled_kernels,
    factor_stats,
    factor_stats_reference,
    precondition_eigen,
    precondition_eigen_reference,
    precondition_eigen_with_form,
    precondition_factored,
    precondition_factored_reference,
    use_triton,
    verified_kernels,
)

from .helpers import seed_preconditioner, step_once
from .kernel_checks import (
    assert_within_bound,
    eigen_truth,
    eigenbasis,
    gram_torch,
    gram_truth,
    ill_conditioned_eigenbasis,
)
from .reference import mse_per_example

dispatch = importlib.import_module("kfac_ef.kernels._dispatch")
guard = importlib.import_module("kfac_ef.kernels._guard")
stats_module = importlib.import_module("kfac_ef.kernels.factor_stats")
eigen_module = importlib.import_module("kfac_ef.kernels.eigen_precondition")
factored_module = importlib.import_module("kfac_ef.kernels.factored_precondition")

CPU = torch.device("cpu")
REL_ATOL = 1e-7


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No verdict carried between tests, no backend override from the environment."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    guard._reset()
    yield
    guard._reset()


@pytest.fixture
def auto_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "AUTO_DEVICE_TYPES", ("cuda", "cpu"))


class FakeKernel:
    """Stands in for a jitted kernel (``kernel[grid](*args, **meta)``): records every launch's
    grid, runs the real kernel, and can raise instead (``fail_from``: from that launch on) or
    write garbage over one of its output arguments afterwards (``corrupt``: the index)."""

    def __init__(self, kernel: Any, fail_from: int | None = None, corrupt: int | None = None):
        self.kernel, self.fail_from, self.corrupt = kernel, fail_from, corrupt
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: Any, **meta: Any) -> None:
            self.grids.append(tuple(grid))
            if self.fail_from is not None and len(self.grids) > self.fail_from:
                raise RuntimeError("simulated failure: PTX assembly aborted (ptxas exit 255)")
            self.kernel[grid](*args, **meta)
            if self.corrupt is not None:
                args[self.corrupt].add_(0.5)

        return launch


def _fake(monkeypatch, module, attr: str, **kw: Any) -> FakeKernel:
    namespace = module._build()
    fake = FakeKernel(getattr(namespace, attr), **kw)
    monkeypatch.setattr(namespace, attr, fake)
    return fake


def _fallback_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, KernelFallbackWarning)]


@dataclass
class Case:
    """One kernel call: ``call`` runs the public function on fresh copies of the inputs
    (in-place state included) and returns its outputs; ``reference`` the same through the
    reference; the jitted kernel of the path (module, attribute, index of its output
    argument)."""

    name: str
    call: Callable[[str], tuple[torch.Tensor, ...]]
    reference: Callable[[], tuple[torch.Tensor, ...]]
    module: Any
    attr: str
    out_arg: int
    shape_text: str


def _stats_case() -> Case:
    x = torch.randn(3, 45, 20).to(torch.bfloat16)
    f0 = torch.randn(3, 21, 21)
    f0 = f0 + f0.transpose(1, 2)
    kw = dict(alpha=0.3, beta=0.9, append_ones=True)  # folds into the old F: state

    def call(backend: str) -> tuple[torch.Tensor, ...]:
        out = f0.clone()
        return (factor_stats(x, out, backend=backend, **kw),)

    def reference() -> tuple[torch.Tensor, ...]:
        return (factor_stats_reference(x, f0.clone(), **kw),)

    return Case("factor_stats", call, reference, stats_module, "main", 1, "(3, 45, 20)")


def _eigen_case(m: int, n: int, tiled: bool) -> Case:
    qg, lg = eigenbasis(2, m)
    qa, la = eigenbasis(2, n)
    grad = torch.randn(2, m, n)
    eps = torch.tensor([1e-3, 1e-2])

    def call(backend: str) -> tuple[torch.Tensor, ...]:
        g = grad.clone()  # out=g: the torch path writes over its input, as step() asks
        return precondition_eigen_with_form(g, qg, lg, qa, la, eps, backend=backend, out=g)

    def reference() -> tuple[torch.Tensor, ...]:
        form = torch.empty(2)
        return precondition_eigen_reference(grad, qg, lg, qa, la, eps, form=form), form

    attr, out_arg = ("gemm", 2) if tiled else ("fused", 6)
    return Case(
        "precondition_eigen", call, reference, eigen_module, attr, out_arg, f"(2, {m}, {n})"
    )


def _factored_case() -> Case:
    grad, ig, ia = torch.randn(4, 10, 9), torch.randn(4, 10, 10), torch.randn(4, 9, 9)

    def call(backend: str) -> tuple[torch.Tensor, ...]:
        return (precondition_factored(grad, ig, ia, backend=backend),)

    def reference() -> tuple[torch.Tensor, ...]:
        return (precondition_factored_reference(grad, ig, ia),)

    return Case("precondition_factored", call, reference, factored_module, "fused", 3, "(4, 10, 9)")


CASES = {
    "factor_stats": _stats_case,
    "eigen_fused": lambda: _eigen_case(7, 33, tiled=False),
    "eigen_tiled": lambda: _eigen_case(70, 9, tiled=True),
    "factored": _factored_case,
}


def _equal(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


# ------------------------------------------------------------------------ failures


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_failing_kernel_falls_back_once(case, backend, auto_on_cpu, monkeypatch):
    """A kernel that raises (compilation or launch): the reference's result, exactly one
    warning naming the kernel, the shapes and the error, and no retry afterwards. With
    "auto" the failure comes in the first-use check, with "triton" in a plain launch."""
    c = CASES[case]()
    fake = _fake(monkeypatch, c.module, c.attr, fail_from=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _equal(c.call(backend), c.reference())
        launches = len(fake.grids)
        for _ in range(2):
            _equal(c.call(backend), c.reference())
    assert launches == 1 and len(fake.grids) == 1, "a disabled variant was tried again"
    messages = _fallback_warnings(record)
    assert len(messages) == 1, messages
    assert c.name in messages[0] and c.shape_text in messages[0], messages[0]
    assert "simulated failure: PTX assembly aborted" in messages[0]
    assert "on cpu" in messages[0] and "float32" in messages[0]
    assert [k.split("[")[0] for k in disabled_kernels()] == [c.name]


@pytest.mark.parametrize("case", list(CASES))
def test_failure_after_the_check_falls_back(case, auto_on_cpu, monkeypatch):
    """A verified variant that fails later (e.g. a new specialization that does not compile)
    falls back too, and in-place state is folded exactly once."""
    c = CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        _equal(c.call("auto"), c.reference())  # first use: checked, the reference's result
        assert len(verified_kernels()) == 1
        fake = _fake(monkeypatch, c.module, c.attr)
        second = c.call("auto")  # Triton's result now
        assert fake.grids, "the verified variant did not run Triton"
    for got, expected in zip(second, c.reference()):
        assert not torch.equal(got, torch.full_like(got, float("nan")))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    fake.fail_from = len(fake.grids)
    with pytest.warns(KernelFallbackWarning, match=c.name):
        _equal(c.call("auto"), c.reference())


def test_chunked_launch_failing_midway_finishes_the_rest(monkeypatch):
    """A launch split into chunks (grid limit) that fails after the first chunk: the done
    blocks are kept, the others computed by the reference; β F is folded once into each."""
    monkeypatch.setattr(dispatch, "GRID_YZ_LIMIT", 2)
    fake = _fake(monkeypatch, stats_module, "main", fail_from=1)
    x = torch.randn(5, 40, 12)
    f0 = torch.randn(5, 13, 13)
    out = f0.clone()
    with pytest.warns(KernelFallbackWarning, match="after the first 2 blocks"):
        factor_stats(x, out, alpha=0.5, beta=0.9, append_ones=True, backend="triton")
    assert len(fake.grids) == 2
    ref = factor_stats_reference(x[2:], f0[2:].clone(), alpha=0.5, beta=0.9, append_ones=True)
    assert torch.equal(out[2:], ref)
    truth = gram_truth(x, f0, 0.5, 0.9, True)
    assert_within_bound(out, gram_torch(x, f0, 0.5, 0.9, True), truth, REL_ATOL)


# ---------------------------------------------------------------------- first use


@pytest.mark.parametrize("case", list(CASES))
def test_wrong_result_is_caught_on_first_use(case, auto_on_cpu, monkeypatch):
    """A kernel that writes garbage: the first-use check sees it, warns once, returns the
    reference's result (state folded once), and the variant runs the reference afterwards."""
    c = CASES[case]()
    fake = _fake(monkeypatch, c.module, c.attr, corrupt=c.out_arg)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _equal(c.call("auto"), c.reference())
        launches = len(fake.grids)
        for _ in range(2):
            _equal(c.call("auto"), c.reference())
    assert len(fake.grids) == launches > 0
    messages = _fallback_warnings(record)
    assert len(messages) == 1, messages
    assert c.name in messages[0] and "disagrees with the torch reference" in messages[0]
    assert c.shape_text in messages[0]
    assert not verified_kernels()


def test_explicit_triton_backend_is_not_checked(monkeypatch):
    """backend="triton" runs the kernels as chosen (documented): no check, no reference."""
    c = _factored_case()
    _fake(monkeypatch, c.module, c.attr, corrupt=c.out_arg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        (got,) = c.call("triton")
    (expected,) = c.reference()
    torch.testing.assert_close(got, expected + 0.5, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_first_use_check_is_inconclusive_on_non_finite_inputs(auto_on_cpu, monkeypatch):
    """Non-finite inputs decide nothing (no warning, no verdict, the reference's result); the
    next finite call of the variant is checked."""
    x = torch.randn(2, 30, 9)
    x[1, 3, 4] = float("inf")
    out = torch.zeros(2, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        factor_stats(x, out, beta=0.0, append_ones=True, backend="auto")
        assert not verified_kernels() and not disabled_kernels()
        x[1, 3, 4] = 1.0
        factor_stats(x, out, beta=0.0, append_ones=True, backend="auto")
    assert len(verified_kernels()) == 1


def _run_all(backend: str) -> None:
    """Every variant family on well- and ill-conditioned inputs."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for beta in (0.0, 0.95):
            x = torch.randn(2, 70, 40).to(dtype)
            factor_stats(x, torch.randn(2, 41, 41), beta=beta, append_ones=True, backend=backend)
    for m, n in ((7, 33), (70, 9)):
        for basis in (eigenbasis, ill_conditioned_eigenbasis):
            qg, lg = basis(2, m)
            qa, la = basis(2, n)
            grad = torch.randn(2, m, n)
            precondition_eigen(grad, qg, lg, qa, la, 1e-3, backend=backend)
            precondition_eigen(grad, qg, lg, qa, la, 1e-3, torch.rand(2, m, n), backend=backend)
            eps = torch.tensor([1e-3, 1e-5])
            precondition_eigen_with_form(grad, qg, lg, qa, la, eps, backend=backend)
    ig, ia = torch.randn(3, 20, 20), torch.randn(3, 30, 30)
    precondition_factored(torch.randn(3, 20, 30), ig, ia, backend=backend)


def test_correct_kernels_pass_their_first_use_check(auto_on_cpu):
    """No false alarm: every variant passes, each is checked once, later calls launch."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        _run_all("auto")
    verified = verified_kernels()
    # factor_stats: 3 dtypes x 2 betas; eigen: 2 paths x (eigenvalues, scale, form with a
    # per-block ε); factored: 1.
    assert len(verified) == 13, verified
    assert {v.split("[")[0] for v in verified} == {
        "factor_stats",
        "precondition_eigen",
        "precondition_factored",
    }
    assert all(v.endswith("on cpu") for v in verified)
    assert not disabled_kernels()


def test_check_then_plain_launches(auto_on_cpu, monkeypatch):
    """After the check, a call is one launch of the kernel (no reference, no float64)."""
    calls = {"reference": 0}
    original = stats_module.factor_stats_reference

    def counted(*args, **kwargs):
        calls["reference"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(stats_module, "factor_stats_reference", counted)
    fake = _fake(monkeypatch, stats_module, "main")
    x, out = torch.randn(1, 33, 8), torch.zeros(1, 9, 9)
    factor_stats(x, out, beta=0.0, append_ones=True, backend="auto")
    assert len(fake.grids) == 1 and calls["reference"] == 2  # real + float64 truth
    for _ in range(3):
        factor_stats(x, out, beta=0.0, append_ones=True, backend="auto")
    assert len(fake.grids) == 4 and calls["reference"] == 2


# ------------------------------------------------------------------ KFAC_EF_BACKEND


def test_environment_variable_overrides_the_backend(monkeypatch):
    monkeypatch.setenv("KFAC_EF_BACKEND", "torch")
    assert not use_triton("triton", CPU)
    check_backend("triton", CPU)  # would raise without the interpreter; torch runs anywhere
    monkeypatch.setenv("KFAC_EF_BACKEND", " Triton ")  # case and spaces do not matter
    assert use_triton("torch", CPU)
    monkeypatch.setenv("KFAC_EF_BACKEND", "auto")
    assert not use_triton("triton", CPU)  # auto: not on the CPU
    monkeypatch.setenv("KFAC_EF_BACKEND", "")  # empty: unset
    assert use_triton("triton", CPU) and not use_triton("torch", CPU)


def test_environment_variable_reaches_every_kernel(monkeypatch):
    """KFAC_EF_BACKEND=torch: no kernel launches even with backend="triton"; =triton:
    every kernel launches with backend="torch"."""
    fakes = [
        _fake(monkeypatch, stats_module, "main"),
        _fake(monkeypatch, eigen_module, "fused"),
        _fake(monkeypatch, factored_module, "fused"),
    ]
    calls = [CASES[name]() for name in ("factor_stats", "eigen_fused", "factored")]
    monkeypatch.setenv("KFAC_EF_BACKEND", "torch")
    for c in calls:
        _equal(c.call("triton"), c.reference())
    assert not any(f.grids for f in fakes)
    monkeypatch.setenv("KFAC_EF_BACKEND", "triton")
    for c in calls:
        c.call("torch")
    assert all(f.grids for f in fakes)


def test_invalid_environment_variable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KFAC_EF_BACKEND", "cuda")
    for fn in (lambda: check_backend("auto", CPU), lambda: use_triton("torch", CPU)):
        with pytest.raises(ValueError, match="KFAC_EF_BACKEND='cuda'"):
            fn()
    with pytest.raises(ValueError, match="KFAC_EF_BACKEND"):
        factor_stats(torch.randn(1, 3, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="KFAC_EF_BACKEND='cuda'"):
        seed_preconditioner(nn.Linear(3, 2))


def test_environment_triton_without_interpreter_names_the_variable(monkeypatch):
    monkeypatch.setenv("KFAC_EF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="KFAC_EF_BACKEND=triton cannot run"):
        seed_preconditioner(nn.Linear(3, 2), backend="torch")
    monkeypatch.delenv("KFAC_EF_BACKEND")
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        check_backend("triton", CPU)


# --------------------------------------------------------------------- grid limits


def test_batch_chunks_respect_the_limit_and_keep_alignment(monkeypatch):
    monkeypatch.setattr(dispatch, "GRID_YZ_LIMIT", 40)
    assert list(dispatch.batch_chunks(70)) == [(0, 32), (32, 64), (64, 70)]
    monkeypatch.setattr(dispatch, "GRID_YZ_LIMIT", 3)
    assert list(dispatch.batch_chunks(7)) == [(0, 3), (3, 6), (6, 7)]
    assert list(dispatch.batch_chunks(0)) == []
    monkeypatch.setattr(dispatch, "GRID_YZ_LIMIT", 65535)
    assert list(dispatch.batch_chunks(65536)) == [(0, 65520), (65520, 65536)]


@pytest.mark.parametrize("splits", [1, 3])
def test_factor_stats_grid_chunks(splits, monkeypatch):
    """The batch on grid axis 1: with the limit lowered to 2, five blocks take three launches
    (each kernel), no grid axis 1 or 2 over the limit, and the result is unchanged."""
    monkeypatch.setattr(dispatch, "GRID_YZ_LIMIT", 2)
    main = _fake(monkeypatch, stats_module, "main")
    reduce = _fake(monkeypatch, stats_module, "reduce")
    x = torch.randn(5, 203, 50).to(torch.bfloat16)
    f0 = torch.randn(5, 51, 51)
    out = f0.clone()
    stats_module.factor_stats_triton(
        x, out, alpha=1.5, beta=0.9, append_ones=True, block=16, splits=splits
    )
    assert [g[1] for g in main.grids] == [2, 2, 1]
    assert all(max(g[1:]) <= 2 for g in main.grids + reduce.grids)
    assert len(reduce.grids) == (3 if splits > 1 else 0)
    if splits > 1:
        assert main.grids[0][2] == 2  # the splits sit on axis 2, clamped to the limit too
    truth = gram_truth(x, f0, 1.5, 0.9, True)
    assert_within_bound(out, gram_torch(x, f0, 1.5, 0.9, True), truth, REL_ATOL)


@pytest.mark.parametrize("with_scale", [False, True], ids=["eigenvalues", "scale"])
def test_eigen_tiled_grid_chunks(with_scale, monkeypatch):
    """The tiled eigenbasis path puts the batch on grid axis 1: chunked the same way."""
    monkeypatch.setattr(dispatch, "GRID_YZ_LIMIT", 2)
    gemm = _fake(monkeypatch, eigen_module, "gemm")
    b, m, n = 5, 20, 70
    qg, lg = eigenbasis(b, m)
    qa, la = eigenbasis(b, n)
    grad = torch.randn(b, m, n)
    scale = torch.rand(b, m, n) if with_scale else None
    form = torch.full((b,), float("nan"))
    got = eigen_module.precondition_eigen_triton(
        grad, qg, lg, qa, la, 1e-3, scale, fused=False, form=form
    )
    assert len(gemm.grids) == 4 * 3 and all(g[1] <= 2 for g in gemm.grids)
    truth = eigen_truth(grad, qg, lg, qa, la, 1e-3, scale)
    same = eigen_truth(grad, qg, lg, qa, la, 1e-3, scale, dtype=torch.float32)
    assert_within_bound(got, same, truth, REL_ATOL)
    ref_form = torch.empty(b)
    precondition_eigen_reference(grad, qg, lg, qa, la, 1e-3, scale, form=ref_form)
    torch.testing.assert_close(form, ref_form, rtol=1e-5, atol=0)


def test_one_program_per_block_kernels_keep_the_batch_on_axis_0(monkeypatch):
    monkeypatch.setattr(dispatch, "GRID_YZ_LIMIT", 2)
    fused = _fake(monkeypatch, eigen_module, "fused")
    factored = _fake(monkeypatch, factored_module, "fused")
    qg, lg = eigenbasis(5, 7)
    qa, la = eigenbasis(5, 9)
    grad = torch.randn(5, 7, 9)
    eigen_module.precondition_eigen_triton(grad, qg, lg, qa, la, 1e-3)
    factored_module.precondition_factored_triton(grad, qg, qa)
    assert fused.grids == [(5,)] and factored.grids == [(5,)]


# ----------------------------------------------------------------- whole preconditioner


class _Net(nn.Module):
    """A grouped conv (fused kernels) and linears wider than 64 (tiled path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(4 * 5 * 5, 70)
        self.fc2 = nn.Linear(70, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("fault", ["none", "garbage"])
def test_preconditioner_auto_backend_through_the_safety_net(fault, auto_on_cpu, monkeypatch):
    """The preconditioner with backend="auto" on the code path of a CUDA user: each variant
    checked on its first step, then launched; its steps match backend="torch". With kernels
    that write garbage, every variant is disabled with one warning on its first use and the
    steps are the reference's, bit for bit. (The tolerance is the GPU test's: the step that
    decomposes factors accumulated by different kernels amplifies their last-bit differences
    through these rank-deficient factors.)"""
    if fault == "garbage":
        _fake(monkeypatch, stats_module, "main", corrupt=1)
        _fake(monkeypatch, eigen_module, "fused", corrupt=6)
        _fake(monkeypatch, eigen_module, "gemm", corrupt=2)
    torch.manual_seed(4)
    models = {b: _Net() for b in ("torch", "auto")}
    models["auto"].load_state_dict(models["torch"].state_dict())
    pres = {
        b: seed_preconditioner(m, damping=1e-2, inv_update_steps=2, backend=b)
        for b, m in models.items()
    }
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            x, y = torch.randn(16, 2, 5, 5), torch.randn(16, 3)
            after = {b: step_once(models[b], pres[b], mse_per_example, x, y)[1] for b in models}
            for name, g in after["torch"].items():
                if fault == "garbage":
                    assert torch.equal(after["auto"][name], g), name
                else:
                    scale = g.abs().max().item()
                    torch.testing.assert_close(
                        after["auto"][name], g, rtol=1e-3, atol=1e-4 * scale, msg=name
                    )
            with torch.no_grad():  # the same parameters for the next step
                for m in models.values():
                    for name, p in m.named_parameters():
                        p.sub_(0.05 * after["torch"][name])
    messages = _fallback_warnings(record)
    if fault == "none":
        assert not messages and not disabled_kernels() and verified_kernels()
    else:
        assert len(messages) == len(disabled_kernels()) > 0 and not verified_kernels()
