"""Who decomposes what: the grid of gradient workers and the LPT assignment of factors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .._blocks import Layer
from .._factors import FactorSpec
from .._model import connected_groups


def grad_workers(fraction: float | str | None, world: int) -> int:
    """Gradient workers per layer: the divisor of ``world`` nearest to f·world (ties: larger);
    None (automatic, unresolved) counts as "comm_opt"."""
    if fraction is None or fraction == "comm_opt":
        target = float(world)
    elif fraction == "mem_opt":
        target = 1.0
    elif fraction == "hybrid":
        target = world / 2
    else:
        target = float(fraction) * world
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def lpt(costs: Sequence[float], bins: int) -> list[int]:
    """Greedy longest-processing-time: each item, costliest first, to the least-loaded bin.

    Deterministic (ties go to the earlier item and the lower bin), so every rank computes
    the same assignment. Its makespan is at most 4/3 of the optimum (Graham, 1969).
    """
    loads = [0.0] * bins
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(bins), key=lambda b: (loads[b], b))
        out[i] = b
        loads[b] += costs[i]
    return out


@dataclass(frozen=True)
class Grid:
    """Ranks 0..W-1 of the group as ``rows`` × ``columns``.

    Rank r sits at row r // columns, column r % columns. A layer assigned to column c has
    the gradient workers {i·columns + c}: one per row.
    """

    rows: int
    columns: int

    def row_of(self, rank: int) -> int:
        return rank // self.columns

    def column_of(self, rank: int) -> int:
        return rank % self.columns

    def column(self, c: int) -> list[int]:
        return [i * self.columns + c for i in range(self.rows)]

    def row(self, i: int) -> list[int]:
        return [i * self.columns + c for c in range(self.columns)]


def _spec(layer: Layer, side: str) -> FactorSpec:
    return layer.a_spec if side == "A" else layer.g_spec


def _cost(layer: Layer, side: str) -> float:
    """Decomposition cost of one factor: blocks·nb·bs³ for eigenbases (dense: blocks·d³),
    blocks·d for a diagonal factor (no eigenbasis, decomposed by every gradient worker)."""
    spec = _spec(layer, side)
    stacks = float(layer.adapter.blocks * spec.nb)
    return stacks * float(spec.bs) ** 3 if spec.has_basis else stacks


@dataclass(frozen=True)
class Plan:
    """Who does what: the column of every layer and the owner (group rank) of every factor.

    The owner of a diagonal factor is nominal: it has no eigenbasis to share, and every
    gradient worker of its layer computes its inverse or eigenvalues (O(d)) locally.
    """

    grid: Grid
    column: dict[str, int]
    owner: dict[tuple[str, str], int]

    @staticmethod
    def build(layers: Sequence[Layer], grid: Grid, together: bool = False) -> Plan:
        """Layers to columns by LPT over the cost of their factors (blocks·d³ for a dense
        one), then, in each column, factors to its ranks by LPT over their cost.

        ``together``: layers that share a parameter (a tied weight, the q, k, v rows of one
        packed projection) go to one column, so that every parameter has one set of
        gradient workers (the sharded distributor gathers each parameter to them)."""
        groups = _sharing(layers) if together else [[layer] for layer in layers]
        costs = [sum(_cost(la, "A") + _cost(la, "G") for la in group) for group in groups]
        column = {
            layer.name: c for group, c in zip(groups, lpt(costs, grid.columns)) for layer in group
        }
        owner: dict[tuple[str, str], int] = {}
        for c in range(grid.columns):
            items = [(layer, s) for layer in layers if column[layer.name] == c for s in "AG"]
            members = grid.column(c)
            for (layer, side), i in zip(
                items, lpt([_cost(layer, s) for layer, s in items], grid.rows)
            ):
                owner[(layer.name, side)] = members[i]
        return Plan(grid, column, owner)

    def loads(self, layers: Sequence[Layer]) -> list[float]:
        """Decomposition cost per rank (see ``build``)."""
        out = [0.0] * (self.grid.rows * self.grid.columns)
        for layer in layers:
            for side in "AG":
                out[self.owner[(layer.name, side)]] += _cost(layer, side)
        return out


def _sharing(layers: Sequence[Layer]) -> list[list[Layer]]:
    """The layers in groups connected by shared parameters, in layer order."""
    keys = [[id(p) for p in layer.adapter.parameters()] for layer in layers]
    return [[layers[i] for i in members] for members in connected_groups(keys)]
