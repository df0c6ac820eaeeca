"""The seed's loss-change constraint on top of the estimator: measure the step in loss
space, scale it by ν, keep the record that ``diagnostics()`` reads (the math is in
``_constraint``)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from . import _constraint, _scaling, _warn
from ._blocks import DiagonalParam, Layer
from ._constraint import Held, StepRecord
from ._grads import grad_of
from ._model import unique_parameters
from ._options import KFACOptions

if TYPE_CHECKING:
    from ._estimator import Estimator


@dataclass
class HeldStep:
    """constrained_step="optimizer": what step() leaves for the optimizer's step hooks."""

    step: int
    loss_calls: dict[str, list[Held]]
    moments: Tensor | None
    params: list[Tensor]  # the parameters step() preconditioned (unique)
    layers: list[Layer]
    diagonal: list[DiagonalParam]
    before: list[Tensor] | None = None  # their values before the update (the pre-hook's)


class LossChangeController:
    """ν and the record of each step (constraint and ``track_loss_changes``).

    Attributes:
        last: the record of the last measured step (None before one).
    """

    def __init__(
        self, options: KFACOptions, est: Estimator, grad_scaler: torch.amp.GradScaler | None
    ) -> None:
        self.options = options
        self.est = est
        self.grad_scaler = grad_scaler
        self.warned_missing: set[str] = set()
        self.last: StepRecord | None = None
        self.held: HeldStep | None = None

    def moments(self, loss: Tensor | None) -> Tensor | None:
        """The loss moments of this step that scale the target (relative units), checked
        before any state changes."""
        opts = self.options
        moments = None
        if opts.constraint != "none" and opts.loss_change_unit != "absolute":
            if loss is None:
                raise ValueError(
                    f"loss_change_unit={opts.loss_change_unit!r} scales the target by this "
                    "step's loss: call precond.step(loss=...) with the loss (per-example "
                    "losses for 'spread'), or use loss_change_unit='absolute'"
                )
            moments = _constraint.loss_moments(
                opts.loss_change_unit,
                loss,
                opts.loss_reduction,
                per_example_scale=self.per_example_scale(),
                distributed=self.est.comm.distributed,
            )
        return moments

    def loss_scale(self) -> Tensor | None:
        """The GradScaler's current scale as a device tensor (None without scaling).

        ``GradScaler.get_scale()`` would read it on the host; its ``_scale`` tensor is what
        ``scale()`` multiplied the loss by, and stays on the device.
        """
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)
        return scale if isinstance(scale, Tensor) else None

    def check_unscaled(self) -> None:
        """With a GradScaler and a measured step (constraint or loss-change tracking), the
        gradients must be unscaled first: ν is computed from p.grad, and on scaled gradients
        it would be off by the loss scale. (Preconditioning alone is linear in p.grad and
        does not care.) Reads the scaler's per-optimizer stage, host-side Python state."""
        scaler = self.grad_scaler
        opts = self.options
        if scaler is None or not scaler.is_enabled():
            return
        if opts.constraint == "none" and not opts.track_loss_changes:
            return
        states = getattr(scaler, "_per_optimizer_states", None)
        if not isinstance(states, Mapping):
            return  # a GradScaler without the attribute: nothing to check against
        if not any(st.get("stage") is OptState.UNSCALED for st in states.values()):
            raise RuntimeError(
                "step() with a GradScaler and a loss-change constraint (or "
                "track_loss_changes) needs unscaled gradients: call scaler.unscale_(optimizer) "
                "before precond.step(), then scaler.step(optimizer) and scaler.update()"
            )

    def per_example_scale(self) -> float:
        """From the observed gradients (and losses) of this process to the per-example ones
        of the preconditioner's loss: 1, or 1/W for sum reduction over W processes (their
        averaged gradient is that of Σ ℓ_n / W, see docs/distributed.md)."""
        return _scaling.loss_share(self.est.comm.world, self.options.loss_reduction)

    def scale_step(
        self,
        steps: int,
        loss_calls: Mapping[str, list[Held]],
        lr: float,
        done: list[Layer],
        forms: list[Tensor],
        done_diag: list[DiagonalParam],
        diag_form: Tensor | None,
        moments: Tensor | None,
    ) -> None:
        """Measure the step -lr·∇̃ in loss space, scale the gradients by ν, keep the record.

        All on the device of the preconditioned gradients (no host-device copy). Distributed,
        the Kronecker form is summed over the ranks that precondition different layers, and
        E[(Δℓ)²] and the loss reference are taken over the global batch.
        """
        opts = self.options
        comm = self.est.comm
        layers = comm.preconditioned_layers(done)
        # Preconditioned parameters with their gradients (diagonal ones always have one).
        unique = unique_parameters(layers, done_diag)
        params = {id(p): g for p in unique if (g := grad_of(p)) is not None}
        grads = list(params.values())
        device = grads[0].device if grads else self.est.device()
        kron = None
        if opts.needs_kronecker_form:
            kron = self._kronecker_form(forms, diag_form, device)
        directions = exact = None
        if opts.needs_loss_records:
            directions, seen = _constraint.per_example_directions(
                self.est.routes, loss_calls, params, opts.factor_dtype
            )
            if not (len(params) == len(unique) and seen.issuperset(params)):
                self._warn_missing(layers, done_diag, seen)  # some is missing
            directions, exact, moments = self._exact_form(directions, moments, device)
        elif moments is not None:
            moments = comm.sum_over_ranks(moments.to(device))
        nu = torch.ones((), dtype=torch.float64, device=device)
        target = None
        if opts.constraint != "none":
            form = kron if opts.constraint == "kronecker" else exact
            assert form is not None
            nu, target = self._nu(form, moments, lr, device)
            groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
            for g in grads:
                groups[(g.device, g.dtype)].append(g)
            for (dev, dtype), group in groups.items():
                torch._foreach_mul_(group, nu.to(device=dev, dtype=dtype))
        self.last = StepRecord(
            step=steps,
            lr=lr,
            nu=nu,
            target=target,
            kronecker=kron,
            exact=exact,
            directions=directions,
        )

    def _nu(
        self, form: Tensor, moments: Tensor | None, lr: float, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """ν for the step -lr·∇̃ whose E[(Δℓ)²] per unit is ``form``, and the target c (in
        the loss-change unit, from this step's loss moments when it is relative)."""
        opts = self.options
        c = opts.target_loss_change or opts.max_loss_change
        assert c is not None
        if moments is not None:
            target = c * _constraint.loss_reference(opts.loss_change_unit, moments.to(device))
        else:
            target = torch.full((), c, dtype=torch.float64, device=device)
        equality = opts.target_loss_change is not None
        return _constraint.step_scale(form, target, lr, equality=equality), target

    # ---------------------------------------------- constrained_step="optimizer"
    def hold_step(
        self,
        steps: int,
        loss_calls: Mapping[str, list[Held]],
        done: list[Layer],
        done_diag: list[DiagonalParam],
        moments: Tensor | None,
    ) -> None:
        """Keep this step's captured calls and loss moments for the optimizer's step."""
        layers = self.est.comm.preconditioned_layers(done)
        params: list[Tensor] = [
            p for p in unique_parameters(layers, done_diag) if grad_of(p) is not None
        ]
        calls = {k: list(v) for k, v in loss_calls.items()}
        self.held = HeldStep(steps, calls, moments, params, layers, done_diag)

    def before_update(self) -> None:
        """The optimizer's step pre-hook: the preconditioned parameters as they are."""
        held = self.held
        if held is not None:
            held.before = [p.detach().clone() for p in held.params]

    def after_update(self) -> None:
        """The optimizer's step post-hook: Δθ of the preconditioned parameters, measured in
        loss space with the exact form (u_n = g_nᵀ(-Δθ), as u_n = g_nᵀ∇̃ for Δθ = -∇̃), and
        θ ← θ_before + ν Δθ with the ν of the constraint (lr = 1: Δθ is the whole step)."""
        held, self.held = self.held, None
        if held is None or held.before is None:
            return  # no step() since the last update, or no pre-hook call
        opts = self.options
        with torch.no_grad():
            back = [b - p.detach() for p, b in zip(held.params, held.before)]  # -Δθ
            tangents = {id(p): t for p, t in zip(held.params, back)}
            directions, seen = _constraint.per_example_directions(
                self.est.routes, held.loss_calls, tangents, opts.factor_dtype
            )
            if not seen.issuperset(tangents):
                self._warn_missing(held.layers, held.diagonal, seen)
            device = back[0].device if back else self.est.device()
            directions, exact, moments = self._exact_form(directions, held.moments, device)
            nu, target = self._nu(exact, moments, 1.0, device)
            for p, b, t in zip(held.params, held.before, back):
                p.copy_(b.sub_(t.mul_(nu.to(t.device, t.dtype))))  # θ_before + ν Δθ
        self.last = StepRecord(
            step=held.step, lr=1.0, nu=nu, target=target, kronecker=None, exact=exact,
            directions=directions,
        )  # fmt: skip

    def _kronecker_form(
        self, forms: list[Tensor], diag_form: Tensor | None, device: torch.device
    ) -> Tensor:
        """Σ_layers ⟨∇̃, G ∇̃ A⟩ + Σ F ∇̃² per example (0-d float64; all ranks' layers)."""
        kron = torch.zeros((), dtype=torch.float64, device=device)
        for f in forms:
            kron = kron + f.to(device=device, dtype=torch.float64)
        kron = self.est.comm.sum_over_columns(kron)
        if diag_form is not None:
            kron = kron + diag_form.to(device=device, dtype=torch.float64)
        return _scaling.form_per_example(kron, self.options.loss_reduction, self.est.stats_examples)

    def _exact_form(
        self, directions: Tensor | None, moments: Tensor | None, device: torch.device
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """u_n = g_nᵀ ∇̃ from the observed directions, E_n[u_n²] (global batch) and the loss
        moments (summed over ranks in the same reduction)."""
        f64 = torch.float64
        if directions is not None:
            directions = directions.to(device)
            loss_scale = self.loss_scale()
            sigma = None if loss_scale is None else loss_scale.to(device, directions.dtype)
            n, world = directions.shape[0], self.est.comm.world
            directions = directions * _scaling.direction_scale(
                n, world, self.options.loss_reduction, sigma
            )
        # (Σ u², n), with the loss moments when there are some: one reduction.
        local = torch.zeros(2, dtype=f64, device=device)
        if directions is not None:
            local[0] = directions.to(f64).square().sum()
            local[1] = directions.shape[0]
        if moments is not None:
            local = torch.cat([local, moments.to(device)])
        local = self.est.comm.sum_over_ranks(local)
        return (
            directions,
            local[0] / local[1].clamp_min(1.0),
            (local[2:] if moments is not None else None),
        )

    def _warn_missing(
        self, layers: list[Layer], diagonal: list[DiagonalParam], seen: set[int]
    ) -> None:
        names = [
            layer.name
            for layer in layers
            if not any(id(p) in seen for p in layer.adapter.parameters())
        ]
        names += [d.name for d in diagonal if id(d.param) not in seen]
        new = [n for n in names if n not in self.warned_missing]
        if new:
            self.warned_missing.update(new)
            _warn.warn(
                f"{', '.join(map(repr, new))}: gradient preconditioned but no call captured "
                "on this step (no gradient reached the output, or the call ran in eval "
                "mode); left out of the exact loss-change form",
            )
