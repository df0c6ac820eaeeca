"""Layers' running factors, their decompositions, and batched preconditioning by shape.

Every layer contributes ``blocks`` Kronecker blocks of shape (g_dim, a_dim). Layers whose
blocks have the same shape (and device) form a *bucket*: their decompositions are stored
stacked, so one batched chain of products preconditions all of them at once, and the launch
count per step does not grow with the number of layers of a shape. Each layer holds views
into its bucket's stacks.

Decompositions are computed per factor size: all factors of one size (A's and G's of every
layer alike) go through one batched eigendecomposition.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from . import linalg
from ._stats import LayerStatistics
from .layers import LayerAdapter

logger = logging.getLogger(__name__)

Decomposition = dict[str, Tensor]


@dataclass(eq=False)
class Layer:
    """One preconditioned module: statistics, running factors and decomposition.

    ``updates[b]`` counts the accepted statistics updates of block b and ``skipped[b]`` the
    rejected (non-finite) ones; both live on the device so that step() never synchronizes.
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

    @property
    def shape_key(self) -> tuple[int, int, torch.device]:
        ad = self.adapter
        return (ad.g_dim, ad.a_dim, ad.weight.device)

    def update_factors(self, loss_reduction: str, decay: float) -> None:
        """Fold this step's statistics into the running A and G, without host synchronization.

        F ← (1-w) F + w · s · S per block, with w = 1-β (w = 1 for a block's first accepted
        update) and w = 0 for a block whose new statistics are not finite.
        """
        acc_a, scale_a, acc_g, scale_g = self.stats.take(loss_reduction)
        self.fold(acc_a, scale_a, acc_g, scale_g, decay)

    def fold(
        self,
        acc_a: Tensor,
        scale_a: float,
        acc_g: Tensor,
        scale_g: float,
        decay: float,
        present: Tensor | None = None,
    ) -> None:
        """Fold batch factors ``scale · acc`` into the running A and G (``acc`` is clobbered).

        ``present`` (``(blocks,)`` bool on the device, optional) marks blocks that have
        statistics at all: a block without is left alone and not counted as skipped (the
        distributed path, where a layer may see no data on any rank, decides it on the device).
        """
        if self.A is None or self.G is None or self.updates is None or self.skipped is None:
            self.A = torch.zeros_like(acc_a)
            self.G = torch.zeros_like(acc_g)
            self.updates = torch.zeros(acc_a.shape[0], dtype=torch.int64, device=acc_a.device)
            self.skipped = torch.zeros_like(self.updates)
        keep = linalg.finite_gram(acc_a, scale_a) & linalg.finite_gram(acc_g, scale_g)
        skip = ~keep
        if present is not None:
            keep &= present
            skip &= present
        weight = torch.where(self.updates > 0, 1.0 - decay, 1.0).to(acc_a.dtype) * keep
        for factor, acc, scale in ((self.A, acc_a, scale_a), (self.G, acc_g, scale_g)):
            linalg.running_average_(factor, acc, scale, weight, keep)
        self.updates.add_(keep)
        self.skipped.add_(skip)


# (id(layer), "A" | "G") -> (parts of the decomposition, whether it succeeded)
Results = dict[tuple[int, str], tuple[dict[str, Tensor], bool]]


class DecompositionShare(Protocol):
    """How decompositions are split between processes (see kfac_ef/distributed.py).

    ``owns(layer, side)`` says whether this process computes the decomposition of factor
    ``side`` ("A" or "G") of ``layer``; ``exchange(results, ready)`` returns the results of
    every factor this process needs (its own and those received from their owners), keyed
    like ``results``. Layers absent from the returned results keep their decomposition.
    """

    def owns(self, layer: Layer, side: str) -> bool: ...

    def exchange(self, results: Results, ready: list[Layer]) -> Results: ...


