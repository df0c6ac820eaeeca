"""KFACPreconditioner: orchestration of capture, statistics, decompositions and step().

Data flows one way: hooks (capture.py) -> per-layer statistics (_stats.py) -> running factors
and, every ``inv_update_steps``, decompositions (_blocks.py, linalg.py) -> step() rewrites
``p.grad``. Nothing else touches ``p.grad``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState
from torch.autograd.profiler import record_function

from . import _constraint, _ekfac, _warn, kernels, linalg
from ._blocks import (
    Bucket,
    Decomposition,
    DiagonalParam,
    Layer,
    decompose,
    decomposition_keys,
    make_buckets,
    precondition_diagonal,
)
from ._constraint import Held, LossChangeDiagnostics, StepRecord
from ._discovery import Plan, Route, check_devices, discover
from ._factors import (
    FactorSpec,
    precondition_inverse_with_form,
    precondition_structured_eigen,
    precondition_structured_inverse,
    to_user,
)
from ._options import KFACOptions, LearningRate, SkipSpec
from ._stats import Scale, g_scale
from .capture import Capture, call_eagerly
from .distributed import DistributedOptions, Distributor, resolve, unwrap
from .summary import DiagonalSummary, LayerSummary, Summary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Faults:
    """Numerical faults met so far (``KFACPreconditioner.faults()``; counts since
    construction, carried by ``state_dict()``).

    Attributes:
        steps: completed step() calls.
        skipped_steps: statistics steps whose gradients were not all finite (e.g. a
            loss-scale overflow): no factor was updated.
        skipped_updates: per layer (or diagonally preconditioned parameter), statistics
            updates rejected for non-finite values (one per Kronecker block per step, so a
            grouped conv counts its groups); layers without any are absent.
        decomposition_failures: per layer, decompositions that failed even in float64
            (the previous decomposition was kept); layers without any are absent.
        consecutive_failures: per layer, the current run of such failures (step() raises
            when it reaches ``max_decomposition_failures``); layers at 0 are absent.
    """

    steps: int
    skipped_steps: int
    skipped_updates: dict[str, int]
    decomposition_failures: dict[str, int]
    consecutive_failures: dict[str, int]


STATE_FORMAT = "kfac_ef.state/1"

# Prefixes that wrappers add to module names: DistributedDataParallel's and torch.compile's.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _check_not_sharded(model: nn.Module) -> None:
    """Refuse sharded models (FSDP, FSDP2's fully_shard, DTensor parameters): a rank holds a
    shard of each parameter and of its gradient, which the Kronecker factors and p.grad
    rewriting assume whole. Checked without importing torch.distributed.tensor: a DTensor
    parameter exists only if that module was imported."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    sharded = [
        name
        for name, p in model.named_parameters()
        if dtensor is not None and isinstance(p, dtensor)
    ]
    wrappers = [
        name or "<root>"
        for name, m in model.named_modules()
        if type(m).__name__ == "FullyShardedDataParallel"
    ]
    if sharded or wrappers:
        what = (
            f"FullyShardedDataParallel modules ({', '.join(wrappers[:5])})"
            if wrappers
            else f"sharded (DTensor) parameters ({', '.join(sharded[:5])}"
            + (", ..." if len(sharded) > 5 else "")
            + ")"
        )
        raise NotImplementedError(
            f"the model has {what}: sharded models (FSDP, fully_shard, tensor parallelism) "
            "are not supported yet. Build the preconditioner on an unsharded model, with "
            "DistributedDataParallel for data parallelism (docs/distributed.md)."
        )


def _unique_parameters(
    layers: Iterable[Layer], diagonal: Iterable[DiagonalParam]
) -> list[nn.Parameter]:
    """The parameters of these Kronecker layers and diagonal entries, each once (a tied
    weight belongs to several layers)."""
    out: dict[int, nn.Parameter] = {}
    for layer in layers:
        for p in layer.adapter.parameters():
            out.setdefault(id(p), p)
    for d in diagonal:
        out.setdefault(id(d.param), d.param)
    return list(out.values())


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module inside a torch.compile wrapper (so that layer names carry no
    ``_orig_mod.``; the wrapper's forward runs the inner modules, whose hooks fire)."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return model


# Modules hooked by a live preconditioner: a second one on the same module would double the
# statistics work and disagree about p.grad, so it is refused.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[KFACPreconditioner]] = (
    weakref.WeakKeyDictionary()
)


def _structure(model: nn.Module) -> list[tuple[str, str, int, tuple[int, ...], tuple[bool, ...]]]:
    """Modules with parameters: name, type, identity, parameter identities, trainability.

    Covers every module discovery looks at: a tied weight appears under each module that
    registers it (so untying or re-tying shows), and the projections of a MultiheadAttention
    (its packed ``in_proj_weight`` and its ``out_proj`` submodule) are listed although the
    attention's adapter, not their own, reads them.
    """
    out = []
    for name, module in model.named_modules():
        direct = list(module.parameters(recurse=False))
        if direct:
            out.append(
                (
                    name or "<model>",
                    type(module).__name__,
                    id(module),
                    tuple(id(p) for p in direct),
                    tuple(p.requires_grad for p in direct),
                )
            )
    return out


# Backward passes whose calls may be held until step() before a warning (gradient
# accumulation over more micro-batches than this is unusual; a loop without step() is a bug).
_HELD_PASSES_WARNING = 64


