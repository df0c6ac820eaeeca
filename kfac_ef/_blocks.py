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
    With ``damping_mode="ekfac"`` the decomposition also holds the scale ``"s"`` (B, g, a),
    and ``scale_updates[b]`` counts the batches folded into it since it was last initialized
    from λ_G λ_Aᵀ.
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
        if self.A is None or self.G is None or self.updates is None or self.skipped is None:
            self.A = torch.zeros_like(acc_a)
            self.G = torch.zeros_like(acc_g)
            self.updates = torch.zeros(acc_a.shape[0], dtype=torch.int64, device=acc_a.device)
            self.skipped = torch.zeros_like(self.updates)
        keep = linalg.finite_gram(acc_a, scale_a) & linalg.finite_gram(acc_g, scale_g)
        weight = torch.where(self.updates > 0, 1.0 - decay, 1.0).to(acc_a.dtype) * keep
        for factor, acc, scale in ((self.A, acc_a, scale_a), (self.G, acc_g, scale_g)):
            linalg.running_average_(factor, acc, scale, weight, keep)
        self.updates.add_(keep)
        self.skipped.add_(~keep)

    def update_scale(self, calls: list[Call], loss_reduction: str, decay: float) -> None:
        """Fold this step's EKFAC second moment into the running scale S, on the device.

        S_batch = s · Σ_n (Q_Gᵀ ∇̂_n Q_A)² in the current eigenbasis, with ∇̂_n the observed
        gradient of example n (summed over its positions and calls) and s the scale of G
        (N for mean reduction, since δ_n = N · ∂L/∂s; 1 for sum). Then
        S ← (1-w) S + w S_batch with w = 1-β, or w = 1 for the first batch since S was
        initialized from λ_G λ_Aᵀ; a block whose S_batch is not finite is left unchanged.
        Updates the view into the bucket's stack in place.
        """
        st = self.decomposition
        if st is None or "s" not in st or not calls:
            return
        ad = self.adapter
        total: Tensor | None = None
        examples = 0
        for a, d in per_pass_rows(ad, calls):
            part = linalg.eigenbasis_second_moment(a, d, st["qa"], st["qg"])
            total = part if total is None else total.add_(part)
            examples += a.shape[0]
        assert total is not None and self.scale_updates is not None
        scale = float(examples) if loss_reduction == "mean" else 1.0
        keep = torch.isfinite(total.sum(dim=(1, 2)) * scale)
        weight = torch.where(self.scale_updates > 0, 1.0 - decay, 1.0).to(total.dtype) * keep
        linalg.running_average_(st["s"], total, scale, weight, keep)
        self.scale_updates.add_(keep)


Call = tuple[Tensor, Tensor, int]
"""One call of a layer as captured: (input x, gradient w.r.t. its output, pass id)."""


