"""KFACPreconditioner: orchestration of capture, statistics, decompositions and step().

Data flows one way: hooks (capture.py) -> per-layer statistics (_stats.py) -> running factors
and, every ``inv_update_steps``, decompositions (_blocks.py, linalg.py) -> step() rewrites
``p.grad``. Nothing else touches ``p.grad``.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from . import kernels
from ._blocks import Bucket, Decomposition, Layer, decompose, make_buckets
from ._options import KFACOptions, SkipSpec
from ._stats import LayerStatistics
from .capture import Capture
from .distributed import DistributedOptions, Distributor, resolve, unwrap
from .layers import make_adapter
from .summary import LayerSummary, Summary

logger = logging.getLogger(__name__)

STATE_FORMAT = "kfac_ef.state/1"

# Modules hooked by a live preconditioner: a second one on the same module would double the
# statistics work and disagree about p.grad, so it is refused.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[KFACPreconditioner]] = (
    weakref.WeakKeyDictionary()
)


def _structure(model: nn.Module) -> list[tuple[str, str, int, tuple[int, ...], tuple[bool, ...]]]:
    """Modules with parameters: name, type, identity, parameter identities, trainability."""
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


class KFACPreconditioner:
    """Kronecker-factored preconditioning with the empirical Fisher.

    ``step()`` replaces each supported layer's gradient ∇ (the matrix [∇W | ∇b]) by
    (G⊗A + εI)⁻¹ vec(∇), where A = E[ã ãᵀ] over layer inputs (with a homogeneous coordinate
    for the bias) and G = E[δ δᵀ] over per-example output gradients δ = ∂ℓ_n/∂s, running-averaged
    over steps. Call it after ``loss.backward()`` and before ``optimizer.step()``.

    Supported layers: nn.Linear (inputs of any rank; extra dims are shared positions),
    nn.Conv1d/2d/3d (any stride, padding, padding_mode, dilation, groups). Parameters of other
    modules are left untouched; ``summary()`` lists them with the reason.

    Args:
        model: the model; its supported submodules are hooked at construction.
        damping: ε > 0.
        factor_decay: β ∈ [0, 1) of the running averages of A and G.
        factor_update_steps: collect statistics every k-th step (steps 0, k, 2k, ...).
        inv_update_steps: recompute decompositions at step 0 and every k-th step.
        loss_reduction: "mean" or "sum", the reduction of the loss over the batch.
        damping_mode: "exact" (ε added to the eigenvalues of G⊗A) or "pi" (factored damping).
        kfac_approx: "expand" or "reduce", for layers with shared positions.
        skip_layers: module names, full-match regexes or module types to leave alone.
        factor_dtype: torch.float32 or torch.float64 for factors and decompositions.
        backend: "auto", "torch" or "triton" kernels.
        distributed: data-parallel training over torch.distributed (docs/distributed.md).
            None (default): on when torch.distributed is initialized with several ranks;
            True, or a :class:`~kfac_ef.DistributedOptions`: on (torch.distributed must be
            initialized); False: off. On, the factors are those of the global batch, the
            decompositions are split across ranks, and every rank must construct the
            preconditioner and call step() in step with the others. A
            DistributedDataParallel model is unwrapped: layer names carry no ``module.``.

    Raises:
        TypeError, ValueError: on an invalid option (the message names it).
        ValueError: if the model has no layer to precondition.
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
        distributed: bool | DistributedOptions | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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
        )
        dist_options = resolve(distributed)
        model, ddp = unwrap(model)
        self._model = weakref.ref(model)
        self._structure = _structure(model)
        self._layers, self._unpreconditioned = self._discover(model)
        if not self._layers:
            raise ValueError(
                "the model has no layer to precondition (supported: nn.Linear, nn.Conv1d/2d/3d "
                "with a trainable weight, not excluded by skip_layers); left untouched:\n"
                + "\n".join(f"  {n}: {why}" for n, why in self._unpreconditioned)
            )
        for device in {layer.adapter.weight.device for layer in self._layers}:
            kernels.check_backend(self.options.backend, device)
        # Every exchange with other processes goes through this object (distributed.py).
        self._dist = (
            Distributor(self._layers, self.options, dist_options, ddp)
            if dist_options is not None
            else None
        )
        self._claim()
        self._by_name = {layer.name: layer for layer in self._layers}
        self._buckets: list[Bucket] = make_buckets(self._layers)
        self._steps = 0
        self._backward_seen = False
        self._force_decompose = False
        self._removed = False
        self._warned_no_stats: set[str] = set()
        self._capture = Capture(
            {layer.name: layer.adapter.module for layer in self._layers},
            wants_statistics=self._wants_statistics,
            on_backward=self._on_backward,
            record=self._record,
            on_call=self._dist.on_call if self._dist is not None else None,
        )

    # ------------------------------------------------------------------ construction
    def _discover(self, model: nn.Module) -> tuple[list[Layer], list[tuple[str, str]]]:
        opts = self.options
        names: dict[int, str] = {}
        owners: dict[int, list[str]] = defaultdict(list)
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                names.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
                owners[id(p)].append(mname or "<model>")

        layers: list[Layer] = []
        left: dict[int, str] = {}
        for mname, module in model.named_modules():
            direct = list(module.parameters(recurse=False))
            if not direct:
                continue
            if opts.skips(mname, module):
                reason: str | None = "skipped by skip_layers"
                adapter = None
            else:
                made = make_adapter(module)
                reason, adapter = (made, None) if isinstance(made, str) else (None, made)
            if adapter is not None:
                shared = sorted(
                    {o for p in adapter.parameters() for o in owners[id(p)]} - {mname or "<model>"}
                )
                if shared:
                    reason = (
                        f"parameter shared with {', '.join(shared)} (tied weights are not "
                        "supported for this layer kind)"
                    )
                    adapter = None
            if adapter is None:
                for p in direct:
                    left.setdefault(id(p), reason or "not preconditioned")
                continue
            covered = {id(p) for p in adapter.parameters()}
            for p in direct:
                if id(p) not in covered:
                    left.setdefault(id(p), "frozen (requires_grad is False)")
            stats = LayerStatistics(adapter, opts.kfac_approx, opts.factor_dtype, opts.backend)
            layers.append(Layer(mname or "<model>", adapter, stats))
        covered_all = {id(p) for layer in layers for p in layer.adapter.parameters()}
        unpre = [(names[i], why) for i, why in left.items() if i not in covered_all]
        return layers, unpre

    def _claim(self) -> None:
        for layer in self._layers:
            module = layer.adapter.module
            ref = _OWNERS.get(module)
            other = ref() if ref is not None else None
            if other is not None and other is not self and not other._removed:
                raise RuntimeError(
                    f"layer {layer.name!r} is already hooked by another KFACPreconditioner; "
                    "call remove() on that one first (two preconditioners on one model would "
                    "both rewrite its gradients)"
                )
        for layer in self._layers:
            _OWNERS[layer.adapter.module] = weakref.ref(self)

    # ------------------------------------------------------------------ capture callbacks
    def _wants_statistics(self) -> bool:
        return self._steps % self.options.factor_update_steps == 0

    def _on_backward(self) -> None:
        self._backward_seen = True

    def _record(self, name: str, x: Tensor, grad: Tensor, pass_id: int) -> None:
        layer = self._by_name[name]
        with torch.no_grad():
            layer.stats.add(x, grad, pass_id)
            if self._dist is not None:
                self._dist.on_record(layer, pass_id)

    # ------------------------------------------------------------------ step
    @property
    def steps(self) -> int:
        """Number of completed step() calls."""
        return self._steps

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this KFACPreconditioner was removed (remove() detached its hooks)")

    def step(self) -> None:
        """Precondition the gradients in place: p.grad ← (G⊗A + εI)⁻¹ p.grad per layer.

        Folds the statistics of the last backward pass(es) into the running factors (on
        statistics steps), recomputes decompositions (on decomposition steps), then rewrites
        the gradients of every layer that has a decomposition. Layers without one yet, and
        parameters whose ``.grad`` is None, are left as they are.

        Raises:
            RuntimeError: if no backward pass reached a hooked layer since the last step()
                (or since construction), or after ``remove()``.
        """
        self._check_live()
        if not self._backward_seen:
            raise RuntimeError(
                "step() called without a backward pass since the last step(): call "
                "loss.backward() (with the model in training mode and grad enabled) before "
                "precond.step(), and step() once per backward (or per accumulated batch)"
            )
        opts = self.options
        with torch.no_grad(), record_function("kfac_ef.step"):
            if self._wants_statistics() and self._dist is not None:
                self._dist.reduce_statistics(self._layers)
            elif self._wants_statistics():
                for layer in self._layers:
                    if not layer.stats.empty:
                        layer.update_factors(opts.loss_reduction, opts.factor_decay)
            else:
                for layer in self._layers:
                    layer.stats.discard()
            if self._steps % opts.inv_update_steps == 0 or self._force_decompose:
                self._check_structure()
                self._decompose()
            fn = self._precondition_fn()
            for bucket in self._buckets:
                bucket.precondition(fn, opts.factor_dtype)
            if self._dist is not None:
                self._dist.share_gradients(self._layers)
        self._steps += 1
        self._backward_seen = False

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

    def _decompose(self) -> None:
        opts = self.options
        with record_function("kfac_ef.decompose"):
            if self._dist is not None:
                self._dist.sync_factors(self._layers)
            waiting = decompose(self._layers, opts.damping_mode, opts.damping, share=self._dist)
            for bucket in self._buckets:
                bucket.restack()
        self._force_decompose = False
        for layer in waiting:
            if layer.name not in self._warned_no_stats:
                self._warned_no_stats.add(layer.name)
                warnings.warn(
                    f"layer {layer.name!r} has no statistics yet (no gradient reached its "
                    "output on a statistics step, or all its statistics were non-finite); its "
                    "gradients pass through unpreconditioned until it has some",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _precondition_fn(self) -> Any:
        damping, backend = self.options.damping, self.options.backend
        if self.options.damping_mode == "exact":

            def exact(grads: Tensor, st: Decomposition) -> Tensor:
                return kernels.precondition_eigen(
                    grads, st["qg"], st["lg"], st["qa"], st["la"], damping, backend=backend
                )

            return exact

        def factored(grads: Tensor, st: Decomposition) -> Tensor:
            return kernels.precondition_factored(grads, st["ig"], st["ia"], backend=backend)

        return factored

    # ------------------------------------------------------------------ inspection
    @property
    def distributed(self) -> Distributor | None:
        """The distributed machinery (assignment, bytes communicated), or None."""
        return self._dist

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The running estimates ``{module name: (A, G)}`` (copies), in DESIGN.md's convention.

        A is ``(a_dim, a_dim)`` with the homogeneous coordinate as its last row and column when
        the layer has a trainable bias; G is ``(g_dim, g_dim)``. For a conv with ``groups > 1``
        both carry a leading dimension, one entry per group: A ``(groups, a, a)``, G
        ``(groups, g, g)``, group g's block being G[g] ⊗ A[g]. Layers without statistics yet
        are absent.
        """
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for layer in self._layers:
            if layer.A is None or layer.G is None:
                continue
            a, g = layer.A.clone(), layer.G.clone()
            if layer.adapter.blocks == 1:
                a, g = a[0], g[0]
            out[layer.name] = (a, g)
        return out

    def summary(self) -> Summary:
        """Layers, factor shapes and bytes of state; parameters left to the optimizer, with why."""
        item = torch.empty((), dtype=self.options.factor_dtype).element_size()
        rows = []
        for layer in self._layers:
            ad = layer.adapter
            a, g, b = ad.a_dim, ad.g_dim, ad.blocks
            decomp = b * (a * a + g * g)
            if self.options.damping_mode == "exact":
                decomp += b * (a + g)  # eigenvalues beside the eigenbases
            if self._dist is not None and not self._dist.preconditions(layer):
                decomp = 0  # another rank holds it (grad_worker_fraction < 1)
            prefix = "" if layer.name == "<model>" else layer.name + "."
            rows.append(
                LayerSummary(
                    name=layer.name,
                    kind=ad.kind,
                    blocks=b,
                    a_shape=(a, a),
                    g_shape=(g, g),
                    parameters=(prefix + "weight",) + ((prefix + "bias",) if ad.has_bias else ()),
                    factor_bytes=2 * layer.stats.nbytes(),  # running factors + accumulators
                    decomposition_bytes=decomp * item,
                )
            )
        return Summary(tuple(rows), tuple(self._unpreconditioned))

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Detach every hook. The preconditioner can no longer step; the model is as before."""
        self._capture.remove()
        for layer in self._layers:
            ref = _OWNERS.get(layer.adapter.module)
            if ref is not None and ref() is self:
                del _OWNERS[layer.adapter.module]
        self._removed = True

    def __repr__(self) -> str:
        o = self.options
        return (
            f"KFACPreconditioner({len(self._layers)} layers, damping={o.damping}, "
            f"damping_mode={o.damping_mode!r}, steps={self._steps})"
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters, options, running factors and decompositions (tensors cloned)."""
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
                    if layer.decomposition is not None
                    else None
                ),
            }
        return {
            "format": STATE_FORMAT,
            "steps": self._steps,
            "options": self.options.to_dict(),
            "layers": layers,
        }

    def _own_name(self, name: str) -> str:
        """A checkpointed layer name as this preconditioner names it: a name saved with the
        ``module.`` prefix of a DistributedDataParallel wrapper maps to the unwrapped name."""
        if name not in self._by_name and name.startswith("module."):
            bare = name.removeprefix("module.")
            if bare in self._by_name:
                return bare
        return name

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; tensors move to each layer's device and factor dtype.

        Distributed, every rank must call it (the ranks agree on whether decompositions are
        recomputed at the next step).

        Raises:
            ValueError: if the state is not from a KFACPreconditioner, names layers this one
                does not have, or holds factors of other shapes (the message names them).
        """
        self._check_live()
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a KFACPreconditioner state (expected format {STATE_FORMAT!r}, got "
                f"{state.get('format') if isinstance(state, Mapping) else type(state).__name__!r})"
            )
        saved = {self._own_name(name): entry for name, entry in state["layers"].items()}
        unknown = sorted(set(saved) - set(self._by_name))
        problems = [f"{n}: not a preconditioned layer of this model" for n in unknown]
        for name, entry in saved.items():
            layer = self._by_name.get(name)
            if layer is None:
                continue
            ad = layer.adapter
            want = {"A": (ad.blocks, ad.a_dim, ad.a_dim), "G": (ad.blocks, ad.g_dim, ad.g_dim)}
            for key, shape in want.items():
                got = tuple(entry[key].shape)
                if got != shape:
                    problems.append(f"{name}: {key} has shape {got}, this model needs {shape}")
        if problems:
            raise ValueError("the checkpoint does not fit this model:\n  " + "\n  ".join(problems))
        saved_opts = state.get("options", {})
        opts = self.options
        keep_decomposition = saved_opts.get("damping_mode") == opts.damping_mode and (
            opts.damping_mode == "exact" or saved_opts.get("damping") == opts.damping
        )
        dtype = opts.factor_dtype
        for layer in self._layers:
            entry = saved.get(layer.name)
            layer.stats.discard()
            if entry is None:
                layer.A = layer.G = layer.updates = layer.skipped = None
                layer.decomposition = None
                continue
            device = layer.adapter.weight.device
            layer.A = entry["A"].to(device=device, dtype=dtype).clone()
            layer.G = entry["G"].to(device=device, dtype=dtype).clone()
            layer.updates = entry["updates"].to(device).clone()
            layer.skipped = entry["skipped"].to(device).clone()
            layer.skipped_reported = int(layer.skipped.sum())
            dec = entry.get("decomposition")
            if dec is not None and keep_decomposition:
                layer.decomposition = {k: v.to(device=device, dtype=dtype) for k, v in dec.items()}
            else:
                layer.decomposition = None
                self._force_decompose = True
        if self._dist is not None:
            self._force_decompose = self._dist.after_load(self._layers, self._force_decompose)
        for bucket in self._buckets:
            bucket.restack()
        self._steps = int(state["steps"])
        self._backward_seen = False
