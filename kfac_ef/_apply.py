"""Appliers: the preconditioned gradients written into ``p.grad``.

Same-shaped Kronecker layers form a :class:`Bucket` whose gradients are gathered into one
``(B, g_pad, a_pad)`` stack, preconditioned in one batched call (the kernel is chosen by the
caller's function, see ``Estimator._bucket_fn``) and written back; diagonally preconditioned
parameters are rescaled in one foreach call (:func:`precondition_diagonal`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._blocks import BucketKey, DiagonalParam, Layer
from ._decomposition import Decomposition
from ._factors import FactorSpec
from ._grads import grad_of
from .layers.base import GradientParts

PreconditionFn = Callable[
    [Tensor, Decomposition, FactorSpec, FactorSpec], "Tensor | tuple[Tensor, Tensor]"
]
"""Maps the stacked gradients ``(B, g_pad, a_pad)`` to the preconditioned ones, optionally with
a ``(B,)`` tensor of per-block values computed on the way (the Kronecker form of the
loss-change constraint), which ``Bucket.precondition`` hands back. The gathered gradients are
the function's to overwrite: it may return its result in that very tensor."""


@dataclass(eq=False)
class Bucket:
    """Layers whose blocks share one shape, factor storage and device; decompositions stacked."""

    key: BucketKey
    layers: list[Layer]
    active: list[Layer] = field(default_factory=list)
    stacked: Decomposition = field(default_factory=Decomposition)

    @property
    def g_spec(self) -> FactorSpec:
        return self.key[0]

    @property
    def a_spec(self) -> FactorSpec:
        return self.key[1]

    @property
    def padded(self) -> bool:
        """Whether the stacked blocks have zero padding (block-diagonal factors)."""
        return self.g_spec.padded != self.g_spec.dim or self.a_spec.padded != self.a_spec.dim

    def restack(self) -> None:
        """Stack the members' decompositions and point each member at its slice of the stack."""
        self.active = [layer for layer in self.layers if layer.decomposition is not None]
        if not self.active:
            self.stacked = Decomposition()
            return
        decs = [layer.decomposition for layer in self.active if layer.decomposition is not None]
        self.stacked = Decomposition.stack(decs)
        stacked = self.stacked.parts()
        offset = dict.fromkeys(stacked, 0)
        for layer, dec in zip(self.active, decs):
            views = {}
            for k, mine in dec.parts().items():
                n = mine.shape[0]
                views[k] = stacked[k][offset[k] : offset[k] + n]
                offset[k] += n
            layer.decomposition = Decomposition.from_parts(views)

    def precondition(
        self, fn: PreconditionFn, dtype: torch.dtype, graft: bool = False
    ) -> tuple[list[Layer], Tensor | None]:
        """Rewrite the gradients of every member that has them, in one batched call.

        Gradients are gathered into one ``(B, g_pad, a_pad)`` buffer (zero padding beyond
        the layers' widths), preconditioned, and written back through views into p.grad.
        ``graft``: each block's result rescaled to the norm of its gathered gradient (the
        per-block values scale with it, by the square: they are quadratic forms).

        Returns:
            The layers whose gradients were rewritten, and the ``(B,)`` per-block values
            ``fn`` returned beside the gradients (None if it returned none).
        """
        members: list[tuple[Layer, GradientParts]] = []
        for layer in self.active:
            parts = layer.adapter.gradient_parts()
            if parts is not None:
                members.append((layer, parts))
        if not members:
            return [], None
        if len(members) == len(self.active):
            stacked = self.stacked
        else:
            stacked = Decomposition.stack(
                [layer.decomposition for layer, _ in members if layer.decomposition is not None]
            )
        g_spec, a_spec, device = self.key
        shape = (sum(layer.adapter.blocks for layer, _ in members), g_spec.padded, a_spec.padded)
        grads = (torch.zeros if self.padded else torch.empty)(shape, dtype=dtype, device=device)
        slots = self._part_views(grads, members)
        sources = [view for _, parts in members for view, _ in parts]
        torch._foreach_copy_(slots, sources)

        raw_norms = torch.linalg.vector_norm(grads, dim=(1, 2)) if graft else None
        result = fn(grads, stacked, g_spec, a_spec)
        out, extra = result if isinstance(result, tuple) else (result, None)
        if raw_norms is not None:
            ratio = graft_ratio(raw_norms, torch.linalg.vector_norm(out, dim=(1, 2)))
            out.mul_(ratio.view(-1, 1, 1))
            if extra is not None:
                extra = extra * ratio.square()

        if stacked is not self.stacked and stacked.n is not None:
            # eigen_adam updated the moments of a copy (some members had no gradient this
            # step): write them back to the members' own
            self._write_back(stacked, [layer for layer, _ in members])
        if out is not grads:  # a new tensor, laid out like the gathered one
            slots = self._part_views(out, members)
        torch._foreach_copy_(sources, slots)
        for _, parts in members:
            parts.flush()
        return [layer for layer, _ in members], extra

    @staticmethod
    def _write_back(stacked: Decomposition, layers: list[Layer]) -> None:
        offset = 0
        for layer in layers:
            dec = layer.decomposition
            assert dec is not None and dec.s is not None and dec.n is not None
            assert stacked.s is not None and stacked.n is not None
            k = dec.n.shape[0]
            dec.s.copy_(stacked.s[offset : offset + k])
            dec.n.copy_(stacked.n[offset : offset + k])
            offset += k

    def _part_views(
        self, stack: Tensor, members: list[tuple[Layer, GradientParts]]
    ) -> list[Tensor]:
        """The views of a ``(B, g_pad, a_pad)`` stack that hold the members' gradient parts,
        in order."""
        g_dim = self.g_spec.dim
        views: list[Tensor] = []
        offset = 0
        for layer, parts in members:
            sl = slice(offset, offset + layer.adapter.blocks)
            for view, col in parts:
                views.append(stack[sl, :g_dim, col : col + view.shape[-1]])
            offset += layer.adapter.blocks
        return views


