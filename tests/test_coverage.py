"""Coverage by what a module computes: probe-checked rules against per-example gradients
(float64), register_module, the coverage shares and the construction warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_ef

from . import ecosystem
from .helpers import seed_preconditioner, step_once
from .reference import (
    dense_exact_matrix,
    layer_io,
    linear_factors_from_rows,
    mse_per_example,
    per_example_grads,
)

pytestmark = pytest.mark.usefixtures("float64")


# ------------------------------------------------------------------ module classes


class Proj(nn.Module):
    """y = x W + b with W of shape (in, out), as transformers' Conv1D."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(d_out)) if bias else None

    def forward(self, x):
        y = x @ self.w
        return y + self.b if self.b is not None else y


class HFStyleRMSNorm(nn.Module):
    """An RMSNorm written as Hugging Face's Llama/Qwen2 ones are (float32 inside)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32) if dtype != torch.float64 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class OffsetRMSNorm(HFStyleRMSNorm):
    """y = x̂ ⊙ (1 + w): an RMSNorm by name that computes something else."""

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1.0 + self.weight) * h


class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of an NCHW tensor, as timm's."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """y = x ⊙ γ, as timm's LayerScale."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1e-1 * torch.ones(d))

    def forward(self, x):
        return x * self.gamma


class PlainLinear(nn.Linear):
    """A subclass that computes what nn.Linear computes."""


class DoubledLinear(nn.Linear):
    """A subclass that does not."""

    def forward(self, x):
        return 2 * super().forward(x)


class MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


class SpatialPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


@pytest.fixture
def registered_proj():
    kfac_ef.register_module(Proj, "linear_transposed", weight="w", bias="b")
    yield
    kfac_ef.unregister_module(Proj)


def _transposed_check(model, name, module, x, y, damping=1e-2, weight="w", bias="b"):
    pre = seed_preconditioner(model, damping=damping, factor_dtype=torch.float64)
    assert name in [r.name for r in pre.summary().layers]
    io = layer_io(model, module, mse_per_example, x, y)
    a_rows = [a.reshape(-1, a.shape[-1]) for calls in io for a, _ in calls]
    d_rows = [d.reshape(-1, d.shape[-1]) for calls in io for _, d in calls]
    A, G = linear_factors_from_rows(a_rows, d_rows, x.shape[0], bias=True)
    before, after = step_once(model, pre, mse_per_example, x, y)
    got_a, got_g = pre.factors()[name]
    torch.testing.assert_close(got_a, A)
    torch.testing.assert_close(got_g, G)
    # The gradient of W (in, out) reads as the Linear gradient Wᵀ; the bias is the last column.
    gm = torch.cat([before[f"{name}.{weight}"].T, before[f"{name}.{bias}"][:, None]], dim=1)
    expected = dense_exact_matrix(A, G, gm, damping)
    torch.testing.assert_close(after[f"{name}.{weight}"], expected[:, :-1].T)
    torch.testing.assert_close(after[f"{name}.{bias}"], expected[:, -1])


def test_registered_transposed_linear_matches_dense(registered_proj):
    model = nn.Sequential(Proj(5, 6), nn.Tanh(), Proj(6, 3), MeanPool())
    x, y = torch.randn(4, 3, 5), torch.randn(4, 3)
    _transposed_check(model, "0", model[0], x, y)


def test_transformers_conv1d_matches_dense():
    tf = ecosystem.transformers()
    conv1d = tf.pytorch_utils.Conv1D
    model = nn.Sequential(conv1d(6, 5), nn.Tanh(), conv1d(3, 6), MeanPool()).double()
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.normal_(0, 0.4)
            m.bias.normal_(0, 0.1)
    x, y = torch.randn(4, 3, 5), torch.randn(4, 3)
    _transposed_check(model, "0", model[0], x, y, weight="weight", bias="bias")
    assert {r.kind for r in seed_preconditioner(model).summary().layers} == {"Conv1D"}


def test_subclasses_are_probed():
    model = nn.Sequential(PlainLinear(4, 5), nn.Tanh(), DoubledLinear(5, 2))
    pre = seed_preconditioner(model)
    layers = {r.name: r.kind for r in pre.summary().layers}
    assert layers == {"0": "PlainLinear"}
    reasons = dict(pre.summary().unpreconditioned)
    assert "probe" in reasons["2.weight"] and "DoubledLinear" in reasons["2.weight"]


class NormModel(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.norm = norm
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.lin(x))).mean(dim=1))


class ChannelModel(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.norm = norm
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.conv(x))).mean(dim=(2, 3)))


