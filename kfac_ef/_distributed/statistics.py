"""Statistics across ranks: the asynchronous bucketed all-reduce launched from the backward
pass, the running factors' all-reduce (``factor_sync="decomposition"``), EKFAC's scales.
The scaling of the reduced sums is in the package docstring ("Factor statistics")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .. import _ekfac
from .._blocks import DiagonalParam, Layer
from .._options import KFACOptions
from .._scaling import Scale, global_g_scale, loss_share, rank_weight
from .options import DistributedOptions
from .packing import DiagTaken, Entry, KronTaken, _packed, _size, _stacks, _StatsBucket, _Triangles


class StatisticsSync:
    """The statistics part of :class:`~kfac_ef._distributed.data_parallel.Distributor`
    (its base class; the attributes below are set by its constructor)."""

    options: DistributedOptions
    kfac: KFACOptions
    group: Any
    world: int
    rank: int
    ranks: list[int]
    device: torch.device
    _ddp: DistributedDataParallel | None
    _layers: list[Layer]
    _diagonal: list[DiagonalParam]
    _tri: _Triangles
    _feeders: dict[int, set[str]]
    _buckets: list[_StatsBucket]
    _buckets_of: dict[str, list[_StatsBucket]]
    _pass: int
    _expected: dict[str, int]
    _got: dict[str, int]
    _next: int
    _examples: Tensor | None
    _control_device: torch.device
    _start: Callable[..., Any]
    _wait: Callable[..., None]
    _run: Callable[..., None]
    _count: Callable[..., None]
    keeps: Callable[[Entry], bool]  # whether this rank folds a unit's statistics (local.Whole)

    # Whether bucket buffers live between statistics steps (False: allocated at launch,
    # freed once unpacked, so that a rank holds no full-model buffer; FSDP's sharded state).
    _persistent_buffers = True

    def _destination(self, unit: Entry) -> int | None:
        """The one rank that needs the unit's reduced statistics (a reduce to it), or None
        when every rank does (an all-reduce; always, here)."""
        return None

    def _syncing(self) -> bool:
        """Whether this backward pass is the last before step() (False inside DDP's
        ``no_sync()``: more passes follow)."""
        return self._ddp is None or bool(self._ddp.require_backward_grad_sync)

    def _buffer(self, bucket: _StatsBucket) -> Tensor:
        if bucket.buffer is None:
            bucket.buffer = torch.zeros(
                bucket.size, dtype=self.kfac.factor_dtype, device=self.device
            )
        return bucket.buffer

    def _make_buckets(self, units: list[Entry]) -> list[_StatsBucket]:
        """Consecutive units (in the given order) up to about ``bucket_cap_mb`` each, and of
        one destination (``_destination``)."""
        dtype = self.kfac.factor_dtype
        item = torch.empty((), dtype=dtype).element_size()
        cap = self.options.bucket_cap_mb * 2**20
        groups: list[list[Entry]] = [[]]
        size = 0
        for entry in units:
            n = _size(entry) + 2
            other = bool(groups[-1]) and self._destination(groups[-1][0]) != self._destination(
                entry
            )
            if groups[-1] and ((size + n) * item > cap or other):
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
            size = pos + 2 * len(members)
            buffer = (
                torch.zeros(size, dtype=dtype, device=self.device)
                if self._persistent_buffers
                else None
            )
            routes = {name for e in members for name in self._feeders[id(e)]}
            dst = self._destination(members[0])
            buckets.append(_StatsBucket(members, buffer, offsets, pos, routes, size, dst))
        return buckets

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
        if not self._syncing():
            return  # inside DDP's no_sync() (FSDP's gradient sync off): more passes follow
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
        buf = self._buffer(bucket)
        counts: list[float] = []
        # δ_n = N_r γ_n for the observed gradients of a mean-reduced loss; the sampled-target
        # backward (fisher_type="mc") observes per-example gradients already.
        per_example = self.kfac.fisher_type == "mc"
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
            # δ_n = N_r γ_n: rank r's contribution to Σ_n δ_n δ_nᵀ is N_r² S_G,r ("mean").
            weight = rank_weight(examples, self.kfac.loss_reduction, per_example)
            if weight != 1.0:
                g_part.mul_(weight)
            counts += [float(rows), float(examples)]
        buf[bucket.counts :].copy_(torch.tensor(counts, dtype=buf.dtype), non_blocking=True)
        if bucket.dst is None:
            bucket.work = self._start(
                lambda: dist.all_reduce(buf, group=self.group, async_op=True),
                "the all-reduce of factor statistics",
            )
            self._count("statistics", buf)
        else:  # only the rank that keeps these units needs their sums
            dst = self.ranks[bucket.dst]
            bucket.work = self._start(
                lambda: dist.reduce(buf, dst=dst, group=self.group, async_op=True),
                "the reduction of factor statistics",
            )
            self._count("statistics_to_owner", buf)
        bucket.dirty = False

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
            if bucket.dst is not None and bucket.dst != self.rank:
                for unit in bucket.entries:  # another rank keeps them
                    unit.stats.release()
                if not self._persistent_buffers:
                    bucket.buffer = None
                continue
            buf = self._buffer(bucket)
            counts = buf[bucket.counts :].view(-1, 2)
            per_bucket.append(counts[:, 1].max())
            for i, (unit, start) in enumerate(zip(bucket.entries, bucket.offsets)):
                if not self.keeps(unit):
                    unit.stats.release()
                    continue
                part = buf[start : start + _size(unit)]
                rows, examples = counts[i, 0], counts[i, 1]
                present = rows > 0
                scale_g = global_g_scale(examples, self.world, self.kfac.loss_reduction, inv_sigma2)
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
            if not self._persistent_buffers:
                bucket.buffer = None
        self._pass = -1  # the next backward pass starts a new step
        if per_bucket:
            self._examples = torch.stack(per_bucket).max()
        return kron, diag

    def global_examples(self, local: float, previous: float | Tensor) -> float | Tensor:
        """Examples of the last statistics step over all ranks (``previous`` is not needed:
        every rank takes part in every statistics step): from the reduced counts
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
        g_local = loss_share(self.world, reduction)
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

    def reduce_scales(
        self, items: list[tuple[Layer, Tensor | None, int]], sigma: Tensor | None
    ) -> list[tuple[Layer, Tensor, Scale, Tensor | None]]:
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
        reduction = self.kfac.loss_reduction
        per_example = self.kfac.fisher_type == "mc"
        pos = 0
        counts = []
        for (_, raw, n), size in zip(items, sizes):
            if raw is not None and n > 0:
                part = buf[pos : pos + size]
                part.copy_(raw.reshape(-1))
                weight = rank_weight(n, reduction, per_example)
                if weight != 1.0:
                    part.mul_(weight)
            counts.append(float(n))
            pos += size
        buf[total:].copy_(torch.tensor(counts, dtype=dtype), non_blocking=True)
        self._count("statistics", buf)
        self._run(
            lambda: dist.all_reduce(buf, group=self.group, async_op=True),
            "the all-reduce of EKFAC statistics",
        )
        inv_sigma2 = None if sigma is None else 1.0 / sigma.to(self.device, dtype).square()
        out: list[tuple[Layer, Tensor, Scale, Tensor | None]] = []
        pos = 0
        for i, ((layer, _, _), size) in enumerate(zip(items, sizes)):
            examples = buf[total + i]
            scale = global_g_scale(examples, self.world, reduction, inv_sigma2)
            shape = (layer.adapter.blocks, layer.g_spec.padded, layer.a_spec.padded)
            out.append((layer, buf[pos : pos + size].view(shape), scale, examples > 0))
            pos += size
        return out