def make_buckets(layers: list[Layer]) -> list[Bucket]:
    groups: dict[BucketKey, list[Layer]] = defaultdict(list)
    for layer in layers:
        groups[layer.shape_key].append(layer)
    return [Bucket(key, members) for key, members in groups.items()]


def graft_ratio(raw: Tensor, new: Tensor) -> Tensor:
    """‖raw‖ / ‖new‖ per block, 1 where the preconditioned norm is 0 or not finite (the
    non-finite step is then left for the checks downstream to see, not hidden)."""
    ok = (new > 0) & torch.isfinite(new)
    return torch.where(ok, raw / torch.where(ok, new, 1.0), 1.0)


def precondition_diagonal(
    params: list[DiagonalParam], with_form: bool = False, graft: bool = False
) -> tuple[list[DiagonalParam], Tensor | None]:
    """p.grad ← p.grad · (F + ε)^p for every diagonal parameter with a gradient, in one call
    (``graft``: then rescaled to the norm the gradient had).

    Returns:
        The parameters rewritten and, with ``with_form``, Σ F ∇̃² over them (0-d, in the
        factor dtype; None without a rewritten parameter): ∇̃ᵀ diag(F) ∇̃ with the F of the
        last decomposition step (``curvature``), the diagonal empirical Fisher's share of
        the constraint's Kronecker form (damping excluded).
    """
    done, grads, inverses = [], [], []
    for d in params:
        g = grad_of(d.param)
        if d.inverse is not None and g is not None:
            done.append(d)
            grads.append(g)
            inverses.append(d.inverse)
    if not grads:
        return [], None
    home = grads[0].device

    def norms() -> Tensor:  # one per parameter, gathered on one device
        return torch.stack([n.to(home) for n in torch._foreach_norm(grads)])

    raw_norms = norms() if graft else None
    torch._foreach_mul_(grads, inverses)
    if raw_norms is not None:  # the ratios of every parameter at once
        ratios = graft_ratio(raw_norms, norms()).unbind()
        torch._foreach_mul_(grads, [r.to(g.device) for r, g in zip(ratios, grads)])
    if not with_form:
        return done, None
    parts = []
    device = grads[0].device
    for d, g in zip(done, grads):
        f = d.curvature
        assert f is not None
        gf = g.reshape(-1).to(f.dtype)
        parts.append((f * gf * gf).sum().to(device))  # g already grafted, when grafting
    return done, torch.stack(parts).sum()
