"""Which parameters a preconditioner covers, how, and why the others are left out.

Every parameter of the model ends up in exactly one of three places:

1. a **Kronecker layer** (Linear, Conv, Embedding, Bilinear, the projections of
   MultiheadAttention), preconditioned by (G ⊗ A + εI)⁻¹;
2. with ``other_params="diagonal"``, a **diagonal parameter** (norm layers' affine
   parameters, PReLU, a bias whose weight is frozen or tied elsewhere), preconditioned by its
   diagonal empirical Fisher;
3. the list of parameters **left to the optimizer**, each with its reason.

Tied weights (one parameter used by several modules, e.g. a language model's output layer
sharing the token embedding) are preconditioned once:

- modules of the same kind using the same parameters the same way (two Linears sharing weight
  and bias) feed **one** Kronecker layer: their calls are positions of the same examples, as
  for a module called twice (``kfac_approx`` applies);
- otherwise **one module owns** the parameter and the others contribute nothing to its
  factors (their share of the gradient is in p.grad and is preconditioned with the owner's
  curvature). With damping_mode "exact", "pi" or "ekfac" the owner is a module whose inputs
  are not one-hot, so that every row of the matrix has curvature (an embedding's A is zero
  for tokens absent from the batch, which would scale those rows of the output layer's
  gradient by 1/ε). With "eigen_adam" only the owner's eigenbases are used (the scale is the
  second moment of the whole gradient, every row included), and the owner is the embedding:
  its token rows stay unrotated, where the output layer's G would mix the rows of the
  embedding's share (measured: docs/models.md). Among candidates, the last one in module
  order. ``summary().ties`` records the decision. When the loss-change constraint
  needs per-example loss changes (constraint="exact", track_loss_changes), the other uses
  are hooked too, for that only: the change of a loss through each use of the weight counts.

Inside sequence-first models (nn.Transformer* with batch_first=False) the batch is the second
dimension of the submodules' inputs: their adapters are told so (``batch_dim = 1``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _coverage
from ._blocks import DiagonalParam, Layer
from ._coverage import ParamCoverage
from ._factors import plan_factor
from ._model import connected_groups
from ._options import KFACOptions
from ._stats import DiagonalStatistics, LayerStatistics
from .layers import LayerAdapter, ModuleAdapter, make_adapter

# Modules that apply their submodules' parameters functionally (the submodules' hooks never
# fire): their adapter, or their reason, covers every parameter below them.
_ABSORBING: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,) + tuple(
    t for t in (getattr(nn, "LinearCrossEntropyLoss", None),) if t is not None
)
_SEQ_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_SEQ_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)


@dataclass
class Route:
    """Where one hooked module's observations go.

    Attributes:
        adapter: the module's adapter.
        layers: ``(index into adapter.layers, Layer)`` of its active Kronecker layers.
        params: ``(parameter, DiagonalParam)`` of its parameters preconditioned diagonally.
        tied: ``(index into adapter.layers, Layer)`` of layers whose tied weight this module
            uses without feeding their factors (only with per-example loss changes).
    """

    adapter: ModuleAdapter
    layers: list[tuple[int, Layer]] = field(default_factory=list)
    params: list[tuple[nn.Parameter, DiagonalParam]] = field(default_factory=list)
    tied: list[tuple[int, Layer]] = field(default_factory=list)


@dataclass
class Discovered:
    """The outcome of discovery (see the module docstring)."""

    layers: list[Layer]
    diagonal: list[DiagonalParam]
    routes: dict[str, Route]  # by hooked module name, in module order
    unpreconditioned: list[tuple[str, str]]
    ties: list[tuple[str, str]]
    trainable: list[nn.Parameter]
    coverage: list[ParamCoverage] = field(default_factory=list)


def _seq_first_modules(model: nn.Module) -> set[int]:
    """ids of modules whose inputs are sequence-first (T, N, ...): the submodules of
    nn.Transformer* layers and stacks built with batch_first=False."""
    out: set[int] = set()
    for module in model.modules():
        seq_first = False
        if isinstance(module, _SEQ_LAYERS):
            seq_first = not module.self_attn.batch_first
        elif isinstance(module, _SEQ_STACKS) and len(module.layers) > 0:
            seq_first = not module.layers[0].self_attn.batch_first  # type: ignore[union-attr]
        if seq_first:
            out.update(id(m) for m in module.modules() if m is not module)
    return out


def _layer_name(module_name: str, layer: LayerAdapter) -> str:
    return (module_name + layer.suffix).lstrip(".") or "<model>"


def _same_use(a: LayerAdapter, b: LayerAdapter) -> bool:
    """Two layers that use the same parameters in the same way (one block can serve both)."""
    return (
        type(a) is type(b)
        and [(id(p), r) for p, r in a.regions()] == [(id(p), r) for p, r in b.regions()]
        and (a.blocks, a.a_dim0, a.g_dim, a.suffix) == (b.blocks, b.a_dim0, b.g_dim, b.suffix)
        and a.one_hot_inputs == b.one_hot_inputs
    )


@dataclass
class _Scan:
    """What discovery learns as it goes (see :func:`discover`)."""

    names: dict[int, str]  # id(parameter) -> qualified name (its first registration)
    order: list[nn.Parameter]  # parameters in module order, each once
    left: dict[int, str] = field(default_factory=dict)  # id(parameter) -> why it is left out
    adapters: dict[str, ModuleAdapter] = field(default_factory=dict)
    # Kronecker layers in module order: (module name, index in adapter.layers, layer).
    kron: list[tuple[str, int, LayerAdapter]] = field(default_factory=list)
    diag_claims: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    ties: list[tuple[str, str]] = field(default_factory=list)
    covered: set[int] = field(default_factory=set)
    routes: dict[str, Route] = field(default_factory=dict)

    def route(self, mname: str) -> Route:
        return self.routes.setdefault(mname, Route(self.adapters[mname]))


def discover(model: nn.Module, opts: KFACOptions) -> Discovered:
    """Build the layers, diagonal parameters and hook routes of ``model`` under ``opts``:
    adapters for the modules, tied weights grouped, Kronecker layers, diagonal parameters,
    and every other parameter with the reason it is left to the optimizer."""
    scan = _scan_modules(model, opts)
    groups, feeds = _tie_groups(scan, opts)
    layers = _kronecker_layers(scan, opts, groups, feeds)
    diagonal = _diagonal_params(scan, opts)
    for adapter in scan.adapters.values():
        module = adapter.module
        for p in module.parameters(recurse=isinstance(module, _ABSORBING)):
            if id(p) not in scan.covered and p.requires_grad:
                scan.left.setdefault(id(p), adapter.unsupported_reason(p))
    for p in scan.order:
        if id(p) not in scan.covered and id(p) not in scan.left:
            scan.left[id(p)] = (
                "frozen (requires_grad is False)"
                if not p.requires_grad
                else "not owned by a module kind with a Kronecker or diagonal rule (a custom "
                "parameter)"
            )
    unpre = [(scan.names[id(p)], scan.left[id(p)]) for p in scan.order if id(p) not in scan.covered]
    routes = {m: scan.routes[m] for m in scan.adapters if m in scan.routes}  # module order
    trainable = [p for p in scan.order if p.requires_grad]
    left = {pid: why for pid, why in scan.left.items() if pid not in scan.covered}
    coverage = _coverage.params_of(model, scan.names, scan.order, left)
    _coverage.warn_left_out(coverage)
    _coverage.warn_wide(layers, opts)
    # A tie whose parameters all went to the optimizer (vocabulary-sized) has no owner.
    left_names = {name for name, _ in unpre}
    ties = [t for t in scan.ties if not set(t[0].split(", ")) <= left_names]
    return Discovered(layers, diagonal, routes, unpre, ties, trainable, coverage)


def _scan_modules(model: nn.Module, opts: KFACOptions) -> _Scan:
    """An adapter for every module with parameters that a rule covers (the reason for the
    others), in module order."""
    names: dict[int, str] = {}
    order: list[nn.Parameter] = []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in names:
                names[id(p)] = f"{mname}.{pname}" if mname else pname
                order.append(p)
    scan = _Scan(names, order)
    seq_first = _seq_first_modules(model)
    absorbed: set[int] = set()  # modules whose parameters an ancestor's adapter handles
    for mname, module in model.named_modules():
        if id(module) in absorbed:
            continue
        absorbing = isinstance(module, _ABSORBING)
        if absorbing:
            absorbed.update(id(m) for m in module.modules() if m is not module)
        params = list(module.parameters(recurse=absorbing))
        if not params:
            continue
        if opts.skips(mname, module):
            for p in params:
                scan.left.setdefault(id(p), "skipped by skip_layers")
            continue
        if not any(p.requires_grad for p in params):
            for p in params:
                scan.left.setdefault(id(p), "frozen (requires_grad is False)")
            continue
        made = make_adapter(module)
        if isinstance(made, str):
            for p in params:
                scan.left.setdefault(
                    id(p), made if p.requires_grad else "frozen (requires_grad is False)"
                )
            continue
        made.batch_dim = 1 if id(module) in seq_first else 0
        scan.adapters[mname] = made
        for i, layer in enumerate(made.layers):
            scan.kron.append((mname, i, layer))
        for p in made.diagonal_candidates():
            scan.diag_claims[id(p)].append(mname)
        for p in params:
            if not p.requires_grad:
                scan.left.setdefault(id(p), "frozen (requires_grad is False)")
    return scan


def _tie_groups(scan: _Scan, opts: KFACOptions) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Group the Kronecker layers that share a parameter (union-find) and decide who feeds
    which factors: ``(groups, feeds)``, ``feeds[i]`` the index of the layer whose Layer
    object layer i feeds (absent: it feeds none)."""
    kron = scan.kron
    keys = [[(id(p), region) for p, region in layer.regions()] for _, _, layer in kron]
    groups = {members[0]: members for members in connected_groups(keys)}
    feeds: dict[int, int] = {}
    for members in groups.values():
        if len(members) == 1:
            feeds[members[0]] = members[0]
        else:
            _tie(scan, members, feeds, opts)
    return groups, feeds


