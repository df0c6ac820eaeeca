"""Options, call order, summary, skip_layers and checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from kfac_ef import KFACPreconditioner

from .helpers import grads, step_once
from .reference import mse_per_example


def _model():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 8),
        nn.LayerNorm(8),
        nn.Linear(8, 2),
    )


BAD_OPTIONS = [
    ("damping", 0.0),
    ("damping", -1e-3),
    ("damping", math.nan),
    ("damping", math.inf),
    ("damping", "1e-3"),
    ("damping", True),
    ("factor_decay", 1.0),
    ("factor_decay", -0.1),
    ("factor_decay", None),
    ("factor_update_steps", 0),
    ("factor_update_steps", 1.5),
    ("factor_update_steps", True),
    ("inv_update_steps", 0),
    ("inv_update_steps", "10"),
    ("loss_reduction", "avg"),
    ("loss_reduction", None),
    ("damping_mode", "tikhonov"),
    ("kfac_approx", "both"),
    ("skip_layers", 3),
    ("skip_layers", ["("]),
    ("skip_layers", [nn.functional.relu]),
    ("factor_dtype", torch.float16),
    ("factor_dtype", "float32"),
    ("backend", "cuda"),
]


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_bad_option_names_itself(option, value):
    with pytest.raises((ValueError, TypeError), match=option):
        KFACPreconditioner(_model(), **{option: value})


def test_triton_backend_without_kernels_or_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'"):
        KFACPreconditioner(_model(), backend="triton")


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        KFACPreconditioner(_model(), 1e-3)  # type: ignore[misc]


def test_model_must_be_a_module_with_supported_layers():
    with pytest.raises(TypeError, match="nn.Module"):
        KFACPreconditioner([nn.Linear(2, 2)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no layer to precondition"):
        KFACPreconditioner(nn.Sequential(nn.LayerNorm(3), nn.BatchNorm1d(3)))


def test_call_order_errors():
    model = _model()
    pre = KFACPreconditioner(model)
    with pytest.raises(RuntimeError, match="without a backward pass"):
        pre.step()
    x, y = torch.randn(2, 2, 4, 4), torch.randn(2, 2)
    step_once(model, pre, mse_per_example, x, y)
    with pytest.raises(RuntimeError, match="without a backward pass"):
        pre.step()


def test_summary_lists_layers_and_left_out_parameters():
    model = _model()
    model.add_module("emb", nn.EmbeddingBag(5, 2))
    model.register_parameter("temperature", nn.Parameter(torch.ones(())))
    pre = KFACPreconditioner(model, skip_layers=["5"])
    s = pre.summary()
    rows = {r.name: r for r in s.layers}
    assert set(rows) == {"0", "3"}
    assert rows["0"].a_shape == (2 * 9 + 1, 19) and rows["0"].g_shape == (3, 3)
    assert rows["3"].a_shape == (49, 49) and rows["3"].parameters == ("3.weight", "3.bias")
    # float32 factors + accumulators: 2 * 4 bytes * (a² + g²); eigen: 4 * (a² + g² + a + g).
    assert rows["3"].factor_bytes == 2 * 4 * (49**2 + 8**2)
    # eigenbases and eigenvalues, and the default mode's second moment (8 × 49) and count
    assert rows["3"].decomposition_bytes == 4 * (49**2 + 8**2 + 49 + 8 + 8 * 49 + 1)
    assert s.total_bytes == sum(r.total_bytes for r in s.layers)
    reasons = dict(s.unpreconditioned)
    assert "LayerNorm" in reasons["4.weight"] and "LayerNorm" in reasons["4.bias"]
    assert reasons["5.weight"] == "skipped by skip_layers"
    assert "EmbeddingBag" in reasons["emb.weight"]
    assert "temperature" in reasons
    text = str(s)
    assert "LayerNorm" in text and "total" in text and "5.weight" in text


def test_unsupported_parameters_untouched_by_step():
    model = _model()
    pre = KFACPreconditioner(model)
    x, y = torch.randn(3, 2, 4, 4), torch.randn(3, 2)
    before, after = step_once(model, pre, mse_per_example, x, y)
    assert torch.equal(before["4.weight"], after["4.weight"])
    assert not torch.equal(before["3.weight"], after["3.weight"])


@pytest.mark.parametrize(
    ("spec", "kept"),
    [
        ("3", {"0", "5"}),
        (r"[35]", {"0"}),
        (nn.Linear, {"0"}),
        ([nn.Conv2d, "5"], {"3"}),
    ],
)
def test_skip_layers_forms(spec, kept):
    pre = KFACPreconditioner(_model(), skip_layers=spec)
    assert {r.name for r in pre.summary().layers} == kept


def test_skipping_everything_is_an_error():
    with pytest.raises(ValueError, match="no layer to precondition"):
        KFACPreconditioner(_model(), skip_layers=r"\d")


def test_tied_linear_weights_with_own_biases_have_one_owner():
    """Two Linears sharing a weight but not their biases: the last one owns the weight; the
    other's bias is left out with the reason (it belongs to a layer that was dropped)."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b, nn.Linear(4, 1))
    pre = KFACPreconditioner(model)
    s = pre.summary()
    assert {r.name for r in s.layers} == {"2", "3"}
    assert "tied weight preconditioned by 2" in dict(s.unpreconditioned)["0.bias"]
    ((names, what),) = s.ties
    assert names == "0.weight" and "preconditioned by 2 alone" in what
    pre.remove()
    # With other_params="diagonal" that bias gets its diagonal Fisher (per-example Σ_t δ).
    pre = KFACPreconditioner(model, other_params="diagonal")
    assert [d.name for d in pre.summary().diagonal] == ["0.bias"]
    step_once(model, pre, mse_per_example, torch.randn(4, 4), torch.randn(4, 1))
    assert set(pre.diagonal_fishers()) == {"0.bias"}


