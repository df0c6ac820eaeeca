"""Checkpoint and resume: an interrupted run equals the uninterrupted one, bitwise on the CPU."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from .helpers import seed_preconditioner
from .reference import mse_per_example


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 7),
        nn.LayerNorm(7),
        nn.Tanh(),
        nn.Linear(7, 2, bias=False),
    )


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(n)
    ]


OPTIONS = {
    "exact": {"damping": 0.05},
    "pi": {"damping": 0.05, "damping_mode": "pi"},
    "ekfac": {"damping": 0.05, "damping_mode": "ekfac"},
    "constraint+diagonal": {
        "damping": 0.05,
        "max_loss_change": 0.5,
        "lr": 1e-2,
        "other_params": "diagonal",
    },
}


def _parts(options: dict, seed: int):
    model = _model(seed)
    pre = seed_preconditioner(model, factor_update_steps=2, inv_update_steps=3, **options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, pre, opt


def _train(model, pre, opt, batches, needs_loss: bool):
    for x, y in batches:
        opt.zero_grad()
        losses = mse_per_example(model(x), y)
        losses.mean().backward()
        pre.step(losses.detach() if needs_loss else None)
        opt.step()


def _save(model, pre, opt, **kwargs) -> dict:
    buf = io.BytesIO()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "kfac": pre.state_dict(**kwargs)}
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_ten_steps_equal_five_save_load_five(name):
    options = OPTIONS[name]
    needs_loss = "max_loss_change" in options
    batches = _batches(10)
    straight = _parts(options, seed=0)
    _train(*straight, batches, needs_loss)

    first = _parts(options, seed=0)
    _train(*first, batches[:5], needs_loss)
    ckpt = _save(*first)
    del first
    model, pre, opt = _parts(options, seed=123)  # fresh objects, other initial weights
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    pre.load_state_dict(ckpt["kfac"])
    _train(model, pre, opt, batches[5:], needs_loss)

    for (k, v), w in zip(straight[0].state_dict().items(), model.state_dict().values()):
        assert torch.isfinite(v).all()
        assert torch.equal(v, w), k
    for k, (a, g) in straight[1].factors().items():
        a2, g2 = pre.factors()[k]
        assert torch.equal(a, a2) and torch.equal(g, g2), k


@pytest.mark.parametrize("name", ["exact", "pi"])  # not ekfac: its running S is decomposition
def test_checkpoint_without_decompositions_is_smaller_and_resumes_on_a_decomposition_step(name):
    options = OPTIONS[name]
    batches = _batches(9)
    straight = _parts(options, seed=0)
    _train(*straight, batches, False)

    first = _parts(options, seed=0)
    _train(*first, batches[:6], False)  # step 6 decomposes (inv_update_steps=3)
    full, lean = _save(*first), _save(*first, decompositions=False)
    assert all(e["decomposition"] is None for e in lean["kfac"]["layers"].values())

    def nbytes(state: dict) -> int:
        return sum(
            t.numel() * t.element_size()
            for e in state["kfac"]["layers"].values()
            for t in [e["A"], e["G"], *(e["decomposition"] or {}).values()]
        )

    assert nbytes(lean) < 0.6 * nbytes(full)
    model, pre, opt = _parts(options, seed=7)
    model.load_state_dict(lean["model"])
    opt.load_state_dict(lean["opt"])
    pre.load_state_dict(lean["kfac"])
    _train(model, pre, opt, batches[6:], False)
    for (k, v), w in zip(straight[0].state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.gpu
def test_checkpoint_moves_between_cuda_and_cpu():
    """Saved on CUDA, loaded on the CPU, trained, saved, loaded on CUDA again: the factors and
    parameters follow the model's device and the runs agree with one CPU run to round-off."""
    options = OPTIONS["exact"]
    batches = _batches(6)
    cpu_run = _parts(options, seed=0)
    _train(*cpu_run, batches, False)

    def moved(device: str):
        model = _model(0).to(device)
        pre = seed_preconditioner(model, factor_update_steps=2, inv_update_steps=3, **options)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        return model, pre, opt

    def on(device: str, batches):
        return [(x.to(device), y.to(device)) for x, y in batches]

    stage = moved("cuda")
    _train(*stage, on("cuda", batches[:2]), False)
    ckpt = _save(*stage)
    stage = moved("cpu")
    _parts_load(stage, ckpt)
    _train(*stage, batches[2:4], False)
    ckpt = _save(*stage)
    stage = moved("cuda")
    _parts_load(stage, ckpt)
    assert all(a.is_cuda and g.is_cuda for a, g in stage[1].factors().values())
    _train(*stage, on("cuda", batches[4:]), False)
    for (k, v), w in zip(cpu_run[0].state_dict().items(), stage[0].state_dict().values()):
        torch.testing.assert_close(w.cpu(), v, rtol=1e-4, atol=1e-5, msg=k)