def _tie(scan: _Scan, members: list[int], feeds: dict[int, int], opts: KFACOptions) -> None:
    """One group of layers sharing a weight: one block for all (same use), or one owner."""
    kron, names = scan.kron, scan.names
    lead = kron[members[0]][2]
    users = ", ".join(_layer_name(kron[i][0], kron[i][2]) for i in members)
    uses: dict[tuple[int, object], int] = defaultdict(int)
    for i in members:
        for p, region in kron[i][2].regions():
            uses[(id(p), region)] += 1
    shared = ", ".join(sorted({names[pid] for (pid, _), n in uses.items() if n > 1}))
    if all(_same_use(lead, kron[i][2]) for i in members):
        for i in members:
            feeds[i] = members[0]
        scan.ties.append(
            (shared, f"one Kronecker block fed by {users} (their calls are positions of "
             "the same examples)")
        )  # fmt: skip
        return
    one_hot = [i for i in members if kron[i][2].one_hot_inputs]
    dense_inputs = [i for i in members if i not in one_hot]
    # eigen_adam: the embedding (its rows unrotated; S covers every row); else a dense one.
    first, second = (
        (one_hot, dense_inputs) if opts.damping_mode == "eigen_adam" else (dense_inputs, one_hot)
    )
    owner = (first or second)[-1]
    feeds[owner] = owner
    owner_name = _layer_name(kron[owner][0], kron[owner][2])
    others = [i for i in members if i != owner]
    scan.ties.append(
        (
            shared,
            f"preconditioned by {owner_name} alone; the other use(s) ("
            + ", ".join(_layer_name(kron[i][0], kron[i][2]) for i in others)
            + ") contribute nothing to its factors, their share of the gradient is "
            "preconditioned with the owner's curvature",
        )
    )
    owned = {id(p) for p in kron[owner][2].parameters()}
    for i in others:
        for p in kron[i][2].parameters():
            if id(p) not in owned:
                scan.left.setdefault(
                    id(p),
                    f"its layer {_layer_name(kron[i][0], kron[i][2])} shares a tied weight "
                    f"preconditioned by {owner_name}",
                )