def _weak(method: Any, default: Any) -> Any:
    """``method`` called through a weak reference to its object (``default`` once the object
    is gone): the hooks must not keep the preconditioner alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return default if bound is None else bound(*args)

    return call


def _snapshot(saved: Any) -> Any:
    """A copy of the tensors in what a call saved (tuples, lists, dicts and dataclasses of
    them walked through; other values kept as they are)."""
    if isinstance(saved, Tensor):
        return saved.clone()
    if isinstance(saved, tuple | list):
        return type(saved)(_snapshot(x) for x in saved)
    if isinstance(saved, dict):
        return {k: _snapshot(v) for k, v in saved.items()}
    if dataclasses.is_dataclass(saved) and not isinstance(saved, type):
        changes = {
            f.name: _snapshot(getattr(saved, f.name)) for f in dataclasses.fields(saved) if f.init
        }
        return dataclasses.replace(saved, **changes)
    return saved


def _value_problems(
    state: Mapping[str, Any], layers: Mapping[str, Any], diagonal: Mapping[str, Any]
) -> list[str]:
    """What in a checkpoint's values cannot be loaded: non-finite factors, decompositions
    or inverses (they would turn every gradient into NaN), negative counters."""
    problems: list[str] = []

    def count(where: str, value: Any) -> None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not ok and isinstance(value, Tensor):
            ok = not value.is_floating_point() and bool((value >= 0).all())
        if not ok:
            problems.append(f"{where} must be a non-negative integer count, got {value!r}")

    def finite(where: str, value: Any, minimum: float | None = None) -> None:
        if not isinstance(value, Tensor):
            problems.append(f"{where} must be a tensor, got {type(value).__name__}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            problems.append(f"{where} has {bad} non-finite entries")
        elif minimum is not None and value.numel() and float(value.min()) < minimum:
            problems.append(f"{where} has entries below {minimum}")

    count("steps", state.get("steps"))
    if state.get("skipped_steps") is not None:
        count("skipped_steps", state["skipped_steps"])
    examples = state.get("stats_examples", 1.0)
    if not (isinstance(examples, int | float) and math.isfinite(examples) and examples > 0):
        problems.append(f"stats_examples must be a finite number > 0, got {examples!r}")
    for name, entry in layers.items():
        for key in ("A", "G"):
            finite(f"{name}: {key}", entry.get(key))
        for key in ("updates", "skipped", "scale_updates"):
            if entry.get(key) is not None:
                count(f"{name}: {key}", entry[key])
        for n in entry.get("failures", (0, 0)):
            count(f"{name}: failures", n)
        for key, value in (entry.get("decomposition") or {}).items():
            finite(f"{name}: decomposition {key!r}", value)
    for name, entry in diagonal.items():
        finite(f"{name}: F", entry.get("F"))
        for key in ("updates", "skipped"):
            count(f"{name}: {key}", entry.get(key))
        if entry.get("inverse") is not None:
            finite(f"{name}: inverse", entry["inverse"], minimum=0.0)
        if entry.get("curvature") is not None:
            finite(f"{name}: curvature", entry["curvature"], minimum=0.0)
    return problems


class KFACPreconditioner:
    """Kronecker-factored preconditioning with the empirical Fisher.

    ``step()`` replaces each supported layer's gradient ∇ (the matrix [∇W | ∇b]) by
    (G⊗A + εI)⁻¹ vec(∇), where A = E[ã ãᵀ] over layer inputs (with a homogeneous coordinate
    for the bias) and G = E[δ δᵀ] over per-example output gradients δ = ∂ℓ_n/∂s, running-averaged
    over steps. Call it after ``loss.backward()`` and before ``optimizer.step()``.

    Supported layers: nn.Linear (inputs of any rank; extra dims are shared positions),
    nn.Conv1d/2d/3d (any stride, padding, padding_mode, dilation, groups), nn.Embedding (a
    Linear on one-hot inputs: diagonal A), nn.Bilinear, nn.MultiheadAttention (its q, k, v and
    output projections). Factors wider than ``max_factor_dim`` are kept diagonal (or
    block-diagonal). Norm layers, PReLU and lone biases are preconditioned by their diagonal
    empirical Fisher with ``other_params="diagonal"``. Other parameters are left untouched;
    ``summary()`` lists them with the reason, and the bytes of the planned state.

    With ``constraint`` other than "none", step() also scales the preconditioned gradients by
    a 0-dim ν so that the optimizer's step Δθ = -lr·ν·∇̃ predicts E_n[(Δℓ_n)²] = c (or ≤ c),
    the seed's loss-change constraint (docs/empirical_fisher.md).

    Mixed precision: factors stay in ``factor_dtype`` whatever autocast does. With a
    torch.amp.GradScaler, pass it as ``grad_scaler`` and call, in this order,
    ``scaler.scale(loss).backward(); scaler.unscale_(optimizer); precond.step();
    scaler.step(optimizer); scaler.update()``: the statistics are unscaled by the scaler's
    scale (a device tensor, no synchronization), and a step whose gradients are not finite
    (an overflow) leaves every factor unchanged.

    Args:
        model: the model; its supported submodules are hooked at construction.
        damping: ε > 0.
        damping_unit: "absolute" (default: ε as given) or "relative" (per Kronecker block,
            ε times the mean eigenvalue of G⊗A, (tr G/dim G)(tr A/dim A), fixed at each
            decomposition; for a diagonal parameter ε times the mean of its F). Relative ε
            means the same at every scale of the loss and of the layer's activations.
        factor_decay: β ∈ [0, 1) of the running averages of A and G.
        factor_update_steps: collect statistics every k-th step (steps 0, k, 2k, ...).
        inv_update_steps: recompute decompositions at step 0 and every k-th step.
        loss_reduction: "mean" or "sum", the reduction of the loss over the batch.
        damping_mode: "exact" (ε added to the eigenvalues of G⊗A), "pi" (factored damping)
            or "ekfac" (the eigenbases of "exact" with the exact second moment S of the
            per-example gradients in them, George et al. 2018).
        kfac_approx: "expand" or "reduce", for layers with shared positions.
        skip_layers: module names, full-match regexes or module types to leave alone.
        factor_dtype: torch.float32 or torch.float64 for factors and decompositions.
        backend: "auto", "torch" or "triton" kernels (the environment variable
            KFAC_EF_BACKEND overrides it). "auto" checks each Triton kernel variant once
            against its torch reference; any Triton failure falls back to the reference
            with a warning (docs/kernels.md).
        other_params: "ignore" or "diagonal", for parameters outside the Kronecker form.
        max_factor_dim: widest dense factor (None: no limit); default 4096.
        large_factor_block: block size of wider factors; 1 (default) keeps them diagonal.
        memory_budget: bytes the planned state may take; construction raises beyond.
        max_decomposition_failures: a layer whose decomposition fails (even in float64)
            on this many decomposition steps in a row makes step() raise, the factors'
            statistics in the message (default 3); fewer failures keep the previous
            decomposition (or leave the layer unpreconditioned until one succeeds).
        warning_interval: at most one warning about skipped non-finite statistics updates
            per this many steps (default 100); ``faults()`` has the counts.
        grad_scaler: the torch.amp.GradScaler scaling the loss, if any.
        fisher_type: "empirical" (G from the gradients of your loss) or "mc" (G from targets
            sampled from the model's predictive distribution; use ``kfac_ef.mc_backward``).
        constraint: "none", "kronecker" (E[(Δℓ)²] by Σ_layers ⟨ΔW, G ΔW A⟩) or "exact"
            (by the empirical Fisher itself, from the step's captured tensors). Default:
            "exact" when ``target_loss_change`` or ``max_loss_change`` is given, else "none".
        target_loss_change: c of the equality form E[(Δℓ)²] = c.
        max_loss_change: c of the trust-region form E[(Δℓ)²] ≤ c (ν ≤ 1).
        loss_change_unit: "spread" (default: c in units of the variance of the per-example
            losses, pass them to ``step(loss=...)``), "loss" (in units of the squared mean
            per-example loss) or "absolute".
        lr: the learning rate your optimizer applies, a number or a callable of the step
            count (needed by the constraint and by ``track_loss_changes``).
        track_loss_changes: keep the step's inputs and output gradients until step() so that
            ``diagnostics()`` reports the per-example loss changes whatever the constraint.
        distributed: data-parallel training over torch.distributed (docs/distributed.md).
            None (default): on when torch.distributed is initialized with several ranks;
            True, or a :class:`~kfac_ef.DistributedOptions`: on (torch.distributed must be
            initialized); False: off. On, the factors are those of the global batch, the
            decompositions are split across ranks, and every rank must construct the
            preconditioner and call step() in step with the others. A
            DistributedDataParallel model is unwrapped: layer names carry no ``module.``.
            With "ekfac", every rank must hold every eigenbasis (``grad_worker_fraction``
            "comm_opt") and statistics are reduced every step (``factor_sync="update"``).

    Raises:
        TypeError, ValueError: on an invalid option (the message names it), or a combination
            that cannot be computed exactly (damping_mode="ekfac" with distributed options
            other than the above).
        ValueError: if the model has nothing to precondition, or if the planned state exceeds
            ``memory_budget`` (the message holds the plan).
        RuntimeError: if another live preconditioner already hooks one of the layers.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        loss_reduction: str = "mean",
        damping_mode: str = "exact",
        kfac_approx: str = "expand",
        skip_layers: SkipSpec | Iterable[SkipSpec] | None = (),
        factor_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        other_params: str = "ignore",
        max_factor_dim: int | None = 4096,
        large_factor_block: int = 1,
        memory_budget: int | None = None,
        max_decomposition_failures: int = 3,
        warning_interval: int = 100,
        grad_scaler: torch.amp.GradScaler | None = None,
        distributed: bool | DistributedOptions | None = None,
        fisher_type: str = "empirical",
        constraint: str | None = None,
        target_loss_change: float | None = None,
        max_loss_change: float | None = None,
        loss_change_unit: str = "spread",
        lr: LearningRate | None = None,
        track_loss_changes: bool = False,
        damping_unit: str = "absolute",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"Invalid grad_scaler={grad_scaler!r}: must be a torch.amp.GradScaler or None"
            )
        self.options = KFACOptions(
            damping=damping,
            factor_decay=factor_decay,
            factor_update_steps=factor_update_steps,
            inv_update_steps=inv_update_steps,
            loss_reduction=loss_reduction,  # type: ignore[arg-type]
            damping_mode=damping_mode,  # type: ignore[arg-type]
            kfac_approx=kfac_approx,  # type: ignore[arg-type]
            skip_layers=skip_layers,  # type: ignore[arg-type]
            factor_dtype=factor_dtype,
            backend=backend,  # type: ignore[arg-type]
            other_params=other_params,  # type: ignore[arg-type]
            max_factor_dim=max_factor_dim,
            large_factor_block=large_factor_block,
            memory_budget=memory_budget,
            max_decomposition_failures=max_decomposition_failures,
            warning_interval=warning_interval,
            fisher_type=fisher_type,  # type: ignore[arg-type]
            constraint=constraint,  # type: ignore[arg-type]
            target_loss_change=target_loss_change,
            max_loss_change=max_loss_change,
            loss_change_unit=loss_change_unit,  # type: ignore[arg-type]
            lr=lr,
            track_loss_changes=track_loss_changes,
            damping_unit=damping_unit,  # type: ignore[arg-type]
        )
        self._grad_scaler = grad_scaler
        dist_options = resolve(distributed)
        model, ddp = unwrap(_uncompiled(model))
        model = _uncompiled(model)
        _check_not_sharded(model)
        self._model = weakref.ref(model)
        self._structure = _structure(model)
        plan: Plan = discover(model, self.options)
        self._layers = plan.layers
        self._diagonal = plan.diagonal
        self._routes: dict[str, Route] = plan.routes
        self._unpreconditioned = plan.unpreconditioned
        self._ties = plan.ties
        self._trainable = plan.trainable
        if not self._layers and not self._diagonal:
            raise ValueError(
                "the model has no layer to precondition (supported: nn.Linear, nn.Conv1d/2d/3d, "
                "nn.Embedding, nn.Bilinear, nn.MultiheadAttention with a trainable weight, not "
                "excluded by skip_layers; norm layers with other_params='diagonal'); left "
                "untouched:\n" + "\n".join(f"  {n}: {why}" for n, why in self._unpreconditioned)
            )
        for device in check_devices(plan):
            kernels.check_backend(self.options.backend, device)
        self._by_name = {layer.name: layer for layer in self._layers}
        self._diag_by_name = {d.name: d for d in self._diagonal}
        self._buckets: list[Bucket] = make_buckets(self._layers)
        # Every exchange with other processes goes through this object (distributed.py).
        self._dist = (
            Distributor(plan, self.options, dist_options, ddp) if dist_options is not None else None
        )
        budget = self.options.memory_budget
        if budget is not None:
            plan_summary = self.summary()
            if plan_summary.total_bytes > budget:
                raise ValueError(
                    f"the preconditioner's planned state ({plan_summary.total_bytes} bytes) "
                    f"exceeds memory_budget={budget}; lower max_factor_dim or "
                    "large_factor_block, or leave layers out (skip_layers). The plan:\n"
                    f"{plan_summary}"
                )
        self._claim()
        self._steps = 0
        self._backward_seen = False
        self._force_decompose = False
        self._removed = False
        self._warned_no_stats: set[str] = set()
        self._skipped_steps: Tensor | None = None
        self._skipped_reported = 0
        self._last_skip_warning: int | None = None
        self._skipped_seen: dict[str, int] = {}
        self._grads_ok: Tensor | None = None  # this step's gradients finite (0-d), if known
        # Calls held until step(), by hooked module: for the EKFAC scale ("fisher": those of
        # the backward that feeds the factors) and for the exact loss-change form ("loss":
        # those of the user's loss). With the empirical Fisher they are the same calls.
        self._fisher_calls: dict[str, list[Held]] = defaultdict(list)
        self._loss_calls: dict[str, list[Held]] = defaultdict(list)
        self._sampling = False
        self._sampled = False
        self._stats_examples: float | Tensor = 1.0  # examples of the last statistics step
        self._warned_missing: set[str] = set()
        self._record_last: StepRecord | None = None
        self._passes_held = 0  # backward passes whose calls are held until step()
        self._last_held_pass = -1
        self._warned_held = False
        # The hooks call back through weak references: a preconditioner dropped without
        # remove() is collected, and its finalizer detaches the hooks.
        self._capture = Capture(
            {name: route.adapter for name, route in self._routes.items()},
            wants_calls=_weak(self._wants_calls, False),
            on_backward=_weak(self._on_backward, None),
            record=_weak(self._record, None),
            on_call=_weak(self._on_call, None) if self._dist is not None else None,
            hold_inputs=self.options.fisher_type == "mc",
            sampling=_weak(self._is_sampling, False),
        )
        weakref.finalize(self, self._capture.remove)

    def _hooked_modules(self) -> list[tuple[str, nn.Module]]:
        return [(name, route.adapter.module) for name, route in self._routes.items()]

    def _claim(self) -> None:
        for name, module in self._hooked_modules():
            ref = _OWNERS.get(module)
            other = ref() if ref is not None else None
            if other is not None and other is not self and not other._removed:
                raise RuntimeError(
                    f"module {name!r} is already hooked by another KFACPreconditioner; "
                    "call remove() on that one first (two preconditioners on one model would "
                    "both rewrite its gradients)"
                )
        for _, module in self._hooked_modules():
            _OWNERS[module] = weakref.ref(self)

    # ------------------------------------------------------------------ capture callbacks
    def _wants_statistics(self) -> bool:
        return self._steps % self.options.factor_update_steps == 0

    def _wants_calls(self) -> bool:
        """Whether this step keeps what calls save: for statistics, or for the exact form."""
        return self._wants_statistics() or self.options.needs_loss_records

    def _is_sampling(self) -> bool:
        return self._sampling

    def _on_backward(self) -> None:
        if not self._sampling:
            self._backward_seen = True

    def _on_call(self, name: str, pass_id: int) -> None:
        # Only calls whose statistics will be recorded count for the all-reduce buckets.
        if self._dist is not None and self._wants_statistics():
            self._dist.on_call(name, pass_id)

    def _record(self, name: str, saved: Any, grad: Tensor, pass_id: int) -> None:
        route = self._routes[name]
        opts = self.options
        # Which backward feeds the factors: the user's loss (empirical) or the sampled one.
        feeds_factors = self._sampling == (opts.fisher_type == "mc")
        held: Held | None = None

        def call() -> Held:
            # Calls held until step() are copied: an input buffer the caller overwrites in
            # place between backward() and step() (a reused batch buffer) must not change
            # what step() computes from them.
            nonlocal held
            if held is None:
                held = (_snapshot(saved), grad.detach(), pass_id)
                self._note_held(pass_id)
            return held

        if feeds_factors and self._wants_statistics() and (route.layers or route.params):
            with torch.no_grad():
                obs = route.adapter.observe(
                    saved, grad, [i for i, _ in route.layers], [p for p, _ in route.params]
                )
                layers = dict(route.layers)
                for index, inputs, grads in obs.kron:
                    layers[index].stats.add(inputs, grads, pass_id)
                for p, entry in route.params:
                    per_example = obs.per_example.get(id(p))
                    if per_example is not None:
                        entry.stats.add(per_example, pass_id)
                if opts.damping_mode == "ekfac" and route.layers:
                    self._fisher_calls[name].append(call())
                if self._dist is not None:
                    self._dist.on_record(name, pass_id)
        if not self._sampling and opts.needs_loss_records:
            self._loss_calls[name].append(call())

    def _note_held(self, pass_id: int) -> None:
        """Count the passes whose calls are held until step(); warn once when they pile up
        (backward passes without step(): each pass's layer inputs stay in memory)."""
        if pass_id == self._last_held_pass:
            return
        self._last_held_pass = pass_id
        self._passes_held += 1
        if self._passes_held > _HELD_PASSES_WARNING and not self._warned_held:
            self._warned_held = True
            _warn.warn(
                f"{self._passes_held} backward passes since the last step(): with "
                f"{self._held_reason()} the preconditioner keeps every pass's layer inputs "
                "and output gradients until step(), so memory grows with each pass. Call "
                "precond.step() once per optimizer step (or per accumulated batch)."
            )

    def _held_reason(self) -> str:
        opts = self.options
        if opts.damping_mode == "ekfac":
            return 'damping_mode="ekfac"'
        if opts.constraint == "exact":
            return 'constraint="exact"'
        return "track_loss_changes=True"

    @contextlib.contextmanager
    def ignored(self) -> Iterator[None]:
        """Backward passes inside this block are left out of the factors.

        Their gradients still accumulate into ``p.grad`` as usual (and step() preconditions
        them), but they feed no statistics, do not count as the step's backward pass, and
        raise nothing. For gradients you knowingly keep out of the curvature estimate: a
        gradient penalty's ``torch.autograd.grad(..., create_graph=True)``, an auxiliary
        loss backpropagated separately through a retained graph.
        """
        self._check_live()
        with self._capture.ignoring():
            yield

    @contextlib.contextmanager
    def _sampled_backward(self) -> Iterator[None]:
        """Marks the backward passes inside as the sampled-target ones (``kfac_ef.mc``)."""
        self._check_live()
        self._sampling = True
        try:
            yield
        finally:
            self._sampling = False
        self._sampled = True

    def parameters(self) -> list[nn.Parameter]:
        """The preconditioned parameters: those of the Kronecker layers (tied weights once)
        and the diagonally preconditioned ones."""
        return _unique_parameters(self._layers, self._diagonal)

    @property
    def collects_statistics(self) -> bool:
        """Whether the coming step() folds statistics into the factors (a statistics step)."""
        return self._wants_statistics()

    # ------------------------------------------------------------------ step
    @property
    def steps(self) -> int:
        """Number of completed step() calls."""
        return self._steps

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this KFACPreconditioner was removed (remove() detached its hooks)")

    def step(self, loss: Tensor | None = None) -> None:
        """Precondition the gradients in place: p.grad ← (G⊗A + εI)⁻¹ p.grad per layer.

        Folds the statistics of the last backward pass(es) into the running factors (on
        statistics steps), recomputes decompositions (on decomposition steps), then rewrites
        the gradients of every layer that has a decomposition (and of the diagonal
        parameters). Layers without one yet, and parameters whose ``.grad`` is None, are left
        as they are. A statistics step with any non-finite statistic or gradient leaves every
        factor unchanged (decided on the device: no host synchronization). With a
        constraint, the rewritten gradients are then scaled by ν (a 0-dim device tensor; see
        the class doc).

        Args:
            loss: this step's loss, needed when ``loss_change_unit`` is relative: the
                per-example losses (1-d; with gradient accumulation, those of every
                micro-batch), or for unit "loss" with mean reduction in one process the
                reduced loss (0-d). Only read on the device.

        Raises:
            RuntimeError: if no backward pass reached a hooked layer since the last step()
                (or since construction), after ``remove()``, or with ``fisher_type="mc"``
                when a statistics step had no sampled-target backward.
            ValueError: if the constraint needs ``loss`` and it is missing or of a wrong shape.
        """
        if torch.compiler.is_compiling():
            # Eager whatever calls it: traced by torch.compile, step() would make the compiler
            # guard on its counters (a recompilation per cadence phase) and break the graph at
            # every host read. The compiler-disabled caller is made on first use (making it
            # imports torch._dynamo, which an eager program never needs).
            return call_eagerly(self._step, (loss,))
        return self._step(loss)

    def _step(self, loss: Tensor | None) -> None:
        self._check_live()
        if not self._backward_seen:
            raise RuntimeError(
                "step() called without a backward pass since the last step(): call "
                "loss.backward() (with the model in training mode and grad enabled) before "
                "precond.step(), and step() once per backward (or per accumulated batch)"
            )
        opts = self.options
        if opts.fisher_type == "mc" and self._wants_statistics() and not self._sampled:
            self._clear_step()
            raise RuntimeError(
                "fisher_type='mc': this statistics step had no sampled-target backward; "
                "replace loss.backward() by kfac_ef.mc_backward(precond, loss, output, "
                "likelihood=...) so that the factors see gradients of sampled targets"
            )
        # Everything that can fail on the user's input is checked before any state changes:
        # after such an error, step() can be called again for the same backward.
        self._check_unscaled()
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
                per_example_scale=self._per_example_scale(),
                distributed=self._dist is not None,
            )
        lr = None
        if opts.constraint != "none" or opts.track_loss_changes:
            lr = opts.learning_rate(self._steps)
        with torch.no_grad(), record_function("kfac_ef.step"):
            self._grads_ok = None
            if self._wants_statistics():
                self._update_factors()
            else:
                for layer in self._layers:
                    layer.stats.discard()
                for entry in self._diagonal:
                    entry.stats.discard()
            if self._steps % opts.inv_update_steps == 0 or self._force_decompose:
                self._check_structure()
                self._decompose()
            if opts.damping_mode == "ekfac" and self._wants_statistics():
                self._update_scales()
            with_form = lr is not None and opts.needs_kronecker_form
            done: list[Layer] = []
            forms: list[Tensor] = []
            for bucket in self._buckets:
                members, form = bucket.precondition(
                    self._precondition_fn(bucket, with_form), opts.factor_dtype
                )
                done.extend(members)
                if form is not None:
                    forms.append(form.sum())
            done_diag, diag_form = precondition_diagonal(self._diagonal, with_form)
            if self._dist is not None:
                self._dist.share_gradients()
            if lr is not None:
                self._scale_step(lr, done, forms, done_diag, diag_form, moments)
        self._clear_step()
        self._steps += 1
        self._backward_seen = False

    def _clear_step(self) -> None:
        self._fisher_calls.clear()
        self._loss_calls.clear()
        self._capture.release()
        self._sampled = False
        self._passes_held = 0
        self._last_held_pass = -1

    def _per_example_scale(self) -> float:
        """From the observed gradients (and losses) of this process to the per-example ones
        of the preconditioner's loss: 1, or 1/W for sum reduction over W processes (their
        averaged gradient is that of Σ ℓ_n / W, see docs/distributed.md)."""
        if self._dist is not None and self.options.loss_reduction == "sum":
            return 1.0 / self._dist.world
        return 1.0

    def _scale_step(
        self,
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
        dist = self._dist
        layers = done if dist is None else dist.preconditioned_layers(done)
        # Preconditioned parameters with their gradients (diagonal ones always have one).
        unique = _unique_parameters(layers, done_diag)
        params = {id(p): g for p in unique if (g := p.grad) is not None}
        every_grad = len(params) == len(unique)
        grads = list(params.values())
        device = grads[0].device if grads else self._device()
        f64 = torch.float64
        kron = None
        if opts.needs_kronecker_form:
            kron = torch.zeros((), dtype=f64, device=device)
            for f in forms:
                kron = kron + f.to(device=device, dtype=f64)
            if dist is not None:
                kron = dist.sum_over_columns(kron)
            if diag_form is not None:
                kron = kron + diag_form.to(device=device, dtype=f64)
            if opts.loss_reduction == "sum":
                # G = Σ_n δδᵀ is N times the mean form: per example, divide by the N of the
                # last statistics step (of the global batch when distributed).
                kron = kron / self._stats_examples
        directions = None
        exact = None
        if opts.needs_loss_records:
            directions, seen = _constraint.per_example_directions(
                self._routes, self._loss_calls, params, opts.factor_dtype
            )
            if not (every_grad and seen.issuperset(params)):  # else none is missing
                self._warn_missing(layers, done_diag, seen)
            if directions is not None:
                directions = directions.to(device)
                scale: float | Tensor = (
                    float(directions.shape[0]) if opts.loss_reduction == "mean" else 1.0
                )
                scale = scale * self._per_example_scale()
                loss_scale = self._loss_scale()
                if loss_scale is not None:
                    scale = scale / loss_scale.to(device=device, dtype=directions.dtype)
                directions = directions * scale
            if dist is None:
                count = directions.shape[0] if directions is not None else 0
                exact = (
                    directions.to(f64).square().sum()
                    if directions is not None
                    else torch.zeros((), dtype=f64, device=device)
                ) / max(count, 1)
            else:
                # (Σ u², n), with the loss moments when there are some: one reduction.
                local = torch.zeros(2, dtype=f64, device=device)
                if directions is not None:
                    local[0] = directions.to(f64).square().sum()
                    local[1] = directions.shape[0]
                if moments is not None:
                    local = torch.cat([local, moments.to(device)])
                local = dist.sum_over_ranks(local)
                exact = local[0] / local[1].clamp_min(1.0)
                if moments is not None:
                    moments = local[2:]
        elif moments is not None and dist is not None:
            moments = dist.sum_over_ranks(moments.to(device))
        nu = torch.ones((), dtype=f64, device=device)
        target = None
        if opts.constraint != "none":
            form = kron if opts.constraint == "kronecker" else exact
            assert form is not None
            c = opts.target_loss_change or opts.max_loss_change
            assert c is not None
            if moments is not None:
                target = c * _constraint.loss_reference(opts.loss_change_unit, moments.to(device))
            else:
                target = torch.full((), c, dtype=f64, device=device)
            nu = _constraint.step_scale(
                form, target, lr, equality=opts.target_loss_change is not None
            )
            groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
            for g in grads:
                groups[(g.device, g.dtype)].append(g)
            for (dev, dtype), group in groups.items():
                torch._foreach_mul_(group, nu.to(device=dev, dtype=dtype))
        self._record_last = StepRecord(
            step=self._steps,
            lr=lr,
            nu=nu,
            target=target,
            kronecker=kron,
            exact=exact,
            directions=directions,
        )

    def _device(self) -> torch.device:
        if self._layers:
            return self._layers[0].adapter.weight.device
        return self._diagonal[0].param.device

    def _warn_missing(
        self, layers: list[Layer], diagonal: list[DiagonalParam], seen: set[int]
    ) -> None:
        names = [
            layer.name
            for layer in layers
            if not any(id(p) in seen for p in layer.adapter.parameters())
        ]
        names += [d.name for d in diagonal if id(d.param) not in seen]
        new = [n for n in names if n not in self._warned_missing]
        if new:
            self._warned_missing.update(new)
            _warn.warn(
                f"{', '.join(map(repr, new))}: gradient preconditioned but no call captured "
                "on this step (no gradient reached the output, or the call ran in eval "
                "mode); left out of the exact loss-change form",
            )

    def faults(self) -> Faults:
        """Counts of the numerical faults met so far: skipped statistics updates, steps with
        non-finite gradients, failed decompositions (see :class:`Faults`). Reads device
        counters on the host (synchronizes)."""
        entries: list[Layer | DiagonalParam] = [*self._layers, *self._diagonal]
        counts = {e.name: int(e.skipped.sum()) for e in entries if e.skipped is not None}
        return Faults(
            steps=self._steps,
            skipped_steps=int(self._skipped_steps) if self._skipped_steps is not None else 0,
            skipped_updates={name: n for name, n in counts.items() if n},
            decomposition_failures={
                la.name: la.failures_total for la in self._layers if la.failures_total
            },
            consecutive_failures={la.name: la.failures for la in self._layers if la.failures},
        )

    def diagnostics(self) -> LossChangeDiagnostics:
        """The scale and predicted per-example loss changes of the last step().

        Reads device values on the host (synchronizes): call it when you want the numbers,
        not inside a timed loop. The Kronecker form is available with
        ``constraint="kronecker"`` or ``track_loss_changes=True``; the exact form and the
        distribution of Δℓ_n with ``constraint="exact"`` or ``track_loss_changes=True``;
        the others are None. Distributed, ``kronecker`` and ``exact`` are those of the
        global batch, the distribution (``loss_changes``, mean, std, min, max,
        fraction_rising) that of this process's examples.

        Raises:
            RuntimeError: before the first step(), or when neither a constraint nor
                ``track_loss_changes`` is on (nothing is measured).
        """
        if self.options.constraint == "none" and not self.options.track_loss_changes:
            raise RuntimeError(
                "diagnostics() needs constraint='kronecker'/'exact' or track_loss_changes=True "
                "(and lr=...): without them step() measures nothing"
            )
        if self._record_last is None:
            raise RuntimeError("diagnostics() describes the last step(): call step() first")
        return _constraint.summarize(self._record_last)

    def _check_unscaled(self) -> None:
        """With a GradScaler and a measured step (constraint or loss-change tracking), the
        gradients must be unscaled first: ν is computed from p.grad, and on scaled gradients
        it would be off by the loss scale. (Preconditioning alone is linear in p.grad and
        does not care.) Reads the scaler's per-optimizer stage, host-side Python state."""
        scaler = self._grad_scaler
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

    def _loss_scale(self) -> Tensor | None:
        """The GradScaler's current scale as a device tensor (None without scaling).

        ``GradScaler.get_scale()`` would read it on the host; its ``_scale`` tensor is what
        ``scale()`` multiplied the loss by, and stays on the device.
        """
        scaler = self._grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)
        return scale if isinstance(scale, Tensor) else None

    def _update_factors(self) -> None:
        """Take every layer's statistics, decide on the device whether the step is finite
        (statistics and gradients alike), and fold them in (or leave everything unchanged)."""
        opts = self.options
        loss_scale = self._loss_scale()
        scales: dict[torch.device, Tensor | None] = {}

        def scale_on(device: torch.device) -> Tensor | None:
            if loss_scale is None:
                return None
            if device not in scales:
                scales[device] = loss_scale.to(device=device, dtype=opts.factor_dtype)
            return scales[device]

        counts = [layer.stats.examples for layer in self._layers]
        counts += [entry.stats.examples for entry in self._diagonal]
        local = float(max(counts, default=0))
        if local > 0:
            self._stats_examples = local
        if self._dist is not None:
            # The global batch's statistics (every rank gets every entry, with a device flag
            # saying whether any rank had statistics for it).
            kron, diag = self._dist.reduce_statistics(scale_on)
            self._stats_examples = self._dist.global_examples(local)
        else:
            reduction = opts.loss_reduction
            kron = [
                (layer, layer.take(reduction, scale_on(layer.adapter.weight.device)), None)
                for layer in self._layers
                if not layer.stats.empty
            ]
            diag = [
                (entry, entry.take(reduction, scale_on(entry.param.device)), None)
                for entry in self._diagonal
                if not entry.stats.empty
            ]
        if not kron and not diag:
            return
        # A step with a non-finite gradient (a loss-scale overflow, a NaN loss) updates no
        # factor; a layer whose own statistics are not finite keeps its factors.
        grads = [p.grad for p in self._trainable if p.grad is not None]
        grads_ok: Tensor | None = None
        if grads:
            device = grads[0].device
            norms = torch.stack([n.to(device) for n in torch._foreach_norm(grads)])
            grads_ok = torch.isfinite(norms).all()
            if self._skipped_steps is None:
                self._skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
            self._skipped_steps.add_(~grads_ok)
        self._grads_ok = grads_ok

        def ok_on(flag: Tensor, device: torch.device) -> Tensor:
            return flag if grads_ok is None else flag & grads_ok.to(device)

        for layer, taken, present in kron:
            ok = ok_on(Layer.finite(taken), layer.adapter.weight.device)
            layer.fold(taken, opts.factor_decay, ok, present)
        for entry, dtaken, present in diag:
            ok = ok_on(DiagonalParam.finite(dtaken), entry.param.device)
            entry.fold(dtaken, opts.factor_decay, ok, present)

    def _update_scales(self) -> None:
        """Statistics step with EKFAC: fold this step's second moment S_batch, in each layer's
        current eigenbasis, into its running scale S (on the device; distributed, S_batch
        of the global batch, reduced like G).

        The calls of the backward that fed the factors were held until now, because the
        eigenbasis may have changed at this step's decomposition (George et al. project the
        statistics onto the basis in force); they go through the adapters again (``observe``:
        a conv's patches unfolded, an attention recomputed), one module at a time.
        """
        opts = self.options
        layers = [
            layer
            for layer in self._layers
            if layer.decomposition is not None and "s" in layer.decomposition
        ]
        wanted = {id(layer) for layer in layers}
        feeders: dict[int, int] = defaultdict(int)
        for name in self._fisher_calls:
            for _, layer in self._routes[name].layers:
                feeders[id(layer)] += 1
        records: dict[int, list[_ekfac.Record]] = defaultdict(list)
        raws: dict[int, tuple[Tensor, int]] = {}
        for name, held in self._fisher_calls.items():
            route = self._routes[name]
            indices = [i for i, layer in route.layers if id(layer) in wanted]
            if not indices:
                continue
            by_index = dict(route.layers)
            for saved, grad, pass_id in held:
                obs = route.adapter.observe(saved, grad, indices, [])
                for index, inputs, grads in obs.kron:
                    records[id(by_index[index])].append((inputs, grads, pass_id))
            for index in indices:
                layer = by_index[index]
                feeders[id(layer)] -= 1
                if feeders[id(layer)] == 0 and records.get(id(layer)):
                    # Every call of the layer is in: reduce them and drop the records.
                    dec = layer.decomposition
                    assert dec is not None
                    raws[id(layer)] = _ekfac.batch_second_moment(
                        records.pop(id(layer)),
                        layer.adapter.has_bias,
                        dec.get("qg"),
                        dec.get("qa"),
                        layer.g_spec,
                        layer.a_spec,
                        opts.factor_dtype,
                    )
        loss_scale = self._loss_scale()
        items: list[tuple[Layer, Tensor, Scale, Tensor | None]] = []
        if self._dist is not None:
            items += self._dist.reduce_scales(
                [(layer, *raws.get(id(layer), (None, 0))) for layer in layers], loss_scale
            )
        else:
            for layer in layers:
                if id(layer) not in raws:
                    continue
                raw, n = raws[id(layer)]
                sigma = None if loss_scale is None else loss_scale.to(raw.device, raw.dtype)
                scale = g_scale(n, opts.loss_reduction, sigma, opts.fisher_type == "mc")
                items.append((layer, raw, scale, None))
        for layer, raw, scale, present in items:
            ok = (
                self._grads_ok.to(raw.device)
                if self._grads_ok is not None
                else torch.ones((), dtype=torch.bool, device=raw.device)
            )
            layer.fold_scale(raw, scale, opts.factor_decay, ok, present)

    def _decompose(self) -> None:
        opts = self.options
        with record_function("kfac_ef.decompose"):
            if self._dist is not None:
                self._dist.sync_factors()
            waiting = decompose(
                self._layers,
                opts.damping_mode,
                opts.damping,
                share=self._dist,
                damping_unit=opts.damping_unit,
            )
            if self._dist is not None:
                self._dist.after_decompose()
            for bucket in self._buckets:
                bucket.restack()
            self._check_failures()
            names = [layer.name for layer in waiting]
            for entry in self._diagonal:
                if not entry.decompose(opts.damping, opts.damping_unit == "relative"):
                    names.append(entry.name)
        self._force_decompose = False
        self._report_skipped()
        for name in names:
            if name not in self._warned_no_stats:
                self._warned_no_stats.add(name)
                _warn.warn(
                    f"layer {name!r} has no statistics yet (no gradient reached its output "
                    "on a statistics step, or all its statistics were non-finite); its "
                    "gradients pass through unpreconditioned until it has some",
                )

    def _check_structure(self) -> None:
        """Raise if the model's modules or parameters changed since construction.

        Runs on decomposition steps only (pure Python, no device work): a replaced layer
        would silently lose its preconditioning, a replaced parameter would have its old
        tensor's gradient rewritten instead of the new one's.
        """
        model = self._model()
        if model is None:
            return
        now = _structure(model)
        if now == self._structure:
            return
        before = {entry[0]: entry for entry in self._structure}
        after = {entry[0]: entry for entry in now}
        changes = [f"{n}: added" for n in after.keys() - before.keys()]
        changes += [f"{n}: removed" for n in before.keys() - after.keys()]
        for n in before.keys() & after.keys():
            old, new = before[n], after[n]
            if old[1:3] != new[1:3]:
                changes.append(f"{n}: module replaced ({old[1]} -> {new[1]})")
            elif old[3] != new[3]:
                changes.append(f"{n}: parameters replaced")
            elif old[4] != new[4]:
                changes.append(f"{n}: requires_grad changed {old[4]} -> {new[4]}")
        raise RuntimeError(
            "the model changed after the KFACPreconditioner was built:\n  "
            + "\n  ".join(sorted(changes))
            + "\ncall remove() on this preconditioner and build a new one for the new model "
            "(load_state_dict() carries the factors of unchanged layers over)"
        )

    def _check_failures(self) -> None:
        """Raise when a layer's decomposition failed ``max_decomposition_failures`` times in a
        row (after the float64 retry; the previous decomposition was reused meanwhile)."""
        limit = self.options.max_decomposition_failures
        failing = [layer for layer in self._layers if layer.failures >= limit]
        if not failing:
            return
        lines = []
        for layer in failing:
            for side in layer.failed_sides:
                mat = getattr(layer, side)
                assert mat is not None
                lines.append(f"{layer.name} {side}: {linalg.describe(mat)}")
        raise RuntimeError(
            f"decomposition failed on {limit} decomposition steps in a row, even in float64, "
            "for:\n  " + "\n  ".join(lines) + "\nnon-finite or huge entries point at the "
            "data or the loss scale; otherwise raise damping, use factor_dtype=torch.float64, "
            "or skip the layer (skip_layers). The factors are intact: state_dict() saves them."
        )

    def _report_skipped(self) -> None:
        """Warn about statistics updates skipped since the last report, at most once per
        ``warning_interval`` steps (reads device counters: decomposition steps only)."""
        last = self._last_skip_warning
        if last is not None and self._steps - last < self.options.warning_interval:
            return  # the counts accumulate until the next report
        steps = int(self._skipped_steps) if self._skipped_steps is not None else 0
        per_entry: list[str] = []
        entries: list[Layer | DiagonalParam] = [*self._layers, *self._diagonal]
        for entry in entries:
            if entry.skipped is None:
                continue
            total = int(entry.skipped.sum())
            done = self._skipped_seen.get(entry.name, 0)
            if total > done:
                per_entry.append(f"{entry.name!r} ({total - done})")
                self._skipped_seen[entry.name] = total
        if per_entry:
            cause = ""
            if steps > self._skipped_reported:
                cause = (
                    f"; {steps - self._skipped_reported} step(s) had non-finite gradients "
                    "(e.g. a loss-scale overflow) and updated no factor"
                )
            _warn.warn(
                "statistics updates had non-finite values and were skipped, the factors kept "
                "their previous values: " + ", ".join(per_entry) + cause + " (at most one "
                f"such warning per {self.options.warning_interval} steps; faults() counts them)"
            )
            self._last_skip_warning = self._steps
        self._skipped_reported = steps

    def _precondition_fn(self, bucket: Bucket, with_form: bool = False) -> Any:
        """The bucket's function: dense buckets through the kernels, structured ones through
        torch (_factors). ``with_form``: also the ``(B,)`` Kronecker forms ⟨∇̃, G ∇̃ A⟩ of the
        loss-change constraint, computed in the same chain (for "pi" one product more, in
        torch: the kernel's chain does not produce the one-sided products the form needs)."""
        eps, backend = self.options.damping, self.options.backend
        dense = bucket.g_spec.dense and bucket.a_spec.dense
        mode = self.options.damping_mode
        if mode == "pi":

            def factored(grads: Tensor, st: Decomposition, gs: FactorSpec, as_: FactorSpec) -> Any:
                if with_form:
                    return precondition_inverse_with_form(grads, st, gs, as_)
                if dense:
                    return kernels.precondition_factored(grads, st["ig"], st["ia"], backend=backend)
                return precondition_structured_inverse(grads, st, gs, as_)

            return factored

        def eigen(grads: Tensor, st: Decomposition, gs: FactorSpec, as_: FactorSpec) -> Any:
            scale = st.get("s")  # EKFAC
            damping = st.get("eps", eps)  # per block with damping_unit="relative"
            if dense:
                args = (grads, st["qg"], st["lg"], st["qa"], st["la"], damping, scale)
                # out=grads: the torch path writes over the gathered gradients.
                if with_form:
                    return kernels.precondition_eigen_with_form(*args, backend=backend, out=grads)
                return kernels.precondition_eigen(*args, backend=backend, out=grads)
            return precondition_structured_eigen(grads, st, gs, as_, damping, scale, with_form)

        return eigen

    # ------------------------------------------------------------------ inspection
    @property
    def distributed(self) -> Distributor | None:
        """The distributed machinery (assignment, bytes communicated), or None."""
        return self._dist

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The running estimates ``{layer name: (A, G)}`` (copies), in DESIGN.md's convention.

        A is ``(a_dim, a_dim)`` with the homogeneous coordinate as its last row and column when
        the layer has a trainable bias; G is ``(g_dim, g_dim)``. A factor kept diagonal (an
        embedding's A; any factor wider than ``max_factor_dim`` by default) is its diagonal,
        a vector ``(d,)``; a block-diagonal one is ``(nb, bs, bs)``, its diagonal blocks, the
        last one zero-padded. For a conv with ``groups > 1`` each carries a leading dimension,
        one entry per group, group g's block being G[g] ⊗ A[g]. Layers without statistics yet
        are absent.
        """
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for layer in self._layers:
            if layer.A is None or layer.G is None:
                continue
            blocks = layer.adapter.blocks
            a = to_user(layer.A, layer.a_spec, blocks)
            g = to_user(layer.G, layer.g_spec, blocks)
            if blocks == 1:
                a, g = a[0], g[0]
            out[layer.name] = (a, g)
        return out

    def diagonal_fishers(self) -> dict[str, Tensor]:
        """The running diagonal empirical Fishers ``{parameter name: F}`` (copies, shaped like
        the parameter) of the parameters preconditioned with other_params="diagonal"."""
        return {
            d.name: d.F.reshape(d.param.shape).clone() for d in self._diagonal if d.F is not None
        }

    def summary(self) -> Summary:
        """The plan: layers, factor storage and bytes of state (available before the first
        step), diagonal parameters, tied weights, and parameters left to the optimizer, with
        why."""
        opts = self.options
        item = torch.empty((), dtype=opts.factor_dtype).element_size()
        rows = []
        for layer in self._layers:
            ad = layer.adapter
            a, g, b = ad.a_dim, ad.g_dim, ad.blocks
            dec_a = layer.a_spec.decomposition_numel(b, opts.damping_mode)
            dec_g = layer.g_spec.decomposition_numel(b, opts.damping_mode)
            scale = 0
            if opts.damping_mode == "ekfac":
                scale = _ekfac.scale_numel(b, layer.g_spec, layer.a_spec)
            if self._dist is not None and not self._dist.preconditions(layer):
                dec_a = dec_g = scale = 0  # another rank holds it (grad_worker_fraction < 1)
            decomp = dec_a + dec_g + scale
            params = []
            for p in ad.parameters():
                params.append(self._param_name(p))
            rows.append(
                LayerSummary(
                    name=layer.name,
                    kind=ad.kind,
                    blocks=b,
                    a_shape=(a, a),
                    g_shape=(g, g),
                    parameters=tuple(params),
                    factor_bytes=2 * layer.stats.nbytes(),  # running factors + accumulators
                    decomposition_bytes=decomp * item,
                    a_factor=layer.a_spec.describe(),
                    g_factor=layer.g_spec.describe(),
                    # running factor + accumulator + decomposition, per side
                    a_bytes=(2 * layer.a_spec.numel(b) + dec_a) * item,
                    g_bytes=(2 * layer.g_spec.numel(b) + dec_g) * item,
                )
            )
        diag = [
            DiagonalSummary(
                name=d.name,
                kind=self._kind_of(d),
                numel=d.param.numel(),
                state_bytes=4 * d.stats.nbytes(),  # running F, accumulator, 1/(F + ε), its F
            )
            for d in self._diagonal
        ]
        workspace = 0
        # Held calls (EKFAC, the exact constraint) are activations the size of the model's:
        # not counted here, as autograd's own are not.
        for bucket in self._buckets:
            blocks = sum(layer.adapter.blocks for layer in bucket.layers)
            # Gathered gradients, the products' intermediates and the result.
            size = 4 * blocks * bucket.g_spec.padded * bucket.a_spec.padded * item
            workspace = max(workspace, size)
        return Summary(
            tuple(rows),
            tuple(self._unpreconditioned),
            diagonal=tuple(diag),
            ties=tuple(self._ties),
            workspace_bytes=workspace,
        )

    def _param_name(self, p: nn.Parameter) -> str:
        for name, route in self._routes.items():
            module = route.adapter.module
            for pname, q in module.named_parameters():
                if q is p:
                    return f"{name}.{pname}" if name else pname
        return "?"

    def _kind_of(self, entry: DiagonalParam) -> str:
        for route in self._routes.values():
            if any(p is entry.param for p, _ in route.params):
                return route.adapter.kind
        return "?"

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Detach every hook. The preconditioner can no longer step; the model is as before."""
        self._capture.remove()
        self._fisher_calls.clear()
        self._loss_calls.clear()
        for _, module in self._hooked_modules():
            ref = _OWNERS.get(module)
            if ref is not None and ref() is self:
                del _OWNERS[module]
        self._removed = True

    def __repr__(self) -> str:
        o = self.options
        return (
            f"KFACPreconditioner({len(self._layers)} layers, {len(self._diagonal)} diagonal, "
            f"damping={o.damping}, damping_unit={o.damping_unit!r}, "
            f"damping_mode={o.damping_mode!r}, steps={self._steps})"
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, decompositions: bool = True) -> dict[str, Any]:
        """Counters, options, running factors and decompositions (tensors cloned).

        Args:
            decompositions: False leaves the decompositions (eigenbases and eigenvalues,
                damped inverses, the EKFAC scale S, the diagonal inverses) out, roughly
                halving the checkpoint; ``load_state_dict`` then recomputes them from the
                saved factors at the first step() after loading. Resuming is bitwise
                exact when that step is a decomposition step anyway; otherwise the
                decomposition is fresher than an uninterrupted run's, and EKFAC's S
                restarts from λ_G λ_Aᵀ.
        """
        layers: dict[str, Any] = {}
        for layer in self._layers:
            if layer.A is None:
                continue
            assert layer.G is not None and layer.updates is not None and layer.skipped is not None
            layers[layer.name] = {
                "A": layer.A.clone(),
                "G": layer.G.clone(),
                "updates": layer.updates.clone(),
                "skipped": layer.skipped.clone(),
                "decomposition": (
                    {k: v.clone() for k, v in layer.decomposition.items()}
                    if layer.decomposition is not None and decompositions
                    else None
                ),
                "failures": (layer.failures, layer.failures_total),
            }
            if layer.scale_updates is not None:
                layers[layer.name]["scale_updates"] = layer.scale_updates.clone()
        diagonal: dict[str, Any] = {}
        for d in self._diagonal:
            if d.F is None:
                continue
            assert d.updates is not None and d.skipped is not None
            diagonal[d.name] = {
                "F": d.F.clone(),
                "updates": d.updates.clone(),
                "skipped": d.skipped.clone(),
                "inverse": (
                    d.inverse.clone() if d.inverse is not None and decompositions else None
                ),
                "curvature": (
                    d.curvature.clone() if d.curvature is not None and decompositions else None
                ),
            }
        return {
            "format": STATE_FORMAT,
            "steps": self._steps,
            "skipped_steps": (
                self._skipped_steps.clone() if self._skipped_steps is not None else None
            ),
            "options": self.options.to_dict(),
            # Examples of the last statistics step: the "sum" Kronecker form divides by it
            # on the steps until the next statistics step.
            "stats_examples": float(self._stats_examples),
            "names": {
                "layers": [layer.name for layer in self._layers],
                "diagonal": [d.name for d in self._diagonal],
            },
            "layers": layers,
            "diagonal": diagonal,
        }

    @staticmethod
    def _own_name(name: str, known: Mapping[str, Any]) -> str:
        """A checkpointed layer or parameter name as this preconditioner names it: a name
        saved with the ``module.`` prefix of a DistributedDataParallel wrapper or the
        ``_orig_mod.`` of a torch.compile wrapper maps to the unwrapped name."""
        bare = name
        while bare not in known and bare.startswith(_WRAPPER_PREFIXES):
            bare = bare.split(".", 1)[1]
        return bare if bare in known else name

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a ``state_dict()``; tensors move to each layer's device and factor dtype.

        Distributed, every rank must call it (the ranks agree on whether decompositions are
        recomputed at the next step).

        Args:
            state: a ``state_dict()``.
            strict: the checkpoint must come from a model with the same preconditioned
                layers and parameters (True, default). False also accepts a checkpoint
                that lacks some of this model's: those start without statistics, as at
                construction (e.g. after adding a layer to a model).

        Raises:
            ValueError: if the state is not from a KFACPreconditioner, names layers this one
                does not have, lacks some of this one's (``strict``), or holds factors of
                other shapes (the message names them).
        """
        self._check_live()
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a KFACPreconditioner state (expected format {STATE_FORMAT!r}, got "
                f"{state.get('format') if isinstance(state, Mapping) else type(state).__name__!r})"
            )
        saved = {self._own_name(n, self._by_name): e for n, e in state["layers"].items()}
        saved_diag = {
            self._own_name(n, self._diag_by_name): e for n, e in state.get("diagonal", {}).items()
        }
        unknown = sorted(set(saved) - set(self._by_name))
        problems = [f"{n}: not a preconditioned layer of this model" for n in unknown]
        problems += [
            f"{n}: not a diagonally preconditioned parameter of this model"
            for n in sorted(set(saved_diag) - set(self._diag_by_name))
        ]
        names = state.get("names")  # absent from checkpoints of older versions
        if strict and names is not None:
            had = {self._own_name(n, self._by_name) for n in names["layers"]}
            had |= {self._own_name(n, self._diag_by_name) for n in names["diagonal"]}
            problems += [
                f"{n}: preconditioned in this model, not in the checkpoint's (strict=False "
                "starts it afresh)"
                for n in sorted((self._by_name.keys() | self._diag_by_name.keys()) - had)
            ]
        for name, entry in saved.items():
            layer = self._by_name.get(name)
            if layer is None:
                continue
            blocks = layer.adapter.blocks
            want = {"A": layer.a_spec.shape(blocks), "G": layer.g_spec.shape(blocks)}
            for key, shape in want.items():
                got = tuple(entry[key].shape)
                if got != shape:
                    problems.append(f"{name}: {key} has shape {got}, this model needs {shape}")
        for name, entry in saved_diag.items():
            d = self._diag_by_name.get(name)
            if d is not None and entry["F"].numel() != d.param.numel():
                problems.append(
                    f"{name}: F has {entry['F'].numel()} entries, this model needs "
                    f"{d.param.numel()}"
                )
        problems += _value_problems(state, saved, saved_diag)
        if problems:
            raise ValueError("the checkpoint does not fit this model:\n  " + "\n  ".join(problems))
        saved_opts = state.get("options", {})
        opts = self.options
        # Eigenbases (and the EKFAC scale) do not depend on ε; damped inverses and the
        # blocks' relative ε do.
        same_eps = saved_opts.get("damping") == opts.damping and (
            saved_opts.get("damping_unit", "absolute") == opts.damping_unit
        )
        keep_decomposition = saved_opts.get("damping_mode") == opts.damping_mode and (
            same_eps or (opts.damping_mode != "pi" and opts.damping_unit == "absolute")
        )
        dtype = opts.factor_dtype
        for layer in self._layers:
            entry = saved.get(layer.name)
            layer.stats.discard()
            if entry is None:
                layer.A = layer.G = layer.updates = layer.skipped = None
                layer.decomposition = None
                layer.failures = layer.failures_total = 0
                continue
            device = layer.adapter.weight.device
            layer.A = entry["A"].to(device=device, dtype=dtype).clone()
            layer.G = entry["G"].to(device=device, dtype=dtype).clone()
            layer.updates = entry["updates"].to(device).clone()
            layer.skipped = entry["skipped"].to(device).clone()
            self._skipped_seen[layer.name] = int(layer.skipped.sum())
            layer.failures, layer.failures_total = entry.get("failures", (0, 0))
            dec = entry.get("decomposition")
            layer.scale_updates = None
            if (
                dec is not None
                and keep_decomposition
                and set(dec) == decomposition_keys(layer, opts.damping_mode, opts.damping_unit)
            ):
                layer.decomposition = {k: v.to(device=device, dtype=dtype) for k, v in dec.items()}
                if opts.damping_mode == "ekfac":
                    counts = entry.get("scale_updates")
                    layer.scale_updates = (
                        counts.to(device).clone()
                        if counts is not None
                        else torch.zeros_like(layer.updates)
                    )
            else:
                layer.decomposition = None
                self._force_decompose = True
        for d in self._diagonal:
            d.stats.discard()
            dentry = saved_diag.get(d.name)
            if dentry is None:
                d.F = d.updates = d.skipped = d.inverse = d.curvature = None
                continue
            device = d.param.device
            d.F = dentry["F"].to(device=device, dtype=dtype).clone()
            d.updates = dentry["updates"].to(device).clone()
            d.skipped = dentry["skipped"].to(device).clone()
            self._skipped_seen[d.name] = int(d.skipped.sum())
            inverse = dentry.get("inverse")
            curvature = dentry.get("curvature")
            # 1/(F + ε) depends on ε in either damping mode. Checkpoints without the F it
            # was computed from (older versions) recompute both from the running F.
            if inverse is not None and curvature is not None and same_eps:
                d.inverse = inverse.to(device=device, dtype=dtype).clone()
                d.curvature = curvature.to(device=device, dtype=dtype).clone()
            else:
                d.inverse = d.curvature = None
                d.decompose(opts.damping, opts.damping_unit == "relative")
        if self._dist is not None:
            self._force_decompose = self._dist.after_load(self._force_decompose)
        for bucket in self._buckets:
            bucket.restack()
        self._steps = int(state["steps"])
        # Older checkpoints lack it: the statistics step that follows sets it again.
        self._stats_examples = float(state.get("stats_examples", 1.0))
        skipped_steps = state.get("skipped_steps")
        self._skipped_steps = (
            skipped_steps.to(self._device()).clone() if skipped_steps is not None else None
        )
        self._skipped_reported = int(skipped_steps) if skipped_steps is not None else 0
        self._backward_seen = False
        self._clear_step()
        self._record_last = None
