"""The seed's loss-change constraint: the step size that fixes E[(Δℓ)²], and its diagnostics.

The optimizer takes Δθ = -lr·ν·∇̃ from the preconditioned gradient ∇̃ (for SGD without
momentum exactly; docs/empirical_fisher.md says what other optimizers do). To first order the
loss of example n changes by Δℓ_n = g_nᵀ Δθ, and the empirical Fisher C = E[g gᵀ] measures

    E_n[(Δℓ_n)²] = Δθᵀ C Δθ = lr² ν² ∇̃ᵀ C ∇̃.

step() picks ν so that this equals c ("equality" form, ``target_loss_change``) or stays at or
below c ("trust-region" form, ``max_loss_change``: ν = min(1, ...)). Two forms of ∇̃ᵀ C ∇̃:

- "kronecker": C ≈ G⊗A per layer (damping excluded), Σ_layers ⟨∇̃, G ∇̃ A⟩, read off the
  preconditioning chain (``precondition_eigen_with_form``, ``precondition_pi_with_form``);
- "exact": the empirical Fisher itself, E_n[u_n²] with u_n = Σ_layers Σ_t δ_{n,t}ᵀ ∇̃ ã_{n,t}
  the directional derivative of ℓ_n along ∇̃, computed from the step's captured inputs and
  output gradients as the layer's output for weights ∇̃ (``per_example_directions``): no
  per-example parameter gradient is formed.

Everything here runs on the device without reading values on the host: ν is a 0-dim tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._blocks import Call, Layer

# ---------------------------------------------------------------------------- quadratic forms


def precondition_eigen_with_form(
    grads: Tensor,
    qg: Tensor,
    lg: Tensor,
    qa: Tensor,
    la: Tensor,
    damping: float,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """∇̃ = Q_G [V ⊘ (K + ε)] Q_Aᵀ with V = Q_Gᵀ ∇ Q_A, and ∇̃ᵀ C ∇̃ per block on the way.

    K = λ_G λ_Aᵀ (K-FAC) or the EKFAC scale S; the curvature without damping is
    C = (Q_G⊗Q_A) diag(vec K) (Q_G⊗Q_A)ᵀ, so with Ṽ = V ⊘ (K + ε) = Q_Gᵀ ∇̃ Q_A

        ∇̃ᵀ C ∇̃ = Σ_ij K_ij Ṽ_ij²,

    a sum of non-negative terms (no cancellation) over a tensor the chain computes anyway:
    the same four products as ``kernels.precondition_eigen`` plus one elementwise pass.

    Returns:
        ``(B, g, a)`` preconditioned gradients and the ``(B,)`` quadratic forms.
    """
    v = qg.transpose(1, 2) @ grads @ qa
    k = lg.unsqueeze(2) * la.unsqueeze(1) if scale is None else scale
    v.div_(k + damping)
    form = (k * v.square()).sum(dim=(1, 2))
    return qg @ v @ qa.transpose(1, 2), form


def precondition_pi_with_form(
    grads: Tensor, ig: Tensor, ia: Tensor, cg: Tensor, ca: Tensor
) -> tuple[Tensor, Tensor]:
    """∇̃ = (G + c_G I)⁻¹ ∇ (A + c_A I)⁻¹ and ⟨∇̃, G ∇̃ A⟩ per block, with one extra product.

    With R = ∇ (A + c_A)⁻¹ and L = (G + c_G)⁻¹ ∇, ∇̃ = (G + c_G)⁻¹ R = L (A + c_A)⁻¹, hence
    G ∇̃ = R - c_G ∇̃ and ∇̃ A = L - c_A ∇̃, and by symmetry of G

        ⟨∇̃, G ∇̃ A⟩ = tr(∇̃ᵀ G ∇̃ A) = ⟨R - c_G ∇̃, L - c_A ∇̃⟩.

    The chain needs one of R, L; the form needs both, so the cheaper of the two products is
    done twice: g²·a extra FLOPs per block when g ≤ a, else g·a². The factors themselves are
    not needed (only the inverses the chain already holds and the shifts c_G, c_A).
    """
    g_dim, a_dim = grads.shape[1], grads.shape[2]
    right = grads @ ia  # R
    left = ig @ grads  # L
    out = ig @ right if g_dim <= a_dim else left @ ia
    cg3, ca3 = cg.view(-1, 1, 1), ca.view(-1, 1, 1)
    form = ((right - cg3 * out) * (left - ca3 * out)).sum(dim=(1, 2))
    return out, form


# ---------------------------------------------------------------------------- exact form


def per_example_directions(
    layers: Sequence[Layer], calls: dict[str, list[Call]], grad_scale: float | None
) -> tuple[Tensor | None, list[str]]:
    """u_n = Σ_layers Σ_calls Σ_t δ_{n,t}ᵀ ∇̃ ã_{n,t} for the examples of the step.

    ∇̃ is read from the layers' ``.grad`` (already preconditioned). For one call with input x
    and observed output gradient ∂L/∂s, Σ_t ∂L/∂s_tᵀ ∇̃ ã_t is ⟨∂L/∂s, s(x; ∇̃)⟩ per example,
    s(x; ∇̃) being the layer's output with its parameters replaced by ∇̃ (the layer is linear in
    them): one forward of the layer, no per-example gradient. δ = s · ∂L/∂s with s = N for
    mean reduction, 1 for sum (``grad_scale``; None: N counted from the calls).

    Examples are those of the step: per pass (see capture.py) its batch, passes concatenated
    in order (gradient accumulation). Calls of one pass (a module applied several times) add
    up per example.

    Returns:
        ``(N,)`` tensor (None when no call was captured) and the names of the layers that
        have a preconditioned gradient but no captured call (left out of u).
    """
    by_pass: dict[int, Tensor] = {}
    missing: list[str] = []
    for layer in layers:
        layer_calls = calls.get(layer.name)
        if not layer_calls:
            missing.append(layer.name)
            continue
        ad = layer.adapter
        dw = ad.weight.grad
        db = ad.bias.grad if ad.bias is not None else None
        assert dw is not None
        dtype = layer.stats.dtype
        for x, grad, pass_id in layer_calls:
            dt = torch.promote_types(x.dtype, dw.dtype)
            s = ad.linear_map(x.to(dt), dw.to(dt), None if db is None else db.to(dt))
            prod = ad.output_grads(s.to(dtype) * grad.to(dtype))  # (N, T, blocks, g)
            contribution = prod.sum(dim=(1, 2, 3))
            seen = by_pass.get(pass_id)
            by_pass[pass_id] = contribution if seen is None else seen.add_(contribution)
    if not by_pass:
        return None, missing
    u = torch.cat([by_pass[k] for k in sorted(by_pass)])
    scale = float(u.shape[0]) if grad_scale is None else grad_scale
    return u.mul_(scale), missing


# ---------------------------------------------------------------------------- the step size


def loss_reference(unit: str, loss: Tensor, loss_reduction: str) -> Tensor:
    """The squared reference r² of a relative target: c_abs = c · r² (0-dim, on the device).

    unit "loss": r = mean per-example loss (a 0-dim ``loss`` is the reduced loss: with mean
    reduction the mean itself; with sum reduction per-example losses are needed). unit
    "spread": r = standard deviation of the per-example losses (population form).

    Raises:
        ValueError: if ``loss`` cannot give the reference (the message says what to pass).
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"step(loss=...) must be a tensor, got {type(loss).__name__}")
    loss = loss.detach()
    if unit == "loss":
        if loss.dim() == 0:
            if loss_reduction != "mean":
                raise ValueError(
                    "loss_change_unit='loss' with loss_reduction='sum' needs the per-example "
                    "losses: pass step(loss=per_example_losses) as a 1-d tensor"
                )
            return loss.square()
        if loss.dim() != 1:
            raise ValueError(
                f"step(loss=...) must be the reduced loss (0-d) or the per-example losses "
                f"(1-d), got shape {tuple(loss.shape)}"
            )
        return loss.mean().square()
    if loss.dim() != 1 or loss.shape[0] < 2:
        raise ValueError(
            "loss_change_unit='spread' needs the per-example losses: pass "
            f"step(loss=per_example_losses), a 1-d tensor of >= 2 values (got shape "
            f"{tuple(loss.shape)})"
        )
    return loss.var(correction=0)


def step_scale(form: Tensor, target: Tensor, lr: float, equality: bool) -> Tensor:
    """ν with lr² ν² · form = target (equality) or ≤ target (trust region: ν ≤ 1), 0-dim.

    Where the form is 0 (no gradient, or a step in the null space of C: no loss change is
    predicted, so no ν meets a positive target) or not finite, ν = 1 leaves the step as the
    optimizer's learning rate makes it.
    """
    form = form.to(torch.float64)
    ok = torch.isfinite(form) & (form > 0)
    nu = (target.to(torch.float64) / (lr * lr * torch.where(ok, form, 1.0))).sqrt()
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
    directions: Tensor | None  # u_n (before lr, ν)


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
        kronecker: E[(Δℓ)²] of the step by the Kronecker form Σ_layers ⟨ΔW, G ΔW A⟩.
        exact: E[(Δℓ)²] of the step by the empirical Fisher, E_n[(Δℓ_n)²].
        mean, std, min, max: of Δℓ_n over the examples (std: population form, so that
            exact = mean² + std²).
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
    changes = None
    if record.directions is not None and record.directions.numel() > 0:
        changes = (-factor * record.directions.double()).cpu()
        stats = {
            "exact": float(changes.square().mean()),
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
