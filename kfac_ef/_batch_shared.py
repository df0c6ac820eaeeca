"""Batch-shared calls: a module applied once to inputs broadcast over the batch.

Hugging Face models pass ``position_ids`` of shape (1, T) to their position embeddings: the
embedding runs once, on a batch of one, and its output is broadcast over the N examples of
the step. The gradient its output receives is Σ_n δ_n, the sum over the examples, so the
per-example gradients δ_n that G needs are not observable by any hook on that module; its
statistics, scaled as if they were one example's, would make G wrong by a data-dependent
factor (and the exact loss-change form would meet a call with 1 example among calls with N).

Rule: on the first statistics step where a layer's (or a diagonal parameter's) calls of a
pass carry 1 example while the pass's other calls carry N > 1, that entry is left to the
optimizer from then on: its statistics of the step are dropped before they reach a factor
(nothing is mis-scaled), its held calls are dropped (the constraint sees only the calls
that carry the batch), ``summary()`` lists its parameters with the reason, and one warning
says how to cover it (``position_ids.expand(N, T)``: the embedding then sees every example).
Step 0 is always a statistics step, so this is decided before the first update.

Distributed runs raise instead (the ranks' plans are fixed at construction).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from . import _warn
from ._apply import make_buckets

if TYPE_CHECKING:
    from ._blocks import DiagonalParam, Layer
    from ._discovery import Route
    from ._estimator import Estimator
    from ._held import HeldCalls

REASON = (
    "batch-shared: called once on inputs broadcast over the batch (a batch of 1 in a step "
    "of {n} examples, e.g. position_ids of shape (1, T)); its per-example gradients are not "
    "observable, pass inputs with the batch dimension (position_ids.expand(N, T)) to cover it"
)


def find(est: Estimator) -> tuple[list[Layer], list[DiagonalParam], int]:
    """The layers and diagonal parameters whose calls of some pass carry 1 example while
    other calls of that pass carry more, and the largest such batch."""
    entries: list[Layer | DiagonalParam] = [*est.layers, *est.diagonal]
    counts = [(e, e.stats.examples_per_pass()) for e in entries]
    batch: dict[int, int] = defaultdict(int)
    for _, per_pass in counts:
        for pass_id, n in per_pass.items():
            batch[pass_id] = max(batch[pass_id], n)
    shared = [e for e, per_pass in counts if any(n == 1 < batch[p] for p, n in per_pass.items())]
    layers = [e for e in shared if e in est.layers]
    diagonal = [e for e in shared if e in est.diagonal]
    return layers, diagonal, max(batch.values(), default=0)  # type: ignore[return-value]


def leave_out(est: Estimator, held: HeldCalls) -> None:
    """Leave the batch-shared entries of this step to the optimizer (see the module doc)."""
    layers, diagonal, n = find(est)
    if not layers and not diagonal:
        return
    names = [la.name for la in layers] + [d.name for d in diagonal]
    if est.comm.distributed:
        raise RuntimeError(
            f"kfac_ef: {', '.join(names)} were called once on inputs broadcast over the batch "
            "(a batch of 1 among calls with the whole batch, e.g. position_ids of shape "
            "(1, T)); their per-example gradients are not observable. Pass inputs with the "
            "batch dimension (position_ids.expand(N, T)), or leave them out with skip_layers."
        )
    reason = REASON.format(n=n)
    gone: set[int] = set()
    for layer in layers:
        layer.stats.discard()
        est.layers.remove(layer)
        del est.by_name[layer.name]
        gone.update(id(p) for p in layer.adapter.parameters())
    for entry in diagonal:
        entry.stats.discard()
        est.diagonal.remove(entry)
        del est.diag_by_name[entry.name]
        gone.add(id(entry.param))
    est.buckets = make_buckets(est.layers)
    dropped = {id(e) for e in [*layers, *diagonal]}
    for name, route in est.routes.items():
        _prune(route, dropped)
        if not (route.layers or route.params or route.tied):
            held.fisher.pop(name, None)
            held.loss.pop(name, None)
    for cov in est.coverage:
        if cov.covered and cov.pid in gone:
            cov.covered = False
            cov.reason = reason
            est.unpreconditioned.append((cov.name, reason))
    _warn.warn(
        f"kfac_ef: {', '.join(names)} {'is' if len(names) == 1 else 'are'} called once on "
        f"inputs broadcast over the batch (1 example among calls with {n}), so per-example "
        "gradients are not observable: left to the optimizer (summary() lists it). To cover "
        "it, pass inputs with the batch dimension, e.g. model(..., "
        "position_ids=position_ids.expand(N, T))"
    )


def _prune(route: Route, dropped: set[int]) -> None:
    route.layers = [(i, la) for i, la in route.layers if id(la) not in dropped]
    route.tied = [(i, la) for i, la in route.tied if id(la) not in dropped]
    route.params = [(p, d) for p, d in route.params if id(d) not in dropped]
