"""torch.compile: a compiled model feeds the preconditioner exactly what the eager one does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .helpers import grads, seed_preconditioner
from .models import GPT, lm_loss
from .reference import mse_per_example


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6, 5),
        nn.Tanh(),
        nn.Linear(5, 2),
    )


def _run(compile_model: bool, steps: int = 3):
    torch.manual_seed(1)
    batches = [(torch.randn(4, 2, 6), torch.randn(4, 2)) for _ in range(steps)]
    model = _model()
    pre = seed_preconditioner(model, damping=1e-2, inv_update_steps=2)
    run = torch.compile(model) if compile_model else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches:
        opt.zero_grad()
        mse_per_example(run(x), y).mean().backward()
        pre.step()
        after = grads(model)
        opt.step()
    return pre.factors(), after, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compiled_model_matches_eager():
    f_eager, g_eager, p_eager = _run(False)
    torch._dynamo.reset()
    f_comp, g_comp, p_comp = _run(True)
    assert set(f_comp) == set(f_eager) == {"0", "3", "5"}
    for name, (a, g) in f_eager.items():
        torch.testing.assert_close(f_comp[name][0], a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f_comp[name][1], g, rtol=1e-4, atol=1e-6)
    for k, v in g_eager.items():
        torch.testing.assert_close(g_comp[k], v, rtol=1e-4, atol=1e-6)
    for k, v in p_eager.items():
        torch.testing.assert_close(p_comp[k], v, rtol=1e-4, atol=1e-6)


def _compiled_training_step(model, pre, opt):
    """One compiled function for a whole training step: forward, backward, step()s."""

    @torch.compile
    def train_step(x, y):
        opt.zero_grad()
        loss = mse_per_example(model(x), y).mean()
        loss.backward()
        pre.step()
        opt.step()
        return loss

    return train_step


def test_compiled_training_step_function():
    """Compiling a whole training step works: backward() and precond.step() run eagerly
    (graph breaks), the model's forward is compiled."""
    torch._dynamo.reset()
    model = _model()
    pre = seed_preconditioner(model, damping=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    train_step = _compiled_training_step(model, pre, opt)

    eager = _model()
    pre_e = seed_preconditioner(eager, damping=1e-2)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    torch.manual_seed(2)
    for _ in range(2):
        x, y = torch.randn(4, 2, 6), torch.randn(4, 2)
        train_step(x, y)
        opt_e.zero_grad()
        mse_per_example(eager(x), y).mean().backward()
        pre_e.step()
        opt_e.step()
    for (k, v), (_, w) in zip(model.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)
    assert pre.steps == 2


@pytest.mark.parametrize("mode", ["default"])
def test_hooks_graph_break_is_reported(mode):
    """The documented cost: each preconditioned layer's hook is a graph break."""
    torch._dynamo.reset()
    model = _model()
    pre = seed_preconditioner(model)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 2, 6))
    pre.remove()
    assert explanation.graph_break_count >= 1


def test_compiling_after_eager_steps():
    """A model stepped eagerly first and compiled afterwards keeps feeding the factors."""
    torch._dynamo.reset()
    model = _model()
    pre = seed_preconditioner(model, damping=1e-2)
    x, y = torch.randn(4, 2, 6), torch.randn(4, 2)
    mse_per_example(model(x), y).mean().backward()
    pre.step()
    compiled = torch.compile(model)
    eager_twin = _model()
    pre_twin = seed_preconditioner(eager_twin, damping=1e-2)
    mse_per_example(eager_twin(x), y).mean().backward()
    pre_twin.step()
    for m, p, run in ((model, pre, compiled), (eager_twin, pre_twin, eager_twin)):
        m.zero_grad()
        mse_per_example(run(x), y).mean().backward()
        p.step()
    for name, (a, g) in pre_twin.factors().items():
        torch.testing.assert_close(pre.factors()[name][0], a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pre.factors()[name][1], g, rtol=1e-4, atol=1e-6)


def _run_gpt(compile_model: bool, dropout: float = 0.0, steps: int = 2):
    """A GPT-style model (tied embedding, MultiheadAttention and SDPA blocks, LayerNorms,
    a vocabulary-wide head kept diagonal): factors, diagonal Fishers and gradients."""
    torch.manual_seed(0)
    model = GPT(vocab=40, dim=8, heads=2, context=5, attention=("mha", "sdpa"), dropout=dropout)
    pre = seed_preconditioner(
        model, damping=1e-2, inv_update_steps=1, other_params="diagonal", max_factor_dim=32
    )
    run = torch.compile(model) if compile_model else model
    for step in range(steps):
        torch.manual_seed(10 + step)
        idx = torch.randint(0, 40, (3, 5))
        model.zero_grad()
        lm_loss(run(idx), idx).backward()
        pre.step()
    return pre.factors(), pre.diagonal_fishers(), grads(model)


def _assert_same(eager, compiled):
    (f_e, d_e, g_e), (f_c, d_c, g_c) = eager, compiled
    assert set(f_c) == set(f_e) and "blocks.0.attn.attn.q_proj" in f_e
    for name, (a, g) in f_e.items():
        torch.testing.assert_close(f_c[name][0], a, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(f_c[name][1], g, rtol=1e-4, atol=1e-6, msg=name)
    assert set(d_c) == set(d_e) and d_e
    for name, f in d_e.items():
        torch.testing.assert_close(d_c[name], f, rtol=1e-4, atol=1e-8, msg=name)
    for name, g in g_e.items():  # preconditioned: float32 round-off relative to the largest
        scale = g.abs().max().item()
        torch.testing.assert_close(g_c[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_compiled_transformer_matches_eager():
    """The module adapters under torch.compile: embeddings, attention (recomputed in the
    backward pass, eagerly), diagonal Fishers and diagonal wide factors match eager mode."""
    torch._dynamo.reset()
    eager = _run_gpt(False)
    torch._dynamo.reset()
    _assert_same(eager, _run_gpt(True))


def test_compiled_attention_dropout():
    """Attention dropout: compiled dropout draws from inductor's generator, which the
    recomputation cannot replay — a clear error; with fallback_random it matches eager."""
    import torch._inductor.config as inductor_config

    # config.patch, not monkeypatch: undoing a monkeypatch deletes the config entry.
    with inductor_config.patch(fallback_random=False):
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="fallback_random"):
            _run_gpt(True, dropout=0.2, steps=1)
    with inductor_config.patch(fallback_random=True):
        torch._dynamo.reset()
        eager = _run_gpt(False, dropout=0.2)
        torch._dynamo.reset()
        _assert_same(eager, _run_gpt(True, dropout=0.2))
    torch._dynamo.reset()


def test_compiled_training_step_does_not_recompile_per_step():
    """step() runs eagerly (compiler-disabled) and the tensor hooks too: the compiler neither
    traces the preconditioner's bookkeeping nor guards on its counters, so the number of
    compiled graphs stops growing after the first steps (before, each cadence phase and each
    backward pass recompiled until the recompilation limit)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model()
    pre = seed_preconditioner(model, damping=1e-2, factor_update_steps=2, inv_update_steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    train_step = _compiled_training_step(model, pre, opt)

    torch.manual_seed(3)
    graphs = []
    for _ in range(14):
        train_step(torch.randn(4, 2, 6), torch.randn(4, 2))
        graphs.append(counters["stats"]["unique_graphs"])
    assert pre.steps == 14
    assert graphs[6] == graphs[-1], graphs  # two full cadence cycles later: nothing new
