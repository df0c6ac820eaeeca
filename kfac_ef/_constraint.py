"""The seed's loss-change constraint: the step size that fixes E[(Δℓ)²], and its diagnostics.

The optimizer takes Δθ = -lr·ν·∇̃ from the preconditioned gradient ∇̃ (for SGD without
momentum exactly; docs/empirical_fisher.md says what other optimizers do). To first order the
loss of example n changes by Δℓ_n = g_nᵀ Δθ, and the empirical Fisher C = E[g gᵀ] measures

    E_n[(Δℓ_n)²] = Δθᵀ C Δθ = lr² ν² ∇̃ᵀ C ∇̃.

step() picks ν so that this equals c ("equality" form, ``target_loss_change``) or stays at or
below c ("trust-region" form, ``max_loss_change``: ν = min(1, ...)). Two forms of ∇̃ᵀ C ∇̃:

- "kronecker": C ≈ G⊗A per layer (as stored: dense, diagonal or block-diagonal factors;
  damping excluded), Σ_layers ⟨∇̃, G ∇̃ A⟩, read off the preconditioning chain
  (``kernels.precondition_eigen_with_form``, ``_factors.precondition_structured_eigen``,
  ``_factors.precondition_inverse_with_form``), plus Σ F ∇̃² for the parameters
  preconditioned by their diagonal empirical Fisher F;
- "exact": the empirical Fisher itself, E_n[u_n²] with u_n = g_nᵀ ∇̃ the directional
  derivative of ℓ_n along ∇̃, computed from the step's captured calls
  (``per_example_directions``): per Kronecker layer Σ_t δ_{n,t}ᵀ ∇̃ ã_{n,t} (every call of
  every module that uses the weight, tied uses included), per diagonal parameter
  ⟨g_n, ∇̃⟩ from its per-example gradient rule; no per-example parameter gradient of a
  Kronecker layer is formed.

Both cover exactly the parameters step() preconditions (and scales by ν); parameters left to
the optimizer, and layers without a decomposition yet, are in neither.

Everything here runs on the device without reading values on the host: ν is a 0-dim tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .layers import Inputs, LayerAdapter, OneHotInputs

if TYPE_CHECKING:
    from ._discovery import Route

Held = tuple[Any, Tensor, int]
"""One call of a hooked module as captured: (what its adapter saved, the gradient w.r.t. its
output, pass id)."""

# ---------------------------------------------------------------------------- exact form


def _layer_directions(
    ad: LayerAdapter, inputs: Inputs, grads: Tensor, tangents: Mapping[int, Tensor], dtype: Any
) -> Tensor | None:
    """Σ_{t,b} γ_{n,t,b}ᵀ (W̃_b ã_{n,t,b}) per example for one call of a Kronecker layer,
    with W̃ = [∇̃W | ∇̃b] read through the layer's matrix views of the tangents (absent
    parameters count as 0); None when the layer has no tangent.

    Per row (example, position, block): s = ∇̃W a + ∇̃b in one batched product with the bias
    folded in, then γᵀ s; without a bias and with the output side wider than the input
    side, (∇̃Wᵀ γ)ᵀ a instead (the same product, a narrower elementwise pass).
    """
    w = tangents.get(id(ad.weight))
    b = tangents.get(id(ad.bias)) if ad.bias is not None else None
    if w is None and b is None:
        return None
    n, t, blocks, g = grads.shape
    rows_d = _block_rows(grads.to(dtype))  # (blocks, N·T, g)
    bias = ad.bias_matrix(b).to(dtype).transpose(1, 2) if b is not None else None  # (B, 1, g)
    if w is None:
        assert bias is not None
        per_row = (rows_d * bias).sum(-1)
    elif isinstance(inputs, OneHotInputs):
        wm = ad.weight_matrix(w).to(dtype)  # (1, g, classes)
        idx = inputs.indices  # (N, T), -1: a zero input
        s = wm[0].t()[idx.clamp_min(0)] * (idx >= 0).unsqueeze(-1).to(dtype)  # (N, T, g)
        s = s.reshape(1, n * t, g)
        per_row = (rows_d * (s if bias is None else s + bias)).sum(-1)
    else:
        wm = ad.weight_matrix(w).to(dtype)  # (blocks, g, a0)
        rows_a = _block_rows(inputs.to(dtype))  # (blocks, N·T, a0)
        if bias is None and g > rows_a.shape[-1]:
            per_row = (torch.bmm(rows_d, wm) * rows_a).sum(-1)
        else:
            wt = wm.transpose(1, 2)
            s = torch.bmm(rows_a, wt) if bias is None else torch.baddbmm(bias, rows_a, wt)
            per_row = (rows_d * s).sum(-1)
    if blocks == 1 and t == 1:
        return per_row.view(n)
    return per_row.view(blocks, n, t).sum(dim=(0, 2))


def _block_rows(x: Tensor) -> Tensor:
    """``(N, T, B, d)`` -> ``(B, N·T, d)``: one row per example and position, per block (a
    view when B = 1)."""
    n, t, blocks, d = x.shape
    if blocks == 1:
        return x.reshape(1, n * t, d)
    return x.permute(2, 0, 1, 3).reshape(blocks, n * t, d)


def per_example_directions(
    routes: Mapping[str, Route],
    calls: Mapping[str, list[Held]],
    tangents: Mapping[int, Tensor],
    dtype: torch.dtype,
) -> tuple[Tensor | None, set[int]]:
    """û_n = Σ_modules Σ_calls (contribution of the call) for the examples of the step.

    ``tangents`` maps ``id(parameter)`` to its preconditioned gradient ∇̃ (the parameters
    step() preconditions). Each held call goes through its module's adapter
    (``observe``: the same layer inputs and output gradients as the statistics, attention
    recomputed) and contributes Σ_t γ_tᵀ ∇̃ ã_t per example for each Kronecker layer it feeds
    or shares a tied weight with, and ⟨ĝ_n, ∇̃⟩ for each diagonal parameter (ĝ_n its
    per-example gradient). γ and ĝ are the observed gradients of the reduced loss: the
    caller scales û to u_n = g_nᵀ ∇̃ (N for mean reduction, 1 for sum, divided by the loss
    scale).

    Examples are those of the step: per pass (see capture.py) its batch, passes concatenated
    in order (gradient accumulation). Calls of one pass (a module applied several times)
    add up per example.

    Returns:
        ``(N,)`` tensor (None when no call was captured) and the ids of the parameters that
        got a contribution.

    Raises:
        ValueError: if calls of one pass have different batch sizes (not the same examples:
            a module called once for the whole batch, e.g. a position embedding on
            ``arange(T)``). A shared call whose length happens to equal the batch size cannot
            be told apart: the documented requirement is that every hooked call carries the
            batch.
    """
    by_pass: dict[int, Tensor] = {}
    seen: set[int] = set()
    for name, held in calls.items():
        route = routes[name]
        adapter = route.adapter
        entries = [*route.layers, *route.tied]
        indices = sorted({i for i, _ in entries})
        params = [p for p, _ in route.params if id(p) in tangents]
        for saved, grad, pass_id in held:
            obs = adapter.observe(saved, grad, indices, params)
            parts: list[Tensor] = []
            for index, inputs, grads in obs.kron:
                ad = adapter.layers[index]
                part = _layer_directions(ad, inputs, grads, tangents, dtype)
                if part is not None:
                    parts.append(part)
                    seen.update(id(p) for p in ad.parameters() if id(p) in tangents)
            for pid, per_example in obs.per_example.items():
                t = tangents[pid].reshape(-1).to(dtype)
                parts.append(per_example.reshape(per_example.shape[0], -1).to(dtype) @ t)
                seen.add(pid)
            for part in parts:
                prior = by_pass.get(pass_id)
                if prior is None:
                    by_pass[pass_id] = part.to(dtype)
                elif prior.shape != part.shape:
                    raise ValueError(
                        f"per-example loss changes: module {name!r} was called on "
                        f"{part.shape[0]} examples in a forward pass whose other calls saw "
                        f"{prior.shape[0]}. Every hooked call must carry the batch (e.g. "
                        "index a position embedding per example, pos.expand(N, T), not once "
                        "for the whole batch): a call shared by the batch only sees the sum "
                        "of its examples' gradients. Or use constraint='kronecker' (and "
                        "track_loss_changes=False)"
                    )
                else:
                    prior.add_(part.to(prior.device))
    if not by_pass:
        return None, seen
    return torch.cat([by_pass[k] for k in sorted(by_pass)]), seen


# ---------------------------------------------------------------------------- the step size


def loss_moments(
    unit: str,
    loss: Any,
    loss_reduction: str,
    *,
    per_example_scale: float = 1.0,
    distributed: bool = False,
) -> Tensor:
    """(Σ ℓ, Σ ℓ², n) of this step's per-example losses, float64 on the loss's device.

    ``loss`` is what the user passed to ``step(loss=...)``: the per-example losses (1-d), or
    for unit "loss" with mean reduction in one process the reduced loss (0-d, the mean
    itself: moments (L, L², 1)). ``per_example_scale`` converts the user's per-example losses
    to the preconditioner's (1/W for sum reduction over W processes, whose averaged gradient
    is that of Σ ℓ_n / W). The moments of several processes add up.

    Raises:
        TypeError, ValueError: if ``loss`` cannot give the reference (the message says what
            to pass).
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"step(loss=...) must be a tensor, got {type(loss).__name__}")
    values = loss.detach().to(torch.float64)
    if values.dim() == 0:
        if unit == "spread":
            raise ValueError(
                "loss_change_unit='spread' needs the per-example losses: pass "
                "step(loss=per_example_losses), a 1-d tensor (got a 0-d loss)"
            )
        if loss_reduction != "mean":
            raise ValueError(
                "loss_change_unit='loss' with loss_reduction='sum' needs the per-example "
                "losses: pass step(loss=per_example_losses) as a 1-d tensor"
            )
        if distributed:
            raise ValueError(
                "loss_change_unit='loss' over several processes needs the per-example "
                "losses (the mean of the global batch weighs each process by its batch "
                "size): pass step(loss=per_example_losses) as a 1-d tensor"
            )
        return torch.stack([values, values.square(), torch.ones_like(values)])
    if values.dim() != 1:
        raise ValueError(
            f"step(loss=...) must be the reduced loss (0-d) or the per-example losses "
            f"(1-d), got shape {tuple(loss.shape)}"
        )
    if unit == "spread" and not distributed and values.shape[0] < 2:
        raise ValueError(
            "loss_change_unit='spread' needs the per-example losses: pass "
            f"step(loss=per_example_losses), a 1-d tensor of >= 2 values (got shape "
            f"{tuple(loss.shape)})"
        )
    if per_example_scale != 1.0:
        values = values * per_example_scale
    count = torch.full((), float(values.shape[0]), dtype=torch.float64, device=values.device)
    return torch.stack([values.sum(), values.square().sum(), count])


