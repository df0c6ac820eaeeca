"""Data-parallel K-FAC on torch.distributed: everything that crosses process boundaries.

This is the only module of kfac_ef that talks to other processes. W ranks each run the same
model on their own local batch (typically under DistributedDataParallel, which averages the
gradients). Four things are communicated, all on a process group of their own (a copy of
the given group, so that K-FAC's asynchronous collectives never interleave with DDP's):

1. **Factor statistics** (all-reduce, sum), on statistics steps only. Each rank packs the
   upper triangles of its raw sums S_A = Σ ã ãᵀ and S_G = Σ γ γᵀ (γ the observed output
   gradients), one triangle per stored block (a diagonal factor is its vector of entries, a
   block-diagonal one its blocks' triangles, see _factors.py), and the sums S = Σ_n ĝ_n² of
   the diagonally preconditioned parameters (scaled like S_G), with its row and example
   counts, in the factor dtype, into buckets of about ``bucket_cap_mb``. A bucket is launched
   asynchronously from the capture path as soon as every module feeding it has recorded
   its calls of the backward pass, so that the reduction runs while backward goes on;
   ``step()`` launches what is left and waits. The reduced sums give the statistics of the
   global batch exactly (docs/distributed.md, "Scaling"):

       A = Σ_r S_A,r / Σ_r rows_r
       G = Σ_r N_r² S_G,r / Σ_r N_r     loss_reduction="mean" (δ_n = N_r γ_n on rank r)
       G = Σ_r S_G,r / W²              loss_reduction="sum"  (DDP averages: L = Σ_r L_r / W)

   (with fisher_type="mc" the sampled backward observes δ_n itself: no N_r² for "mean")

   (diagonal Fishers F like G), each divided by σ² with a loss scale σ (grad_scaler).

   With ``factor_sync="decomposition"`` nothing is sent on statistics steps: each rank keeps
   running factors of its own batches, and the running factors themselves are averaged
   (all-reduce) just before each decomposition.

   With ``fisher_type="mc"`` the statistics are those of the sampled-target backward and
   travel the same way. With ``damping_mode="ekfac"`` the second moments in the eigenbases,
   Σ_n (Q_Gᵀ ∇̂_n Q_A)², are all-reduced in ``step()`` after the decomposition (one buffer,
   scaled like S_G); this needs every eigenbasis on every rank ("comm_opt") and
   ``factor_sync="update"`` (checked at construction).
2. **Decompositions** (broadcast), on decomposition steps. Every factor with an eigenbasis
   has one owner, which decomposes it; the owners are chosen by greedy
   longest-processing-time over the cost blocks·nb·bs³ (blocks·d³ for a dense factor).
   Diagonal factors are decomposed (O(d)) by every rank that needs them. Eigenbases and
   eigenvalues ("exact"), or the packed damped inverses ("pi"), go to the ranks that
   precondition the layer (its *gradient workers*).
3. **Preconditioned gradients** (broadcast), every step, when a layer has fewer gradient
   workers than there are ranks: a gradient worker preconditions the layer and broadcasts
   the result (the layer's [∇W | ∇b] views into p.grad) to the ranks of its row, which
   hold no decomposition of that layer. Diagonal parameters are preconditioned everywhere.
4. **The loss-change constraint** (all-reduce, a few numbers), every step with a constraint
   or ``track_loss_changes``: Σ_n u_n², the example count and the loss moments over every
   rank (E[(Δℓ)²] and the relative target are those of the global batch), and, with several
   columns, the Kronecker forms of each column's layers over the ranks of a row.

``grad_worker_fraction`` f sets the gradient workers per layer to n_g ≈ f·W (a divisor of
W): ranks form a grid of n_g rows by m = W/n_g columns, every layer is assigned to one
column (its n_g ranks are its gradient workers, one per row), and row i's worker of a layer
broadcasts its preconditioned gradient within row i. Presets: "comm_opt" (f = 1: every rank
holds every decomposition, no gradient traffic), "mem_opt" (n_g = 1: one rank per layer
decomposes and preconditions, then broadcasts the gradient), "hybrid" (f = 1/2).

Every collective is waited on with the process group's timeout; a failure (a peer that died
or stopped calling ``step()``) is re-raised as a RuntimeError that says so.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import _ekfac
from ._blocks import DiagonalParam, Layer, Results, Taken
from ._factors import FactorSpec
from ._options import KFACOptions
from ._stats import Scale
from .layers.base import GradientParts

if TYPE_CHECKING:
    from ._discovery import Plan as Discovered

logger = logging.getLogger(__name__)

GRAD_WORKER_PRESETS = ("comm_opt", "mem_opt", "hybrid")
FACTOR_SYNCS = ("update", "decomposition")


@dataclass(frozen=True)
class DistributedOptions:
    """How a :class:`~kfac_ef.KFACPreconditioner` splits its work across processes.

    Attributes:
        process_group: the ranks that train together (default: all). K-FAC communicates on
            a copy of it, created at construction (every rank of the group must construct
            its preconditioner at the same point of the program).
        grad_worker_fraction: "comm_opt" (default), "mem_opt", "hybrid", or a number f in
            (0, 1]: the fraction of ranks that hold each layer's decomposition and
            precondition its gradient (rounded to the nearest divisor of the group size).
        factor_sync: "update" (default): all-reduce the statistics on every statistics
            step, so the running factors are those of the global batch; "decomposition":
            keep per-rank running factors and average them only before decompositions
            (less traffic; exact when every rank has the same local batch size).
        bucket_cap_mb: approximate size of one all-reduce of statistics, in MiB.
        overlap: launch the all-reduce of a bucket of statistics during backward, as soon
            as its layers' statistics are complete. Needs every rank to run the same layers
            the same number of times per pass; set it to False for models whose executed
            layers depend on the data (reductions then all start in ``step()``).
    """

    process_group: Any = None
    grad_worker_fraction: float | str = "comm_opt"
    factor_sync: str = "update"
    bucket_cap_mb: float = 25.0
    overlap: bool = True

    def __post_init__(self) -> None:
        f = self.grad_worker_fraction
        if isinstance(f, str):
            if f not in GRAD_WORKER_PRESETS:
                raise ValueError(
                    f"Invalid grad_worker_fraction={f!r}: must be one of "
                    f"{', '.join(map(repr, GRAD_WORKER_PRESETS))} or a number in (0, 1]"
                )
        elif isinstance(f, bool) or not isinstance(f, int | float) or not (0 < f <= 1):
            raise ValueError(
                f"Invalid grad_worker_fraction={f!r}: must be a number in (0, 1] or one of "
                f"{', '.join(map(repr, GRAD_WORKER_PRESETS))}"
            )
        if self.factor_sync not in FACTOR_SYNCS:
            raise ValueError(
                f"Invalid factor_sync={self.factor_sync!r}: must be one of "
                f"{', '.join(map(repr, FACTOR_SYNCS))}"
            )
        cap = self.bucket_cap_mb
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not (0 < cap < math.inf):
            raise ValueError(f"Invalid bucket_cap_mb={cap!r}: must be a finite number > 0")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"Invalid overlap={self.overlap!r}: must be True or False")
        pg = self.process_group
        if pg is not None and not isinstance(pg, dist.ProcessGroup):
            raise TypeError(
                f"Invalid process_group={pg!r}: must be a torch.distributed ProcessGroup "
                "(from torch.distributed.new_group) or None for all ranks"
            )


def unwrap(model: nn.Module) -> tuple[nn.Module, DistributedDataParallel | None]:
    """The model inside a DistributedDataParallel wrapper (layer names without ``module.``)."""
    if isinstance(model, DistributedDataParallel):
        return model.module, model
    return model, None


def resolve(distributed: bool | DistributedOptions | None) -> DistributedOptions | None:
    """The distributed options in force, or None for a single-process preconditioner.

    ``None`` (automatic) turns distribution on when torch.distributed is initialized with
    more than one rank; ``True`` or a DistributedOptions require it to be initialized.
    """
    if distributed is False:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is None:
        if not initialized or dist.get_world_size() < 2:
            return None
        return DistributedOptions()
    if distributed is True:
        opts = DistributedOptions()
    elif isinstance(distributed, DistributedOptions):
        opts = distributed
    else:
        raise TypeError(
            f"Invalid distributed={distributed!r}: must be None (automatic), True, False or "
            "a kfac_ef.DistributedOptions"
        )
    if not initialized:
        raise RuntimeError(
            "distributed K-FAC needs torch.distributed to be initialized: call "
            "torch.distributed.init_process_group() before building the preconditioner "
            "(or pass distributed=False)"
        )
    return opts


def grad_workers(fraction: float | str, world: int) -> int:
    """Gradient workers per layer: the divisor of ``world`` nearest to f·world (ties: larger)."""
    if fraction == "comm_opt":
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
    def build(layers: Sequence[Layer], grid: Grid) -> Plan:
        """Layers to columns by LPT over the cost of their factors (blocks·d³ for a dense
        one), then, in each column, factors to its ranks by LPT over their cost."""
        cols = lpt([_cost(layer, "A") + _cost(layer, "G") for layer in layers], grid.columns)
        column = {layer.name: c for layer, c in zip(layers, cols)}
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


# A unit of statistics: a Kronecker layer (A and G) or a diagonally preconditioned parameter.
Entry = Layer | DiagonalParam
# A step's statistics with their scales, and whether any rank had some (None: local).
KronTaken = list[tuple[Layer, Taken, Tensor | None]]
DiagTaken = list[tuple[DiagonalParam, tuple[Tensor, Scale], Tensor | None]]


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
    buffer: Tensor
    offsets: list[int]  # start of each unit
    counts: int  # start of the counts
    routes: set[str]
    work: Any = None
    dirty: bool = False


def _group_timeout(group: Any) -> timedelta | None:
    """The timeout of a process group, to give the same one to the groups made from it."""
    try:
        for device in (torch.device("cpu"), torch.device("cuda")):
            try:
                backend = group._get_backend(device)
            except Exception:  # noqa: BLE001 (no backend for this device type)
                continue
            timeout = backend.options._timeout
            if isinstance(timeout, timedelta):
                return timeout
    except Exception:  # noqa: BLE001 (private API of torch.distributed; fall back)
        pass
    return None


# Groups made by this module, by (parent group, global ranks): every preconditioner of a
# program reuses them instead of opening new connections each time. Forgotten when the
# default group changes (destroy_process_group, then a new init_process_group). Each entry
# holds its parent too, so that the parent's id cannot be reused by another group.
_GROUPS: dict[tuple[int, tuple[int, ...]], tuple[Any, Any]] = {}
_GROUPS_WORLD: list[Any] = [None]


def _new_group(parent: Any, ranks: list[int], everyone: bool) -> Any:
    """A process group over ``ranks`` (global ranks), cached.

    ``everyone``: all ranks of the world call this in the same order (torch's default
    ``new_group`` protocol); otherwise only the members do (``use_local_synchronization``).
    """
    if _GROUPS_WORLD[0] is not dist.group.WORLD:
        _GROUPS.clear()
        _GROUPS_WORLD[0] = dist.group.WORLD  # held, so that its id is not reused
    key = (id(parent), tuple(ranks))
    if key not in _GROUPS:
        timeout = _group_timeout(parent)
        if everyone:
            group = dist.new_group(ranks, timeout=timeout)
        elif dist.get_rank() in ranks:
            group = dist.new_group(ranks, timeout=timeout, use_local_synchronization=True)
        else:
            group = None
        _GROUPS[key] = (parent, group)
    return _GROUPS[key][1]


class Distributor:
    """Data-parallel K-FAC: the statistics all-reduce, the decomposition owners and their
    broadcasts, the broadcasts of preconditioned gradients (see the module docstring).

    Built by :class:`~kfac_ef.KFACPreconditioner` from its discovery plan (Kronecker layers,
    diagonal parameters, and the hooked modules that feed them); reachable as
    ``precond.distributed`` for inspection (``plan``, ``communicated()``, ``describe()``).
    """

    def __init__(
        self,
        discovered: Discovered,
        kfac: KFACOptions,
        options: DistributedOptions,
        ddp: DistributedDataParallel | None,
    ) -> None:
        self.options = options
        self.kfac = kfac
        self._ddp = ddp
        parent = options.process_group if options.process_group is not None else dist.group.WORLD
        self.ranks = sorted(dist.get_process_group_ranks(parent))
        _check_supported(kfac, options, len(self.ranks))
        everyone = len(self.ranks) == dist.get_world_size()
        self.group = _new_group(parent, self.ranks, everyone)
        self.world = len(self.ranks)
        self.rank = dist.get_rank(self.group)
        layers, diagonal = discovered.layers, discovered.diagonal
        devices = {layer.adapter.weight.device for layer in layers}
        devices |= {d.param.device for d in diagonal}
        if len(devices) != 1:
            raise ValueError(
                "distributed K-FAC needs every preconditioned layer on one device per process; "
                f"found {sorted(map(str, devices))}"
            )
        self.device = devices.pop()
        backend = str(dist.get_backend(self.group))
        self._control_device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend
            else torch.device("cpu")
        )
        self._layers = layers
        self._diagonal = diagonal
        self._check_same_layers()

        n_g = grad_workers(options.grad_worker_fraction, self.world)
        self.grid = Grid(rows=n_g, columns=self.world // n_g)
        self.plan = Plan.build(layers, self.grid)
        me = self.grid
        self._my_column = me.column_of(self.rank)
        self._my_row = me.row_of(self.rank)
        if everyone:
            # torch's protocol: every rank creates every group, in the same order.
            for c in range(me.columns):
                self._subgroup(me.column(c), me.rows, parent, everyone)
            for i in range(me.rows):
                self._subgroup(me.row(i), me.columns, parent, everyone)
        # Otherwise only members create a group: all columns before all rows on every rank,
        # so that no two ranks wait for each other in opposite orders.
        self._column_group = self._subgroup(me.column(self._my_column), me.rows, parent, everyone)
        self._row_group = self._subgroup(me.row(self._my_row), me.columns, parent, everyone)

        self._tri = _Triangles()
        # The hooked modules feeding each unit (a tied weight's layer may have several).
        self._feeders: dict[int, set[str]] = defaultdict(set)
        route_index: dict[int, int] = {}
        for i, (name, route) in enumerate(discovered.routes.items()):
            for _, entry in [*route.layers, *route.params]:
                self._feeders[id(entry)].add(name)
                route_index.setdefault(id(entry), i)  # the first (in module order) feeder
        units: list[Entry] = [*layers, *diagonal]
        # Reverse module order, the order in which backward completes them.
        units.sort(key=lambda e: -route_index.get(id(e), 0))
        self._buckets = self._make_buckets(units) if options.factor_sync == "update" else []
        self._buckets_of: dict[str, list[_StatsBucket]] = defaultdict(list)
        for b in self._buckets:
            for name in b.routes:
                self._buckets_of[name].append(b)
        self._pass = -1
        self._expected: dict[str, int] = defaultdict(int)
        self._got: dict[str, int] = defaultdict(int)
        self._next = 0
        self._examples: Tensor | None = None  # examples of the last statistics step (global)
        # Layers some rank preconditions (known to every rank; see preconditioned_layers).
        self._active: set[str] | None = None
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)  # collectives launched, by kind

    # ------------------------------------------------------------------ construction
    def _subgroup(self, members: list[int], size: int, parent: Any, everyone: bool) -> Any:
        """The group of these group ranks: the K-FAC group itself, None for one rank."""
        if size == 1:
            return None
        if size == self.world:
            return self.group
        return _new_group(parent, [self.ranks[r] for r in members], everyone)

    def _signature(self) -> list[str]:
        opts = {k: v for k, v in self.kfac.to_dict().items() if k != "skip_layers"}

        def storage(spec: FactorSpec) -> str:
            return "" if spec.dense else f" ({spec.describe()})"

        out = [
            f"{layer.name}: {layer.adapter.kind}, {layer.adapter.blocks} block(s), "
            f"A {layer.adapter.a_dim}x{layer.adapter.a_dim}{storage(layer.a_spec)}, "
            f"G {layer.adapter.g_dim}x{layer.adapter.g_dim}{storage(layer.g_spec)}"
            for layer in self._layers
        ]
        out += [f"{d.name}: diagonal, {d.param.numel()} entries" for d in self._diagonal]
        out.append(f"options: {sorted(opts.items())}")
        out.append(
            f"distributed options: grad_worker_fraction={self.options.grad_worker_fraction!r}, "
            f"factor_sync={self.options.factor_sync!r}, overlap={self.options.overlap}, "
            f"bucket_cap_mb={self.options.bucket_cap_mb}"
        )
        return out

    def _check_same_layers(self) -> None:
        """Compare a checksum of layer names, kinds, shapes and factor storage, the diagonal
        parameters (and options) across ranks.

        On a mismatch every rank gathers the full descriptions and raises the same error,
        naming the first difference; otherwise the ranks would deadlock or silently mix up
        factors later.
        """
        sig = self._signature()
        digest = hashlib.sha256("\n".join(sig).encode()).digest()
        local = torch.tensor(
            [int.from_bytes(digest[:7], "big")], dtype=torch.int64, device=self._control_device
        )
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        self._run(
            lambda: dist.all_gather(gathered, local, group=self.group, async_op=True),
            "the check that all ranks have the same layers",
        )
        if len({int(t.item()) for t in gathered}) == 1:
            return
        sigs: list[Any] = [None] * self.world
        dist.all_gather_object(sigs, sig, group=self.group)
        raise ValueError(
            "the preconditioned layers (or K-FAC options) differ across ranks; every rank "
            "must build the same model with the same options (pass distributed=False if the "
            "ranks train different models):\n  " + "\n  ".join(_first_differences(sigs))
        )

    def _make_buckets(self, units: list[Entry]) -> list[_StatsBucket]:
        """Consecutive units (in the given order) up to about ``bucket_cap_mb`` each."""
        dtype = self.kfac.factor_dtype
        item = torch.empty((), dtype=dtype).element_size()
        cap = self.options.bucket_cap_mb * 2**20
        groups: list[list[Entry]] = [[]]
        size = 0
        for entry in units:
            n = _size(entry) + 2
            if groups[-1] and (size + n) * item > cap:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += n
        buckets = []
        for members in groups:
            offsets = []
            pos = 0
            for entry in members:
                offsets.append(pos)
                pos += _size(entry)
            buffer = torch.zeros(pos + 2 * len(members), dtype=dtype, device=self.device)
            routes = {name for e in members for name in self._feeders[id(e)]}
            buckets.append(_StatsBucket(members, buffer, offsets, pos, routes))
        return buckets

    # ------------------------------------------------------------------ plumbing
    def _failure(self, what: str, exc: Exception) -> RuntimeError:
        return RuntimeError(
            f"kfac_ef: {what} failed on rank {self.rank} of {self.world} — another rank "
            "probably died, hung, or stopped calling step() in step with the others "
            "(every rank must run the same number of backward passes and step() calls). "
            f"Cause: {exc}"
        )

    def _start(self, launch: Callable[[], Any], what: str) -> Any:
        """Launch a collective (``async_op=True``); a failure to launch (a peer already gone)
        raises the same error as a failed wait."""
        try:
            return launch()
        except Exception as exc:  # noqa: BLE001 (gloo/NCCL raise RuntimeError subclasses)
            raise self._failure(what, exc) from exc

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 (gloo/NCCL raise RuntimeError subclasses)
            raise self._failure(what, exc) from exc

    def _run(self, launch: Callable[[], Any], what: str) -> None:
        """Launch a collective and wait for it."""
        self._wait(self._start(launch, what), what)

    def _count(self, kind: str, t: Tensor, source: bool = False) -> None:
        if not source:
            self.bytes[kind] += t.numel() * t.element_size()
        self.bytes["collectives"] += 1
        self.calls[kind] += 1

    def communicated(self) -> dict[str, int]:
        """Bytes communicated by this rank so far, by kind, and the number of collectives.

        Kinds: "statistics" (all-reduce on statistics steps) and "factors" (all-reduce before
        decompositions with factor_sync="decomposition") count the buffer each rank reduces
        (a ring all-reduce moves about 2(W-1)/W times that through each rank's link);
        "decompositions" and "gradients" (broadcasts) count the bytes this rank receives
        (nothing for the rank that sends); "constraint" the loss-change constraint's sums
        (EKFAC's statistics count as "statistics"). "collectives" counts the calls.
        """
        return dict(self.bytes)

    def describe(self) -> str:
        """The assignment as text: grid, each layer's column and each factor's owner."""
        loads = self.plan.loads(self._layers)
        lines = [
            f"{self.world} ranks as {self.grid.rows} gradient worker(s) per layer x "
            f"{self.grid.columns} column(s); decomposition cost per rank (Σ blocks·nb·bs³): "
            + ", ".join(f"{x:.3g}" for x in loads)
        ]

        def where(layer: Layer, side: str) -> str:
            if not _spec(layer, side).has_basis:
                return "diagonal (on each gradient worker)"
            return f"on rank {self.plan.owner[(layer.name, side)]}"

        for layer in self._layers:
            lines.append(
                f"  {layer.name}: column {self.plan.column[layer.name]}, "
                f"A {where(layer, 'A')}, G {where(layer, 'G')}"
            )
        if self._diagonal:
            lines.append(
                f"  {len(self._diagonal)} diagonal parameter(s): preconditioned on every rank"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ 1. statistics
    def on_call(self, name: str, pass_id: int) -> None:
        """Forward pass: one more call of module ``name`` whose statistics will be recorded."""
        if pass_id != self._pass:
            self._pass = pass_id
            self._expected.clear()
            self._got.clear()
            self._next = 0
        self._expected[name] += 1

    def on_record(self, name: str, pass_id: int) -> None:
        """Backward pass: module ``name`` recorded the statistics of one call; launch the
        buckets that are complete."""
        buckets = self._buckets_of.get(name)
        if not buckets:
            return
        for bucket in buckets:
            if bucket.work is not None:
                bucket.dirty = True  # launched in an earlier pass of this step: relaunch
        if pass_id != self._pass or not self.options.overlap:
            return
        self._got[name] += 1
        if self._got[name] != self._expected[name]:
            return
        if self._ddp is not None and not self._ddp.require_backward_grad_sync:
            return  # inside DDP's no_sync(): more passes follow before step()
        while self._next < len(self._buckets):
            nxt = self._buckets[self._next]
            if not all(
                self._expected.get(m, 0) > 0 and self._got.get(m, 0) == self._expected[m]
                for m in nxt.routes
            ):
                break
            self._launch(nxt)
            self._next += 1

    def _launch(self, bucket: _StatsBucket) -> None:
        """Pack the bucket's statistics so far (upper triangles; S_G and S scaled by N_r² for
        "mean") and their counts, and start the all-reduce without waiting for it."""
        if bucket.work is not None:
            self._wait(bucket.work, "the all-reduce of factor statistics")
        buf = bucket.buffer
        counts: list[float] = []
        # δ_n = N_r γ_n for the observed gradients of a mean-reduced loss; the sampled-target
        # backward (fisher_type="mc") observes per-example gradients already.
        g_mean = self.kfac.loss_reduction == "mean" and self.kfac.fisher_type != "mc"
        for entry, start in zip(bucket.entries, bucket.offsets):
            part = buf[start : start + _size(entry)]
            if isinstance(entry, DiagonalParam):
                acc, examples = entry.stats.peek()
                rows = examples
                if acc is None or examples == 0:
                    part.zero_()
                    counts += [0.0, 0.0]
                    continue
                part.copy_(acc)
                g_part = part
            else:
                acc_a, rows, acc_g, examples = entry.stats.peek()
                if rows == 0 or acc_a is None or acc_g is None:
                    part.zero_()
                    counts += [0.0, 0.0]
                    continue
                ka = _packed(entry, "A")
                self._tri.pack(acc_a, part[:ka].view(_stacks(entry, "A"), -1))
                g_part = part[ka:]
                self._tri.pack(acc_g, g_part.view(_stacks(entry, "G"), -1))
            if g_mean:
                # δ_n = N_r γ_n: rank r's contribution to Σ_n δ_n δ_nᵀ is N_r² S_G,r.
                g_part.mul_(float(examples) ** 2)
            counts += [float(rows), float(examples)]
        buf[bucket.counts :].copy_(torch.tensor(counts, dtype=buf.dtype), non_blocking=True)
        bucket.work = self._start(
            lambda: dist.all_reduce(buf, group=self.group, async_op=True),
            "the all-reduce of factor statistics",
        )
        bucket.dirty = False
        self._count("statistics", buf)

    def reduce_statistics(
        self, loss_scale_on: Callable[[torch.device], Tensor | None]
    ) -> tuple[KronTaken, DiagTaken]:
        """Statistics step: the global batch's statistics of every unit, with their scales
        (module docstring) and whether any rank had some (a 0-d device flag), to be folded
        by the caller. ``loss_scale_on(device)``: the loss scale σ (statistics of σ·L), or None.

        ``factor_sync="update"``: launch the buckets not launched during backward (or whose
        units got more statistics since), wait for all, unpack into the accumulators.
        ``"decomposition"``: this rank's own statistics, as a single process (at the global
        scale for "sum"). No host synchronization: counts travel in the buffers.
        """
        sigma = loss_scale_on(self.device)
        if self.options.factor_sync == "decomposition":
            return self._local_statistics(sigma)
        for bucket in self._buckets:
            if bucket.work is None or bucket.dirty:
                self._launch(bucket)
        inv_sigma2 = None if sigma is None else 1.0 / sigma.square()
        kron: KronTaken = []
        diag: DiagTaken = []
        per_bucket: list[Tensor] = []
        for bucket in self._buckets:
            self._wait(bucket.work, "the all-reduce of factor statistics")
            bucket.work = None
            buf = bucket.buffer
            counts = buf[bucket.counts :].view(-1, 2)
            per_bucket.append(counts[:, 1].max())
            for i, (unit, start) in enumerate(zip(bucket.entries, bucket.offsets)):
                part = buf[start : start + _size(unit)]
                rows, examples = counts[i, 0], counts[i, 1]
                present = rows > 0
                if self.kfac.loss_reduction == "mean":
                    scale_g = 1.0 / examples.clamp_min(1.0)
                else:
                    scale_g = torch.full_like(rows, 1.0 / self.world**2)
                if inv_sigma2 is not None:
                    scale_g = scale_g * inv_sigma2
                if isinstance(unit, DiagonalParam):
                    acc = unit.stats.buffer()
                    acc.copy_(part)
                    unit.stats.discard()
                    diag.append((unit, (acc, scale_g), present))
                    continue
                acc_a, acc_g = unit.stats.buffers()
                ka = _packed(unit, "A")
                self._tri.unpack(part[:ka].view(_stacks(unit, "A"), -1), acc_a)
                self._tri.unpack(part[ka:].view(_stacks(unit, "G"), -1), acc_g)
                unit.stats.discard()
                scale_a = 1.0 / rows.clamp_min(1.0)
                kron.append((unit, (acc_a, scale_a, acc_g, scale_g), present))
        self._pass = -1  # the next backward pass starts a new step
        if per_bucket:
            self._examples = torch.stack(per_bucket).max()
        return kron, diag

    def global_examples(self, local: float) -> float | Tensor:
        """Examples of the last statistics step over all ranks: from the reduced counts
        (a 0-d device tensor) with ``factor_sync="update"``; ``local`` times the number of
        ranks with ``"decomposition"`` (exact when the local batches have one size, the
        condition under which that mode is exact)."""
        if self.options.factor_sync == "update" and self._examples is not None:
            return self._examples
        return local * self.world

    def _local_statistics(self, sigma: Tensor | None) -> tuple[KronTaken, DiagTaken]:
        """factor_sync="decomposition": this rank's statistics, at the global scale. For
        "sum", G = Σ_r S_G,r / W² is the mean over ranks of S_G,r / W (for "mean" the local
        G is already right)."""
        reduction = self.kfac.loss_reduction
        g_local = 1.0 if reduction == "mean" else 1.0 / self.world
        kron: KronTaken = []
        for layer in self._layers:
            if not layer.stats.empty:
                acc_a, scale_a, acc_g, scale_g = layer.take(reduction, sigma)
                kron.append((layer, (acc_a, scale_a, acc_g, scale_g * g_local), None))
        diag: DiagTaken = []
        for entry in self._diagonal:
            if not entry.stats.empty:
                acc, scale = entry.take(reduction, sigma)
                diag.append((entry, (acc, scale * g_local), None))
        return kron, diag

    def sync_factors(self) -> None:
        """Before a decomposition with ``factor_sync="decomposition"``: average the running
        factors (and diagonal Fishers) of the ranks that have some, and make the update
        counts agree."""
        if self.options.factor_sync != "decomposition":
            return
        dtype = self.kfac.factor_dtype
        units: list[Entry] = [*self._layers, *self._diagonal]

        def flags(entry: Entry) -> int:
            return entry.adapter.blocks if isinstance(entry, Layer) else 1

        sizes = [_size(e) + 2 * flags(e) for e in units]
        buf = torch.zeros(sum(sizes), dtype=dtype, device=self.device)
        pos = 0
        for entry, n in zip(units, sizes):
            b = flags(entry)
            body = buf[pos : pos + _size(entry)]
            tail = buf[pos + _size(entry) : pos + n]
            pos += n
            if entry.updates is None:
                continue
            has = (entry.updates > 0).to(dtype)
            if isinstance(entry, DiagonalParam):
                assert entry.F is not None
                body.copy_(entry.F * has)
            else:
                assert entry.A is not None and entry.G is not None
                ka = _packed(entry, "A")
                part_a = body[:ka].view(_stacks(entry, "A"), -1)
                part_g = body[ka:].view(_stacks(entry, "G"), -1)
                self._tri.pack(entry.A, part_a)
                self._tri.pack(entry.G, part_g)
                # A block of a layer: the block's stored sub-blocks (nb of them) go together.
                part_a.mul_(has.repeat_interleave(entry.a_spec.nb).view(-1, 1))
                part_g.mul_(has.repeat_interleave(entry.g_spec.nb).view(-1, 1))
            tail[:b] = has
            tail[b:] = entry.updates.to(dtype)
        self._count("factors", buf)
        self._run(
            lambda: dist.all_reduce(buf, group=self.group, async_op=True),
            "the all-reduce of running factors",
        )
        pos = 0
        for entry, n in zip(units, sizes):
            b = flags(entry)
            body = buf[pos : pos + _size(entry)]
            ranks_with = buf[pos + _size(entry) : pos + _size(entry) + b]
            total = buf[pos + _size(entry) + b : pos + n]
            pos += n
            inv = 1.0 / ranks_with.clamp_min(1.0)
            if isinstance(entry, DiagonalParam):
                if entry.F is None or entry.updates is None:
                    entry.F = torch.zeros(entry.param.numel(), dtype=dtype, device=self.device)
                    entry.updates = torch.zeros(1, dtype=torch.int64, device=self.device)
                    entry.skipped = torch.zeros_like(entry.updates)
                entry.F.copy_(body * inv)
            else:
                blocks = entry.adapter.blocks
                if entry.A is None or entry.G is None or entry.updates is None:
                    shape_a, shape_g = entry.a_spec.shape(blocks), entry.g_spec.shape(blocks)
                    entry.A = torch.zeros(shape_a, dtype=dtype, device=self.device)
                    entry.G = torch.zeros(shape_g, dtype=dtype, device=self.device)
                    entry.updates = torch.zeros(blocks, dtype=torch.int64, device=self.device)
                    entry.skipped = torch.zeros_like(entry.updates)
                ka = _packed(entry, "A")
                self._tri.unpack(body[:ka].view(_stacks(entry, "A"), -1), entry.A)
                self._tri.unpack(body[ka:].view(_stacks(entry, "G"), -1), entry.G)
                entry.A.mul_(inv.repeat_interleave(entry.a_spec.nb).view(-1, 1, 1))
                entry.G.mul_(inv.repeat_interleave(entry.g_spec.nb).view(-1, 1, 1))
            # Accepted updates: the mean over the ranks that had any (agreed by all ranks).
            entry.updates.copy_(torch.round(total * inv).to(torch.int64))

    # ------------------------------------------------------------------ 2. decompositions
    def preconditions(self, layer: Layer) -> bool:
        """Whether this rank holds ``layer``'s decomposition and preconditions its gradient."""
        return self.plan.column[layer.name] == self._my_column

    def owns(self, layer: Layer, side: str) -> bool:
        """Whether this rank decomposes factor ``side`` of ``layer`` (one with an eigenbasis:
        diagonal factors are decomposed wherever they are needed)."""
        return self.plan.owner[(layer.name, side)] == self.rank

    def _part_shapes(self, layer: Layer, side: str) -> list[tuple[str, int]]:
        """What a decomposition of one factor (with an eigenbasis) is made of: (name, count).

        The EKFAC scale is not sent: every rank holds every eigenbasis ("comm_opt", checked at
        construction) and computes the same S from the same reduced statistics."""
        spec = _spec(layer, side)
        n = _stacks(layer, side)
        if self.kfac.damping_mode != "pi":
            return [("q", n * spec.bs * spec.bs), ("l", n * spec.bs)]
        return [("i", n * _tri(spec.bs))]  # symmetric: the upper triangles suffice

    def exchange(self, results: Results, ready: list[Layer]) -> Results:
        """Decomposition step: broadcast the decompositions within each layer's column.

        Each member of this rank's column broadcasts, in turn, every factor with an
        eigenbasis it owns in one flat buffer (fixed layout: factors of layers not ready yet
        are sent as zeros, with a failure flag). Diagonal factors were decomposed here and
        are not sent. Returns the results of every factor of this column's layers that are
        ready; layers of other columns are absent (other ranks precondition them).
        """
        ready_ids = {id(layer) for layer in ready}
        column = [layer for layer in self._layers if self.preconditions(layer)]
        out: Results = {}
        for layer in column:
            for side in "AG":
                if not _spec(layer, side).has_basis and (id(layer), side) in results:
                    out[(id(layer), side)] = results[(id(layer), side)]
        members = self.grid.column(self._my_column)
        dtype = self.kfac.factor_dtype
        for src in members:
            items = [
                (layer, side)
                for layer in column
                for side in "AG"
                if _spec(layer, side).has_basis and self.plan.owner[(layer.name, side)] == src
            ]
            if not items:
                continue
            if self._column_group is None:  # a column of one rank: everything is local
                for layer, side in items:
                    if (id(layer), side) in results:
                        out[(id(layer), side)] = results[(id(layer), side)]
                continue
            total = sum(n for layer, side in items for _, n in self._part_shapes(layer, side))
            buf = torch.zeros(total + len(items), dtype=dtype, device=self.device)
            flags = buf[total:]
            if src == self.rank:
                pos = 0
                for k, (layer, side) in enumerate(items):
                    got = results.get((id(layer), side))
                    for name, n in self._part_shapes(layer, side):
                        if got is not None:
                            self._put(buf[pos : pos + n], got[0][name], name)
                        pos += n
                    if got is not None and got[1]:
                        flags[k] = 1.0
            self._count("decompositions", buf, source=src == self.rank)
            self._run(
                functools.partial(
                    dist.broadcast,
                    buf,
                    src=self.ranks[src],
                    group=self._column_group,
                    async_op=True,
                ),
                "the broadcast of decompositions",
            )
            ok_flags = flags.tolist()  # decomposition steps may synchronize
            pos = 0
            for k, (layer, side) in enumerate(items):
                parts: dict[str, Tensor] = {}
                for name, n in self._part_shapes(layer, side):
                    parts[name] = self._get(buf[pos : pos + n], layer, side, name)
                    pos += n
                if id(layer) in ready_ids:
                    out[(id(layer), side)] = (parts, ok_flags[k] > 0.5)
        return out

    def _put(self, dst: Tensor, part: Tensor, name: str) -> None:
        if name == "i":
            self._tri.pack(part, dst.view(part.shape[0], -1))
        else:
            dst.copy_(part.reshape(-1))

    def _get(self, src: Tensor, layer: Layer, side: str, name: str) -> Tensor:
        n, bs = _stacks(layer, side), _spec(layer, side).bs
        if name == "q":
            return src.view(n, bs, bs)
        if name == "l":
            return src.view(n, bs)
        full = torch.empty(n, bs, bs, dtype=src.dtype, device=src.device)
        self._tri.unpack(src.view(n, -1), full)
        return full

    # ------------------------------------------------------------------ 3. gradients
    def share_gradients(self) -> None:
        """Every step, with fewer gradient workers than ranks: within this rank's row, the
        worker of each column broadcasts the preconditioned gradients of that column's
        layers (one flat buffer per column); the other ranks of the row overwrite theirs.

        A layer's gradient is its matrix [∇W | ∇b] (views into p.grad), so layers that share
        a packed parameter (the q, k, v projections of attention) may sit in different
        columns. Diagonal parameters are preconditioned on every rank: nothing to share.
        """
        if self._row_group is None:
            return
        pending = []
        for c in range(self.grid.columns):
            src = self._my_row * self.grid.columns + c
            views: list[Tensor] = []
            written: list[GradientParts] = []
            for layer in self._layers:
                if self.plan.column[layer.name] != c:
                    continue
                parts = layer.adapter.gradient_parts()
                if parts is not None:
                    views += [view for view, _ in parts]
                    written.append(parts)
            if not views:
                continue
            dtype = views[0].dtype
            if any(v.dtype != dtype for v in views):
                raise TypeError(
                    "distributed K-FAC with grad_worker_fraction < 1 needs all preconditioned "
                    "gradients in one dtype; got "
                    + ", ".join(sorted({str(v.dtype) for v in views}))
                )
            if src == self.rank:
                buf = torch.cat([v.reshape(-1) for v in views])
            else:
                buf = torch.empty(sum(v.numel() for v in views), dtype=dtype, device=self.device)
            self._count("gradients", buf, source=src == self.rank)
            work = self._start(
                functools.partial(
                    dist.broadcast, buf, src=self.ranks[src], group=self._row_group, async_op=True
                ),
                "the broadcast of preconditioned gradients",
            )
            pending.append((work, buf, views, written, src == self.rank))
        for work, buf, views, written, mine in pending:
            self._wait(work, "the broadcast of preconditioned gradients")
            if not mine:
                pieces = buf.split([v.numel() for v in views])
                torch._foreach_copy_(views, [p.view_as(v) for p, v in zip(pieces, views)])
                for parts in written:
                    parts.flush()

    # ------------------------------------------------------------------ lifecycle
    def after_load(self, missing: bool) -> bool:
        """After load_state_dict: keep only the decompositions this rank preconditions with,
        and agree on whether any rank lacks one it needs (then all recompute at the next
        step, since decompositions are computed together). Returns that agreement."""
        for layer in self._layers:
            if not self.preconditions(layer):
                layer.decomposition = None
        flag = torch.tensor([1.0 if missing else 0.0], device=self._control_device)
        self._run(
            lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
            "the agreement on checkpointed decompositions",
        )
        self._active = None
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ 4. the constraint
    def after_decompose(self) -> None:
        """Decomposition step: forget which layers are preconditioned (asked again by
        ``preconditioned_layers`` when the loss-change constraint needs it)."""
        self._active = None

    def preconditioned_layers(self, local: list[Layer]) -> list[Layer]:
        """The layers whose gradients were preconditioned on some rank this step (``local``:
        those this rank preconditioned), the same list on every rank: the loss-change
        constraint scales exactly these. With one column every rank preconditions every
        layer it has a decomposition of, so ``local`` is that list; otherwise the ranks
        agree once per decomposition (an all-reduce of one flag per layer, read on the host:
        decomposition steps and the first step after loading only)."""
        if self.grid.columns == 1:
            return local
        if self._active is None:
            flags = torch.tensor(
                [
                    1.0 if self.preconditions(layer) and layer.decomposition is not None else 0.0
                    for layer in self._layers
                ],
                device=self._control_device,
            )
            self._run(
                lambda: dist.all_reduce(
                    flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True
                ),
                "the agreement on preconditioned layers",
            )
            self._active = {
                layer.name for layer, flag in zip(self._layers, flags.tolist()) if flag > 0
            }
        active = self._active
        return [
            layer
            for layer in self._layers
            if layer.name in active and layer.adapter.gradient_parts() is not None
        ]

    def sum_over_columns(self, t: Tensor) -> Tensor:
        """Σ over this rank's row of ``t`` (one rank per column: the sum over every layer of a
        per-layer quantity each rank computed for its column's layers). No host read."""
        return t if self._row_group is None else self._sum(t, self._row_group)

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """Σ over every rank of ``t`` (sums over the global batch). No host read."""
        return self._sum(t, self.group)

    def _sum(self, t: Tensor, group: Any) -> Tensor:
        t = t.clone()
        self._count("constraint", t)
        self._run(
            lambda: dist.all_reduce(t, group=group, async_op=True),
            "the reduction of the loss-change constraint",
        )
        return t

    def reduce_scales(
        self, items: list[tuple[Layer, Tensor | None, int]], sigma: Tensor | None
    ) -> list[tuple[Layer, Tensor, Scale, Tensor]]:
        """EKFAC statistics step: the global batch's second moments in the eigenbases,
        reduced exactly like S_G (module docstring, "Factor statistics"): rank r contributes
        N_r² S_r ("mean") or S_r ("sum"), S_r = Σ_{n on r} (Q_Gᵀ ∇̂_n Q_A)² of its observed
        gradients, and the sum is scaled by 1/Σ_r N_r or 1/W², divided by σ². One all-reduce
        for every layer (no host synchronization); ``items``: (layer, S_r or None, N_r) for
        every layer with a scale, the same layers in the same order on every rank.

        Returns:
            (layer, reduced sum, its scale, whether any rank had statistics) per layer.
        """
        if not items:
            return []
        dtype = self.kfac.factor_dtype
        sizes = [_ekfac.scale_numel(la.adapter.blocks, la.g_spec, la.a_spec) for la, _, _ in items]
        total = sum(sizes)
        buf = torch.zeros(total + len(items), dtype=dtype, device=self.device)
        g_mean = self.kfac.loss_reduction == "mean"
        premultiply = g_mean and self.kfac.fisher_type != "mc"  # as in _launch
        pos = 0
        counts = []
        for (_, raw, n), size in zip(items, sizes):
            if raw is not None and n > 0:
                part = buf[pos : pos + size]
                part.copy_(raw.reshape(-1))
                if premultiply:
                    part.mul_(float(n) ** 2)
            counts.append(float(n))
            pos += size
        buf[total:].copy_(torch.tensor(counts, dtype=dtype), non_blocking=True)
        self._count("statistics", buf)
        self._run(
            lambda: dist.all_reduce(buf, group=self.group, async_op=True),
            "the all-reduce of EKFAC statistics",
        )
        inv_sigma2 = None if sigma is None else 1.0 / sigma.to(self.device, dtype).square()
        out: list[tuple[Layer, Tensor, Scale, Tensor]] = []
        pos = 0
        for i, ((layer, _, _), size) in enumerate(zip(items, sizes)):
            examples = buf[total + i]
            scale: Tensor = (
                1.0 / examples.clamp_min(1.0)
                if g_mean
                else torch.full_like(examples, 1.0 / self.world**2)
            )
            if inv_sigma2 is not None:
                scale = scale * inv_sigma2
            shape = (layer.adapter.blocks, layer.g_spec.padded, layer.a_spec.padded)
            out.append((layer, buf[pos : pos + size].view(shape), scale, examples > 0))
            pos += size
        return out


