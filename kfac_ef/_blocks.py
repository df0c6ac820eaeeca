"""Layers' running factors, their decompositions, and batched preconditioning by shape.

Every layer contributes ``blocks`` Kronecker blocks of shape (g_dim, a_dim); each factor is
stored dense, diagonal or block-diagonal (``_factors.FactorSpec``). Layers whose blocks have
the same shape and factor storage (and device) form a *bucket*: their decompositions are
stored stacked, so one batched chain of products preconditions all of them at once, and the
launch count per step does not grow with the number of layers of a shape. Each layer holds
views into its bucket's stacks.

Decompositions are computed per block size: all factor blocks of one size (A's and G's of
every layer alike) go through one batched eigendecomposition; diagonal factors need none.

Parameters outside the Kronecker form, with other_params="diagonal", are
:class:`DiagonalParam`: a running diagonal empirical Fisher F and p.grad ← p.grad / (F + ε).

With damping_mode="ekfac" a layer's decomposition also holds the scale S of _ekfac.py
(``"s"``, ``(blocks, g_pad, a_pad)``), carried over each basis change; with "pi" it holds the
shifts of the damped inverses (``"cg"``, ``"ca"``), which the loss-change constraint's
Kronecker form needs.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from . import _ekfac, _warn, linalg
from ._decomposition import Decomposition
from ._factors import FactorSpec, block_traces, eigenvalue_products
from ._scaling import Scale
from ._stats import DiagonalStatistics, LayerStatistics

if TYPE_CHECKING:
    from .layers import LayerAdapter

logger = logging.getLogger(__name__)

Taken = tuple[Tensor, Scale, Tensor, Scale]
BucketKey = tuple[FactorSpec, FactorSpec, torch.device]


def _per_stack(x: Tensor, nb: int) -> Tensor:
    """Per-Kronecker-block values ``(blocks,)`` -> per stored block ``(blocks · nb,)``."""
    return x if nb == 1 else x.repeat_interleave(nb)


def _accepted(ok: Tensor, present: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-block flags (keep, skip) of a statistics update: kept when finite (``ok``),
    counted as skipped when not; neither where ``present`` says there were no statistics."""
    if present is None:
        return ok, ~ok
    return ok & present, ~ok & present


def _fold_weight(updates: Tensor, decay: float, keep: Tensor, dtype: torch.dtype) -> Tensor:
    """w = 1-β per kept block (1 for its first accepted update), 0 where not kept.

    Built in ``dtype`` from the start: a float32 intermediate would round 1-β (float64
    factors would then average with a weight off by ~1e-9 relative)."""
    one = torch.ones((), dtype=dtype, device=updates.device)
    return torch.where(updates > 0, one * (1.0 - decay), one) * keep


