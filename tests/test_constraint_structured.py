"""The loss-change constraint and EKFAC on structured models, in float64, against torch.func
per-example gradients and dense references: embeddings (diagonal A, repeated tokens, a
padding index), a tied embedding/output weight, attention's four projections, LayerNorm
through the diagonal empirical Fisher, and factors past ``max_factor_dim`` (block-diagonal
and diagonal)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import internals
from .helpers import seed_preconditioner
from .reference import (
    block_diagonal_part,
    embedding_factors,
    layer_io,
    per_example_grads,
    reference_factors,
)
from .test_constraint import _pre as constraint_pre
from .test_constraint import _predicted_changes as predicted_changes
from .test_constraint import _sgd_step as sgd_step

pytestmark = [
    pytest.mark.usefixtures("float64"),
    # torch.func's per-example gradients of attention fall back to a slow batching rule.
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

V, D, T, WIDE = 11, 6, 4, 13
STRUCTURED = {"max_factor_dim": 8, "large_factor_block": 4}  # WIDE: 4 blocks of 4


class TokenModel(nn.Module):
    """Token and position embeddings, attention, LayerNorm, a wide MLP, and an output layer
    tied to the token embedding (``tied=True``) or its own."""

    def __init__(self, tied: bool = True, attention: bool = True) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D, padding_idx=0)
        self.pos = nn.Embedding(T, D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True) if attention else None
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, WIDE)
        self.down = nn.Linear(WIDE, D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        n, t = idx.shape
        h = self.tok(idx) + self.pos(torch.arange(t).expand(n, t))
        if self.attn is not None:
            h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h)
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


def seq_ce(out: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy summed over positions."""
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


def _data(n: int = 6) -> tuple[Tensor, Tensor]:
    idx = torch.randint(0, V, (n, T))
    idx[0, :3] = 5  # a token repeated within one sequence
    idx[1, 1] = 0  # the padding token
    return idx, torch.randint(0, V, (n, T))


def _sgd_step(model, pre, x, y, reduction="mean"):
    """Backward, step(), SGD step (test_constraint's); returns Δθ per parameter name."""
    return sgd_step(model, pre, seq_ce, [(x, y)], reduction)


def _pre(model, **kw):
    return constraint_pre(model, **({"other_params": "diagonal"} | kw))


