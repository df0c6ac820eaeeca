"""Backend dispatch, lazy import of triton, and the whole preconditioner on the Triton backend."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from kfac_ef import KFACPreconditioner
from kfac_ef.kernels import check_backend, use_triton

from .helpers import seed_preconditioner, step_once
from .reference import mse_per_example

# Kernel failures fall back to the reference with this warning: here it would hide the bug.
pytestmark = pytest.mark.filterwarnings("error::kfac_ef.kernels.KernelFallbackWarning")

CPU = torch.device("cpu")
# The package re-exports functions named like their modules: fetch the modules themselves.
eigen_module = importlib.import_module("kfac_ef.kernels.eigen_precondition")
factor_stats_module = importlib.import_module("kfac_ef.kernels.factor_stats")
factored_module = importlib.import_module("kfac_ef.kernels.factored_precondition")


def _run_python(code: str, env_interpret: str | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if env_interpret is not None:
        env["TRITON_INTERPRET"] = env_interpret
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_triton_is_imported_lazily():
    """Importing kfac_ef and stepping on the CPU with backend "auto" never imports triton."""
    res = _run_python(
        """
        import sys, torch
        from torch import nn
        from kfac_ef import KFACPreconditioner
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        pre = KFACPreconditioner(model, inv_update_steps=1)
        model(torch.randn(5, 3)).pow(2).mean().backward()
        pre.step()
        assert "triton" not in sys.modules, "triton was imported"
        print("ok")
        """
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_without_triton_auto_and_torch_work_and_triton_is_a_clear_error():
    res = _run_python(
        """
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        from torch import nn
        from kfac_ef import KFACPreconditioner
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        for backend in ("auto", "torch"):
            pre = KFACPreconditioner(model, backend=backend, inv_update_steps=1)
            model(torch.randn(5, 3)).pow(2).mean().backward()
            pre.step()
            pre.remove()
        try:
            KFACPreconditioner(model, backend="triton")
        except ValueError as exc:
            assert "triton does not import" in str(exc), exc
            print("ok")
        """,
        env_interpret="1",
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_use_triton_resolution(monkeypatch):
    assert not use_triton("auto", CPU)
    assert not use_triton("torch", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        use_triton("triton", CPU)
    with pytest.raises(ValueError, match="Invalid backend"):
        check_backend("cuda", CPU)


class _OddNet(nn.Module):
    """Odd widths, a grouped conv, bias-free layers and two same-shaped layers (one bucket).

    Blocks: conv1 3 × (2, 10) and conv2 (10, 54) take the fused one-program-per-block
    kernels; the linears (67, 91), 2 × (67, 67), (5, 68) the tiled ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, groups=3)
        self.conv2 = nn.Conv2d(6, 10, 3, stride=2, bias=False)
        self.fc1 = nn.Linear(90, 67)
        self.fc2 = nn.Linear(67, 67, bias=False)
        self.fc3 = nn.Linear(67, 67, bias=False)
        self.fc4 = nn.Linear(67, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x)).flatten(1)
        x = torch.tanh(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        x = torch.tanh(self.fc3(x))
        return self.fc4(x)


def _count_launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count calls of the Triton launchers (the public functions look them up per call)."""
    counts: dict[str, int] = {}
    for module, name in (
        (factor_stats_module, "factor_stats_triton"),
        (eigen_module, "precondition_eigen_triton"),
        (factored_module, "precondition_factored_triton"),
    ):
        original = getattr(module, name)

        def counted(*args, __original=original, __name=name, **kwargs):
            counts[__name] = counts.get(__name, 0) + 1
            return __original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


LR = 0.05


def _close_to_truth(got: dict, ref: dict, truth: dict, what: str) -> None:
    """Triton's result is as close to the float64 truth as the float32 torch reference is.

    The bound is dtype-aware, not bit-level: the two float32 runs decompose factors that
    differ in their last bits, and where a factor is ill-conditioned or rank-deficient
    (6 examples here) their eigenbases differ by much more than that, in the same way for
    both; so each is compared with the float64 run: Triton's error may be at most 4 times
    the reference's, plus 1e-5 of the gradient's scale.
    """
    for name, t in truth.items():
        scale = float(t.abs().max())
        err_ref = float((ref[name].double() - t).abs().max())
        err_got = float((got[name].double() - t).abs().max())
        assert err_got <= 4 * err_ref + 1e-5 * scale, (
            f"{name} {what}: Triton off by {err_got:.3g}, torch by {err_ref:.3g} "
            f"(scale {scale:.3g})"
        )


def _float64_twin(model: nn.Module, **options) -> tuple[nn.Module, KFACPreconditioner]:
    twin = copy.deepcopy(model).double()
    options = {**options, "backend": "torch", "factor_dtype": torch.float64}
    return twin, seed_preconditioner(twin, **options)


def _sync_twin(twin: nn.Module, model: nn.Module) -> None:
    """The float64 twin continues from the float32 model's parameters."""
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters()):
            p.copy_(q)