def loss_reference(unit: str, moments: Tensor) -> Tensor:
    """The squared reference r² of a relative target, c_abs = c · r² (0-dim, float64): the
    squared mean per-example loss (unit "loss") or the variance of the per-example losses
    (unit "spread", population form), from ``loss_moments`` (summed over processes)."""
    n = moments[2].clamp_min(1.0)
    mean = moments[0] / n
    if unit == "loss":
        return mean.square()
    return (moments[1] / n - mean.square()).clamp_min(0.0)


def step_scale(form: Tensor, target: Tensor, lr: float, equality: bool) -> Tensor:
    """ν with lr² ν² · form = target (equality) or ≤ target (trust region: ν ≤ 1), 0-dim.

    Where the form is 0 (no gradient, or a step in the null space of C: no loss change is
    predicted, so no ν meets a positive target) or not finite, ν = 1 leaves the step as the
    optimizer's learning rate makes it. So does a target of 0: a relative unit whose
    reference is 0 (loss_change_unit="spread" with every per-example loss equal, as under a
    zero-initialized classifier head) gives no scale, and ν = 0 would stop training for good.
    """
    form = form.to(torch.float64)
    target = target.to(torch.float64)
    ok = torch.isfinite(form) & (form > 0) & (target > 0)
    nu = (target / (lr * lr * torch.where(ok, form, 1.0))).sqrt()
    if not equality:
        nu = nu.clamp(max=1.0)
    return torch.where(ok, nu, 1.0)