@pytest.mark.parametrize("mode", ["exact", "pi", "ekfac"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("large_factor_block", [4, 1])
def test_exact_constraint_on_a_structured_model(mode, reduction, large_factor_block):
    """Every parameter is preconditioned (Kronecker layers with dense, block-diagonal and
    diagonal factors, the LayerNorm diagonally); the realized SGD step meets E[(Δℓ)²] = c by
    torch.func's per-example gradients, the tied weight counted through both its uses."""
    model = TokenModel()
    c = 2e-3
    pre = _pre(
        model,
        damping_mode=mode,
        loss_reduction=reduction,
        constraint="exact",
        target_loss_change=c,
        max_factor_dim=8,
        large_factor_block=large_factor_block,
    )
    summary = pre.summary()
    assert not summary.unpreconditioned, summary.unpreconditioned
    storage = {r.name: (r.a_factor, r.g_factor) for r in summary.layers}
    assert "tok" not in storage  # the tied weight's factors are the head's
    assert storage["pos"][0] == "diagonal" and storage["up"][1] != "dense"
    assert storage["head"][1] != "dense" and storage["down"][0] != "dense"
    x, y = _data()
    pe = per_example_grads(model, seq_ce, x, y)
    delta = _sgd_step(model, pre, x, y, reduction)
    dl = predicted_changes(pe, delta)
    torch.testing.assert_close(dl.square().mean(), torch.tensor(c), rtol=1e-6, atol=0)
    d = pre.diagnostics()
    torch.testing.assert_close(d.loss_changes, dl, rtol=1e-6, atol=1e-12)
    assert d.exact == pytest.approx(c, rel=1e-9)


@pytest.mark.parametrize("mode", ["exact", "eigen_adam"])
def test_exact_form_counts_every_use_of_a_tied_weight(mode):
    """One module owns the tied weight's factors (the output layer under "exact", the
    embedding under "eigen_adam"), but the other's use of it moves the losses too: the
    predicted Δℓ_n include it (torch.func on the tied model), and its share (torch.func on an
    untied twin's embedding, or the rest) is not negligible here."""
    model = TokenModel(attention=False)
    twin = TokenModel(tied=False, attention=False)
    twin.load_state_dict(model.state_dict())
    pre = _pre(model, track_loss_changes=True, damping_mode=mode)
    assert ("head alone" if mode == "exact" else "tok alone") in pre.summary().ties[0][1]
    x, y = _data()
    pe = per_example_grads(model, seq_ce, x, y)
    through_embedding = per_example_grads(twin, seq_ce, x, y)["tok.weight"]
    delta = _sgd_step(model, pre, x, y)
    dl = predicted_changes(pe, delta)
    torch.testing.assert_close(pre.diagnostics().loss_changes, dl, rtol=1e-6, atol=1e-12)
    share = through_embedding.reshape(x.shape[0], -1) @ delta["tok.weight"].reshape(-1)
    other_use = (
        share
        if mode == "exact"
        else predicted_changes(pe, {"tok.weight": delta["tok.weight"]}) - share
    )
    assert other_use.abs().max() > 0.01 * dl.abs().max()


def _structured_part(M: Tensor, dim: int, block: int) -> Tensor:
    """The stored part of a factor: dense within max_factor_dim, else block-diagonal."""
    if dim <= STRUCTURED["max_factor_dim"]:
        return M
    nb = -(-dim // block)
    return block_diagonal_part(M, -(-dim // nb))


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kronecker_constraint_with_structured_factors_and_diagonal_parameters(mode, reduction):
    """Σ_layers ⟨ΔW, G ΔW A⟩ with the stored (block-diagonal, diagonal) factors plus Σ F Δθ²
    of the LayerNorm's diagonal Fisher equals c (per example: divided by N for "sum")."""
    model = TokenModel(tied=False, attention=False)
    c = 3e-3
    pre = _pre(
        model,
        damping_mode=mode,
        loss_reduction=reduction,
        constraint="kronecker",
        target_loss_change=c,
        **STRUCTURED,
    )
    x, y = _data()
    n = x.shape[0]
    pe = per_example_grads(model, seq_ce, x, y)
    factors = {}
    for name in ("up", "down", "head"):
        m = model.get_submodule(name)
        A, G = reference_factors(m, layer_io(model, m, seq_ce, x, y), reduction=reduction)
        factors[name] = (
            _structured_part(A[0], A.shape[-1], STRUCTURED["large_factor_block"]),
            _structured_part(G[0], G.shape[-1], STRUCTURED["large_factor_block"]),
        )
    for name in ("tok", "pos"):
        m = model.get_submodule(name)
        A, G = embedding_factors(m, layer_io(model, m, seq_ce, x, y), reduction=reduction)
        factors[name] = (torch.diag(torch.diagonal(A)), G)  # A diagonal by structure
    fisher = {k: pe[f"norm.{k}"].square().sum(0) for k in ("weight", "bias")}
    if reduction == "mean":
        fisher = {k: f / n for k, f in fisher.items()}
    delta = _sgd_step(model, pre, x, y, reduction)
    form = torch.zeros(())
    for name, (A, G) in factors.items():
        m = model.get_submodule(name)
        dw = delta[f"{name}.weight"]
        dm = dw.t() if isinstance(m, nn.Embedding) else dw
        if getattr(m, "bias", None) is not None:
            dm = torch.cat([dm, delta[f"{name}.bias"].unsqueeze(1)], dim=1)
        form = form + (dm * (G @ dm @ A)).sum()
    for k, f in fisher.items():
        form = form + (f * delta[f"norm.{k}"].square()).sum()
    form = form / (n if reduction == "sum" else 1)
    torch.testing.assert_close(form, torch.tensor(c), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------- EKFAC


def _matrix(pe: dict[str, Tensor], layer: str) -> Tensor:
    """Per-example gradient matrices [∇W | ∇b] ``(N, g, a)`` of one layer, from torch.func."""
    if layer in ("tok", "pos"):
        return pe[f"{layer}.weight"].transpose(1, 2)  # the Linear on one-hot inputs: weightᵀ
    if layer.startswith("attn."):
        proj = layer.removeprefix("attn.")
        if proj == "out_proj":
            w, b = pe["attn.out_proj.weight"], pe["attn.out_proj.bias"]
        else:
            i = ("q_proj", "k_proj", "v_proj").index(proj)
            w = pe["attn.in_proj_weight"][:, i * D : (i + 1) * D]
            b = pe["attn.in_proj_bias"][:, i * D : (i + 1) * D]
        return torch.cat([w, b.unsqueeze(2)], dim=2)
    w = pe[f"{layer}.weight"]
    b = pe.get(f"{layer}.bias")
    return w if b is None else torch.cat([w, b.unsqueeze(2)], dim=2)


def _basis(dec: dict[str, Tensor], side: str, padded: int) -> Tensor:
    """The full (padded) eigenbasis of one factor: block-diagonal of the stored blocks, or the
    identity for a diagonal factor."""
    q = dec.get("q" + side)
    return torch.eye(padded) if q is None else torch.block_diag(*q)


def _pad(m: Tensor, g: int, a: int) -> Tensor:
    return F.pad(m, (0, a - m.shape[-1], 0, g - m.shape[-2]))


@pytest.mark.parametrize("large_factor_block", [4, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ekfac_scale_and_solve_with_structured_factors(large_factor_block, reduction):
    """S = E_n[(Q_Gᵀ ∇_n Q_A)²] (N times that for "sum") with block-diagonal or identity
    bases, and the preconditioned gradient equals (Q_G⊗Q_A) diag(S + ε)⁻¹ (Q_G⊗Q_A)ᵀ vec(∇),
    a dense solve in the padded space: every layer of the model, the embeddings (repeated
    tokens and a padding index) and attention's projections included."""
    model = TokenModel(tied=False)
    damping = 1e-2
    pre = seed_preconditioner(
        model,
        damping=damping,
        damping_mode="ekfac",
        loss_reduction=reduction,
        factor_dtype=torch.float64,
        max_factor_dim=8,
        large_factor_block=large_factor_block,
    )
    x, y = _data(n=7)
    n = x.shape[0]
    pe = per_example_grads(model, seq_ce, x, y)
    model.zero_grad()
    losses = seq_ce(model(x), y)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()

    def grads() -> dict[str, Tensor]:
        batch = {k: p.grad.unsqueeze(0).clone() for k, p in model.named_parameters()}
        return {name: _matrix(batch, name)[0] for name in internals.layer_names(pre)}

    before = grads()
    pre.step()
    after = grads()
    for name, layer in ((la.name, la) for la in internals.layers(pre)):
        dec = {k: v.clone() for k, v in layer.decomposition.parts().items()}
        g_pad, a_pad = layer.g_spec.padded, layer.a_spec.padded
        qg, qa = _basis(dec, "g", g_pad), _basis(dec, "a", a_pad)
        for q in (qg, qa):  # orthogonal bases (anchors the definition below)
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]))
        mats = _pad(_matrix(pe, name), g_pad, a_pad)
        s_def = (qg.T @ mats @ qa).square().mean(0) * (n if reduction == "sum" else 1)
        torch.testing.assert_close(dec["s"][0], s_def, msg=name)
        k = torch.kron(qg, qa)
        solve = k @ torch.diag(1.0 / (dec["s"][0].reshape(-1) + damping)) @ k.T
        grad = _pad(before[name], g_pad, a_pad)
        g, a = before[name].shape
        expect = (solve @ grad.reshape(-1)).reshape(g_pad, a_pad)[:g, :a]
        torch.testing.assert_close(after[name], expect, msg=name)


def test_step_reads_no_tensor_value_on_the_host_with_every_feature(monkeypatch):
    """Between decompositions, step() with EKFAC (one-hot second moments, attention
    recomputed, block-diagonal bases), the exact form (tied weight, diagonal parameters) and a
    relative target reads no tensor value on the host."""
    model = TokenModel()
    pre = _pre(
        model,
        damping_mode="ekfac",
        constraint="exact",
        target_loss_change=0.5,
        loss_change_unit="spread",
        track_loss_changes=True,
        inv_update_steps=5,
        **STRUCTURED,
    )
    x, y = _data()
    losses = seq_ce(model(x), y)
    losses.mean().backward()
    pre.step(loss=losses.detach())  # a decomposition step: may read values

    def host_read(*args, **kwargs):
        raise AssertionError("step() read a tensor value on the host")

    model.zero_grad()
    losses = seq_ce(model(x), y)
    losses.mean().backward()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
            m.setattr(torch.Tensor, name, host_read)
        pre.step(loss=losses.detach())
    assert pre.diagnostics().exact == pytest.approx(
        0.5 * float(losses.detach().var(correction=0)), rel=1e-9
    )


def test_a_call_shared_by_the_batch_is_a_clear_error_for_the_exact_form():
    """A position embedding indexed once for the whole batch sees the sum of the examples'
    gradients: the per-example loss changes through it are not observable."""

    class Shared(TokenModel):
        def forward(self, idx):
            h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))  # (T, D), broadcast
            h = self.norm(h)
            return self.head(h + self.down(torch.tanh(self.up(h))))

    model = Shared(attention=False)
    pre = _pre(model, track_loss_changes=True)
    x, y = _data()
    seq_ce(model(x), y).mean().backward()
    with pytest.raises(ValueError, match="'pos' was called on 4 examples.*pos.expand"):
        pre.step()


def test_structured_ekfac_checkpoint_round_trip():
    """S over padded block-diagonal and diagonal storage, and its update counts, survive
    state_dict() / load_state_dict(); the next step is the same as without the round trip."""
    x, y = _data()
    states = []
    for reload in (False, True):
        torch.manual_seed(5)
        model = TokenModel(tied=False)
        pre = _pre(model, damping_mode="ekfac", inv_update_steps=2, factor_decay=0.5, **STRUCTURED)
        _sgd_step(model, pre, x, y)
        if reload:
            state = pre.state_dict()
            pre.remove()
            pre = _pre(
                model, damping_mode="ekfac", inv_update_steps=2, factor_decay=0.5, **STRUCTURED
            )
            pre.load_state_dict(state)
            for name, layer in ((la.name, la) for la in internals.layers(pre)):
                saved = state["layers"][name]
                assert torch.equal(layer.decomposition.s, saved["decomposition"]["s"])
                assert torch.equal(layer.scale_updates, saved["scale_updates"])
        states.append(_sgd_step(model, pre, x.flip(0), y.flip(0)))
    for k, d in states[0].items():
        torch.testing.assert_close(states[1][k], d, rtol=1e-12, atol=1e-14)


def test_pi_checkpoint_without_shifts_is_decomposed_again():
    """A "pi" checkpoint whose decompositions lack the shifts the Kronecker form needs (as
    saved before they were kept) loads, and its decompositions are recomputed."""
    model = TokenModel(tied=False, attention=False)
    pre = _pre(model, damping_mode="pi", constraint="kronecker", target_loss_change=1e-3)
    x, y = _data()
    _sgd_step(model, pre, x, y)
    state = pre.state_dict()
    for entry in state["layers"].values():
        for key in ("cg", "ca"):
            del entry["decomposition"][key]
    pre.load_state_dict(state)
    assert internals.decomposes_next_step(pre)
    _sgd_step(model, pre, x, y)
    assert pre.diagnostics().kronecker == pytest.approx(1e-3, rel=1e-9)
