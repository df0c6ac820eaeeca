"""nn.Embedding as a Linear on one-hot inputs, and tied weights (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_ef import KFACPreconditioner

from .helpers import seed_preconditioner, step_once
from .reference import (
    dense_exact_matrix,
    dense_pi,
    embedding_factors,
    layer_io,
    linear_factors_from_rows,
    mse_per_example,
    one_hot_rows,
    per_example_grads,
)

pytestmark = pytest.mark.usefixtures("float64")

V, D = 11, 4


class EmbModel(nn.Module):
    """Embedding over (N, T) tokens -> tanh -> mean over positions -> Linear."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, **kwargs)
        self.head = nn.Linear(D, 2)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)).mean(dim=1))


def _data(n=4, t=5):
    idx = torch.randint(0, V, (n, t))
    idx[0, :3] = 2  # repeated tokens within one sequence
    return idx, torch.randn(n, 2)


def test_reference_is_consistent():
    """Σ_t onehot ⊗ δ from the test's own inputs and δ's equals torch.func's per-example
    gradient of the embedding weight."""
    model = EmbModel(padding_idx=3)
    idx, y = _data()
    idx[1, 0] = 3
    io = layer_io(model, model.emb, mse_per_example, idx, y)
    pe = per_example_grads(model, mse_per_example, idx, y)
    for n, ((i, d),) in enumerate(io):
        a = one_hot_rows(i, V, 3)
        torch.testing.assert_close(a.T @ d.reshape(-1, D), pe["emb.weight"][n])


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_factors(approx, reduction, padding_idx):
    model = EmbModel(padding_idx=padding_idx)
    pre = seed_preconditioner(
        model, factor_dtype=torch.float64, kfac_approx=approx, loss_reduction=reduction
    )
    idx, y = _data()
    idx[1, :2] = 3
    io = layer_io(model, model.emb, mse_per_example, idx, y)
    step_once(model, pre, mse_per_example, idx, y, reduction)
    A, G = embedding_factors(model.emb, io, approx=approx, reduction=reduction)
    got_a, got_g = pre.factors()["emb"]
    assert got_a.shape == (V,), "A of an embedding is stored as a vector"
    torch.testing.assert_close(got_a, A.diagonal())
    torch.testing.assert_close(got_g, G)
    if approx == "expand":  # the one-hot Gram matrix has no off-diagonal part
        assert torch.count_nonzero(A - torch.diag(A.diagonal())) == 0
    if padding_idx is not None:
        assert got_a[padding_idx] == 0


def test_exact_rank_one():
    """N = 1, T = 1: G ⊗ diag(A) equals g gᵀ of the embedding's per-example gradient."""
    model = EmbModel()
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    idx, y = torch.tensor([[7]]), torch.randn(1, 2)
    pe = per_example_grads(model, mse_per_example, idx, y)
    step_once(model, pre, mse_per_example, idx, y)
    a, g = pre.factors()["emb"]
    grad = pe["emb.weight"][0].T.reshape(-1)  # the Linear's weight is weightᵀ
    torch.testing.assert_close(torch.kron(g, torch.diag(a)), torch.outer(grad, grad))


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_preconditioned_gradient_matches_dense_solve(mode, padding_idx):
    damping = 1e-2
    model = EmbModel(padding_idx=padding_idx)
    pre = seed_preconditioner(model, damping=damping, damping_mode=mode, factor_dtype=torch.float64)
    idx, y = _data()
    idx[2, 1] = 3
    io = layer_io(model, model.emb, mse_per_example, idx, y)
    before, after = step_once(model, pre, mse_per_example, idx, y)
    A, G = embedding_factors(model.emb, io)
    grad_m = before["emb.weight"].T
    if mode == "exact":
        expected = dense_exact_matrix(A, G, grad_m, damping)
    else:
        expected = dense_pi(A[None], G[None], grad_m[None], damping)[0]
    torch.testing.assert_close(after["emb.weight"].T, expected)
    if padding_idx is not None:
        assert torch.all(after["emb.weight"][padding_idx] == 0)


def test_max_norm_is_preconditioned_like_a_lookup():
    model = EmbModel(max_norm=0.5)
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    idx, y = _data()
    step_once(model, pre, mse_per_example, idx, y)  # renormalizes the rows it touches
    io = layer_io(model, model.emb, mse_per_example, idx, y)
    step_once(model, pre, mse_per_example, idx, y)
    A, G = embedding_factors(model.emb, io)
    a, g = pre.factors()["emb"]
    # factor_decay mixes two identical index sets: A is exact, G close (weights renormed).
    torch.testing.assert_close(a, A.diagonal())
    assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    ("kwargs", "why"), [({"sparse": True}, "sparse"), ({"scale_grad_by_freq": True}, "frequency")]
)
def test_unsupported_embeddings_are_listed_with_reason(kwargs, why):
    pre = seed_preconditioner(EmbModel(**kwargs))
    assert why in dict(pre.summary().unpreconditioned)["emb.weight"]


