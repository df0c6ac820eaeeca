"""The data-parallel distributor: construction (groups, grid, plan, the check that every
rank has the same layers), decompositions and their broadcasts, the broadcasts of
preconditioned gradients, the constraint's sums. Statistics: ``statistics.py``."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .._blocks import Layer, Results
from .._factors import FactorSpec
from .._options import KFACOptions
from ..layers.base import GradientParts
from .groups import _new_group
from .local import Whole
from .options import DistributedOptions, _check_supported, with_workers
from .packing import Entry, _stacks, _StatsBucket, _tri, _Triangles
from .plan import Grid, Plan, _spec, grad_workers
from .statistics import StatisticsSync

if TYPE_CHECKING:
    from .._discovery import Discovered

logger = logging.getLogger(__name__)


class Distributor(Whole, StatisticsSync):
    """Data-parallel K-FAC: the statistics all-reduce, the decomposition owners and their
    broadcasts, the broadcasts of preconditioned gradients (see the module docstring).

    Built by :class:`~kfac_ef.KFACPreconditioner` from its discovery plan (Kronecker layers,
    diagonal parameters, and the hooked modules that feed them); reachable as
    ``precond.distributed`` for inspection (``plan``, ``communicated()``, ``describe()``).
    """

    distributed = True
    sharded = False  # FSDP2 (``sharded.ShardedDistributor``)

    def __init__(
        self,
        discovered: Discovered,
        kfac: KFACOptions,
        options: DistributedOptions,
        ddp: DistributedDataParallel | None,
    ) -> None:
        options = with_workers(options, kfac, self.sharded)
        self.options = options
        self.kfac = kfac
        self._ddp = ddp
        parent = options.process_group if options.process_group is not None else dist.group.WORLD
        self.ranks = sorted(dist.get_process_group_ranks(parent))
        _check_supported(kfac, options, len(self.ranks), self.sharded)
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
        self.plan = Plan.build(layers, self.grid, together=self.sharded)
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
        (EKFAC's statistics count as "statistics"). "collectives" counts the calls. Under
        FSDP2 (``sharded.py``): "statistics_to_owner" (buffers reduced to the one rank that
        keeps their layers, "mem_opt"), "gather" and "return" (the all-to-alls of gradients,
        bytes received from other ranks).
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
            layer for layer in self._layers if layer.name in active and self._has_gradient(layer)
        ]

    def _has_gradient(self, layer: Layer) -> bool:
        return layer.adapter.gradient_parts() is not None

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