def _wide_targets(
    scan: _Scan, opts: KFACOptions, groups: dict[int, list[int]], feeds: dict[int, int]
) -> dict[int, str]:
    """wide_layers="optimizer": the feeding layers (by index) of every embedding with more
    rows than max_factor_dim and of the layers tied to it (a vocabulary-sized LM head), with
    the reason for summary(). Other wide layers (a wide MLP) keep their wide factors."""
    limit = opts.max_factor_dim
    if opts.wide_layers != "optimizer" or limit is None:
        return {}
    group_of = {i: members for members in groups.values() for i in members}
    wide: dict[int, str] = {}
    for i, (_, _, la) in enumerate(scan.kron):
        if not (la.one_hot_inputs and la.a_dim > limit):
            continue
        reason = (
            f"vocabulary-sized: an embedding of {la.a_dim} rows (or a layer tied to it), above "
            f"max_factor_dim={limit} (wide_layers='optimizer' leaves it to the optimizer; "
            "'diagonal' preconditions it with diagonal factors)"
        )
        for m in group_of.get(i, [i]):
            if feeds.get(m) is not None:
                wide[feeds[m]] = reason
    return wide


def _kronecker_layers(
    scan: _Scan, opts: KFACOptions, groups: dict[int, list[int]], feeds: dict[int, int]
) -> list[Layer]:
    """A Layer (statistics, factor plan) per feeding layer, and the routes to it."""
    layers: list[Layer] = []
    by_index: dict[int, Layer] = {}
    owner_of: dict[int, int] = {}  # member of a tie group (not feeding) -> its owner
    for members in groups.values():
        owners = [i for i in members if feeds.get(i) == i]
        for i in members:
            if i not in feeds and owners:
                owner_of[i] = owners[0]
    wide = _wide_targets(scan, opts, groups, feeds)
    for i, (mname, idx, la) in enumerate(scan.kron):
        target = feeds.get(i)
        if target is None:
            continue
        if target in wide:
            for p in la.parameters():
                scan.left.setdefault(id(p), wide[target])
            continue
        if target == i:
            a_spec = plan_factor(
                la.a_dim,
                opts.max_factor_dim,
                opts.large_factor_block,
                la.one_hot_inputs,
                bias=la.has_bias,
            )
            g_spec = plan_factor(la.g_dim, opts.max_factor_dim, opts.large_factor_block, False)
            stats = LayerStatistics(
                la,
                opts.kfac_approx,
                opts.factor_dtype,
                opts.backend,
                a_spec,
                g_spec,
                per_example=opts.fisher_type == "mc",
                stride=opts.statistics_stride,
            )
            by_index[i] = Layer(_layer_name(mname, la), la, stats)
            layers.append(by_index[i])
            scan.covered.update(id(p) for p in la.parameters())
        scan.route(mname).layers.append((idx, by_index[target]))
    if opts.needs_loss_records:
        for i, owner in owner_of.items():
            if owner not in by_index:  # left to the optimizer with its group
                continue
            mname, idx, _ = scan.kron[i]
            scan.route(mname).tied.append((idx, by_index[owner]))
    return layers


