"""How statistics travel: upper triangles of symmetric blocks, packed sizes, buckets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._blocks import DiagonalParam, Layer, Taken
from .._scaling import Scale
from .plan import _spec

# A unit of statistics: a Kronecker layer (A and G) or a diagonally preconditioned parameter.
Entry = Layer | DiagonalParam

# A step's statistics with their scales, and whether any rank had some (None: local).
KronTaken = list[tuple[Layer, Taken, Tensor | None]]

DiagTaken = list[tuple[DiagonalParam, tuple[Tensor, Scale], Tensor | None]]


class _Triangles:
    """Flat indices of the upper triangle of d×d matrices, per (d, device), cached."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def get(self, d: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (d, device)
        if key not in self._cache:
            i, j = torch.triu_indices(d, d, device=device)
            self._cache[key] = (i * d + j, j * d + i)
        return self._cache[key]

    def pack(self, mats: Tensor, out: Tensor) -> None:
        """``(b, d, d)`` symmetric -> ``out`` ``(b, d(d+1)/2)``: the upper triangles.

        A stack of 1×1 blocks (a diagonal factor) is its vector of entries."""
        b, d, _ = mats.shape
        if d == 1:
            out.copy_(mats.view(b, 1))
            return
        upper, _ = self.get(d, mats.device)
        torch.index_select(mats.reshape(b, d * d), 1, upper, out=out)

    def unpack(self, packed: Tensor, out: Tensor) -> None:
        """``packed`` ``(b, d(d+1)/2)`` -> both triangles of ``out`` ``(b, d, d)``, in place."""
        b, d, _ = out.shape
        if d == 1:
            out.view(b, 1).copy_(packed)
            return
        upper, lower = self.get(d, out.device)
        flat = out.view(b, d * d)
        flat.scatter_(1, upper.expand(b, -1), packed)
        flat.scatter_(1, lower.expand(b, -1), packed)


def _tri(d: int) -> int:
    return d * (d + 1) // 2


def _packed(layer: Layer, side: str) -> int:
    """Entries of one factor's upper triangles: per stored block (see _factors), so a
    diagonal factor is its d entries and a block-diagonal one nb·bs(bs+1)/2."""
    spec = _spec(layer, side)
    return layer.adapter.blocks * spec.nb * _tri(spec.bs)


def _stacks(layer: Layer, side: str) -> int:
    return layer.adapter.blocks * _spec(layer, side).nb


def _size(entry: Entry) -> int:
    """Entries of one unit's packed statistics (without its counts)."""
    if isinstance(entry, DiagonalParam):
        return entry.param.numel()
    return _packed(entry, "A") + _packed(entry, "G")


@dataclass(eq=False)
class _StatsBucket:
    """Units whose statistics are all-reduced together, and the flat buffer they use.

    Layout: for each unit, the upper triangles of S_A then S_G (per stored block), or the
    vector S of a diagonal parameter; then at the end two counts per unit (rows, examples).
    ``routes``: the hooked modules that feed the units (the bucket is complete in a pass
    when every one of them has recorded all its announced calls).
    """

    entries: list[Entry]
    buffer: Tensor | None  # None between statistics steps when buffers are transient
    offsets: list[int]  # start of each unit
    counts: int  # start of the counts
    routes: set[str]
    size: int = 0  # entries of the buffer
    dst: int | None = None  # group rank the sums go to (None: every rank, an all-reduce)
    work: Any = None
    dirty: bool = False
