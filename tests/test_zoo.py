"""The model zoo (tests/zoo_models.py): each model built from its library's config at a tiny
size; summary() covers the blocks and norms; one Kronecker layer and one diagonal parameter
of each kind against per-example references (each example alone through a hook-free copy,
float64); 10 training steps finite. Entries whose library is not usable here skip."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from .helpers import seed_preconditioner
from .reference import clean_copy, homogeneous, positions
from .zoo_models import ZOO, ZooModel

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("float64")]

# Why a parameter may be left out of a zoo model (with other_params="diagonal").
ALLOWED = (
    "frozen",
    "batch-shared",
    "batch normalization",
    "not owned by a module kind",
    "custom parameter",
)


def _one(inputs: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    return {k: v[n : n + 1] for k, v in inputs.items()}


def _per_example(
    model: nn.Module, entry: ZooModel, inputs: dict[str, Tensor], modules: list[str]
) -> tuple[dict[str, list[list[tuple[Tensor, Tensor]]]], dict[str, Tensor]]:
    """Each example alone through a hook-free copy: per module, per example, its calls'
    (input, ∂ℓ_n/∂output); and the per-example gradients of every parameter."""
    twin = clean_copy(model)
    n_examples = next(iter(inputs.values())).shape[0]
    calls: dict[str, list[list[tuple[Tensor, Tensor]]]] = {m: [] for m in modules}
    grads: dict[str, list[Tensor]] = {}
    for n in range(n_examples):
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {m: [] for m in modules}
        handles = []
        for m in modules:

            def hook(mod, args, out, m=m, seen=seen):
                out.retain_grad()
                seen[m].append((args[0].detach(), out))

            handles.append(twin.get_submodule(m).register_forward_hook(hook))
        twin.zero_grad()
        try:
            entry.losses(twin, _one(inputs, n)).sum().backward()
        finally:
            for h in handles:
                h.remove()
        for m in modules:
            calls[m].append([(a[0], out.grad[0].detach()) for a, out in seen[m]])
        for name, p in twin.named_parameters():
            if p.grad is not None:
                grads.setdefault(name, []).append(p.grad.detach().clone())
    return calls, {k: torch.stack(v) for k, v in grads.items()}


def _reference_factors(
    module: nn.Module, kind: str, io: list[list[tuple[Tensor, Tensor]]]
) -> tuple[Tensor, Tensor]:
    """A = mean over (example, position) of ã ãᵀ, G = (1/N) Σ δ δᵀ (mean reduction)."""
    bias = getattr(module, "bias", None) is not None
    a_rows, d_rows = [], []
    for example in io:
        for a, d in example:
            if kind == "conv":
                pa, pd = positions(module, a, d)
                pa, pd = pa[:, 0], pd[:, 0]
            else:
                pa, pd = a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])
            a_rows.append(homogeneous(pa, bias))
            d_rows.append(pd)
    a_all, d_all = torch.cat(a_rows), torch.cat(d_rows)
    return a_all.T @ a_all / a_all.shape[0], d_all.T @ d_all / len(io)


def _prepare(entry: ZooModel) -> nn.Module:
    model = entry.build().double()
    model.train()
    with torch.no_grad():  # non-trivial norm scales and LoRA B (zero at initialization)
        for name, p in model.named_parameters():
            if p.dim() == 1 or "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    for m in model.modules():
        # Running statistics: per-example gradients are defined (batch statistics are not).
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name):
    entry = ZOO[name]
    model = _prepare(entry)
    pre = seed_preconditioner(
        model, damping=1e-2, factor_dtype=torch.float64, other_params="diagonal"
    )
    gen = torch.Generator().manual_seed(1)
    inputs = entry.batch(3, gen)
    io, per_example = _per_example(model, entry, inputs, list(entry.kron))
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch-shared position embeddings warn once
        entry.losses(model, inputs).mean().backward()
        pre.step()

    summary = pre.summary()
    left = dict(summary.unpreconditioned)
    odd = {n: why for n, why in left.items() if not why.startswith(ALLOWED)}
    assert not odd, odd
    for p in entry.left:
        assert p in left, p
    for p in entry.frozen:
        assert left[p].startswith("frozen"), (p, left[p])
    cov = summary.coverage
    assert cov is not None and cov.matrices[0] == cov.matrices[1], str(cov)

    factors = pre.factors()
    for mname, kind in entry.kron.items():
        A, G = _reference_factors(model.get_submodule(mname), kind, io[mname])
        got_a, got_g = factors[mname]
        torch.testing.assert_close(got_a, A, rtol=1e-6, atol=1e-9, msg=mname)
        torch.testing.assert_close(got_g, G, rtol=1e-6, atol=1e-9, msg=mname)
    fishers = pre.diagonal_fishers()
    for pname in entry.diagonal:
        expected = per_example[pname].square().mean(0)
        torch.testing.assert_close(fishers[pname], expected, rtol=1e-5, atol=1e-12, msg=pname)

    model.train()  # batch norms back to batch statistics for training
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(10):
            opt.zero_grad()
            loss = entry.losses(model, entry.batch(4, gen)).mean()
            loss.backward()
            pre.step()
            opt.step()
    assert math.isfinite(float(loss.detach()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    pre.remove()


@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_llama_gradient_checkpointing_matches_the_plain_run(reentrant):
    """gradient_checkpointing_enable(use_reentrant=...) under the exact constraint: ν and the
    preconditioned gradients of 3 steps equal those of the run without checkpointing."""
    entry = ZOO["llama"]
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = entry.build().double()
        if checkpointed:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
        model.train()
        pre = seed_preconditioner(
            model, damping=1e-2, factor_dtype=torch.float64, target_loss_change=0.5, lr=0.1,
            loss_change_unit="absolute",
        )  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        record = []
        for _ in range(3):
            opt.zero_grad()
            entry.losses(model, entry.batch(4, gen)).mean().backward()
            pre.step()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            record.append((pre.diagnostics().nu, grads))
            opt.step()
        pre.remove()
        runs.append(record)
    for (nu0, g0), (nu1, g1) in zip(*runs):
        assert nu1 == pytest.approx(nu0, rel=1e-9)
        assert len(g0) == len(g1)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b)