@dataclass(eq=False)
class Layer:
    """One preconditioned Kronecker layer: statistics, running factors and decomposition.

    ``A`` and ``G`` are stored as ``spec.shape(blocks)`` stacks (see _factors). ``updates[b]``
    counts the accepted statistics updates of block b and ``skipped[b]`` the rejected
    (non-finite) ones; both live on the device so that step() never synchronizes.
    With damping_mode="ekfac", ``scale_updates[b]`` counts the batches folded into the scale
    S of block b since it was last initialized from λ_G λ_Aᵀ.
    """

    name: str
    adapter: LayerAdapter
    stats: LayerStatistics
    A: Tensor | None = None
    G: Tensor | None = None
    updates: Tensor | None = None
    skipped: Tensor | None = None
    decomposition: Decomposition | None = None
    skipped_reported: int = 0
    scale_updates: Tensor | None = None
    failures: int = 0  # consecutive failed decompositions (reset by a success)
    failures_total: int = 0
    failed_sides: tuple[str, ...] = ()  # the factors ("A", "G") of the last failure

    @property
    def a_spec(self) -> FactorSpec:
        return self.stats.a_spec

    @property
    def g_spec(self) -> FactorSpec:
        return self.stats.g_spec

    @property
    def shape_key(self) -> BucketKey:
        return (self.g_spec, self.a_spec, self.adapter.weight.device)

    def take(self, loss_reduction: str, loss_scale: Tensor | None = None) -> Taken:
        """This step's statistics and their scales (see LayerStatistics.take)."""
        return self.stats.take(loss_reduction, loss_scale)

    @staticmethod
    def finite(taken: Taken) -> Tensor:
        """0-d flag: whether every entry of this step's scaled statistics is finite."""
        acc_a, scale_a, acc_g, scale_g = taken
        return linalg.finite_gram(acc_a, scale_a).all() & linalg.finite_gram(acc_g, scale_g).all()

    def fold(self, taken: Taken, decay: float, ok: Tensor, present: Tensor | None = None) -> None:
        """Fold statistics into the running A and G, without host synchronization.

        F ← (1-w) F + w · s · S per block, with w = 1-β (w = 1 for a block's first accepted
        update) and w = 0 when ``ok`` (a 0-d device flag) is False. ``taken``'s accumulators
        are clobbered.

        ``present`` (a 0-d bool device tensor, optional) says whether the layer has statistics
        at all: without, it is left alone and not counted as skipped (the distributed path,
        where a layer may see no data on any rank, decides it on the device).
        """
        acc_a, scale_a, acc_g, scale_g = taken
        blocks = self.adapter.blocks
        if self.A is None or self.G is None or self.updates is None or self.skipped is None:
            self.A = torch.zeros_like(acc_a)
            self.G = torch.zeros_like(acc_g)
            self.updates = torch.zeros(blocks, dtype=torch.int64, device=acc_a.device)
            self.skipped = torch.zeros_like(self.updates)
        keep, skip = _accepted(ok.expand(blocks), present)
        weight = _fold_weight(self.updates, decay, keep, acc_a.dtype)
        for factor, acc, scale, spec in (
            (self.A, acc_a, scale_a, self.a_spec),
            (self.G, acc_g, scale_g, self.g_spec),
        ):
            linalg.running_average_(
                factor, acc, scale, _per_stack(weight, spec.nb), _per_stack(keep, spec.nb)
            )
        self.updates.add_(keep)
        self.skipped.add_(skip)

    def fold_scale(
        self, raw: Tensor, scale: Scale, decay: float, ok: Tensor, present: Tensor | None = None
    ) -> None:
        """Fold a batch's EKFAC second moment into the running S, without host synchronization.

        S ← (1-w) S + w · s · raw per block, s the scale of G (the raw sums are of observed
        gradients, like S_G), w = 1-β, or 1 for the first batch since S was initialized from
        λ_G λ_Aᵀ; w = 0 where the batch is not finite or ``ok`` (0-d flag) is False, or where
        ``present`` (0-d flag, distributed) says no rank had statistics. Updates the view into
        the bucket's stack in place; ``raw`` is clobbered.
        """
        dec = self.decomposition
        assert dec is not None and dec.s is not None and self.scale_updates is not None
        finite = torch.isfinite(raw.sum(dim=(1, 2)) * scale) & ok
        keep, _ = _accepted(finite, present)
        weight = _fold_weight(self.scale_updates, decay, keep, raw.dtype)
        linalg.running_average_(dec.s, raw, scale, weight, keep)
        self.scale_updates.add_(keep)

    def state(self, decompositions: bool) -> dict[str, Any] | None:
        """This layer's checkpoint entry (tensors cloned); None without statistics yet."""
        if self.A is None:
            return None
        assert self.G is not None and self.updates is not None and self.skipped is not None
        entry: dict[str, Any] = {
            "A": self.A.clone(),
            "G": self.G.clone(),
            "updates": self.updates.clone(),
            "skipped": self.skipped.clone(),
            "decomposition": (
                {k: v.clone() for k, v in self.decomposition.parts().items()}
                if self.decomposition is not None and decompositions
                else None
            ),
            "failures": (self.failures, self.failures_total),
        }
        if self.scale_updates is not None:
            entry["scale_updates"] = self.scale_updates.clone()
        return entry

    def load_state(
        self, entry: Mapping[str, Any] | None, keys: set[str] | None, dtype: torch.dtype
    ) -> bool:
        """Restore a checkpoint entry (None: start afresh, as at construction), on this
        layer's device in ``dtype``. ``keys``: the decomposition's keys under the current
        options when a saved decomposition can be reused, None when it cannot.

        Returns:
            Whether the decomposition must be recomputed at the next step.
        """
        self.stats.discard()
        self.scale_updates = None
        if entry is None:
            self.A = self.G = self.updates = self.skipped = None
            self.decomposition = None
            self.failures = self.failures_total = 0
            return False
        device = self.adapter.weight.device
        self.A = entry["A"].to(device=device, dtype=dtype).clone()
        self.G = entry["G"].to(device=device, dtype=dtype).clone()
        self.updates = entry["updates"].to(device).clone()
        self.skipped = entry["skipped"].to(device).clone()
        self.failures, self.failures_total = entry.get("failures", (0, 0))
        dec = entry.get("decomposition")
        if dec is None or keys is None or set(dec) != keys:
            self.decomposition = None
            return True
        self.decomposition = Decomposition.from_parts(dec).map(
            lambda v: v.to(device=device, dtype=dtype)
        )
        if "s" in keys:
            counts = entry.get("scale_updates")
            self.scale_updates = (
                counts.to(device).clone() if counts is not None else torch.zeros_like(self.updates)
            )
        return False