def decompose(
    layers: list[Layer],
    damping_mode: str,
    damping: float,
    share: DecompositionShare | None = None,
) -> list[Layer]:
    """Recompute the decomposition of every layer whose factors have been updated.

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
        if layer.A is None or layer.updates is None or layer.skipped is None:
            waiting.append(layer)
            continue
        counts = layer.updates.tolist()
        skipped = int(layer.skipped.sum())
        if skipped > layer.skipped_reported:
            warnings.warn(
                f"layer {layer.name!r}: {skipped - layer.skipped_reported} statistics update(s) "
                "had non-finite values and were skipped (factors kept their previous values)",
                RuntimeWarning,
                stacklevel=4,
            )
            layer.skipped_reported = skipped
        (ready if min(counts) > 0 else waiting).append(layer)

    # One batched call per factor size and device: eigendecompositions ("exact") or damped
    # inverses ("pi", whose shifts √ε·π and √ε/π depend on each layer's traces).
    jobs: dict[tuple[int, torch.device], list[tuple[Layer, str]]] = defaultdict(list)
    shifts: dict[tuple[int, str], Tensor] = {}
    sqrt_eps = math.sqrt(damping)
    for layer in ready:
        assert layer.A is not None and layer.G is not None
        for side, factor in (("A", layer.A), ("G", layer.G)):
            if share is None or share.owns(layer, side):
                jobs[(factor.shape[-1], factor.device)].append((layer, side))
        if damping_mode == "pi":
            pi = linalg.pi_scale(
                layer.A.diagonal(dim1=1, dim2=2).sum(-1),
                layer.adapter.a_dim,
                layer.G.diagonal(dim1=1, dim2=2).sum(-1),
                layer.adapter.g_dim,
            )
            shifts[(id(layer), "A")] = sqrt_eps * pi
            shifts[(id(layer), "G")] = sqrt_eps / pi
    results: Results = {}
    for items in jobs.values():
        mats = torch.cat([getattr(layer, side) for layer, side in items])
        if damping_mode == "exact":
            eig = linalg.eigh_psd(mats)
            parts, ok = {"q": eig.eigenvectors, "l": eig.eigenvalues}, eig.ok
        else:
            shift = torch.cat([shifts[(id(layer), side)] for layer, side in items])
            inv, ok = linalg.damped_inverses(mats, shift)
            parts = {"i": inv}
        offset = 0
        for layer, side in items:
            sl = slice(offset, offset + layer.adapter.blocks)
            results[(id(layer), side)] = ({k: v[sl] for k, v in parts.items()}, all(ok[sl]))
            offset += layer.adapter.blocks
    if share is not None:
        results = share.exchange(results, ready)

    for layer in ready:
        if (id(layer), "A") not in results:
            continue  # preconditioned by other processes (distributed)
        part_a, ok_a = results[(id(layer), "A")]
        part_g, ok_g = results[(id(layer), "G")]
        if not (ok_a and ok_g):
            what = (
                "keeps its previous decomposition"
                if layer.decomposition
                else ("stays unpreconditioned until a decomposition succeeds")
            )
            warnings.warn(
                f"layer {layer.name!r}: decomposition failed even in float64; it {what}",
                RuntimeWarning,
                stacklevel=4,
            )
            continue
        # Keys: eigenbases/eigenvalues ("qg", "lg", "qa", "la") or inverses ("ig", "ia").
        layer.decomposition = {
            f"{k}{side}": v
            for side, part in (("g", part_g), ("a", part_a))
            for k, v in part.items()
        }
    return waiting


PreconditionFn = Callable[[Tensor, Decomposition], Tensor]


@dataclass(eq=False)
class Bucket:
    """Layers whose blocks share one (g_dim, a_dim) and device; decompositions stacked."""

    key: tuple[int, int, torch.device]
    layers: list[Layer]
    active: list[Layer] = field(default_factory=list)
    stacked: Decomposition = field(default_factory=dict)

    def restack(self) -> None:
        """Stack the members' decompositions and point each member at its slice of the stack."""
        self.active = [layer for layer in self.layers if layer.decomposition is not None]
        if not self.active:
            self.stacked = {}
            return
        names = list(self.active[0].decomposition or {})
        self.stacked = {
            k: torch.cat([layer.decomposition[k] for layer in self.active])  # type: ignore[index]
            for k in names
        }
        offset = 0
        for layer in self.active:
            blocks = layer.adapter.blocks
            layer.decomposition = {k: v[offset : offset + blocks] for k, v in self.stacked.items()}
            offset += blocks

    def precondition(self, fn: PreconditionFn, dtype: torch.dtype) -> None:
        """Rewrite the gradients of every member that has one, in one batched call."""
        layers = [
            layer
            for layer in self.active
            if all(p.grad is not None for p in layer.adapter.parameters())
        ]
        if not layers:
            return
        if len(layers) == len(self.active):
            stacked = self.stacked
        else:
            stacked = {
                k: torch.cat([layer.decomposition[k] for layer in layers])  # type: ignore[index]
                for k in self.stacked
            }
        g_dim, a_dim, device = self.key
        total = sum(layer.adapter.blocks for layer in layers)
        grads = torch.empty(total, g_dim, a_dim, dtype=dtype, device=device)
        dst: list[Tensor] = []
        src: list[Tensor] = []
        offset = 0
        for layer in layers:
            ad = layer.adapter
            sl = slice(offset, offset + ad.blocks)
            dst.append(grads[sl, :, : ad.a_dim0])
            src.append(ad.weight_matrix(ad.weight.grad))  # type: ignore[arg-type]
            if ad.bias is not None:
                dst.append(grads[sl, :, ad.a_dim0 :])
                src.append(ad.bias_matrix(ad.bias.grad))  # type: ignore[arg-type]
            offset += ad.blocks
        torch._foreach_copy_(dst, src)

        out = fn(grads, stacked)

        dst, src = [], []
        offset = 0
        for layer in layers:
            ad = layer.adapter
            sl = slice(offset, offset + ad.blocks)
            dst.append(ad.weight.grad)  # type: ignore[arg-type]
            src.append(out[sl, :, : ad.a_dim0].reshape(ad.weight.shape))
            if ad.bias is not None:
                dst.append(ad.bias.grad)  # type: ignore[arg-type]
                src.append(out[sl, :, ad.a_dim0 :].reshape(ad.bias.shape))
            offset += ad.blocks
        torch._foreach_copy_(dst, src)


def make_buckets(layers: list[Layer]) -> list[Bucket]:
    groups: dict[tuple[int, int, torch.device], list[Layer]] = defaultdict(list)
    for layer in layers:
        groups[layer.shape_key].append(layer)
    return [Bucket(key, members) for key, members in groups.items()]
