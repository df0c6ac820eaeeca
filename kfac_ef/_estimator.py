"""The curvature estimator: per-layer statistics folded into running factors, their
decompositions, and the preconditioning of the gradients with them.

Data flows one way: the hooks' observations (``LayerStatistics.add``, through the
preconditioner's capture callbacks) -> :meth:`Estimator.update_factors` on statistics steps
(finite-step check, EMA fold) -> :meth:`Estimator.decompose` on decomposition steps ->
:meth:`Estimator.precondition` rewrites ``p.grad`` bucket by bucket (the appliers of
``_blocks``/kernels). Exchanges with other processes go through ``comm`` (the identity in
one process). The preconditioner (the façade) owns the cadence; this object owns the state.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from . import _ekfac, _warn, kernels, linalg
from ._apply import Bucket, make_buckets, precondition_diagonal
from ._blocks import DiagonalParam, Layer, decompose
from ._constraint import Held
from ._decomposition import Decomposition
from ._discovery import Discovered, Route
from ._factors import (
    FactorSpec,
    precondition_eigen_adam,
    precondition_inverse_with_form,
    precondition_structured_eigen,
    precondition_structured_inverse,
    to_user,
)
from ._grads import grad_of
from ._model import structure_of
from ._options import KFACOptions

if TYPE_CHECKING:
    from ._distributed.local import Communicator


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


class Estimator:
    """The preconditioner's curvature state and the math that updates and applies it.

    Attributes:
        layers, diagonal: the Kronecker layers and the diagonally preconditioned parameters
            (discovery order); ``by_name`` / ``diag_by_name`` index them.
        buckets: same-shaped layers preconditioned in one batched call.
        comm: the communicator (``_distributed.local.Local`` in one process).
        stats_examples: examples of the last statistics step (the "sum" form's N).
        force_decompose: recompute decompositions at the next step (after a load).
    """

    def __init__(
        self,
        plan: Discovered,
        options: KFACOptions,
        comm: Communicator,
        model: nn.Module,
    ) -> None:
        self.options = options
        self.layers: list[Layer] = plan.layers
        self.diagonal: list[DiagonalParam] = plan.diagonal
        self.routes: dict[str, Route] = plan.routes
        self.trainable = plan.trainable
        self.unpreconditioned = plan.unpreconditioned
        self.ties = plan.ties
        self.coverage = plan.coverage
        self.by_name = {layer.name: layer for layer in self.layers}
        self.diag_by_name = {d.name: d for d in self.diagonal}
        self.buckets: list[Bucket] = make_buckets(self.layers)
        self.comm = comm
        self.model = weakref.ref(model)
        self.structure = structure_of(model)
        self.force_decompose = False
        self.warned_no_stats: set[str] = set()
        self.skipped_steps: Tensor | None = None
        self.skipped_reported = 0
        self.last_skip_warning: int | None = None
        self.skipped_seen: dict[str, int] = {}
        self.grads_ok: Tensor | None = None  # this step's gradients finite (0-d), if known
        self.stats_examples: float | Tensor = 1.0  # examples of the last statistics step

    def discard_statistics(self) -> None:
        """Drop this step's statistics (a step that collects none)."""
        for layer in self.layers:
            layer.stats.discard()
        for entry in self.diagonal:
            entry.stats.discard()

    def precondition(
        self, with_form: bool, graft: bool | None = None
    ) -> tuple[list[Layer], list[Tensor], list[DiagonalParam], Tensor | None]:
        """Rewrite the gradients of every layer with a decomposition and of the diagonal
        parameters; with ``with_form`` also the Kronecker forms ⟨∇̃, G ∇̃ A⟩ per bucket and
        Σ F ∇̃² of the diagonal parameters (the constraint's measure of the step).
        ``graft``: rescale each block to its gradient's norm (None: the grafting option)."""
        done: list[Layer] = []
        forms: list[Tensor] = []
        if graft is None:
            graft = self.options.grafting == "gradient"
        for bucket in self.buckets:
            members, form = bucket.precondition(
                self._bucket_fn(bucket, with_form), self.options.factor_dtype, graft
            )
            done.extend(members)
            if form is not None:
                forms.append(form.sum())
        done_diag, diag_form = precondition_diagonal(self.diagonal, with_form, graft)
        self.comm.share_gradients()
        return done, forms, done_diag, diag_form

    def update_factors(self, loss_scale: Tensor | None) -> None:
        """Take every layer's statistics, decide on the device whether the step is finite
        (statistics and gradients alike), and fold them in (or leave everything unchanged)."""
        opts = self.options
        scales: dict[torch.device, Tensor | None] = {}

        def scale_on(device: torch.device) -> Tensor | None:
            if loss_scale is None:
                return None
            if device not in scales:
                scales[device] = loss_scale.to(device=device, dtype=opts.factor_dtype)
            return scales[device]

        counts = [layer.stats.examples for layer in self.layers]
        counts += [entry.stats.examples for entry in self.diagonal]
        local = float(max(counts, default=0))
        # The (global) batch's statistics; distributed, every rank gets every entry, with a
        # device flag saying whether any rank had statistics for it.
        kron, diag = self.comm.reduce_statistics(scale_on)
        self.stats_examples = self.comm.global_examples(local, self.stats_examples)
        if not kron and not diag and not self.comm.sharded:
            return  # (sharded, a rank that keeps no factor still joins the finite check)
        # A step with a non-finite gradient (a loss-scale overflow, a NaN loss) updates no
        # factor; a layer whose own statistics are not finite keeps its factors.
        grads = [g for p in self.trainable if (g := grad_of(p)) is not None]
        grads_ok: Tensor | None = None
        if grads:
            device = grads[0].device
            norms = torch.stack([n.to(device) for n in torch._foreach_norm(grads)])
            grads_ok = torch.isfinite(norms).all()
        # Sharded, each rank checked its own rows: the ranks agree (all or none fold).
        grads_ok = self.comm.all_finite(grads_ok)
        if grads_ok is not None:
            device = grads_ok.device
            if self.skipped_steps is None:
                self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
            self.skipped_steps.add_(~grads_ok)
        self.grads_ok = grads_ok

        def ok_on(flag: Tensor, device: torch.device) -> Tensor:
            return flag if grads_ok is None else flag & grads_ok.to(device)

        for layer, taken, present in kron:
            ok = ok_on(Layer.finite(taken), layer.adapter.weight.device)
            layer.fold(taken, opts.factor_decay, ok, present)
        for entry, dtaken, present in diag:
            ok = ok_on(DiagonalParam.finite(dtaken), entry.param.device)
            entry.fold(dtaken, opts.factor_decay, ok, present)

    def update_scales(
        self, fisher_calls: Mapping[str, list[Held]], loss_scale: Tensor | None
    ) -> None:
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
            for layer in self.layers
            if layer.decomposition is not None and layer.decomposition.s is not None
        ]
        wanted = {id(layer) for layer in layers}
        feeders: dict[int, int] = defaultdict(int)
        for name in fisher_calls:
            for _, layer in self.routes[name].layers:
                feeders[id(layer)] += 1
        records: dict[int, list[_ekfac.Record]] = defaultdict(list)
        raws: dict[int, tuple[Tensor, int]] = {}
        for name, held in fisher_calls.items():
            route = self.routes[name]
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
                        dec.qg,
                        dec.qa,
                        layer.g_spec,
                        layer.a_spec,
                        opts.factor_dtype,
                    )
        items = self.comm.reduce_scales(
            [(layer, *raws.get(id(layer), (None, 0))) for layer in layers], loss_scale
        )
        for layer, raw, scale, present in items:
            ok = (
                self.grads_ok.to(raw.device)
                if self.grads_ok is not None
                else torch.ones((), dtype=torch.bool, device=raw.device)
            )
            layer.fold_scale(raw, scale, opts.factor_decay, ok, present)

    def decompose(self, steps: int) -> None:
        opts = self.options
        with record_function("kfac_ef.decompose"):
            self.comm.sync_factors()
            waiting = decompose(
                self.layers,
                opts.damping_mode,
                opts.damping,
                share=self.comm,
                damping_unit=opts.damping_unit,
                exponent=opts.exponent,
            )
            self.comm.after_decompose()
            for bucket in self.buckets:
                bucket.restack()
            self._check_failures()
            # (sharded, the layers other ranks keep have no factors here by design)
            names = [layer.name for layer in waiting if self.comm.keeps(layer)]
            relative = opts.damping_unit == "relative"
            for entry in self.diagonal:
                if not entry.decompose(opts.damping, relative, opts.exponent):
                    names.append(entry.name)
        self.force_decompose = False
        self._report_skipped(steps)
        for name in names:
            if name not in self.warned_no_stats:
                self.warned_no_stats.add(name)
                _warn.warn(
                    f"layer {name!r} has no statistics yet (no gradient reached its output "
                    "on a statistics step, or all its statistics were non-finite); its "
                    "gradients pass through unpreconditioned until it has some",
                )

    def check_structure(self) -> None:
        """Raise if the model's modules or parameters changed since construction.

        Runs on decomposition steps only (pure Python, no device work): a replaced layer
        would silently lose its preconditioning, a replaced parameter would have its old
        tensor's gradient rewritten instead of the new one's.
        """
        model = self.model()
        if model is None:
            return
        now = structure_of(model)
        if now == self.structure:
            return
        before = {entry[0]: entry for entry in self.structure}
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
        failing = [layer for layer in self.layers if layer.failures >= limit]
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

    def _report_skipped(self, steps: int) -> None:
        """Warn about statistics updates skipped since the last report, at most once per
        ``warning_interval`` steps (reads device counters: decomposition steps only)."""
        last = self.last_skip_warning
        if last is not None and steps - last < self.options.warning_interval:
            return  # the counts accumulate until the next report
        skipped = int(self.skipped_steps) if self.skipped_steps is not None else 0
        per_entry: list[str] = []
        entries: list[Layer | DiagonalParam] = [*self.layers, *self.diagonal]
        for entry in entries:
            if entry.skipped is None:
                continue
            total = int(entry.skipped.sum())
            done = self.skipped_seen.get(entry.name, 0)
            if total > done:
                per_entry.append(f"{entry.name!r} ({total - done})")
                self.skipped_seen[entry.name] = total
        if per_entry:
            cause = ""
            if skipped > self.skipped_reported:
                cause = (
                    f"; {skipped - self.skipped_reported} step(s) had non-finite gradients "
                    "(e.g. a loss-scale overflow) and updated no factor"
                )
            _warn.warn(
                "statistics updates had non-finite values and were skipped, the factors kept "
                "their previous values: " + ", ".join(per_entry) + cause + " (at most one "
                f"such warning per {self.options.warning_interval} steps; faults() counts them)"
            )
            self.last_skip_warning = steps
        self.skipped_reported = skipped

    def _bucket_fn(self, bucket: Bucket, with_form: bool = False) -> Any:
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
                    assert st.ig is not None and st.ia is not None
                    return kernels.precondition_factored(grads, st.ig, st.ia, backend=backend)
                return precondition_structured_inverse(grads, st, gs, as_)

            return factored

        exponent = self.options.exponent
        if mode == "eigen_adam":
            relative = self.options.damping_unit == "relative"
            decay = self.options.factor_decay

            def adam(grads: Tensor, st: Decomposition, gs: FactorSpec, as_: FactorSpec) -> Any:
                return precondition_eigen_adam(
                    grads, st, gs, as_, eps, relative, decay, exponent, with_form
                )

            return adam

        def eigen(grads: Tensor, st: Decomposition, gs: FactorSpec, as_: FactorSpec) -> Any:
            scale = st.s  # EKFAC
            damping = st.eps if st.eps is not None else eps  # per block: damping_unit="relative"
            if exponent != -1.0:  # the kernels divide by K + ε: another power runs in torch
                return precondition_structured_eigen(
                    grads, st, gs, as_, damping, scale, with_form, exponent
                )
            if dense:
                assert st.qg is not None and st.qa is not None
                assert st.lg is not None and st.la is not None
                args = (grads, st.qg, st.lg, st.qa, st.la, damping, scale)
                # out=grads: the torch path writes over the gathered gradients.
                if with_form:
                    return kernels.precondition_eigen_with_form(*args, backend=backend, out=grads)
                return kernels.precondition_eigen(*args, backend=backend, out=grads)
            return precondition_structured_eigen(grads, st, gs, as_, damping, scale, with_form)

        return eigen

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Copies of the running factors as ``KFACPreconditioner.factors()`` documents them."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for layer in self.layers:
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
            d.name: d.F.reshape(d.param.shape).clone() for d in self.diagonal if d.F is not None
        }

    def faults(self, steps: int) -> Faults:
        """Counts of the numerical faults met so far: skipped statistics updates, steps with
        non-finite gradients, failed decompositions (see :class:`Faults`). Reads device
        counters on the host (synchronizes)."""
        entries: list[Layer | DiagonalParam] = [*self.layers, *self.diagonal]
        counts = {e.name: int(e.skipped.sum()) for e in entries if e.skipped is not None}
        return Faults(
            steps=steps,
            skipped_steps=int(self.skipped_steps) if self.skipped_steps is not None else 0,
            skipped_updates={name: n for name, n in counts.items() if n},
            decomposition_failures={
                la.name: la.failures_total for la in self.layers if la.failures_total
            },
            consecutive_failures={la.name: la.failures for la in self.layers if la.failures},
        )

    def device(self) -> torch.device:
        if self.layers:
            return self.layers[0].adapter.weight.device
        return self.diagonal[0].param.device