def carried_scale(layer: Layer, new: Decomposition) -> Tensor:
    """The EKFAC scale of a layer's new eigenbasis: the previous S carried over, or λ_G λ_Aᵀ.

    A layer that had a scale keeps its running average, transported to the new basis
    (``_ekfac.transport``); one without (its first basis, or a checkpoint without a scale)
    starts from K-FAC's diagonal λ_G λ_Aᵀ and its next batch replaces it.
    """
    old = layer.decomposition
    assert new.lg is not None and new.la is not None
    if old is not None and old.s is not None and layer.scale_updates is not None:
        return _ekfac.transport(old.s, old, new, layer.g_spec, layer.a_spec)
    layer.scale_updates = torch.zeros(layer.adapter.blocks, dtype=torch.int64, device=new.lg.device)
    # K-FAC's own diagonal: with it, EKFAC preconditions exactly like K-FAC
    return eigenvalue_products(new, layer.g_spec, layer.a_spec)


def carried_moment(layer: Layer, new: Decomposition) -> tuple[Tensor, Tensor]:
    """damping_mode="eigen_adam": the running second moment of the minibatch gradient in the
    new eigenbasis and its update count per Kronecker block: the previous moment transported
    to the new basis (as EKFAC's scale, ``_ekfac.transport``), or zeros with a count of 0
    (Adam's bias correction then makes the first moment that step's squared gradient)."""
    old = layer.decomposition
    assert new.lg is not None
    if old is not None and old.s is not None and old.n is not None:
        return _ekfac.transport(old.s, old, new, layer.g_spec, layer.a_spec), old.n.clone()
    b = layer.adapter.blocks
    shape = (b, layer.g_spec.padded, layer.a_spec.padded)
    s = torch.zeros(shape, dtype=new.lg.dtype, device=new.lg.device)
    return s, torch.zeros(b, dtype=new.lg.dtype, device=new.lg.device)


def decomposition_keys(layer: Layer, damping_mode: str, damping_unit: str = "absolute") -> set[str]:
    """The entries of a complete decomposition of ``layer`` (a checkpoint missing one is
    decomposed afresh): a diagonal factor has eigenvalues but no eigenbasis; relative
    damping adds the blocks' ε ("eps")."""
    if damping_mode == "pi":
        return {"ig", "ia", "cg", "ca"}
    keys = {"lg", "la"}
    keys |= {"eps"} if damping_unit == "relative" and damping_mode != "eigen_adam" else set()
    keys |= {"qg"} if layer.g_spec.has_basis else set()
    keys |= {"qa"} if layer.a_spec.has_basis else set()
    keys |= {"s"} if damping_mode == "ekfac" else set()
    return keys | ({"s", "n"} if damping_mode == "eigen_adam" else set())