NORMS = {
    "hf-rmsnorm": (lambda: NormModel(HFStyleRMSNorm(6)), (3, 4), ["norm.weight"]),
    "layerscale": (lambda: NormModel(LayerScale(6)), (3, 4), ["norm.gamma"]),
    "layernorm2d": (lambda: ChannelModel(LayerNorm2d(6)), (2, 4, 3), ["norm.weight", "norm.bias"]),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_lookalike_norms_match_per_example_gradients(name):
    make, in_shape, names = NORMS[name]
    model = make()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.add_(0.3 * torch.randn_like(p))
    damping = 1e-2
    pre = seed_preconditioner(
        model, damping=damping, factor_dtype=torch.float64, other_params="diagonal"
    )
    assert {d.name for d in pre.summary().diagonal} == set(names)
    x, y = torch.randn(5, *in_shape), torch.randn(5, 2)
    pe = per_example_grads(model, mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    fishers = pre.diagonal_fishers()
    for n in names:
        expected = pe[n].square().mean(0)
        torch.testing.assert_close(fishers[n], expected, msg=n)
        torch.testing.assert_close(after[n], before[n] / (expected + damping), msg=n)


def test_lookalike_that_computes_something_else_is_left_out():
    model = NormModel(OffsetRMSNorm(6))
    pre = seed_preconditioner(model, other_params="diagonal")
    reasons = dict(pre.summary().unpreconditioned)
    assert "probe" in reasons["norm.weight"] and "OffsetRMSNorm" in reasons["norm.weight"]
    assert not pre.summary().diagonal


def test_frozen_norms_are_listed_as_frozen():
    model = NormModel(HFStyleRMSNorm(6))
    model.norm.weight.requires_grad_(False)
    reasons = dict(seed_preconditioner(model, other_params="diagonal").summary().unpreconditioned)
    assert reasons["norm.weight"].startswith("frozen")


def test_register_module_validates():
    with pytest.raises(ValueError, match="computes"):
        kfac_ef.register_module(Proj, "quadratic")
    with pytest.raises(TypeError, match="nn.Module"):
        kfac_ef.register_module(int, "linear")  # type: ignore[arg-type]


def test_unregistered_class_says_how_to_register():
    model = nn.Sequential(nn.Linear(3, 4), Proj(4, 2))
    reasons = dict(seed_preconditioner(model).summary().unpreconditioned)
    assert "register_module" in reasons["1.w"]


def test_registered_class_that_lies_is_left_out():
    kfac_ef.register_module(Proj, "linear", weight="w", bias="b")  # it is "linear_transposed"
    try:
        model = nn.Sequential(nn.Linear(3, 4), Proj(4, 4))
        reasons = dict(seed_preconditioner(model).summary().unpreconditioned)
        assert "probe" in reasons["1.w"]
    finally:
        kfac_ef.unregister_module(Proj)


def _warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def test_left_out_weight_matrices_warn_once(registered_proj):
    def blocks():
        return nn.Sequential(nn.Embedding(50, 4), *[nn.Linear(4, 4) for _ in range(2)])

    model = nn.Sequential(blocks(), *[Proj(4, 4) for _ in range(3)])
    kfac_ef.unregister_module(Proj)
    pre, caught = _warnings(lambda: seed_preconditioner(model))
    assert len([m for m in caught if "non-embedding weight matrices" in m]) == 1
    assert any("3 of 5" in m and "1.w, 2.w, 3.w" in m for m in caught)
    pre.remove()
    kfac_ef.register_module(Proj, "linear_transposed", weight="w", bias="b")
    _, caught = _warnings(lambda: seed_preconditioner(model))
    assert not [m for m in caught if "non-embedding weight matrices" in m]


def test_coverage_shares_with_and_without_embeddings():
    emb = nn.Embedding(100, 4)  # 400 entries, covered
    model = nn.Sequential(emb, nn.Linear(4, 4), Proj(4, 4))  # 20 covered, 20 left out
    pre = seed_preconditioner(model)
    cov = pre.summary().coverage
    assert cov is not None
    assert cov.params == pytest.approx(420 / 440)
    assert cov.params_without_embeddings == pytest.approx(20 / 40)
    assert cov.matrices == (1, 2)
    assert cov.embeddings == (1, 1)
    assert "without embeddings" in str(pre.summary())


def test_wide_factors_warn_and_the_decomposition_cost_is_estimated():
    model = nn.Sequential(nn.Linear(40, 3), nn.Tanh(), nn.Linear(3, 2))
    pre, caught = _warnings(lambda: seed_preconditioner(model, max_factor_dim=16))
    wide = [m for m in caught if "max_factor_dim=16" in m]
    assert len(wide) == 1 and "0 A (41 wide, diagonal" in wide[0]
    s = pre.summary()
    assert [(n, side, d) for n, side, d, _, _ in s.wide_factors] == [("0", "A", 41)]
    assert s.wide_factors[0][4] == 41 * 41 * 4  # float32 bytes of a dense A
    # Dense factors: G of layer 0 (3), A (4) and G (2) of layer 2; ≈ 9 d³ flops each.
    assert s.decomposition_flops == pytest.approx(9.0 * (3**3 + 4**3 + 2**3))
    assert s.largest_factors[0] == ("2", "A", 4)
    assert "inv_update_steps" in str(s) and "max_factor_dim" in str(s)
    s_pi = seed_preconditioner(nn.Linear(3, 2), damping_mode="pi").summary()
    assert s_pi.decomposition_flops == pytest.approx(4**3 + 2**3)
