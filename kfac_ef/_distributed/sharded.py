"""FSDP2 (``fully_shard``): K-FAC on a model whose parameters are sharded by rows.

Under ``fully_shard`` every parameter is a DTensor sharded on dim 0 over the data-parallel
ranks, and after backward ``p.grad`` holds this rank's rows of the gradient averaged over
the ranks (the reduce-scatter), as DDP's all-reduce would have, only sharded. What this
changes, and what it does not:

1. **Statistics: the same sums.** FSDP computes each layer with its whole (all-gathered)
   weight, so the hooks see this rank's whole local inputs and output gradients, and the
   gradient is the mean over ranks as under DDP: the statistics are summed exactly as in
   ``data_parallel`` (same packing, same scaling, docs/distributed.md). Only a layer's
   *gradient workers* fold them into running factors. With one worker per layer
   ("mem_opt") the buckets hold one owner's layers each and are *reduced* to it (half an
   all-reduce's traffic), the global example count in an all-reduce of its own; the other
   ranks free their sums (``keeps``; bucket buffers are allocated per statistics step).
   Diagonal parameters' Fishers are all-reduced and kept everywhere (they are small).
2. **Gradients: gathered to the workers, preconditioned whole, returned by rows.** The A
   side of a layer (input dim) would act on a row shard locally, but the G side mixes rows,
   and the eigenbasis moments of ``eigen_adam`` live in the rotated space: each worker
   needs the whole gradient. One all-to-all sends every rank's rows of every preconditioned
   parameter to that parameter's workers, which stage the whole gradient (``_grads``) and
   run the single-process preconditioning and constraint on it; a second all-to-all sends
   every rank its rows of the result ("mem_opt": one worker per layer). With "comm_opt"
   every rank is a worker of every layer: the gather is an all-gather and each rank keeps
   its own rows, with no second exchange. Layers that share a parameter are planned on one
   column, so every parameter has one set of workers. Diagonal parameters are gathered to
   every rank. Nothing is written into ``p.grad`` until the step has succeeded.
3. **State.** With "mem_opt" a layer's running factors, decomposition and eigenbasis moments
   live on its one worker (the LPT plan balances the decompositions), so the per-rank
   state falls as 1/W plus the largest layer; the staged whole gradients of a step are the
   rank's own layers' (also 1/W). With "comm_opt" every rank holds everything, as under DDP.

Traffic per step, in entries of the gradient dtype (P the preconditioned parameters' total
size, W ranks), received per rank: with "mem_opt" the gather brings a rank its layers'
rows from the W-1 others, about P(W-1)/W², and the return its rows of the other layers, as
much again; "comm_opt" receives P(W-1)/W (an all-gather) and returns nothing. FSDP's own
step moves the parameters twice (all-gather in forward, again in backward when resharded
after forward) and the gradients once (reduce-scatter), each about P(W-1)/W: K-FAC adds
at most one gradient-sized exchange, and less with "mem_opt" beyond two ranks.
``benchmarks/fsdp.py`` measures it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _grads
from .._blocks import DiagonalParam, Layer
from .._checkpoint import to_device
from .._options import KFACOptions
from .data_parallel import Distributor
from .options import DistributedOptions
from .packing import DiagTaken, Entry, KronTaken

if TYPE_CHECKING:
    from .._discovery import Discovered


@dataclass(frozen=True, eq=False)
class ShardedParam:
    """One preconditioned parameter sharded by rows: rank r holds rows ``span(r)``."""

    name: str
    param: nn.Parameter
    shape: tuple[int, ...]
    workers: tuple[int, ...]  # group ranks that stage its whole gradient

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    def span(self, rank: int, world: int) -> tuple[int, int]:
        """Rows of ``rank``: torch.chunk's split (ceil(rows/W) per rank, the last ones
        shorter or empty), as FSDP2 shards dim 0."""
        chunk = -(-self.rows // world)
        start = min(rank * chunk, self.rows)
        return start, min(start + chunk, self.rows)

    def numel_of(self, rank: int, world: int) -> int:
        a, b = self.span(rank, world)
        return (b - a) * self.row_numel


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` wrapped by FSDP2's ``fully_shard`` (empty if none)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover (torch without distributed)
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class ShardedDistributor(Distributor):
    """K-FAC on an FSDP2 model (module docstring): the data-parallel distributor's
    statistics, plan and decompositions, with gradients gathered to their workers and the
    state of a layer kept on its workers only."""

    sharded = True
    _persistent_buffers = False

    def __init__(
        self,
        discovered: Discovered,
        kfac: KFACOptions,
        options: DistributedOptions,
        fsdp: list[nn.Module],
    ) -> None:
        self._fsdp = fsdp
        # The largest set of whole gradients staged by one step() so far (bytes): the
        # transient memory this rank needs beyond its state.
        self.staged_bytes = 0
        super().__init__(discovered, kfac, options, None)
        names = {id(p): n for n, p in _named(discovered)}
        params: dict[int, ShardedParam] = {}
        everyone = tuple(range(self.world))
        for layer in self._layers:
            workers = tuple(self.grid.column(self.plan.column[layer.name]))
            for p in layer.adapter.parameters():
                params.setdefault(id(p), self._describe(p, names.get(id(p), layer.name), workers))
        for d in self._diagonal:
            params.setdefault(id(d.param), self._describe(d.param, d.name, everyone))
        self._params = list(params.values())

    # ------------------------------------------------------------------ construction
    def _describe(self, p: nn.Parameter, name: str, workers: tuple[int, ...]) -> ShardedParam:
        """Check that ``p`` is sharded as FSDP2 shards (dim 0, over this group's ranks)."""
        if not _grads.is_dtensor(p):
            raise ValueError(
                f"parameter {name!r} is not sharded while other parameters of the model are "
                "(DTensors from fully_shard): call fully_shard on the root module too, so "
                "that every preconditioned parameter is sharded, or leave the layer out "
                "(skip_layers)"
            )
        placements = tuple(p.placements)  # type: ignore[attr-defined]
        mesh = p.device_mesh  # type: ignore[attr-defined]
        if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
            raise NotImplementedError(
                f"parameter {name!r} has placements {placements} on a {mesh.ndim}-d mesh: "
                "K-FAC supports FSDP2's default sharding (Shard(0) on a 1-d mesh of the "
                "data-parallel ranks); HSDP, tensor parallelism and custom shard placements "
                "are not supported yet"
            )
        ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
        if ranks != self.ranks:
            raise ValueError(
                f"parameter {name!r} is sharded over ranks {ranks}, but K-FAC runs on "
                f"ranks {self.ranks}: pass distributed=DistributedOptions(process_group=...) "
                "with the group of the FSDP mesh (the data-parallel ranks)"
            )
        return ShardedParam(name, p, tuple(p.shape), workers)

    def keeps(self, unit: Entry) -> bool:
        return isinstance(unit, DiagonalParam) or self.preconditions(unit)

    def _destination(self, unit: Entry) -> int | None:
        """With one worker per layer ("mem_opt") a layer's statistics are reduced to that
        rank only; diagonal parameters (kept everywhere) and "comm_opt" are all-reduced."""
        if self.grid.rows != 1 or isinstance(unit, DiagonalParam):
            return None
        return self.grid.column(self.plan.column[unit.name])[0]

    def reduce_statistics(
        self, loss_scale_on: Callable[[torch.device], Tensor | None]
    ) -> tuple[KronTaken, DiagTaken]:
        """As under DDP; with reductions to the owners, the global example count (every
        rank needs it: the "sum" form divides by it) travels in an all-reduce of its own."""
        if self.grid.rows != 1:
            return super().reduce_statistics(loss_scale_on)
        units: list[Entry] = [*self._layers, *self._diagonal]
        local = float(max((u.stats.examples for u in units), default=0))
        kron, diag = super().reduce_statistics(loss_scale_on)
        total = torch.tensor([local], dtype=self.kfac.factor_dtype, device=self.device)
        self._count("statistics", total)
        self._run(
            lambda: dist.all_reduce(total, group=self.group, async_op=True),
            "the all-reduce of example counts",
        )
        self._examples = total[0]
        return kron, diag

    def _syncing(self) -> bool:
        """Whether FSDP reduces the gradients of this backward pass
        (``set_requires_gradient_sync(False)`` turns that off for accumulation)."""
        for module in self._fsdp:
            try:
                state = module._get_fsdp_state()  # type: ignore[operator]
            except AttributeError:  # another torch version: assume every pass reduces
                return True
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch < 2.7: one group per module
                one = getattr(state, "_fsdp_param_group", None)
                groups = [one] if one is not None else []
            for group in groups:
                return bool(getattr(group, "reduce_grads", True))
        return True

    def _has_gradient(self, layer: Layer) -> bool:
        # (the rows here are not a matrix: the layer's worker has it whole)
        return all(p.grad is not None for p in layer.adapter.parameters())

    def describe(self) -> str:
        mode = "one worker per layer" if self.grid.columns > 1 else "every rank per layer"
        return f"FSDP2 (fully_shard), {mode}\n" + super().describe()

    # ------------------------------------------------------------------ gradients
    def share_gradients(self) -> None:
        return None  # the gradients go back in gradients() (after the constraint)

    @contextlib.contextmanager
    def gradients(self) -> Iterator[None]:
        """The whole gradients of this rank's parameters, staged for step() inside the
        block; on a normal exit, every rank's rows of the result written into ``p.grad``.
        On an exception nothing is written: ``p.grad`` keeps the gradient."""
        staged = self._gather()
        with _grads.staged(staged):
            yield
            self._return(staged)

    def _by_dtype(self) -> dict[torch.dtype, list[ShardedParam]]:
        out: dict[torch.dtype, list[ShardedParam]] = {}
        for sp in self._params:
            out.setdefault(sp.param.dtype, []).append(sp)
        return out

    def _local_grad(self, sp: ShardedParam) -> Tensor | None:
        g = sp.param.grad
        if g is None:
            return None
        lg = _grads.local(g)
        want = sp.numel_of(self.rank, self.world)
        if lg.numel() != want:
            raise RuntimeError(
                f"kfac_ef: the gradient of {sp.name!r} holds {lg.numel()} entries on rank "
                f"{self.rank}, where FSDP2's row sharding of shape {sp.shape} gives {want}"
            )
        return lg

    def _exchange(
        self, send: list[list[Tensor]], recv_sizes: list[int], dtype: torch.dtype, what: str
    ) -> Tensor:
        """One all-to-all: ``send[d]`` to rank d; returns what came, by source rank."""
        pieces = [t for chunk in send for t in chunk]
        buf = (
            torch.cat([t.reshape(-1) for t in pieces])
            if pieces
            else torch.empty(0, dtype=dtype, device=self.device)
        )
        in_splits = [sum(t.numel() for t in chunk) for chunk in send]
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=self.device)
        self.bytes[what] += (sum(recv_sizes) - recv_sizes[self.rank]) * out.element_size()
        self.bytes["collectives"] += 1
        self.calls[what] += 1
        self._run(
            functools.partial(
                dist.all_to_all_single,
                out,
                buf,
                output_split_sizes=recv_sizes,
                input_split_sizes=in_splits,
                group=self.group,
                async_op=True,
            ),
            f"the all-to-all of gradients ({what})",
        )
        return out

    def _gather(self) -> dict[int, Tensor]:
        """Every rank's rows of each parameter to its workers: the whole gradients of this
        rank's parameters. A parameter's gradient exists on every rank or on none (FSDP's
        reduce-scatter is collective), so each rank decides from its own ``p.grad``; a
        missing one travels as zeros, keeping every rank's layout the same, and is not
        staged."""
        me, world = self.rank, self.world
        staged: dict[int, Tensor] = {}
        for dtype, params in self._by_dtype().items():
            send: list[list[Tensor]] = [[] for _ in range(world)]
            recv = [0] * world
            for sp in params:
                lg = self._local_grad(sp)
                piece = (
                    lg.reshape(-1).to(dtype)
                    if lg is not None
                    else torch.zeros(sp.numel_of(me, world), dtype=dtype, device=self.device)
                )
                for d in sp.workers:
                    send[d].append(piece)
                if me in sp.workers:
                    for s in range(world):
                        recv[s] += sp.numel_of(s, world)
            out = self._exchange(send, recv, dtype, "gather")
            mine = [sp for sp in params if me in sp.workers]
            whole = {id(sp): torch.empty(sp.shape, dtype=dtype, device=self.device) for sp in mine}
            pos = 0
            for s in range(world):
                for sp in mine:
                    a, b = sp.span(s, world)
                    n = (b - a) * sp.row_numel
                    rows = whole[id(sp)].view(sp.rows, sp.row_numel)[a:b]
                    rows.view(-1).copy_(out[pos : pos + n])
                    pos += n
            for sp in mine:
                if sp.param.grad is not None:
                    staged[id(sp.param)] = whole[id(sp)]
        size = sum(t.numel() * t.element_size() for t in staged.values())
        self.staged_bytes = max(self.staged_bytes, size)
        return staged

    def _return(self, staged: dict[int, Tensor]) -> None:
        """Every rank's rows of the preconditioned gradients into its ``p.grad``: from its own
        staging when it is a worker of the parameter, else from the worker of its row."""
        me, world = self.rank, self.world
        row = self.grid.row(self.grid.row_of(me))
        for dtype, params in self._by_dtype().items():
            spread = [sp for sp in params if len(sp.workers) < world]
            if spread:
                send: list[list[Tensor]] = [[] for _ in range(world)]
                recv = [0] * world
                worker = {id(sp): next(w for w in sp.workers if w in row) for sp in spread}
                for sp in spread:
                    if worker[id(sp)] == me:
                        whole = staged.get(id(sp.param))
                        for r in row:
                            a, b = sp.span(r, world)
                            send[r].append(
                                whole.view(sp.rows, sp.row_numel)[a:b]
                                if whole is not None
                                else torch.zeros(
                                    (b - a) * sp.row_numel, dtype=dtype, device=self.device
                                )
                            )
                    recv[worker[id(sp)]] += sp.numel_of(me, world)
                out = self._exchange(send, recv, dtype, "return")
                pos = [sum(recv[:s]) for s in range(world)]
                for sp in spread:
                    w, n = worker[id(sp)], sp.numel_of(me, world)
                    g = sp.param.grad
                    if g is not None:
                        _grads.local(g).view(-1).copy_(out[pos[w] : pos[w] + n])
                    pos[w] += n
            for sp in params:
                whole = staged.get(id(sp.param))
                g = sp.param.grad
                if len(sp.workers) < world or whole is None or g is None:
                    continue
                a, b = sp.span(me, world)
                _grads.local(g).view(-1).copy_(whole.view(sp.rows, sp.row_numel)[a:b].reshape(-1))

    # ------------------------------------------------------------------ numerics, state
    def all_finite(self, flag: Tensor | None) -> Tensor | None:
        """Whether every rank's rows of the gradients are finite (each rank checked its own):
        the ranks must agree on whether the step folds statistics."""
        device = flag.device if flag is not None else self._control_device
        local = torch.ones(1, dtype=torch.float32, device=self._control_device)
        if flag is not None:
            local.mul_(flag.to(self._control_device, torch.float32))
        self._run(
            lambda: dist.all_reduce(local, op=dist.ReduceOp.MIN, group=self.group, async_op=True),
            "the agreement on finite gradients",
        )
        return (local[0] > 0.5).to(device)

    def after_load(self, missing: bool) -> bool:
        """After load_state_dict: also drop the running factors of the layers other ranks
        keep (the checkpoint holds every layer's)."""
        for layer in self._layers:
            if not self.keeps(layer):
                layer.A = layer.G = None
                layer.stats.release()
        return super().after_load(missing)

    def complete_state(self, layers: dict[str, Any]) -> dict[str, Any]:
        """state_dict(): every layer's entry, from the rank that keeps it (collective: every
        rank must call state_dict()). Tensors travel through the host (pickled)."""
        if self.grid.columns == 1:
            return layers
        mine = {
            layer.name: to_device(layers[layer.name], torch.device("cpu"))
            for layer in self._layers
            if layer.name in layers and self.preconditions(layer) and self._my_row == 0
        }
        parts: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(parts, mine, group=self.group)
        except Exception as exc:  # noqa: BLE001 (gloo/NCCL raise RuntimeError subclasses)
            raise self._failure("the gathering of the checkpoint", exc) from exc
        out: dict[str, Any] = {}
        for part in parts:
            for name, entry in part.items():
                out[name] = to_device(entry, self.device)
        return {layer.name: out[layer.name] for layer in self._layers if layer.name in out}


def _named(discovered: Discovered) -> list[tuple[str, nn.Parameter]]:
    """Parameter names for messages (the model's, through discovery's routes)."""
    out: list[tuple[str, nn.Parameter]] = []
    for name, route in discovered.routes.items():
        for p_name, p in route.adapter.module.named_parameters(recurse=False):
            out.append((f"{name}.{p_name}" if name else p_name, p))
    return out


__all__ = ["ShardedDistributor", "ShardedParam", "fsdp_modules"]