@dataclass(eq=False)
class DiagonalParam:
    """A parameter preconditioned by its diagonal empirical Fisher: p.grad ← p.grad / (F + ε).

    ``F`` is the running average (same cadence, decay and reduction scaling as the Kronecker
    factors), ``inverse`` = 1 / (F + ε) as of the last decomposition step, shaped like p, and
    ``curvature`` the F (clipped at 0) it was computed from: the constraint's Kronecker form
    measures the step with the same curvature that made it, as the Kronecker layers do with
    their decompositions' eigenvalues.
    """

    name: str
    param: nn.Parameter
    stats: DiagonalStatistics
    F: Tensor | None = None
    updates: Tensor | None = None
    skipped: Tensor | None = None
    inverse: Tensor | None = None
    curvature: Tensor | None = None

    def take(self, loss_reduction: str, loss_scale: Tensor | None = None) -> tuple[Tensor, Scale]:
        return self.stats.take(loss_reduction, loss_scale)

    @staticmethod
    def finite(taken: tuple[Tensor, Scale]) -> Tensor:
        acc, scale = taken
        return torch.isfinite(acc.sum() * scale)

    def fold(
        self,
        taken: tuple[Tensor, Scale],
        decay: float,
        ok: Tensor,
        present: Tensor | None = None,
    ) -> None:
        """F ← (1-w) F + w · s · S, as :meth:`Layer.fold` (``ok``, ``present``: 0-d flags)."""
        acc, scale = taken
        if self.F is None or self.updates is None or self.skipped is None:
            self.F = torch.zeros_like(acc)
            self.updates = torch.zeros(1, dtype=torch.int64, device=acc.device)
            self.skipped = torch.zeros_like(self.updates)
        keep, skip = _accepted(ok.reshape(1), present)
        weight = _fold_weight(self.updates, decay, keep, acc.dtype)
        acc.masked_fill_(~keep, 0.0)
        self.F.mul_(1.0 - weight).add_(acc * (weight * scale))
        self.updates.add_(keep)
        self.skipped.add_(skip)

    def decompose(self, damping: float, relative: bool = False, exponent: float = -1.0) -> bool:
        """inverse ← (F + ε)^p (p = ``exponent``, 1/(F + ε) by default); False (and no
        inverse) while F has no accepted update.

        ``relative``: ε = damping · mean(F) (damping alone while the mean is 0).
        Reads the update count on the host: decomposition steps only.
        """
        if self.F is None or self.updates is None or int(self.updates.sum()) == 0:
            return False
        f = self.F.clamp_min(0.0)
        eps: float | Tensor = damping
        if relative:
            mean = f.mean()
            eps = damping * torch.where((mean > 0) & torch.isfinite(mean), mean, 1.0)
        shifted = f + eps
        power = shifted.reciprocal_() if exponent == -1.0 else shifted.pow_(exponent)
        self.inverse = power.view(self.param.shape)
        self.curvature = f
        return True

    def state(self, decompositions: bool) -> dict[str, Any] | None:
        """This parameter's checkpoint entry (tensors cloned); None without statistics."""
        if self.F is None:
            return None
        assert self.updates is not None and self.skipped is not None
        keep = decompositions and self.inverse is not None and self.curvature is not None
        return {
            "F": self.F.clone(),
            "updates": self.updates.clone(),
            "skipped": self.skipped.clone(),
            "inverse": self.inverse.clone() if keep and self.inverse is not None else None,
            "curvature": (self.curvature.clone() if keep and self.curvature is not None else None),
        }

    def load_state(
        self,
        entry: Mapping[str, Any] | None,
        reuse: bool,
        damping: float,
        relative: bool,
        dtype: torch.dtype,
        exponent: float = -1.0,
    ) -> None:
        """Restore a checkpoint entry (None: start afresh). ``reuse``: the saved 1/(F + ε)
        holds under the current damping; otherwise (or in checkpoints without the F it
        was computed from) it is recomputed from the running F."""
        self.stats.discard()
        if entry is None:
            self.F = self.updates = self.skipped = self.inverse = self.curvature = None
            return
        device = self.param.device
        self.F = entry["F"].to(device=device, dtype=dtype).clone()
        self.updates = entry["updates"].to(device).clone()
        self.skipped = entry["skipped"].to(device).clone()
        inverse, curvature = entry.get("inverse"), entry.get("curvature")
        if inverse is not None and curvature is not None and reuse:
            self.inverse = inverse.to(device=device, dtype=dtype).clone()
            self.curvature = curvature.to(device=device, dtype=dtype).clone()
        else:
            self.inverse = self.curvature = None
            self.decompose(damping, relative, exponent)


# (id(layer), "A" | "G") -> (parts of the decomposition, whether it succeeded)
Results = dict[tuple[int, str], tuple[dict[str, Tensor], bool]]


class DecompositionShare(Protocol):
    """How decompositions are split between processes (see kfac_ef/_distributed/).

    ``owns(layer, side)`` says whether this process computes the decomposition of factor
    ``side`` ("A" or "G") of ``layer`` (asked for factors with an eigenbasis only: diagonal
    factors are decomposed by every process, it costs O(d)); ``exchange(results, ready)``
    returns the results of every factor this process needs (its own, the diagonal ones, and
    those received from their owners), keyed like ``results``. Layers absent from the
    returned results keep their decomposition.
    """

    def owns(self, layer: Layer, side: str) -> bool: ...

    def exchange(self, results: Results, ready: list[Layer]) -> Results: ...