def _diagonal_params(scan: _Scan, opts: KFACOptions) -> list[DiagonalParam]:
    """Parameters outside the Kronecker form with a per-example rule: diagonal (or left)."""
    diagonal: list[DiagonalParam] = []
    param_by_id = {id(p): p for p in scan.order}
    for pid, claimants in scan.diag_claims.items():
        p = param_by_id[pid]
        if pid in scan.covered or not p.requires_grad:
            continue
        if opts.other_params != "diagonal":
            scan.left.setdefault(
                pid,
                f"{scan.adapters[claimants[0]].kind}: other_params='ignore' leaves it to the "
                "optimizer (other_params='diagonal' preconditions it with its diagonal "
                "empirical Fisher)",
            )
            continue
        name = scan.names[pid]
        dstats = DiagonalStatistics(
            name, p.numel(), opts.factor_dtype, p.device, opts.fisher_type == "mc"
        )
        entry = DiagonalParam(name, p, dstats)
        diagonal.append(entry)
        scan.covered.add(pid)
        scan.left.pop(pid, None)
        for mname in claimants:
            scan.route(mname).params.append((p, entry))
        if len(claimants) > 1:
            scan.ties.append((name, "one diagonal Fisher fed by " + ", ".join(claimants)))
    return diagonal


def check_devices(plan: Discovered) -> set[torch.device]:
    """The devices of the preconditioned parameters."""
    return {layer.adapter.weight.device for layer in plan.layers} | {
        d.param.device for d in plan.diagonal
    }
