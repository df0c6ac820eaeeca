"""KFACPreconditioner: the façade users hold; it wires the pieces and owns the cadence.

hooks (capture.py) -> statistics (_stats.py) -> factors, decompositions, appliers
(_estimator.py, _blocks.py, _apply.py, kernels) -> the constraint (_controller.py) -> p.grad.
Checkpoints: _checkpoint.py; the plan: summary.py; other processes: _distributed/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from . import _batch_shared, _checkpoint, kernels, mc, summary
from ._constraint import Held, LossChangeDiagnostics, summarize
from ._controller import LossChangeController
from ._discovery import Discovered, check_devices, discover
from ._distributed.local import Communicator, Local
from ._distributed.sharded import ShardedDistributor, fsdp_modules
from ._estimator import Estimator, Faults
from ._held import HeldCalls
from ._model import (
    check_sharding,
    uncompiled,
    unique_parameters,
    weak_method,
)
from ._options import KFACOptions, LearningRate, SkipSpec
from ._update import UpdatePreconditioner
from .capture import Capture, call_eagerly
from .distributed import DistributedOptions, Distributor, check_sharded_run, resolve, unwrap

__all__ = ["Faults", "KFACPreconditioner"]

# Modules hooked by a live preconditioner: a second one on the same module would double the
# statistics work and disagree about p.grad, so it is refused.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[KFACPreconditioner]] = (
    weakref.WeakKeyDictionary()
)

_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(KFACOptions))


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
        damping: ε > 0 (default 1e-2, in the unit below).
        damping_unit: "relative" (default: per Kronecker block, ε times the mean eigenvalue
            of G⊗A, (tr G/dim G)(tr A/dim A), fixed at each decomposition; for a diagonal
            parameter ε times the mean of its F) or "absolute" (ε as given). Relative ε
            means the same at every scale of the loss and of the layer's activations.
        exponent: p of the update (G⊗A + εI)^p ∇ (with "eigen_adam", (Ŝ + ε)^p in the
            eigenbasis), in [-1, 0). Default -1/2, the power of Adam and Shampoo
            (docs/guides/transformers.md); -1 is the seed's natural-gradient step.
        grafting: "gradient" (default: each Kronecker block's, and diagonal parameter's,
            preconditioned gradient rescaled to its raw gradient's norm, so the optimizer's
            learning rate keeps its meaning) or "none".
        wide_layers: "optimizer" (default: embeddings with more rows than
            ``max_factor_dim``, and the layers tied to them, are left to the optimizer and
            listed by summary()) or "diagonal" (preconditioned with a diagonal factor). Other
            wide layers keep diagonal or block-diagonal factors either way.
        factor_decay: β ∈ [0, 1) of the running averages of A and G.
        factor_update_steps: collect statistics every k-th step (steps 0, k, 2k, ...).
        inv_update_steps: recompute decompositions at step 0 and every k-th step.
        loss_reduction: "mean" or "sum", the reduction of the loss over the batch.
        damping_mode: "eigen_adam" (default: the eigenbases of "exact" with Adam's running
            second moment of the minibatch gradient in them, β = factor_decay at every
            step), "exact" (ε added to the eigenvalues of G⊗A), "pi" (factored damping) or
            "ekfac" (the eigenbases of "exact" with the exact second moment S of the
            per-example gradients in them, George et al. 2018).
        kfac_approx: "expand" or "reduce", for layers with shared positions.
        constrained_step: "gradient" (default: the constraint scales the preconditioned
            gradients, using ``lr``) or "optimizer" (it scales the update the optimizer
            makes, measured by the step hooks ``attach(optimizer)`` registers: momentum and
            Adam keep the constraint; no ``lr``; needs constraint="exact").
        precondition_update: also precondition the optimizer's update (after each
            ``optimizer.step()`` that follows a step(), with the hooks ``attach(optimizer)``
            registers): Δθ ← (C + εI)^p Δθ, rescaled per block to Δθ's norm, for the
            parameters the optimizer holds. Under torch.optim.Muon, Muon's step in K-FAC's
            geometry (docs/guides/transformers.md). Needs damping_mode "exact", "pi" or
            "ekfac", no constraint; not under FSDP2.
        statistics_stride: k: with "expand", statistics from every k-th position of each
            sequence, the first advancing by one each statistics step (G rescaled by
            T/(positions kept)); default 1, every position.
        skip_layers: module names, full-match regexes or module types to leave alone.
        factor_dtype: torch.float32 or torch.float64 for factors and decompositions.
        backend: "auto", "torch" or "triton" kernels (the environment variable
            KFAC_EF_BACKEND overrides it). "auto" checks each Triton kernel variant once
            against its torch reference; any Triton failure falls back to the reference
            with a warning (docs/kernels.md).
        other_params: "ignore" or "diagonal", for parameters outside the Kronecker form.
        max_factor_dim: widest dense factor (None: no limit), A's bias coordinate not
            counted; default 4096.
        large_factor_block: block size of wider factors; 1 (default) keeps them diagonal
            (construction warns, naming them); above 1 they are block-diagonal (no warning:
            summary() shows the plan).
        memory_budget: bytes the planned state may take (distributed: this rank's, which
            FSDP2 with grad_worker_fraction="mem_opt" splits); construction raises beyond.
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
        damping: float = 1e-2,
        factor_decay: float = 0.95,
        factor_update_steps: int = 5,
        inv_update_steps: int = 10,
        loss_reduction: str = "mean",
        damping_mode: str = "eigen_adam",
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
        damping_unit: str = "relative",
        exponent: float = -0.5,
        grafting: str = "gradient",
        wide_layers: str = "optimizer",
        statistics_stride: int = 1,
        constrained_step: str = "gradient",
        precondition_update: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"Invalid grad_scaler={grad_scaler!r}: must be a torch.amp.GradScaler or None"
            )
        # Every keyword but model, grad_scaler and distributed is an option, validated there.
        self.options = KFACOptions(**{k: v for k, v in locals().items() if k in _OPTION_NAMES})
        self._build(model, grad_scaler, distributed)

    def _build(
        self,
        model: nn.Module,
        grad_scaler: torch.amp.GradScaler | None,
        distributed: bool | DistributedOptions | None,
    ) -> None:
        dist_options = resolve(distributed)
        model, ddp = unwrap(uncompiled(model))
        model = uncompiled(model)
        sharded = check_sharding(model)
        check_sharded_run(sharded, dist_options)
        plan: Discovered = discover(model, self.options)
        if not plan.layers and not plan.diagonal:
            raise ValueError(
                "the model has no layer to precondition (supported: nn.Linear, nn.Conv1d/2d/3d, "
                "nn.Embedding, nn.Bilinear, nn.MultiheadAttention with a trainable weight, not "
                "excluded by skip_layers; norm layers with other_params='diagonal'); left "
                "untouched:\n" + "\n".join(f"  {n}: {why}" for n, why in plan.unpreconditioned)
            )
        for device in check_devices(plan):
            kernels.check_backend(self.options.backend, device)
        # Every exchange with other processes goes through this object (_distributed/).
        comm: Communicator = (
            ShardedDistributor(plan, self.options, dist_options, fsdp_modules(model))
            if dist_options and sharded
            else Distributor(plan, self.options, dist_options, ddp)
            if dist_options
            else Local(plan.layers, plan.diagonal, self.options)
        )
        self._est = Estimator(plan, self.options, comm, model)
        self._routes = plan.routes
        self._controller = LossChangeController(self.options, self._est, grad_scaler)
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
        self._removed = False
        self._update_hooks: list[Any] = []  # attach(): the optimizer's step hooks
        self._update: UpdatePreconditioner | None = None  # attach() with precondition_update
        self._held = HeldCalls(self.options)  # calls kept until step() (_held.py)
        self._sampling = False
        self._sampled = False
        # The hooks call back through weak references: a preconditioner dropped without
        # remove() is collected, and its finalizer detaches the hooks.
        self._capture = Capture(
            {name: route.adapter for name, route in self._routes.items()},
            wants_calls=weak_method(self._wants_calls, False),
            on_backward=weak_method(self._on_backward, None),
            record=weak_method(self._record, None),
            on_call=weak_method(self._on_call, None) if comm.distributed else None,
            hold_inputs=self.options.fisher_type == "mc",
            sampling=weak_method(self._is_sampling, False),
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
        if self._wants_statistics():
            self._est.comm.on_call(name, pass_id)

    def _record(self, name: str, saved: Any, grad: Tensor, pass_id: int) -> None:
        route = self._routes[name]
        opts = self.options
        # Which backward feeds the factors: the user's loss (empirical) or the sampled one.
        feeds_factors = self._sampling == (opts.fisher_type == "mc")
        held: Held | None = None

        def call() -> Held:  # one held copy per call, made only if it is held (_held.py)
            nonlocal held
            if held is None:
                held = self._held.call(saved, grad, pass_id)
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
                    self._held.fisher[name].append(call())
                self._est.comm.on_record(name, pass_id)
        if (
            not self._sampling
            and opts.needs_loss_records
            and (route.layers or route.params or route.tied)
        ):
            self._held.loss[name].append(call())

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

    def mc_backward(
        self,
        loss: Tensor,
        output: Tensor,
        *,
        likelihood: str,
        variance: float = 1.0,
        generator: torch.Generator | None = None,
        targets: Tensor | None = None,
    ) -> None:
        """``loss.backward()`` for ``fisher_type="mc"``: on statistics steps, first one
        backward of the loss of targets sampled from the model's predictive distribution,
        which feeds the factors (see :func:`kfac_ef.mc_backward`, same arguments)."""
        self._check_live()
        mc.check_likelihood(likelihood, variance)
        if self.options.fisher_type == "mc" and self._wants_statistics():
            params = [p for p in self.parameters() if p.requires_grad]
            self._sampling = True
            try:
                mc.sampled_backward(
                    params, output, likelihood, variance, generator, targets,
                    self._controller.loss_scale(),
                )  # fmt: skip
            finally:
                self._sampling = False
            self._sampled = True
        loss.backward()

    def parameters(self) -> list[nn.Parameter]:
        """The preconditioned parameters: those of the Kronecker layers (tied weights once)
        and the diagonally preconditioned ones."""
        return unique_parameters(self._est.layers, self._est.diagonal)

    @property
    def collects_statistics(self) -> bool:
        """Whether the coming step() folds statistics into the factors (a statistics step)."""
        return self._wants_statistics()

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
        opts, est, ctl = self.options, self._est, self._controller
        if self._wants_statistics():
            _batch_shared.leave_out(est, self._held)  # before anything reads the statistics
        if opts.fisher_type == "mc" and self._wants_statistics() and not self._sampled:
            self._clear_step()
            raise RuntimeError(
                "fisher_type='mc': this statistics step had no sampled-target backward; "
                "replace loss.backward() by kfac_ef.mc_backward(precond, loss, output, "
                "likelihood=...) so that the factors see gradients of sampled targets"
            )
        # Everything that can fail on the user's input is checked before any state changes:
        # after such an error, step() can be called again for the same backward.
        ctl.check_unscaled()
        moments = ctl.moments(loss)
        lr = None
        on_update = opts.constrained_step == "optimizer"
        if on_update and not self._update_hooks:
            raise RuntimeError(
                "constrained_step='optimizer' scales the optimizer's step: call "
                "precond.attach(optimizer) once before the first step()"
            )
        if opts.precondition_update and self._update is None:
            raise RuntimeError(
                "precondition_update=True preconditions the optimizer's update: call "
                "precond.attach(optimizer) once before the first step()"
            )
        if (opts.constraint != "none" or opts.track_loss_changes) and not on_update:
            lr = opts.learning_rate(self._steps)
        with torch.no_grad(), record_function("kfac_ef.step"):
            est.grads_ok = None
            if self._wants_statistics():
                est.update_factors(ctl.loss_scale())
            else:
                est.discard_statistics()
            if self._steps % opts.inv_update_steps == 0 or est.force_decompose:
                est.check_structure()
                est.decompose(self._steps)
            if opts.damping_mode == "ekfac" and self._wants_statistics():
                est.update_scales(self._held.fisher, ctl.loss_scale())
            with_form = lr is not None and opts.needs_kronecker_form
            # Sharded: the whole gradients of this rank's layers, written back on success.
            with est.comm.gradients():
                done, forms, done_diag, diag_form = est.precondition(with_form)
                if lr is not None:
                    ctl.scale_step(
                        self._steps, self._held.loss, lr, done, forms, done_diag, diag_form,
                        moments,
                    )  # fmt: skip
                elif on_update:
                    ctl.hold_step(self._steps, self._held.loss, done, done_diag, moments)
            if self._update is not None:
                self._update.hold(done, done_diag)
        self._clear_step()
        self._steps += 1
        self._backward_seen = False
        self._set_position_offsets()

    def _set_position_offsets(self) -> None:
        """statistics_stride: the first position the next statistics capture keeps is the
        index of its statistics step (mod the stride), derived from the step count."""
        if self.options.statistics_stride > 1:
            index = self._steps // self.options.factor_update_steps
            for layer in self._est.layers:
                layer.stats.offset = index

    def _clear_step(self) -> None:
        self._held.clear()
        self._capture.release()
        self._sampled = False

    def faults(self) -> Faults:
        """Counts of the numerical faults met so far: skipped statistics updates, steps with
        non-finite gradients, failed decompositions (see :class:`Faults`). Reads device
        counters on the host (synchronizes)."""
        return self._est.faults(self._steps)

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
        if self._controller.last is None:
            raise RuntimeError("diagnostics() describes the last step(): call step() first")
        return summarize(self._controller.last)

    # ------------------------------------------------------------------ inspection
    @property
    def distributed(self) -> Distributor | None:
        """The distributed machinery (assignment, bytes communicated), or None."""
        comm = self._est.comm
        return comm if isinstance(comm, Distributor) else None

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
        return self._est.factors()

    def diagonal_fishers(self) -> dict[str, Tensor]:
        """The running diagonal empirical Fishers ``{parameter name: F}`` (copies, shaped like
        the parameter) of the parameters preconditioned with other_params="diagonal"."""
        return self._est.diagonal_fishers()

    def summary(self) -> summary.Summary:
        """The plan: layers, factor storage and bytes of state (available before the first
        step), diagonal parameters, tied weights, and parameters left to the optimizer, with
        why."""
        return summary.build(self._est)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``constrained_step="optimizer"``: measure and scale the update of each
        ``optimizer.step()`` that follows a ``step()``; with ``precondition_update=True``:
        precondition that update once more (Δθ ← (C + εI)^p Δθ, rescaled per block to the
        norm of Δθ, for the preconditioned parameters ``optimizer`` holds; the others, and
        every gradient, are left as they are).

        Registers a step pre-hook (a copy of the preconditioned parameters: their memory
        once more) and a post-hook on ``optimizer``: Δθ of the parameters ``step()``
        preconditioned, whatever the optimizer made of their gradients (momentum, Adam's
        moments, weight decay), is measured with the exact form and scaled by ν so that
        E_n[(g_nᵀ Δθ)²] meets the constraint; the optimizer's state is left as it is. Other
        parameters, and an ``optimizer.step()`` with no ``step()`` before it, are untouched.
        One optimizer: it must hold every preconditioned parameter that should be
        constrained.

        Raises:
            ValueError: without ``constrained_step="optimizer"`` or ``precondition_update``,
                a second ``attach()``, or a model sharded by FSDP2 (its parameters are
                shards: not supported).
            TypeError: if ``optimizer`` is not a torch.optim.Optimizer.
        """
        self._check_live()
        if self.options.constrained_step != "optimizer" and not self.options.precondition_update:
            raise ValueError(
                "attach() is for constrained_step='optimizer' (the constraint on the "
                "optimizer's step) or precondition_update=True; this preconditioner has "
                f"constrained_step={self.options.constrained_step!r} and "
                "precondition_update=False"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if self._update_hooks:
            raise ValueError("attach() was already called: one optimizer per preconditioner")
        if isinstance(self._est.comm, ShardedDistributor):
            what = (
                "precondition_update=True"
                if self.options.precondition_update
                else "constrained_step='optimizer'"
            )
            raise ValueError(
                f"{what} is not supported under FSDP2 (fully_shard): the update would be "
                "measured on parameter shards"
            )
        if self.options.precondition_update:
            update = self._update = UpdatePreconditioner(self._est, optimizer)
            self._update_hooks = [
                optimizer.register_step_pre_hook(lambda *_: update.before_update()),
                optimizer.register_step_post_hook(lambda *_: update.after_update()),
            ]
            return
        ctl = self._controller
        self._update_hooks = [
            optimizer.register_step_pre_hook(lambda *_: ctl.before_update()),
            optimizer.register_step_post_hook(lambda *_: ctl.after_update()),
        ]

    def remove(self) -> None:
        """Detach every hook. The preconditioner can no longer step; the model is as before."""
        self._capture.remove()
        for handle in self._update_hooks:
            handle.remove()
        self._clear_step()
        for _, module in self._hooked_modules():
            ref = _OWNERS.get(module)
            if ref is not None and ref() is self:
                del _OWNERS[module]
        self._removed = True

    def __repr__(self) -> str:
        o = self.options
        return (
            f"KFACPreconditioner({len(self._est.layers)} layers, "
            f"{len(self._est.diagonal)} diagonal, damping={o.damping}, "
            f"damping_unit={o.damping_unit!r}, damping_mode={o.damping_mode!r}, "
            f"steps={self._steps})"
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, decompositions: bool = True) -> dict[str, Any]:
        """Counters, options, running factors and decompositions (tensors cloned); the
        format is described in ``_checkpoint``.

        Args:
            decompositions: False leaves the decompositions (eigenbases and eigenvalues,
                damped inverses, the EKFAC scale S, the diagonal inverses) out, roughly
                halving the checkpoint; ``load_state_dict`` then recomputes them from the
                saved factors at the first step() after loading. Resuming is bitwise
                exact when that step is a decomposition step anyway; otherwise the
                decomposition is fresher than an uninterrupted run's, and EKFAC's S
                restarts from λ_G λ_Aᵀ.

        Under FSDP2 (``fully_shard``) a layer's state lives on the ranks that precondition
        it: every rank must call ``state_dict()`` (a collective), and each gets every
        layer's entry. For checkpoints where each rank writes only its share, use
        :meth:`dcp_state` with ``torch.distributed.checkpoint``.
        """
        return _checkpoint.save(self._est, self._steps, decompositions)

    def dcp_state(self, decompositions: bool = True) -> _checkpoint.DistributedState:
        """This preconditioner as a ``torch.distributed.checkpoint`` Stateful: each rank
        writes the layers it keeps, and reads back those it keeps under the world size it
        runs with (save under 2 ranks, load under 1 or 3)::

            dcp.save({"model": ..., "kfac": precond.dcp_state()}, checkpoint_id=path)
            dcp.load({"model": ..., "kfac": precond.dcp_state()}, checkpoint_id=path)

        Loading checks the checkpoint like :meth:`load_state_dict` with ``strict=True``
        (a layer of this model missing from the checkpoint is an error of DCP's own).
        """
        self._check_live()
        return _checkpoint.DistributedState(self, decompositions)

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
                does not have, lacks some of this one's (``strict``), holds factors of other
                shapes, or values that cannot be right (non-finite factors, decompositions or
                inverses, negative counters); the message names them, nothing is changed.
        """
        self._check_live()
        self._load(state, strict)

    def _load(self, state: Mapping[str, Any], strict: bool) -> None:
        self._steps = _checkpoint.load(self._est, state, strict)
        self._set_position_offsets()
        self._backward_seen = False
        self._clear_step()
        self._controller.last = None