def per_pass_rows(adapter: LayerAdapter, calls: list[Call]) -> list[tuple[Tensor, Tensor]]:
    """The calls of one step as ``(N, T, blocks, a_dim)`` inputs and ``(N, T, blocks, g_dim)``
    output gradients, one pair per pass (the same N examples); the calls of one pass (a
    module applied several times) are concatenated along positions. Inputs carry the
    homogeneous coordinate when the layer has a trainable bias.
    """
    by_pass: dict[int, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    for x, grad, pass_id in calls:
        a = adapter.inputs(x)
        if adapter.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        by_pass[pass_id].append((a, adapter.output_grads(grad)))
    out: list[tuple[Tensor, Tensor]] = []
    for items in by_pass.values():
        if len({a.shape[0] for a, _ in items}) == 1:
            out.append((torch.cat([a for a, _ in items], 1), torch.cat([d for _, d in items], 1)))
        else:  # batch sizes differ within a pass (warned by the statistics): calls apart
            out.extend(items)
    return out


def decompose(layers: list[Layer], damping_mode: str, damping: float) -> list[Layer]:
    """Recompute the decomposition of every layer whose factors have been updated.

    A layer whose eigendecomposition fails even in float64 keeps its previous decomposition
    (warning); without one it stays unpreconditioned until a later decomposition succeeds.
    Reads update counts on the host: called only on decomposition steps. Warnings point at
    the caller of ``KFACPreconditioner.step()``.

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
        jobs[(layer.A.shape[-1], layer.A.device)].append((layer, "A"))
        jobs[(layer.G.shape[-1], layer.G.device)].append((layer, "G"))
        if damping_mode == "pi":
            pi = linalg.pi_scale(
                layer.A.diagonal(dim1=1, dim2=2).sum(-1),
                layer.adapter.a_dim,
                layer.G.diagonal(dim1=1, dim2=2).sum(-1),
                layer.adapter.g_dim,
            )
            shifts[(id(layer), "A")] = sqrt_eps * pi
            shifts[(id(layer), "G")] = sqrt_eps / pi
    results: dict[tuple[int, str], tuple[dict[str, Tensor], bool]] = {}
    for items in jobs.values():
        mats = torch.cat([getattr(layer, side) for layer, side in items])
        if damping_mode != "pi":
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

    for layer in ready:
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
        # Keys: eigenbases/eigenvalues ("qg", "lg", "qa", "la") or inverses ("ig", "ia")
        # with their shifts ("cg", "ca"); "ekfac" adds the scale "s".
        new = {
            f"{k}{side}": v
            for side, part in (("g", part_g), ("a", part_a))
            for k, v in part.items()
        }
        if damping_mode == "pi":
            dtype = new["ig"].dtype
            new["cg"] = shifts[(id(layer), "G")].to(dtype)
            new["ca"] = shifts[(id(layer), "A")].to(dtype)
        elif damping_mode == "ekfac":
            new["s"] = _carried_scale(layer, new)
        layer.decomposition = new
    return waiting


def _carried_scale(layer: Layer, new: Decomposition) -> Tensor:
    """The EKFAC scale of a layer's new eigenbasis: the previous S carried over, or λ_G λ_Aᵀ.

    A layer that had a scale keeps its running average, transported to the new basis
    (``linalg.ekfac_transport``); one without (its first basis, or a checkpoint without a
    scale) starts from K-FAC's diagonal λ_G λ_Aᵀ and its next batch replaces it.
    """
    old = layer.decomposition
    if old is not None and "s" in old and layer.scale_updates is not None:
        return linalg.ekfac_transport(old["s"], old["qg"], old["qa"], new["qg"], new["qa"])
    layer.scale_updates = torch.zeros(
        layer.adapter.blocks, dtype=torch.int64, device=new["lg"].device
    )
    return linalg.ekfac_initial_scale(new["lg"], new["la"])


PreconditionFn = Callable[[Tensor, Decomposition], "Tensor | tuple[Tensor, Tensor]"]
"""Maps the stacked gradients ``(B, g, a)`` to the preconditioned ones, optionally with a
``(B,)`` tensor of per-block values computed on the way (the quadratic forms of the
loss-change constraint), which ``Bucket.precondition`` hands back."""


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

    def precondition(
        self, fn: PreconditionFn, dtype: torch.dtype
    ) -> tuple[list[Layer], Tensor | None]:
        """Rewrite the gradients of every member that has one, in one batched call.

        Returns:
            The layers whose gradients were rewritten, and the ``(B,)`` per-block values
            ``fn`` returned beside the gradients (None if it returned none).
        """
        layers = [
            layer
            for layer in self.active
            if all(p.grad is not None for p in layer.adapter.parameters())
        ]
        if not layers:
            return [], None
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

        result = fn(grads, stacked)
        out, extra = result if isinstance(result, tuple) else (result, None)

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
        return layers, extra


def make_buckets(layers: list[Layer]) -> list[Bucket]:
    groups: dict[tuple[int, int, torch.device], list[Layer]] = defaultdict(list)
    for layer in layers:
        groups[layer.shape_key].append(layer)
    return [Bucket(key, members) for key, members in groups.items()]