def _constraint(constraint: str) -> dict:
    """Options of the loss-change constraint (none: no options)."""
    if constraint == "none":
        return {}
    return dict(constraint=constraint, target_loss_change=1e-3, loss_change_unit="absolute", lr=LR)


def _same_scale(pres: dict, constraint: str, truth: KFACPreconditioner) -> float:
    """The backends' ν agree (as close to the float64 run's as each other) and meet the
    target; returns the torch one (1: no constraint)."""
    if constraint == "none":
        return 1.0
    d = {b: pre.diagnostics() for b, pre in pres.items()}
    nu64 = truth.diagnostics().nu
    err_ref, err_got = abs(d["torch"].nu - nu64), abs(d["triton"].nu - nu64)
    assert err_got <= 4 * err_ref + 1e-5 * nu64, (d["triton"].nu, d["torch"].nu, nu64)
    form = "kronecker" if constraint == "kronecker" else "exact"
    assert getattr(d["triton"], form) == pytest.approx(1e-3, rel=1e-4)
    return d["torch"].nu


@pytest.mark.parametrize(
    ("mode", "constraint"),
    [
        ("exact", "none"),
        ("pi", "none"),
        ("exact", "kronecker"),  # the form from the kernels' Ṽ (fused and tiled)
        ("ekfac", "kronecker"),  # with the scale S in place of λ_G λ_Aᵀ
        ("pi", "exact"),  # ν scales the kernels' output
    ],
)
def test_preconditioner_triton_backend_matches_torch(mode, constraint, monkeypatch):
    torch.manual_seed(1)
    launches = _count_launches(monkeypatch)
    models = {b: _OddNet() for b in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    # EKFAC measures S per eigenvector: in a degenerate eigenspace of these rank-deficient
    # factors (6 examples) the basis is arbitrary, and a batch with components outside the
    # factors' range gets a basis-dependent S; with a decomposition every step the batch is
    # in the range of factors that hold it, where S does not depend on that choice.
    inv = 1 if mode == "ekfac" else 2
    options = dict(damping=1e-2, damping_mode=mode, inv_update_steps=inv, **_constraint(constraint))
    pres = {b: seed_preconditioner(m, backend=b, **options) for b, m in models.items()}
    twin, pre64 = _float64_twin(models["torch"], **options)
    for step in range(3):  # decompositions on steps 0 and 2, step 1 reuses them
        x, y = torch.randn(6, 3, 7, 7), torch.randn(6, 5)
        after = {}
        for b in models:
            _, after[b] = step_once(models[b], pres[b], mse_per_example, x, y)
        _, truth = step_once(twin, pre64, mse_per_example, x.double(), y.double())
        _close_to_truth(after["triton"], after["torch"], truth, f"step {step}")
        factors_triton = pres["triton"].factors()
        for name, (a, g) in pres["torch"].factors().items():
            torch.testing.assert_close(factors_triton[name][0], a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(factors_triton[name][1], g, rtol=1e-5, atol=1e-6)
        nu = _same_scale(pres, constraint, pre64)
        # Keep the two models' parameters identical for the next step (on the trajectory of
        # the unconstrained step, whose conditioning the tolerances above were set for).
        for m in models.values():
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(LR / nu * after["torch"][_param_name(m, p)])
        _sync_twin(twin, models["torch"])
    # Every layer's two statistics, every step, and each bucket's preconditioning ran Triton
    # (in "pi" mode only the small-block buckets: conv1 and conv2).
    assert launches["factor_stats_triton"] == 3 * 2 * 6
    name = "precondition_factored_triton" if mode == "pi" else "precondition_eigen_triton"
    assert launches[name] == 3 * (2 if mode == "pi" else 5)


class _TokenNet(nn.Module):
    """Structured factors beside dense ones: an embedding (diagonal A, dense G 9), fc1
    (dense 10 × 10: a dense bucket), fc2 (G 70 block-diagonal: 5 blocks of 14) and fc3
    (A 71 block-diagonal: 5 blocks of 15) under max_factor_dim=32, large_factor_block=16."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(23, 9)
        self.fc1 = nn.Linear(9, 9)
        self.fc2 = nn.Linear(9, 70)
        self.fc3 = nn.Linear(70, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.fc1(self.emb(idx)))
        return self.fc3(torch.tanh(self.fc2(x))).sum(1)


@pytest.mark.parametrize(
    ("mode", "constraint"), [("exact", "none"), ("pi", "none"), ("ekfac", "kronecker")]
)
def test_structured_factors_triton_backend_matches_torch(mode, constraint, monkeypatch):
    """Dense statistics (block-diagonal ones included) and dense buckets go through the
    kernels, diagonal and block-diagonal buckets through torch; the two backends agree
    (EKFAC's scale and the constraint's Kronecker form included)."""
    torch.manual_seed(3)
    launches = _count_launches(monkeypatch)
    models = {b: _TokenNet() for b in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    options = dict(
        damping=1e-2,
        damping_mode=mode,
        inv_update_steps=1,
        max_factor_dim=32,
        large_factor_block=16,
        **_constraint(constraint),
    )
    pres = {b: seed_preconditioner(m, backend=b, **options) for b, m in models.items()}
    twin, pre64 = _float64_twin(models["torch"], **options)
    kinds = {s.name: (s.a_factor, s.g_factor) for s in pres["torch"].summary().layers}
    assert kinds == {
        "emb": ("diagonal", "dense"),
        "fc1": ("dense", "dense"),
        "fc2": ("dense", "5 blocks of 14"),
        "fc3": ("5 blocks of 15", "dense"),
    }
    for step in range(2):
        idx, y = torch.randint(0, 23, (6, 4)), torch.randn(6, 5)
        after = {b: step_once(models[b], pres[b], mse_per_example, idx, y)[1] for b in models}
        _, truth = step_once(twin, pre64, mse_per_example, idx, y.double())
        _close_to_truth(after["triton"], after["torch"], truth, f"step {step}")
        factors_triton = pres["triton"].factors()
        for name, (a, g) in pres["torch"].factors().items():
            torch.testing.assert_close(factors_triton[name][0], a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(factors_triton[name][1], g, rtol=1e-5, atol=1e-6)
        _same_scale(pres, constraint, pre64)
    # Statistics: every factor but the embedding's diagonal A (token counts), per step.
    # Preconditioning: only fc1's bucket is dense, one launch per step.
    assert launches["factor_stats_triton"] == 2 * 7
    name = "precondition_factored_triton" if mode == "pi" else "precondition_eigen_triton"
    assert launches[name] == 2


def _param_name(model: nn.Module, p: torch.Tensor) -> str:
    return next(k for k, q in model.named_parameters() if q is p)


def test_float64_factors_with_triton_backend_run_the_references(monkeypatch):
    """factor_dtype=float64 is computed by the references, whatever the backend."""
    launches = _count_launches(monkeypatch)
    torch.manual_seed(2)
    models = {b: _OddNet().double() for b in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    pres = {
        b: seed_preconditioner(m, factor_dtype=torch.float64, inv_update_steps=1, backend=b)
        for b, m in models.items()
    }
    x, y = torch.randn(4, 3, 7, 7, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    after = {b: step_once(models[b], pres[b], mse_per_example, x, y)[1] for b in models}
    for name, g in after["torch"].items():
        assert torch.equal(after["triton"][name], g), name
    assert not launches