def _parts_load(parts, ckpt) -> None:
    model, pre, opt = parts
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    pre.load_state_dict(ckpt["kfac"])


def test_checkpoint_missing_layers_of_this_model_is_an_error_unless_not_strict():
    small = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    pre_small = seed_preconditioner(small)
    small(torch.randn(5, 3)).square().sum().backward()
    pre_small.step()
    state = pre_small.state_dict()
    grown = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 2))
    pre = seed_preconditioner(grown)
    with pytest.raises(ValueError, match=r"4: preconditioned in this model, not in the checkpoint"):
        pre.load_state_dict(state)
    pre.load_state_dict(state, strict=False)
    assert set(pre.factors()) == {"0", "2"}
    for k, (a, g) in pre_small.factors().items():
        assert torch.equal(pre.factors()[k][0], a) and torch.equal(pre.factors()[k][1], g)


def test_layers_of_a_compiled_model_are_named_as_in_the_plain_model():
    """Built on a torch.compile wrapper, the preconditioner names layers without
    ``_orig_mod.``, and checkpoints move between the wrapped and the plain model."""
    plain = _model(0)
    pre = seed_preconditioner(torch.compile(plain))
    assert {row.name for row in pre.summary().layers} == {"0", "3", "6"}
    x, y = _batches(1)[0]
    mse_per_example(plain(x), y).mean().backward()
    pre.step()
    state = pre.state_dict()
    # A checkpoint written with the wrapper's names (older versions did) loads too.
    state["layers"] = {f"_orig_mod.{k}": v for k, v in state["layers"].items()}
    state["names"]["layers"] = [f"_orig_mod.{k}" for k in state["names"]["layers"]]
    pre.remove()
    other = seed_preconditioner(_model(1))
    other.load_state_dict(state)
    for k, (a, g) in pre.factors().items():
        assert torch.equal(other.factors()[k][0], a) and torch.equal(other.factors()[k][1], g), k


def test_a_state_with_the_head_owning_a_tied_weight_loads_with_the_embedding_skipped():
    """Under eigen_adam the embedding owns a tied weight. A state whose plan had the head own
    it (as before that rule; made here with the embedding skipped, options as the default's)
    does not fit today's plan, and loads with the embedding in skip_layers
    (docs/guides/checkpointing.md)."""
    from kfac_ef import KFACPreconditioner

    from .models import GPT

    torch.manual_seed(0)
    model = GPT(vocab=13, dim=8, context=6, attention=("sdpa",))
    old = KFACPreconditioner(model, skip_layers=["wte"])
    model(torch.randint(0, 13, (2, 6))).logsumexp(-1).sum().backward()
    old.step()
    state = old.state_dict()
    state["options"]["skip_layers"] = []  # as the default's
    assert "head" in state["layers"] and "wte" not in state["layers"]
    old.remove()
    today = KFACPreconditioner(model)
    with pytest.raises(ValueError, match="head: not a preconditioned layer of this model"):
        today.load_state_dict(state)
    today.remove()
    again = KFACPreconditioner(model, skip_layers=["wte"])
    again.load_state_dict(state)
    for k, (a, g) in old.factors().items():
        assert torch.equal(again.factors()[k][0], a) and torch.equal(again.factors()[k][1], g)