def relative_scale(layer: Layer) -> Tensor:
    """Per Kronecker block, the mean eigenvalue of G⊗A: (tr G / dim G)(tr A / dim A), ``(blocks,)``.

    The unit of ε with ``damping_unit="relative"``. A block whose factors have no positive
    finite trace (no signal yet) gets 1: its ε is then the absolute one. Float64, so that
    factors of very different scales do not underflow the product.
    """
    assert layer.A is not None and layer.G is not None
    blocks = layer.adapter.blocks
    ta = block_traces(layer.A, layer.a_spec, blocks).double() / layer.a_spec.dim
    tg = block_traces(layer.G, layer.g_spec, blocks).double() / layer.g_spec.dim
    m = ta * tg
    return torch.where((m > 0) & torch.isfinite(m), m, 1.0)


def decompose(
    layers: list[Layer],
    damping_mode: str,
    damping: float,
    share: DecompositionShare | None = None,
    damping_unit: str = "absolute",
    exponent: float = -1.0,
) -> list[Layer]:
    """Recompute the decomposition of every layer whose factors have been updated.

    ``exponent`` p matters to "pi" only (the other modes apply it with their eigenvalues):
    its stored "damped inverses" are then the powers (M + c I)^p.

    With ``damping_unit="relative"`` each Kronecker block's ε is ``damping`` times its
    :func:`relative_scale`, fixed here until the next decomposition: stored as the
    decomposition's ``"eps"`` (``(blocks,)``; "exact", "ekfac"), or folded into the shifts of
    the damped inverses ("pi": c_A = √ε·π·√m = √ε·tr A/dim A, c_G = √ε·tr G/dim G).

    A layer whose eigendecomposition fails even in float64 keeps its previous decomposition
    (warning); without one it stays unpreconditioned until a later decomposition succeeds.
    Reads update counts on the host: called only on decomposition steps. Warnings point at
    the caller of ``KFACPreconditioner.step()``. With ``share``, only the factors this process
    owns are decomposed here, and the others arrive through ``share.exchange``.

    Returns:
        The layers that have no accepted statistics yet (nothing to decompose).
    """
    ready: list[Layer] = []
    waiting: list[Layer] = []
    for layer in layers:
        if layer.A is None or layer.updates is None:
            waiting.append(layer)
            continue
        (ready if min(layer.updates.tolist()) > 0 else waiting).append(layer)

    jobs, diagonal, shifts, scales = _plan_jobs(ready, damping_mode, damping, share, damping_unit)
    results = _run_jobs(jobs, diagonal, shifts, damping_mode, exponent)
    if share is not None:
        results = share.exchange(results, ready)

    for layer in ready:
        if (id(layer), "A") in results:  # else preconditioned by other processes
            _install(layer, results, shifts, scales.get(id(layer)), damping_mode, damping)
    return waiting


Jobs = dict[tuple[int, torch.device], list[tuple[Layer, str]]]


def _plan_jobs(
    ready: list[Layer],
    damping_mode: str,
    damping: float,
    share: DecompositionShare | None,
    damping_unit: str,
) -> tuple[Jobs, list[tuple[Layer, str]], dict[tuple[int, str], Tensor], dict[int, Tensor]]:
    """The batched calls to make (by block size and device), the diagonal factors, π's
    shifts and the relative-damping scales of the layers ready for a decomposition."""
    # One batched call per block size and device: eigendecompositions ("exact", "ekfac") or
    # damped inverses ("pi", whose shifts √ε·π and √ε/π depend on each layer's traces).
    # Diagonal factors need no call: their eigenvalues are their entries.
    jobs: dict[tuple[int, torch.device], list[tuple[Layer, str]]] = defaultdict(list)
    diagonal: list[tuple[Layer, str]] = []
    shifts: dict[tuple[int, str], Tensor] = {}
    sqrt_eps = math.sqrt(damping)
    scales: dict[int, Tensor] = {}
    for layer in ready:
        assert layer.A is not None and layer.G is not None
        if damping_unit == "relative":
            scales[id(layer)] = relative_scale(layer)
        for side, spec in (("A", layer.a_spec), ("G", layer.g_spec)):
            mat = getattr(layer, side)
            if not spec.has_basis:
                diagonal.append((layer, side))  # local everywhere: cheap
            elif share is None or share.owns(layer, side):
                jobs[(spec.bs, mat.device)].append((layer, side))
        if damping_mode == "pi":
            blocks = layer.adapter.blocks
            pi = linalg.pi_scale(
                block_traces(layer.A, layer.a_spec, blocks),
                layer.a_spec.dim,
                block_traces(layer.G, layer.g_spec, blocks),
                layer.g_spec.dim,
            )
            root = sqrt_eps * (scales[id(layer)].sqrt() if id(layer) in scales else 1.0)
            shifts[(id(layer), "A")] = _per_stack(root * pi, layer.a_spec.nb)
            shifts[(id(layer), "G")] = _per_stack(root / pi, layer.g_spec.nb)
    return jobs, diagonal, shifts, scales


