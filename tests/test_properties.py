"""Property-based tests: random small architectures and random options.

Each drawn configuration either raises a documented construction error or preconditions
every layer exactly as the dense reference does — never a silent wrong number.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from .helpers import seed_preconditioner, step_once
from .reference import (
    dense_exact,
    dense_pi,
    grad_matrix,
    layer_io,
    mse_per_example,
    reference_factors,
)

pytestmark = pytest.mark.usefixtures("float64")

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@st.composite
def conv_layer(draw, channels: int, length: int):
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
    out = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from(["valid", "same", 0, 1, 2]))
    stride = 1 if padding == "same" else draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if mode != "zeros" and padding not in ("valid", 0):
        pad = dilation * (k - 1) // 2 + 1 if padding == "same" else padding
        if pad >= length:  # reflect/circular padding must be smaller than the input
            mode = "zeros"
    conv = nn.Conv1d(
        channels,
        out,
        k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=mode,
    )
    return conv


@st.composite
def architecture(draw):
    """(model, input shape without batch, list of preconditioned layer names)."""
    layers: list[nn.Module] = []
    if draw(st.booleans()):
        channels, length = draw(st.integers(1, 4)), draw(st.integers(3, 6))
        in_shape: tuple[int, ...] = (channels, length)
        for _ in range(draw(st.integers(1, 2))):
            conv = draw(conv_layer(channels, length))
            try:
                with torch.no_grad():
                    probe = conv(torch.zeros(1, channels, length))
            except RuntimeError:  # kernel wider than the (padded) input: stop stacking convs
                break
            layers += [conv, nn.Tanh()]
            channels, length = probe.shape[1], probe.shape[2]
        layers.append(nn.Flatten())
        width = channels * length
    else:
        width = draw(st.integers(1, 5))
        in_shape = (width,)
    for _ in range(draw(st.integers(1, 2))):
        out = draw(st.integers(1, 5))
        layers += [nn.Linear(width, out, bias=draw(st.booleans())), nn.Tanh()]
        width = out
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers), in_shape


BAD_VALUES = {
    "damping": [0.0, -1.0, math.nan, math.inf],
    "damping_mode": ["bogus", ""],
    "kfac_approx": ["both"],
    "loss_reduction": ["avg"],
    "factor_decay": [1.0, -0.5],
}


@st.composite
def options(draw):
    """Valid options; in about a quarter of the draws one of them is replaced by a bad value."""
    opts = {
        "damping": draw(st.floats(1e-4, 10.0)),
        "damping_mode": draw(st.sampled_from(["exact", "pi"])),
        "kfac_approx": draw(st.sampled_from(["expand", "reduce"])),
        "loss_reduction": draw(st.sampled_from(["mean", "sum"])),
        "factor_decay": draw(st.sampled_from([0.0, 0.5, 0.95])),
    }
    bad = draw(st.sampled_from([None, None, None, *BAD_VALUES]))
    if bad is not None:
        opts[bad] = draw(st.sampled_from(BAD_VALUES[bad]))
    return opts, bad


@SETTINGS
@given(arch=architecture(), drawn=options(), batch=st.integers(1, 4), seed=st.integers(0, 99))
def test_random_models_match_dense_or_raise(arch, drawn, batch, seed):
    model, in_shape = arch
    model = model.double()
    opts, bad = drawn
    if bad is not None:
        with pytest.raises((ValueError, TypeError), match=bad):
            seed_preconditioner(model, factor_dtype=torch.float64, **opts)
        return
    pre = seed_preconditioner(model, factor_dtype=torch.float64, **opts)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *in_shape, generator=gen)
    y = torch.randn(batch, 2, generator=gen)
    layers = [(n, m) for n, m in model.named_children() if isinstance(m, nn.Linear | nn.Conv1d)]
    ios = {n: layer_io(model, m, mse_per_example, x, y) for n, m in layers}
    before, after = step_once(model, pre, mse_per_example, x, y, opts["loss_reduction"])
    dense = dense_exact if opts["damping_mode"] == "exact" else dense_pi
    for name, module in layers:
        A, G = reference_factors(
            module, ios[name], approx=opts["kfac_approx"], reduction=opts["loss_reduction"]
        )
        if opts["damping_mode"] == "pi" and (
            bool((A.diagonal(dim1=1, dim2=2).sum(-1) == 0).any())
            or bool((G.diagonal(dim1=1, dim2=2).sum(-1) == 0).any())
        ):
            continue  # π is defined as 1 there; dense_pi divides by the zero trace
        has_b = module.bias is not None
        gm = grad_matrix(
            module, before[f"{name}.weight"], before[f"{name}.bias"] if has_b else None
        )
        expected = dense(A, G, gm, opts["damping"])
        got = grad_matrix(module, after[f"{name}.weight"], after[f"{name}.bias"] if has_b else None)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