def _train(model, pre, batches):
    out = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in batches:
        step_once(model, pre, mse_per_example, x, y)
        opt.step()
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_state_dict_round_trip_is_exact(mode):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 2, 4, 4), torch.randn(4, 2)) for _ in range(6)]
    model = _model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    pre = KFACPreconditioner(model, damping=0.1, damping_mode=mode, inv_update_steps=2)
    straight = _train(model, pre, batches)

    model_a = _model()
    model_a.load_state_dict(init)
    pre_a = KFACPreconditioner(model_a, damping=0.1, damping_mode=mode, inv_update_steps=2)
    _train(model_a, pre_a, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "kfac": pre_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_b = _model()
    model_b.load_state_dict(ckpt["model"])
    pre_b = KFACPreconditioner(model_b, damping=0.1, damping_mode=mode, inv_update_steps=2)
    pre_b.load_state_dict(ckpt["kfac"])
    assert pre_b.steps == 3
    resumed = _train(model_b, pre_b, batches[3:])
    for k, v in straight[-1].items():
        assert torch.isfinite(v).all()
        assert torch.equal(resumed[-1][k], v), k


def test_load_state_dict_rejects_other_model():
    pre = KFACPreconditioner(_model())
    model = _model()
    step_once(
        model,
        pre_src := KFACPreconditioner(model),
        mse_per_example,
        torch.randn(2, 2, 4, 4),
        torch.randn(2, 2),
    )
    other = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 9),
        nn.LayerNorm(9),
        nn.Linear(9, 2),
    )
    pre_other = KFACPreconditioner(other)
    with pytest.raises(ValueError, match=r"3: A|3: G") as err:
        pre_other.load_state_dict(pre_src.state_dict())
    assert "5" in str(err.value)
    with pytest.raises(ValueError, match="not a KFACPreconditioner state"):
        pre.load_state_dict({"layers": {}})


def test_factors_empty_before_first_step_and_grads_after():
    model = _model()
    pre = KFACPreconditioner(model)
    assert pre.factors() == {}
    step_once(model, pre, mse_per_example, torch.randn(2, 2, 4, 4), torch.randn(2, 2))
    assert set(pre.factors()) == {"0", "3", "5"}
    assert all(torch.isfinite(g).all() for g in grads(model).values())