def test_index_tensor_ranks():
    """0-d and 1-d index tensors: a 1-d index tensor is a batch of single tokens."""
    emb = nn.Embedding(V, D)
    model = nn.Sequential(emb, nn.Linear(D, 1))
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    idx, y = torch.tensor([1, 1, 4]), torch.randn(3, 1)
    io = layer_io(model, emb, mse_per_example, idx, y)
    step_once(model, pre, mse_per_example, idx, y)
    A, G = embedding_factors(emb, io)
    a, g = pre.factors()["0"]
    torch.testing.assert_close(a, A.diagonal())
    torch.testing.assert_close(g, G)
    model.zero_grad()
    model(torch.tensor(2)).sum().backward()
    pre.step()


class TiedLM(nn.Module):
    """Token embedding -> tanh -> LM head sharing the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.wte(idx))))


def _lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(dim=1)


@pytest.mark.parametrize("vocab_diagonal", [False, True])
def test_tied_embedding_is_preconditioned_once_by_the_head(vocab_diagonal):
    """The head owns the shared matrix: its factors are the head's alone, the embedding is not
    hooked, and the shared gradient (both uses) is preconditioned exactly once with them."""
    damping = 0.05
    model = TiedLM()
    opts = {"max_factor_dim": V - 1} if vocab_diagonal else {}
    pre = seed_preconditioner(model, damping=damping, factor_dtype=torch.float64, **opts)
    idx, tgt = torch.randint(0, V, (3, 4)), torch.randint(0, V, (3, 4))
    s = pre.summary()
    assert {r.name for r in s.layers} == {"mix", "head"}
    ((names, what),) = s.ties
    assert names == "wte.weight" and "head alone" in what and "wte" in what
    io = layer_io(model, model.head, _lm_loss, idx, tgt)
    before, after = step_once(model, pre, _lm_loss, idx, tgt)
    assert set(pre.factors()) == {"mix", "head"}
    A, G = linear_factors_from_rows(
        [a.reshape(-1, D) for calls in io for a, _ in calls],
        [d.reshape(-1, V) for calls in io for _, d in calls],
        n_examples=3,
        bias=False,
    )
    a, g = pre.factors()["head"]
    torch.testing.assert_close(a, A)
    if vocab_diagonal:
        torch.testing.assert_close(g, G.diagonal())
        G = torch.diag(G.diagonal())
    else:
        torch.testing.assert_close(g, G)
    expected = dense_exact_matrix(A, G, before["wte.weight"], damping)
    torch.testing.assert_close(after["wte.weight"], expected)


def test_tied_embedding_owns_the_weight_under_eigen_adam():
    """damping_mode="eigen_adam" (the default): the embedding owns the shared matrix (its token
    rows unrotated), the head is not hooked, and the shared gradient (both uses) is Adam's
    step in the embedding's eigenbasis: Q_G[V ⊙ (V² + ε)^(-1/2)], V = Q_Gᵀ ∇ᵀ (A is diagonal,
    its basis the tokens), at the first step."""
    damping = 0.05
    model = TiedLM()
    pre = KFACPreconditioner(model, damping=damping, grafting="none", factor_dtype=torch.float64)
    idx, tgt = torch.randint(0, V - 3, (3, 4)), torch.randint(0, V, (3, 4))  # 3 tokens absent
    s = pre.summary()
    assert {r.name for r in s.layers} == {"wte", "mix"}
    ((names, what),) = s.ties
    assert names == "wte.weight" and "wte alone" in what and "(head)" in what
    io = layer_io(model, model.wte, _lm_loss, idx, tgt)
    before, after = step_once(model, pre, _lm_loss, idx, tgt)
    A, G = embedding_factors(model.wte, io)
    a, g = pre.factors()["wte"]
    torch.testing.assert_close(a, A.diagonal())
    torch.testing.assert_close(g, G)
    qg = torch.linalg.eigh(G)[1]
    v = qg.T @ before["wte.weight"].T  # (D, V): G's side by the tokens
    want = qg @ (v * (v.square() + damping * v.square().mean()).rsqrt())
    torch.testing.assert_close(after["wte.weight"], want.T)
    # the head's share is in it: the embedding alone leaves rows of absent tokens at zero
    assert after["wte.weight"][V - 3 :].abs().min() > 0


def test_linears_sharing_weight_and_bias_feed_one_block():
    """Same parameters used the same way by two modules: one block, both calls as positions."""
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight, b.bias = a.weight, a.bias
    model = nn.Sequential(a, nn.Tanh(), b, nn.Linear(3, 1))
    pre = seed_preconditioner(model, factor_dtype=torch.float64)
    s = pre.summary()
    assert {r.name for r in s.layers} == {"0", "3"}
    assert "one Kronecker block fed by 0, 2" in s.ties[0][1]
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    io_a = layer_io(model, a, mse_per_example, x, y)
    io_b = layer_io(model, b, mse_per_example, x, y)
    step_once(model, pre, mse_per_example, x, y)
    A, G = linear_factors_from_rows(
        [t.reshape(1, -1) for ca, cb in zip(io_a, io_b) for t, _ in ca + cb],
        [t.reshape(1, -1) for ca, cb in zip(io_a, io_b) for _, t in ca + cb],
        n_examples=5,
        bias=True,
    )
    got_a, got_g = pre.factors()["0"]
    torch.testing.assert_close(got_a, A)
    torch.testing.assert_close(got_g, G)