def _check_supported(kfac: KFACOptions, options: DistributedOptions, world: int) -> None:
    """Combinations of K-FAC and distribution options that cannot be computed exactly.

    EKFAC's S is the second moment of every example's gradient projected onto the eigenbases:
    each rank projects its own examples, so every rank needs every eigenbasis (one column:
    "comm_opt", or a fraction that rounds to every rank), and the running S must follow the
    global batch at every statistics step (factor_sync="update"), as the preconditioner uses
    S itself, not a decomposition of it.
    """
    if kfac.damping_mode != "ekfac":
        return
    if options.factor_sync != "update":
        raise ValueError(
            f"damping_mode='ekfac' with factor_sync={options.factor_sync!r}: the EKFAC scale S "
            "is used directly at every step, so per-rank running statistics would make the "
            "ranks precondition differently; use factor_sync='update' (the default)"
        )
    if grad_workers(options.grad_worker_fraction, world) != world:
        raise ValueError(
            f"damping_mode='ekfac' with grad_worker_fraction="
            f"{options.grad_worker_fraction!r}: S projects every rank's examples onto each "
            "layer's eigenbases, so every rank must hold every eigenbasis; use "
            "grad_worker_fraction='comm_opt' (the default), or damping_mode='exact'"
        )


def _first_differences(sigs: list[list[str]]) -> list[str]:
    """Human-readable differences between the ranks' layer descriptions (rank 0 as base)."""
    base = sigs[0]
    out = []
    for r, sig in enumerate(sigs[1:], start=1):
        if sig == base:
            continue
        if len(sig) != len(base):
            out.append(f"rank 0 has {len(base) - 2} layer(s), rank {r} has {len(sig) - 2}")
        for i, (a, b) in enumerate(zip(base, sig)):
            if a != b:
                out.append(f"entry {i}: rank 0 has '{a}', rank {r} has '{b}'")
                break
        else:
            longer, who = (base, 0) if len(base) > len(sig) else (sig, r)
            out.append(f"rank {who} also has '{longer[min(len(base), len(sig))]}'")
    return out


__all__ = ["DistributedOptions", "Distributor", "grad_workers", "lpt", "resolve", "unwrap"]