def _run_jobs(
    jobs: Jobs,
    diagonal: list[tuple[Layer, str]],
    shifts: dict[tuple[int, str], Tensor],
    damping_mode: str,
    exponent: float = -1.0,
) -> Results:
    """Decompose (or invert, or raise to π's power ``exponent``) each job's stacked factors in
    one call, and the diagonal ones."""
    results: Results = {}
    for items in jobs.values():
        mats = torch.cat([getattr(layer, side) for layer, side in items])
        if damping_mode != "pi":
            eig = linalg.eigh_psd(mats)
            parts, ok = {"q": eig.eigenvectors, "l": eig.eigenvalues}, eig.ok
        else:
            shift = torch.cat([shifts[(id(layer), side)] for layer, side in items])
            if exponent == -1.0:
                inv, ok = linalg.damped_inverses(mats, shift)
            else:
                eig = linalg.eigh_psd(mats)
                inv, ok = linalg.damped_inverse(eig, shift, exponent), eig.ok
            parts = {"i": inv}
        offset = 0
        for layer, side in items:
            n = getattr(layer, side).shape[0]
            sl = slice(offset, offset + n)
            results[(id(layer), side)] = ({k: v[sl] for k, v in parts.items()}, all(ok[sl]))
            offset += n
    for layer, side in diagonal:
        entries = getattr(layer, side).reshape(-1, 1).clamp_min(0.0)
        if damping_mode != "pi":
            results[(id(layer), side)] = ({"l": entries}, True)
        else:
            shift = shifts[(id(layer), side)].to(entries.dtype).unsqueeze(1)
            shifted = entries + shift
            power = shifted.reciprocal_() if exponent == -1.0 else shifted.pow_(exponent)
            results[(id(layer), side)] = ({"i": power}, True)
    return results


def _install(
    layer: Layer,
    results: Results,
    shifts: dict[tuple[int, str], Tensor],
    scale: Tensor | None,
    damping_mode: str,
    damping: float,
) -> None:
    """Make a layer's new decomposition current, or count and report its failure."""
    part_a, ok_a = results[(id(layer), "A")]
    part_g, ok_g = results[(id(layer), "G")]
    if not (ok_a and ok_g):
        layer.failures += 1
        layer.failures_total += 1
        layer.failed_sides = tuple(s for s, ok in (("A", ok_a), ("G", ok_g)) if not ok)
        what = (
            "keeps its previous decomposition"
            if layer.decomposition
            else ("stays unpreconditioned until a decomposition succeeds")
        )
        _warn.warn(
            f"layer {layer.name!r}: decomposition of {' and '.join(layer.failed_sides)} "
            f"failed even in float64 ({layer.failures} in a row); it {what}",
        )
        return
    layer.failures = 0
    new = Decomposition.of_sides(part_g, part_a)
    if damping_mode == "pi":
        assert new.ig is not None
        new.cg = shifts[(id(layer), "G")].to(new.ig.dtype)
        new.ca = shifts[(id(layer), "A")].to(new.ig.dtype)
    elif damping_mode == "ekfac":
        new.s = carried_scale(layer, new)
    elif damping_mode == "eigen_adam":
        new.s, new.n = carried_moment(layer, new)
    if damping_mode in ("exact", "ekfac") and scale is not None:
        assert new.lg is not None
        new.eps = (damping * scale).to(new.lg.dtype)
    layer.decomposition = new