# ---------------------------------------------------------------------------- diagnostics


@dataclass
class StepRecord:
    """Device tensors of the last step, read on the host only by ``diagnostics()``."""

    step: int
    lr: float
    nu: Tensor
    target: Tensor | None
    kronecker: Tensor | None  # ∇̃ᵀ(G⊗A)∇̃ summed over layers, per example (before lr, ν)
    exact: Tensor | None  # E_n[u_n²] over the (global) batch (before lr, ν)
    directions: Tensor | None  # u_n of this process's examples (before lr, ν)


@dataclass(frozen=True)
class LossChangeDiagnostics:
    """The last step's scale and predicted per-example loss changes (first order).

    With the step Δθ = -lr·ν·∇̃ the optimizer takes (SGD without momentum), the predicted
    change of example n's loss is Δℓ_n = g_nᵀ Δθ. Fields that need data the options did not
    keep are None (see ``KFACPreconditioner.diagnostics``).

    Attributes:
        step: index of the step described (0 for the first step() call).
        lr: the learning rate used to measure the step.
        nu: the scale ν applied to the preconditioned gradients (1 without a constraint).
        target: c in absolute units (E[(Δℓ)²] = c or ≤ c), None without a constraint.
        kronecker: E[(Δℓ)²] of the step by the Kronecker form Σ_layers ⟨ΔW, G ΔW A⟩ (and
            Σ F Δθ² of the diagonally preconditioned parameters).
        exact: E[(Δℓ)²] of the step by the empirical Fisher, E_n[(Δℓ_n)²] (distributed:
            over the global batch).
        mean, std, min, max: of Δℓ_n over the examples (std: population form, so that
            exact = mean² + std² in one process; distributed: this process's examples).
        fraction_rising: fraction of examples whose loss is predicted to rise (Δℓ_n > 0).
        loss_changes: the ``(N,)`` predicted Δℓ_n (a CPU copy).
    """

    step: int
    lr: float
    nu: float
    target: float | None
    kronecker: float | None
    exact: float | None
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    fraction_rising: float | None
    loss_changes: Tensor | None

    def as_dict(self) -> dict[str, float | int | None]:
        """The scalar fields as a plain dict (for logging)."""
        return {k: v for k, v in vars(self).items() if k != "loss_changes"}


def summarize(record: StepRecord) -> LossChangeDiagnostics:
    """Read a step's record on the host (synchronizes; called only by ``diagnostics()``)."""
    nu = record.nu.double()
    factor = record.lr * nu  # Δθ = -lr ν ∇̃, so Δℓ_n = -lr ν u_n
    kron = None
    if record.kronecker is not None:
        kron = float(factor.square() * record.kronecker.double())
    stats: dict[str, float | None] = dict.fromkeys(
        ("exact", "mean", "std", "min", "max", "fraction_rising")
    )
    if record.exact is not None:
        stats["exact"] = float(factor.square() * record.exact.double())
    changes = None
    if record.directions is not None and record.directions.numel() > 0:
        changes = (-factor * record.directions.double()).cpu()
        stats |= {
            "mean": float(changes.mean()),
            "std": float(changes.std(correction=0)),
            "min": float(changes.min()),
            "max": float(changes.max()),
            "fraction_rising": float((changes > 0).double().mean()),
        }
    return LossChangeDiagnostics(
        step=record.step,
        lr=record.lr,
        nu=float(nu),
        target=None if record.target is None else float(record.target),
        kronecker=kron,
        loss_changes=changes,
        **stats,  # type: ignore[arg-type]
    )
