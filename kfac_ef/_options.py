"""Typed, validated options of :class:`~kfac_ef.KFACPreconditioner`.

Every option is checked once, at construction; an invalid value raises ``ValueError`` (or
``TypeError``) naming the option, the value received and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

LossReduction = Literal["mean", "sum"]
DampingMode = Literal["exact", "pi", "ekfac", "eigen_adam"]
KFACApprox = Literal["expand", "reduce"]
Backend = Literal["auto", "torch", "triton"]
FisherType = Literal["empirical", "mc"]
Constraint = Literal["none", "kronecker", "exact"]
LossChangeUnit = Literal["absolute", "loss", "spread"]
DampingUnit = Literal["absolute", "relative"]
LearningRate = float | Callable[[int], float]
OtherParams = Literal["ignore", "diagonal"]
Grafting = Literal["none", "gradient"]
WideLayers = Literal["optimizer", "diagonal"]

LOSS_REDUCTIONS = ("mean", "sum")
DAMPING_MODES = ("exact", "pi", "ekfac", "eigen_adam")
KFAC_APPROXES = ("expand", "reduce")
BACKENDS = ("auto", "torch", "triton")
FISHER_TYPES = ("empirical", "mc")
CONSTRAINTS = ("none", "kronecker", "exact")
LOSS_CHANGE_UNITS = ("absolute", "loss", "spread")
DAMPING_UNITS = ("absolute", "relative")
OTHER_PARAMS = ("ignore", "diagonal")
GRAFTINGS = ("none", "gradient")
CONSTRAINED_STEPS = ("gradient", "optimizer")
WIDE_LAYERS = ("optimizer", "diagonal")
FACTOR_DTYPES = (torch.float32, torch.float64)

SkipSpec = str | type[nn.Module]


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"Invalid {name}={value!r}: must be one of {', '.join(map(repr, allowed))}"
        )
    return value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}={value!r}: must be an int >= 1")
    return value


def _optional_positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"Invalid {name}={value!r}: must be a finite number > 0 (or None)")
    return float(value)


def _normalize_skip(value: Any) -> tuple[SkipSpec, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str | type) else value
    if not isinstance(items, Iterable):
        raise TypeError(
            f"Invalid skip_layers={value!r}: must be a module name, a regex, an nn.Module "
            "subclass, or an iterable of those"
        )
    out: list[SkipSpec] = []
    for item in items:
        if isinstance(item, str):
            try:
                re.compile(item)
            except re.error as exc:
                raise ValueError(
                    f"Invalid skip_layers entry {item!r}: not a valid regex ({exc})"
                ) from None
            out.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            out.append(item)
        else:
            raise TypeError(
                f"Invalid skip_layers entry {item!r}: must be a module name or regex (str) "
                "or an nn.Module subclass"
            )
    return tuple(out)


@dataclass(frozen=True)
class KFACOptions:
    """Options of the preconditioner (see the README's options table for the meaning of each).

    Attributes:
        damping: ε > 0, added to the Kronecker-factored curvature: (G⊗A + εI)⁻¹.
        damping_unit: "relative" (default: ε times each Kronecker block's mean curvature
            eigenvalue (tr G / dim G)(tr A / dim A), set at every decomposition; for a
            diagonal parameter ε times the mean of its F; docs/math.md) or "absolute" (ε as
            given).
        factor_decay: β ∈ [0, 1); running average F ← β F + (1-β) F_batch of A and G.
            0 keeps only the latest statistics. The first update sets F = F_batch.
        factor_update_steps: statistics are captured on steps 0, k, 2k, ...
        inv_update_steps: eigendecompositions at step 0 and every k steps after.
        loss_reduction: how the loss reduces over the batch, "mean" or "sum" (fixes the
            scale of G, see docs/math.md).
        damping_mode: "eigen_adam" (default: the eigenbasis of "exact" with Adam's
            running second moment of the minibatch gradient in it), "exact" (eigenbasis of
            the Kronecker product), "pi" (factored Tikhonov damping with π-scaling) or
            "ekfac" (eigenvalue-corrected: the eigenbasis of "exact" with the exact
            per-example second moment S in it).
        kfac_approx: "expand" or "reduce" for layers with shared positions.
        statistics_stride: k >= 1: with "expand", the factor statistics of layers with shared
            positions (sequences, convolutions) use every k-th position, starting at a
            position that advances by one each statistics step (so k statistics steps cover
            every position), G's sum scaled by T/(positions used) (over k statistics steps
            at fixed parameters, and k dividing T, the mean is the full A and G; docs/math.md);
            1 (default) uses every position. Cuts the statistics' cost by about k.
        skip_layers: module names / regexes (full match) / module types to leave alone.
        factor_dtype: float32 (default) or float64 for factors and decompositions.
        backend: "auto", "torch" or "triton" for the factor-statistics and preconditioning
            kernels; the environment variable KFAC_EF_BACKEND overrides it (docs/kernels.md).
        fisher_type: "empirical" (G from the gradients of the user's loss) or "mc" (G from
            targets sampled from the model's predictive distribution, see ``kfac_ef.mc``).
        constraint: "none", "kronecker" or "exact": which form of E[(Δℓ)²] step() scales the
            preconditioned gradients to meet (docs/empirical_fisher.md). None (default):
            "exact" when a target or maximum is given, else "none".
        target_loss_change: c of the equality form E[(Δℓ)²] = c, in ``loss_change_unit``.
        max_loss_change: c of the trust-region form E[(Δℓ)²] ≤ c, in ``loss_change_unit``.
        loss_change_unit: "absolute" (c as given), "loss" (c times the squared mean
            per-example loss) or "spread" (c times the variance of the per-example losses).
        lr: the learning rate the optimizer applies (a number, or a callable of the step
            count returning one); needed by the constraint (with ``constrained_step=
            "gradient"``) and the loss-change tracking.
        constrained_step: what the constraint scales. "gradient" (default): the
            preconditioned gradients, by the ν that makes Δθ = -lr·ν·∇̃ meet it (exact for
            SGD without momentum). "optimizer": the update the optimizer makes to the
            preconditioned parameters, measured after its step (``precond.attach(optimizer)``
            registers the hooks): any optimizer, momentum and Adam included, keeps the
            constraint, and no ``lr`` is needed. Needs constraint="exact"; not with
            track_loss_changes.
        track_loss_changes: keep each step's captured inputs and output gradients until
            step() to compute the per-example loss changes for ``diagnostics()``.
        other_params: what happens to trainable parameters outside the Kronecker form
            (norm layers, lone biases, ...): "ignore" leaves them to the optimizer,
            "diagonal" preconditions those with a per-example gradient rule by their diagonal
            empirical Fisher, p.grad / (F + ε).
        max_factor_dim: widest factor kept dense (None: no limit), not counting A's bias
            coordinate (a layer with d inputs and a bias keeps its (d+1)-wide A dense for
            d <= max_factor_dim). Wider factors are block-diagonal with blocks of at most
            ``large_factor_block``, or their layers left to the optimizer (``wide_layers``).
        wide_layers: "optimizer" (default): an embedding with more rows than
            ``max_factor_dim`` (a vocabulary), and the layers tied to it (an LM head), are
            left to the optimizer, listed by summary() with the reason; "diagonal": they are
            preconditioned with diagonal wide factors. Other layers wider than
            ``max_factor_dim`` (a wide MLP, an untied head) keep diagonal or block-diagonal
            factors either way.
        large_factor_block: block size of factors wider than ``max_factor_dim``; 1 (default)
            keeps them diagonal, with a warning at construction naming them; above 1 they are
            block-diagonal, without one. At most ``max_factor_dim``.
        memory_budget: bytes the preconditioner's state may take (None: no limit);
            construction raises with the plan when it exceeds them.
        max_decomposition_failures: a layer whose decomposition fails (even in float64)
            this many decomposition steps in a row makes step() raise, with the factors'
            statistics in the message; fewer failures keep the previous decomposition.
        warning_interval: at most one warning about skipped (non-finite) statistics
            updates per this many steps; the counts accumulate in between (``faults()``).
        exponent: p of the update (C + εI)^p ∇: -1 (the natural-gradient step the
            constraint derives) or any p in [-1, 0), e.g. -0.5, the power of Adam and the
            Shampoo family (scale-free: the same step for the loss times any constant).
            "exact" and "ekfac" apply it to their eigenvalues (or S); "pi" raises both
            damped factors to p (its Kronecker form, for constraint="kronecker" or
            track_loss_changes, needs p = -1).
        precondition_update: also precondition the update the optimizer makes from the
            preconditioned gradients (``precond.attach(optimizer)`` registers the hooks):
            after each ``optimizer.step()`` that follows a step(), the change Δθ of the
            preconditioned layers' parameters that the optimizer holds is replaced by
            (C + εI)^p Δθ with the same factors, rescaled per block to the norm of Δθ. Under
            torch.optim.Muon this makes its step the steepest descent under the spectral norm
            measured in K-FAC's geometry, C^p orth(C^p M) (M: Muon's momentum). Needs a
            stateless damping_mode ("exact", "pi" or "ekfac"), no constraint and no
            track_loss_changes; not under FSDP2 (DDP: every rank has the same Δθ, and the
            gradient workers precondition it as in step()).
        grafting: "gradient" (each Kronecker block's, and diagonal parameter's,
            preconditioned gradient rescaled to the norm of its raw gradient, so that the
            preconditioner chooses the direction and the optimizer's own step size holds)
            or "none".
    """

    damping: float = 1e-2
    damping_unit: DampingUnit = "relative"
    factor_decay: float = 0.95
    factor_update_steps: int = 5
    inv_update_steps: int = 10
    loss_reduction: LossReduction = "mean"
    damping_mode: DampingMode = "eigen_adam"
    kfac_approx: KFACApprox = "expand"
    statistics_stride: int = 1
    skip_layers: tuple[SkipSpec, ...] = field(default=())
    factor_dtype: torch.dtype = torch.float32
    backend: Backend = "auto"
    fisher_type: FisherType = "empirical"
    constraint: Constraint | None = None
    target_loss_change: float | None = None
    max_loss_change: float | None = None
    loss_change_unit: LossChangeUnit = "spread"
    lr: LearningRate | None = None
    track_loss_changes: bool = False
    constrained_step: str = "gradient"
    other_params: OtherParams = "ignore"
    max_factor_dim: int | None = 4096
    large_factor_block: int = 1
    memory_budget: int | None = None
    max_decomposition_failures: int = 3
    warning_interval: int = 100
    exponent: float = -0.5
    grafting: Grafting = "gradient"
    wide_layers: WideLayers = "optimizer"
    precondition_update: bool = False

    def __post_init__(self) -> None:
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d) or d <= 0:
            raise ValueError(f"Invalid damping={d!r}: must be a finite number > 0")
        object.__setattr__(self, "damping", float(d))
        b = self.factor_decay
        if isinstance(b, bool) or not isinstance(b, int | float) or not (0.0 <= b < 1.0):
            raise ValueError(f"Invalid factor_decay={b!r}: must be a number in [0, 1)")
        object.__setattr__(self, "factor_decay", float(b))
        _positive_int("factor_update_steps", self.factor_update_steps)
        _positive_int("inv_update_steps", self.inv_update_steps)
        _choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _choice("damping_mode", self.damping_mode, DAMPING_MODES)
        _choice("kfac_approx", self.kfac_approx, KFAC_APPROXES)
        _positive_int("statistics_stride", self.statistics_stride)
        _choice("backend", self.backend, BACKENDS)
        if self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(
                f"Invalid factor_dtype={self.factor_dtype!r}: must be torch.float32 or "
                "torch.float64 (factors are kept in full precision whatever the activations' dtype)"
            )
        object.__setattr__(self, "skip_layers", _normalize_skip(self.skip_layers))
        _choice("other_params", self.other_params, OTHER_PARAMS)
        if self.max_factor_dim is not None:
            _positive_int("max_factor_dim", self.max_factor_dim)
        _positive_int("large_factor_block", self.large_factor_block)
        if self.max_factor_dim is not None and self.large_factor_block > self.max_factor_dim:
            raise ValueError(
                f"Invalid large_factor_block={self.large_factor_block!r}: must be <= "
                f"max_factor_dim={self.max_factor_dim} (blocks of wide factors are at most as "
                "wide as a dense factor may be)"
            )
        if self.memory_budget is not None:
            _positive_int("memory_budget", self.memory_budget)
        _choice("fisher_type", self.fisher_type, FISHER_TYPES)
        _positive_int("max_decomposition_failures", self.max_decomposition_failures)
        _positive_int("warning_interval", self.warning_interval)
        self._check_constraint()
        _choice("damping_unit", self.damping_unit, DAMPING_UNITS)
        _choice("grafting", self.grafting, GRAFTINGS)
        _choice("wide_layers", self.wide_layers, WIDE_LAYERS)
        p = self.exponent
        if (
            isinstance(p, bool)
            or not isinstance(p, int | float)
            or not math.isfinite(p)
            or not -1.0 <= p < 0.0
        ):
            raise ValueError(f"Invalid exponent={p!r}: must be a number in [-1, 0)")
        object.__setattr__(self, "exponent", float(p))
        if p != -1.0 and self.damping_mode == "pi" and self.needs_kronecker_form:
            what = (
                f"constraint={self.constraint!r}"
                if self.constraint == "kronecker"
                else "track_loss_changes=True"
            )
            raise ValueError(
                f"Invalid exponent={p!r} with damping_mode='pi' and {what}: the Kronecker "
                "form of π-damping is computed from damped inverses, so it needs exponent=-1; "
                "choose damping_mode='exact' or 'ekfac', or exponent=-1"
            )
        self._check_precondition_update()

    def _check_precondition_update(self) -> None:
        if not isinstance(self.precondition_update, bool):
            raise TypeError(
                f"Invalid precondition_update={self.precondition_update!r}: must be True or False"
            )
        if not self.precondition_update:
            return
        if self.damping_mode == "eigen_adam":
            raise ValueError(
                "Invalid precondition_update=True with damping_mode='eigen_adam': its moments "
                "would take the optimizer's update for a gradient; choose damping_mode="
                "'exact', 'pi' or 'ekfac'"
            )
        if self.constraint != "none" or self.track_loss_changes:
            raise ValueError(
                f"Invalid precondition_update=True with constraint={self.constraint!r} and "
                f"track_loss_changes={self.track_loss_changes}: the update preconditioned after "
                "the optimizer's step is no longer the one a constraint measured; use neither"
            )

    def _check_constraint(self) -> None:
        if self.constraint is None:
            given = self.target_loss_change is not None or self.max_loss_change is not None
            object.__setattr__(self, "constraint", "exact" if given else "none")
        _choice("constraint", self.constraint, CONSTRAINTS)
        _choice("loss_change_unit", self.loss_change_unit, LOSS_CHANGE_UNITS)
        target = _optional_positive("target_loss_change", self.target_loss_change)
        maximum = _optional_positive("max_loss_change", self.max_loss_change)
        object.__setattr__(self, "target_loss_change", target)
        object.__setattr__(self, "max_loss_change", maximum)
        if not isinstance(self.track_loss_changes, bool):
            raise TypeError(
                f"Invalid track_loss_changes={self.track_loss_changes!r}: must be True or False"
            )
        lr = self.lr
        if lr is not None and not callable(lr):
            if (
                isinstance(lr, bool)
                or not isinstance(lr, int | float)
                or not (math.isfinite(lr) and lr > 0)
            ):
                raise ValueError(
                    f"Invalid lr={lr!r}: must be a finite number > 0 or a callable of the step "
                    "count returning one (the learning rate your optimizer applies)"
                )
            object.__setattr__(self, "lr", float(lr))
        if self.constraint == "none":
            if target is not None or maximum is not None:
                which = "target_loss_change" if target is not None else "max_loss_change"
                raise ValueError(
                    f"Invalid {which}={target if target is not None else maximum!r} with "
                    "constraint='none': it has no effect; choose constraint='kronecker' or "
                    "'exact', or drop it"
                )
        elif (target is None) == (maximum is None):
            raise ValueError(
                f"Invalid target_loss_change={target!r} / max_loss_change={maximum!r} with "
                f"constraint={self.constraint!r}: give exactly one of them (target_loss_change "
                "for the equality form E[(Δℓ)²] = c, max_loss_change for the trust-region form "
                "E[(Δℓ)²] ≤ c)"
            )
        _choice("constrained_step", self.constrained_step, CONSTRAINED_STEPS)
        if self.constrained_step == "optimizer":
            if self.constraint != "exact" or self.track_loss_changes:
                raise ValueError(
                    f"Invalid constrained_step='optimizer' with constraint={self.constraint!r}"
                    f" and track_loss_changes={self.track_loss_changes}: the optimizer's step "
                    "is measured with the exact form only (constraint='exact', or a target or "
                    "maximum without constraint=) and without track_loss_changes"
                )
            return  # Δθ is measured after the optimizer's step: no lr
        if (self.constraint != "none" or self.track_loss_changes) and lr is None:
            what = (
                f"constraint={self.constraint!r}"
                if self.constraint != "none"
                else "track_loss_changes=True"
            )
            raise ValueError(
                f"Invalid lr=None with {what}: pass lr=, the learning rate your optimizer "
                "applies (a number or a callable of the step count), so that the step "
                "Δθ = -lr·ν·∇̃ can be measured"
            )

    @property
    def needs_loss_records(self) -> bool:
        """Whether step() needs this step's inputs and output gradients of the user's loss."""
        return self.constraint == "exact" or self.track_loss_changes

    @property
    def needs_kronecker_form(self) -> bool:
        """Whether step() evaluates Σ_layers ⟨ΔW, G ΔW A⟩."""
        return self.constraint == "kronecker" or self.track_loss_changes

    def learning_rate(self, step: int) -> float:
        """The optimizer's learning rate at ``step`` (``lr`` called if it is a callable)."""
        lr = self.lr
        if lr is None:
            raise RuntimeError("no lr was given")  # guarded at construction
        if callable(lr):
            value = lr(step)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"lr({step}) returned {value!r}: the lr callable must return a finite "
                    "number > 0"
                )
            return float(value)
        return lr

    def skips(self, name: str, module: nn.Module) -> bool:
        """Whether ``skip_layers`` names this module (exact name, full-match regex or type)."""
        for spec in self.skip_layers:
            if isinstance(spec, str):
                if spec == name or re.fullmatch(spec, name):
                    return True
            elif isinstance(module, spec):
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """A plain, picklable description of the options (types of skip_layers by name)."""
        # Not dataclasses.asdict: it deep-copies, and a callable lr may be a bound method of a
        # scheduler holding the optimizer.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["factor_dtype"] = str(self.factor_dtype).removeprefix("torch.")
        if callable(self.lr):
            out["lr"] = f"<callable {getattr(self.lr, '__qualname__', type(self.lr).__name__)}>"
        out["skip_layers"] = [
            s if isinstance(s, str) else f"{s.__module__}.{s.__qualname__}"
            for s in self.skip_layers
        ]
        return out
