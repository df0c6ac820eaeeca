"""The true Fisher for contrast: factors from targets sampled from the model's predictions.

The Fisher of a model with predictive distribution p(y | f(x)) is
F = E_x E_{ŷ ~ p(·|f(x))}[∇ℓ(ŷ) ∇ℓ(ŷ)ᵀ], ℓ = -log p: the same outer products as the
empirical Fisher, with the observed targets replaced by targets drawn from the model
(Martens & Grosse, 2015, draw one per example: the Monte-Carlo estimate). With
``fisher_type="mc"`` the preconditioner's G (and EKFAC's scale) come from one extra backward
of the sampled loss, while ``p.grad`` stays the gradient of your loss:

    out = model(x)
    loss = F.cross_entropy(out, y)
    kfac_ef.mc_backward(precond, loss, out, likelihood="categorical")   # not loss.backward()
    precond.step()
    optimizer.step()

Likelihoods (each matches a loss):

- "categorical": logits ``(N, C)`` or ``(N, C, d1, ...)`` (the class dimension second, as
  for ``F.cross_entropy``); ŷ ~ Categorical(softmax(f)) and ℓ̂ = cross-entropy(f, ŷ), the
  mean over an example's positions (it matches a loss that averages over positions; one that
  sums over T positions has a Fisher T² times larger).
- "gaussian": regression outputs of any shape ``(N, ...)``; ŷ = f + σ ε, ε ~ N(0, I), and
  ℓ̂_n = ||f_n - ŷ_n||² / (2σ²), whose gradient is -ε/σ. It matches ℓ = ||f - y||² / (2σ²)
  per example: σ² = 1 for ½·sum of squares; for ``F.mse_loss`` (the mean over the D
  outputs of an example) σ² = D/2.

The sampled loss is the sum Σ_n ℓ̂_n over the examples (times the loss scale of the
preconditioner's ``grad_scaler``), so its gradients are per-example ones; the statistics are
then scaled to ``loss_reduction``'s convention, (1/N) Σ_n for "mean" (N counting every
micro-batch of a step) and Σ_n for "sum", so G is on the same scale as the empirical one
however your loss is divided (gradient accumulation included). Distributed, each rank
samples the targets of its own examples and the statistics are reduced like the empirical
ones (docs/distributed.md); pass ``targets`` drawn from a generator of your own to make the
draws reproducible across process counts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

LIKELIHOODS = ("categorical", "gaussian")


def sample_targets(
    output: Tensor,
    likelihood: str,
    *,
    variance: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Targets drawn from the model's predictive distribution (no gradient).

    "categorical": the class dimension (dim 1) is moved last and flattened with the others,
    ``torch.multinomial(softmax(rows), 1, generator=generator)``, one draw per row in row
    order, reshaped to ``(N, d1, ...)`` (int64 class indices). "gaussian":
    ``output + sqrt(variance) * torch.randn(output.shape, generator=generator)``.
    ``generator`` must live on the output's device.
    """
    check_likelihood(likelihood, variance)
    f = output.detach()
    if likelihood == "categorical":
        if f.dim() < 2:
            raise ValueError(
                f"likelihood='categorical' needs logits of shape (N, C) or (N, C, ...), got "
                f"{tuple(f.shape)}"
            )
        classes = f.shape[1]
        rows = f.movedim(1, -1).reshape(-1, classes)
        probs = torch.softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)
        draws = torch.multinomial(probs, 1, generator=generator)
        return draws.reshape(f.movedim(1, -1).shape[:-1])
    noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
    return f + math.sqrt(variance) * noise


def sampled_loss(output: Tensor, targets: Tensor, likelihood: str, variance: float = 1.0) -> Tensor:
    """Σ_n ℓ̂_n, the negative log-likelihood (up to constants) of ``targets`` summed over the
    examples (a sum, so that its gradients are per-example ones whatever the reduction of
    your loss; see the module docstring). Over positions of an example, the categorical
    ℓ̂_n is the mean cross-entropy (as ``F.cross_entropy``'s "mean"), the Gaussian one the
    sum of squares."""
    check_likelihood(likelihood, variance)
    if likelihood == "categorical":
        per_example = F.cross_entropy(output, targets, reduction="none")
        if per_example.dim() > 1:  # positions: mean per example, as F.cross_entropy's "mean"
            per_example = per_example.reshape(per_example.shape[0], -1).mean(1)
    else:
        diff = (output - targets).reshape(output.shape[0], -1)
        per_example = diff.square().sum(1) / (2.0 * variance)
    return per_example.sum()


def mc_backward(
    precond: KFACPreconditioner,
    loss: Tensor,
    output: Tensor,
    *,
    likelihood: str,
    variance: float = 1.0,
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
) -> None:
    """``loss.backward()`` for a preconditioner with ``fisher_type="mc"``, in one call.

    On statistics steps, first one backward of the sampled loss (``sample_targets``,
    ``sampled_loss`` summed over examples, times the loss scale of the preconditioner's
    ``grad_scaler``) through the retained graph: its gradients reach the hooked layers, whose
    factors they feed, and are then discarded (``torch.autograd.grad``: ``p.grad`` is not
    touched). Then ``loss.backward()`` as usual. On other steps, and for a preconditioner with
    ``fisher_type="empirical"``, it is just ``loss.backward()``.

    Args:
        precond: the preconditioner of the model that produced ``output``.
        loss: your loss (its gradients go to ``p.grad``).
        output: the model's output the likelihood is about (logits or regression outputs).
        likelihood: "categorical" or "gaussian" (see the module docstring).
        variance: σ² of the Gaussian likelihood.
        generator: random generator for the targets (on the output's device).
        targets: targets already drawn from the model's predictive distribution (e.g. by
            ``sample_targets``); then no draw is made here.

    Note:
        With a mean-reduced loss over positions (sequence outputs), examples are the first
        dimension, as everywhere in kfac_ef.
    """
    precond.mc_backward(
        loss,
        output,
        likelihood=likelihood,
        variance=variance,
        generator=generator,
        targets=targets,
    )


def sampled_backward(
    params: list[torch.nn.Parameter],
    output: Tensor,
    likelihood: str,
    variance: float,
    generator: torch.Generator | None,
    targets: Tensor | None,
    loss_scale: Tensor | None,
) -> None:
    """The sampled-target backward of :func:`mc_backward`: the gradients of the sampled loss
    (times the loss scale, so that the statistics are unscaled like the empirical ones)
    reach the hooked layers through the retained graph; ``torch.autograd.grad`` leaves
    ``p.grad`` untouched."""
    if not output.requires_grad:
        raise ValueError("mc_backward: output does not require grad (was it detached?)")
    with torch.enable_grad():
        if targets is None:
            targets = sample_targets(output, likelihood, variance=variance, generator=generator)
        mc_loss = sampled_loss(output, targets, likelihood, variance)
        if loss_scale is not None:
            mc_loss = mc_loss * loss_scale.to(mc_loss.device)
        torch.autograd.grad(mc_loss, params, retain_graph=True, allow_unused=True)


def check_likelihood(likelihood: str, variance: float) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"Invalid likelihood={likelihood!r}: must be one of {', '.join(map(repr, LIKELIHOODS))}"
        )
    if not (isinstance(variance, int | float) and math.isfinite(variance) and variance > 0):
        raise ValueError(f"Invalid variance={variance!r}: must be a finite number > 0")
