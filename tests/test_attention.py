"""nn.MultiheadAttention's projections as Linear layers, and nn.Transformer* layers (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .helpers import grads, seed_preconditioner, step_once
from .reference import (
    dense_exact_matrix,
    layer_io,
    linear_factors_from_rows,
    mha_io,
    mse_per_example,
    reference_factors,
)

pytestmark = pytest.mark.usefixtures("float64")

E, H = 8, 2


class AttnModel(nn.Module):
    """Attention (self or cross) -> mean over query positions -> Linear."""

    def __init__(self, batch_first=True, cross=False, mask=None, **mha_kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, **mha_kwargs)
        self.head = nn.Linear(E, 2)
        self.batch_first = batch_first
        self.cross = cross
        self.mask = mask or {}

    def forward(self, x, mem=None):
        kv = mem if self.cross else x
        q, kv = (x, kv) if self.batch_first else (x.transpose(0, 1), kv.transpose(0, 1))
        kwargs = dict(self.mask)
        if "key_padding_mask" in kwargs:
            kwargs["key_padding_mask"] = kwargs["key_padding_mask"][: x.shape[0]]
        out = self.attn(q, kv, kv, **kwargs)[0]
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(dim=1))


def _expected(io, model, reduction="mean"):
    """Reference factors of the four projections from per-example internals."""
    n = len(io)
    m = model.attn
    bias = m.in_proj_bias is not None
    out = {}
    for proj, a_key, d_key in (("q", "query", "d_q"), ("k", "key", "d_k"), ("v", "value", "d_v")):
        out[f"attn.{proj}_proj"] = linear_factors_from_rows(
            [c[a_key] for calls in io for c in calls],
            [c[d_key] for calls in io for c in calls],
            n,
            bias,
            reduction,
        )
    out["attn.out_proj"] = linear_factors_from_rows(
        [c["ctx"] for calls in io for c in calls],
        [c["d_out"] for calls in io for c in calls],
        n,
        m.out_proj.bias is not None,
        reduction,
    )
    return out


L, S = 5, 3
CASES = {
    "self-batch-first": lambda: dict(),
    "self-seq-first": lambda: dict(batch_first=False),
    "self-causal-mask": lambda: dict(
        mask={"attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1), "is_causal": True}
    ),
    "self-float-mask-nobias": lambda: dict(mask={"attn_mask": torch.randn(L, L)}, bias=False),
    "self-key-padding": lambda: dict(
        mask={"key_padding_mask": torch.tensor([[False] * (L - 1) + [True]] * 4)},
        add_bias_kv=True,
        add_zero_attn=True,
    ),
    "cross-kdim-vdim": lambda: dict(cross=True, kdim=3, vdim=6),
    "cross-seq-first-padding": lambda: dict(
        cross=True,
        batch_first=False,
        mask={"key_padding_mask": torch.tensor([[False, True, False]] * 4)},
    ),
}


def _inputs(case):
    n = 4
    x = torch.randn(n, L, E)
    if not case.get("cross"):
        return (x,)
    mem = torch.randn(n, S, max(case.get("kdim", E), case.get("vdim", E)))
    return x, mem


class _CrossDims(nn.Module):
    """Cross-attention with key and value of different widths (kdim != vdim)."""

    def __init__(self, model: AttnModel) -> None:
        super().__init__()
        self.model = model
        self.kdim, self.vdim = model.attn.kdim, model.attn.vdim

    def forward(self, x, mem):
        m = self.model
        k, v = mem[..., : self.kdim], mem[..., : self.vdim]
        out = m.attn(x, k, v)[0]
        return m.head(out.mean(dim=1))


def _build(case):
    case = dict(case)
    model = AttnModel(**case)
    if case.get("kdim"):
        return _CrossDims(model), model
    return model, model


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_projection_factors_match_explicit_attention(name, reduction):
    torch.manual_seed(1)
    case = CASES[name]()
    model, inner = _build(case)
    pre = seed_preconditioner(model, factor_dtype=torch.float64, loss_reduction=reduction)
    xs = _inputs(case)
    y = torch.randn(4, 2)
    io = mha_io(model, inner.attn, mse_per_example, xs if len(xs) > 1 else xs[0], y)
    # The explicit attention reproduces the module's output.
    with torch.no_grad():
        got = model(*xs)
    model.zero_grad()
    losses = mse_per_example(model(*xs), y)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    pre.step()
    ref_out = torch.stack([inner.head(calls[0]["out"].mean(0)) for calls in io])
    torch.testing.assert_close(got, ref_out)
    prefix = "model." if inner is not model else ""
    factors = pre.factors()
    for layer, (A, G) in _expected(io, inner, reduction).items():
        a, g = factors[prefix + layer]
        torch.testing.assert_close(a, A, msg=lambda m, layer=layer: f"{layer} A: {m}")
        torch.testing.assert_close(g, G, msg=lambda m, layer=layer: f"{layer} G: {m}")


def test_projection_gradients_match_dense_solve():
    """The four projections' rows of in_proj_weight / in_proj_bias and out_proj are rewritten
    each by (G⊗A + εI)⁻¹ with its own factors."""
    damping = 0.1
    model = AttnModel()
    pre = seed_preconditioner(model, damping=damping, factor_dtype=torch.float64)
    x, y = torch.randn(3, L, E), torch.randn(3, 2)
    before, after = step_once(model, pre, mse_per_example, x, y)
    factors = pre.factors()
    for i, proj in enumerate(("q", "k", "v")):
        rows = slice(i * E, (i + 1) * E)
        gm = torch.cat(
            [before["attn.in_proj_weight"][rows], before["attn.in_proj_bias"][rows, None]], 1
        )
        a, g = factors[f"attn.{proj}_proj"]
        got = torch.cat(
            [after["attn.in_proj_weight"][rows], after["attn.in_proj_bias"][rows, None]], 1
        )
        torch.testing.assert_close(got, dense_exact_matrix(a, g, gm, damping))
    gm = torch.cat([before["attn.out_proj.weight"], before["attn.out_proj.bias"][:, None]], 1)
    got = torch.cat([after["attn.out_proj.weight"], after["attn.out_proj.bias"][:, None]], 1)
    a, g = factors["attn.out_proj"]
    torch.testing.assert_close(got, dense_exact_matrix(a, g, gm, damping))


@pytest.mark.parametrize("need_weights", [False, True])
def test_dropout_mask_is_replayed(need_weights):
    """With attention dropout, one example and one query position, the q projection's and
    out_proj's per-example gradients are rank one: G ⊗ A = g gᵀ holds only if the statistics
    see the dropout mask of the real forward pass."""
    model = AttnModel(cross=True, dropout=0.5)
    model.attn.register_forward_hook(lambda *a: None)  # hooks by others do not interfere
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    x, mem, y = torch.randn(1, 1, E), torch.randn(1, 6, E), torch.randn(1, 2)

    def forward():
        out = model.attn(x, mem, mem, need_weights=need_weights)[0]
        return model.head(out.mean(dim=1))

    state = torch.get_rng_state()
    model.zero_grad()
    mse_per_example(forward(), y).sum().backward()
    after_backward = torch.get_rng_state()
    g_all = grads(model)
    pre.step()
    assert torch.equal(torch.get_rng_state(), after_backward), "the replay restores the RNG"
    assert not torch.equal(state, after_backward)
    factors = pre.factors()
    gq = torch.cat([g_all["attn.in_proj_weight"][:E], g_all["attn.in_proj_bias"][:E, None]], 1)
    a, g = factors["attn.q_proj"]
    torch.testing.assert_close(torch.kron(g, a), torch.outer(gq.reshape(-1), gq.reshape(-1)))
    go = torch.cat([g_all["attn.out_proj.weight"], g_all["attn.out_proj.bias"][:, None]], 1)
    a, g = factors["attn.out_proj"]
    torch.testing.assert_close(torch.kron(g, a), torch.outer(go.reshape(-1), go.reshape(-1)))


def test_unbatched_inputs():
    m = nn.MultiheadAttention(E, H)
    model = nn.Sequential()
    pre = seed_preconditioner(m)
    x = torch.randn(L, E)
    m(x, x, x)[0].sum().backward()
    pre.step()
    assert set(pre.factors()) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    del model


def test_bias_kv_listed_and_frozen_projection():
    m = nn.MultiheadAttention(E, H, add_bias_kv=True)
    m.in_proj_weight.requires_grad_(False)
    pre = seed_preconditioner(m)
    s = pre.summary()
    assert {r.name for r in s.layers} == {"out_proj"}
    reasons = dict(s.unpreconditioned)
    assert "bias_k" in reasons["bias_k"] and "bias_k" in reasons["bias_v"]
    assert "frozen" in reasons["in_proj_weight"] and "frozen projection" in reasons["in_proj_bias"]


def _encoder(batch_first):
    torch.manual_seed(5)
    return nn.TransformerEncoderLayer(
        E, H, dim_feedforward=12, dropout=0.0, batch_first=batch_first
    )


def _decoder(batch_first):
    torch.manual_seed(6)
    return nn.TransformerDecoderLayer(
        E, H, dim_feedforward=12, dropout=0.0, batch_first=batch_first, norm_first=True
    )


class SeqModel(nn.Module):
    def __init__(self, layer, decoder, batch_first) -> None:
        super().__init__()
        self.layer, self.decoder, self.batch_first = layer, decoder, batch_first
        self.head = nn.Linear(E, 2)

    def forward(self, x, mem=None):
        t = x.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        if not self.batch_first:
            x = x.transpose(0, 1)
            mem = mem.transpose(0, 1) if mem is not None else None
        if self.decoder:
            out = self.layer(x, mem, tgt_mask=causal, tgt_is_causal=True)
        else:
            out = self.layer(x, src_mask=causal, is_causal=True)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(dim=1))


@pytest.mark.parametrize("decoder", [False, True])
def test_transformer_layers(decoder):
    """Every parameter preconditioned (norms diagonally); sequence-first layers give the same
    factors as batch-first ones (the batch is found in dim 1); batch-first factors match the
    references (feed-forward Linears, and the explicit attention)."""
    x, mem, y = torch.randn(3, L, E), torch.randn(3, S, E), torch.randn(3, 2)
    inputs = (x, mem) if decoder else (x,)
    results = {}
    for bf in (True, False):
        layer = (_decoder if decoder else _encoder)(bf)
        model = SeqModel(layer, decoder, bf)
        pre = seed_preconditioner(model, factor_dtype=torch.float64, other_params="diagonal")
        assert pre.summary().unpreconditioned == ()
        model.zero_grad()
        mse_per_example(model(*inputs), y).mean().backward()
        pre.step()
        results[bf] = (pre.factors(), pre.diagonal_fishers(), grads(model))
        if bf:
            ref_model = model
    for name, (a, g) in results[True][0].items():
        torch.testing.assert_close(results[False][0][name][0], a, msg=name)
        torch.testing.assert_close(results[False][0][name][1], g, msg=name)
    for name, f in results[True][1].items():
        torch.testing.assert_close(results[False][1][name], f, msg=name)
    for name, g in results[True][2].items():
        torch.testing.assert_close(results[False][2][name], g, msg=name)

    factors = results[True][0]
    if not decoder:  # layer_io feeds one input
        lin = ref_model.layer.linear1
        A, G = reference_factors(lin, layer_io(ref_model, lin, mse_per_example, x, y))
        torch.testing.assert_close(factors["layer.linear1"][0], A[0])
        torch.testing.assert_close(factors["layer.linear1"][1], G[0])
    attn = ref_model.layer.multihead_attn if decoder else ref_model.layer.self_attn
    mio = mha_io(ref_model, attn, mse_per_example, inputs if decoder else x, y)
    attn_name = "layer.multihead_attn" if decoder else "layer.self_attn"
    n = 3
    for proj, a_key, d_key in (("q", "query", "d_q"), ("k", "key", "d_k")):
        A, G = linear_factors_from_rows(
            [c[a_key] for calls in mio for c in calls],
            [c[d_key] for calls in mio for c in calls],
            n,
            True,
        )
        a, g = factors[f"{attn_name}.{proj}_proj"]
        torch.testing.assert_close(a, A)
        torch.testing.assert_close(g, G)
