"""Factors wider than max_factor_dim: diagonal or block-diagonal storage, memory plan, budget."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfac_ef import KFACPreconditioner

from .helpers import conv_head, seed_preconditioner, step_once
from .reference import (
    block_diagonal_part,
    dense_pi,
    grad_matrix,
    layer_io,
    mse_per_example,
    reference_factors,
)
from .reference import dense_exact_matrix as dense_exact

pytestmark = pytest.mark.usefixtures("float64")


def _stored(factor, dim, block):
    """A factor from factors() back as a dense (dim, dim) matrix."""
    if block == 1:
        return torch.diag(factor)
    nb, bs = factor.shape[0], factor.shape[1]
    dense = torch.block_diag(*factor)
    assert nb * bs >= dim
    return dense[:dim, :dim]


def _blocks(dim, block):
    nb = math.ceil(dim / block)
    return nb, math.ceil(dim / nb)


@pytest.mark.parametrize("block", [1, 4, 9])
@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_wide_factors_match_dense_solve(block, mode):
    """G (20 wide) and A (19 + bias wide) over max_factor_dim=10: stored as their diagonal
    (blocks) and the gradient rewritten by (G_bd ⊗ A_bd + εI)⁻¹ exactly."""
    damping = 0.05
    model = nn.Sequential(
        nn.Linear(3, 19), nn.Tanh(), nn.Linear(19, 20), nn.Tanh(), nn.Linear(20, 2)
    )
    pre = seed_preconditioner(
        model,
        damping=damping,
        damping_mode=mode,
        factor_dtype=torch.float64,
        max_factor_dim=10,
        large_factor_block=block,
    )
    rows = {r.name: r for r in pre.summary().layers}
    kind = (
        "diagonal" if block == 1 else f"{_blocks(20, block)[0]} blocks of {_blocks(20, block)[1]}"
    )
    assert rows["2"].g_factor == kind and rows["0"].a_factor == "dense"
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    lin = model[2]
    io = layer_io(model, lin, mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    A, G = reference_factors(lin, io)
    A, G = A[0], G[0]
    a, g = pre.factors()["2"]
    bs_a, bs_g = _blocks(20, block)[1], _blocks(20, block)[1]
    A_bd = block_diagonal_part(A, bs_a) if block > 1 else torch.diag(A.diagonal())
    G_bd = block_diagonal_part(G, bs_g) if block > 1 else torch.diag(G.diagonal())
    torch.testing.assert_close(_stored(a, 20, block), A_bd)
    torch.testing.assert_close(_stored(g, 20, block), G_bd)
    gm = grad_matrix(lin, before["2.weight"], before["2.bias"])[0]
    if mode == "exact":
        expected = dense_exact(A_bd, G_bd, gm, damping)
    else:
        expected = dense_pi(A_bd[None], G_bd[None], gm[None], damping)[0]
    got = grad_matrix(lin, after["2.weight"], after["2.bias"])[0]
    torch.testing.assert_close(got, expected)


def test_grouped_conv_with_block_diagonal_factor():
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1)  # per group: A 2·9 + 1 = 19, G 3
    model = conv_head(conv, (4, 4, 4))
    damping = 0.1
    pre = seed_preconditioner(
        model, damping=damping, factor_dtype=torch.float64, max_factor_dim=8, large_factor_block=8
    )
    x, y = torch.randn(3, 4, 4, 4), torch.randn(3, 2)
    io = layer_io(model, conv, mse_per_example, x, y)
    before, after = step_once(model, pre, mse_per_example, x, y)
    A, G = reference_factors(conv, io)
    a, g = pre.factors()["0"]
    assert a.shape == (2, 3, 7, 7)  # 2 groups, 19 -> 3 blocks of 7
    gm = grad_matrix(conv, before["0.weight"], before["0.bias"])
    got = grad_matrix(conv, after["0.weight"], after["0.bias"])
    for grp in range(2):
        A_bd = block_diagonal_part(A[grp], 7)
        torch.testing.assert_close(torch.block_diag(*a[grp])[:19, :19], A_bd)
        torch.testing.assert_close(g[grp], G[grp])
        torch.testing.assert_close(got[grp], dense_exact(A_bd, G[grp], gm[grp], damping))


def test_vocabulary_sized_head_is_never_squared():
    """A 50257-wide output layer: G is a vector, the plan and the state say so."""
    vocab = 50257
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, vocab, bias=False))
    pre = seed_preconditioner(model.float())
    s = pre.summary()
    row = {r.name: r for r in s.layers}["2"]
    assert row.g_factor == "diagonal" and row.g_shape == (vocab, vocab)
    # running G + accumulator: 2 · 4 bytes · 50257; decomposition: its eigenvalues.
    assert row.factor_bytes == 2 * 4 * (vocab + 8 * 8)
    assert row.decomposition_bytes == 4 * (vocab + 8 * 8 + 8)
    assert row.g_bytes == 4 * 3 * vocab and row.a_bytes == 4 * (3 * 64 + 8)
    assert row.a_bytes + row.g_bytes == row.total_bytes
    assert s.total_bytes < 2_000_000
    x = torch.randn(4, 3, 8, dtype=torch.float32)
    y = torch.randint(0, vocab, (4, 3))
    model.zero_grad()
    nn.functional.cross_entropy(model(x).transpose(1, 2), y).backward()
    pre.step()
    a, g = pre.factors()["2"]
    assert g.shape == (vocab,) and a.shape == (8, 8)
    assert "50257 (diagonal)" in str(s)


def test_the_bias_coordinate_does_not_count_against_max_factor_dim():
    """max_factor_dim=d keeps the (d+1)-wide A of a layer with d inputs and a bias dense; an A
    wider by more than its bias, and a G, are planned as before (blocks over the full width,
    the bias in the last one)."""
    model = nn.Sequential(
        nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8, bias=False), nn.Tanh(), nn.Linear(8, 9)
    )
    plan = {r.name: (r.a_factor, r.g_factor) for r in KFACPreconditioner(
        model, max_factor_dim=8, large_factor_block=4).summary().layers}  # fmt: skip
    assert plan["0"] == ("dense", "3 blocks of 4")  # A: 8 inputs + bias; G: 12 > 8
    assert plan["2"] == ("3 blocks of 4", "dense")  # A: 12 inputs, no bias
    assert plan["4"] == ("dense", "3 blocks of 3")  # A: 8 + bias; G: 9 > 8
    wide = KFACPreconditioner(nn.Linear(9, 2), max_factor_dim=8, large_factor_block=4)
    assert wide.summary().layers[0].a_factor == "3 blocks of 4"  # 10 wide: 9 inputs + bias


def test_memory_budget_raises_with_the_plan():
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    probe = seed_preconditioner(model)
    planned = probe.summary().total_bytes
    probe.remove()
    seed_preconditioner(model, memory_budget=planned).remove()
    with pytest.raises(ValueError, match="exceeds memory_budget") as err:
        seed_preconditioner(model, memory_budget=planned - 1)
    assert "total" in str(err.value) and "64x64" in str(err.value)
    # The fix the message suggests works: a smaller max_factor_dim fits.
    seed_preconditioner(model, memory_budget=planned // 4, max_factor_dim=16)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_factor_dim", 0),
        ("max_factor_dim", 2.5),
        ("large_factor_block", 0),
        ("large_factor_block", 5000),
        ("memory_budget", -1),
        ("other_params", "adam"),
    ],
)
def test_bad_size_options(option, value):
    with pytest.raises(ValueError, match=option):
        seed_preconditioner(nn.Linear(3, 3), **{option: value})
