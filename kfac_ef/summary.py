"""What a preconditioner covers and what its state costs, as data and as a printable table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import _coverage, _ekfac
from ._coverage import Coverage

if TYPE_CHECKING:
    from ._blocks import DiagonalParam
    from ._estimator import Estimator


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class LayerSummary:
    """One preconditioned Kronecker layer.

    Attributes:
        name: layer name (the module name; ".q_proj" etc. appended for attention).
        kind: "Linear", "Conv2d", "Embedding", "MultiheadAttention", ...
        blocks: Kronecker blocks (groups of a grouped conv, else 1).
        a_shape, g_shape: logical shape of one block's A and G (A includes the bias
            coordinate), whatever their storage.
        parameters: names of the parameters the layer preconditions.
        factor_bytes: running factors plus the statistics accumulators, on this rank
            (distributed, the bytes are this rank's: under FSDP2 with
            grad_worker_fraction="mem_opt" a layer's factors are on one rank, 0 elsewhere;
            the accumulators of every layer exist on every rank during a statistics step).
        decomposition_bytes: eigenbases and eigenvalues ("exact"; "ekfac" adds the scale S,
            one g × a matrix per block) or damped inverses and their shifts ("pi").
        a_factor, g_factor: storage of A and G: "dense", "diagonal" or "N blocks of B".
        a_bytes, g_bytes: the share of A and of G in the total (running factor, accumulator
            and decomposition of each).
    """

    name: str
    kind: str
    blocks: int
    a_shape: tuple[int, int]
    g_shape: tuple[int, int]
    parameters: tuple[str, ...]
    factor_bytes: int
    decomposition_bytes: int
    a_factor: str = "dense"
    g_factor: str = "dense"
    a_bytes: int = 0
    g_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.factor_bytes + self.decomposition_bytes


@dataclass(frozen=True)
class DiagonalSummary:
    """One parameter preconditioned by its diagonal empirical Fisher (other_params="diagonal").

    Attributes:
        name: parameter name.
        kind: kind of the module it belongs to.
        numel: its number of entries.
        state_bytes: running F, accumulator, 1/(F + ε) and the F it was computed from.
    """

    name: str
    kind: str
    numel: int
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.state_bytes


def _factor_cell(shape: tuple[int, int], storage: str) -> str:
    if storage == "dense":
        return "x".join(map(str, shape))
    return f"{shape[0]} ({storage})"


@dataclass(frozen=True)
class Summary:
    """Returned by ``KFACPreconditioner.summary()``; ``str()`` renders it as a table.

    Available before the first step: it is the memory plan, in bytes, of the state the
    preconditioner keeps (factors, accumulators, decompositions, diagonal Fishers).

    Attributes:
        layers: one row per preconditioned Kronecker layer.
        unpreconditioned: ``(parameter name, reason)`` for every trainable or frozen parameter
            the preconditioner leaves to the optimizer untouched.
        diagonal: one row per parameter preconditioned by its diagonal empirical Fisher.
        ties: ``(parameter names, decision)`` for parameters shared by several modules.
        workspace_bytes: estimate of the largest transient buffers of one step() (the
            gradients of the largest bucket of same-shaped layers, in and out of the
            preconditioning products); not part of ``total_bytes``.
        coverage: shares of the trainable parameters preconditioned, with and without
            embeddings, and the count of non-embedding weight matrices covered.
        decomposition_flops: estimated floating-point operations of one decomposition of
            every factor (the first step() does one, then every ``inv_update_steps``):
            ``DECOMPOSITION_FLOPS_PER_D3`` · d³ per dense or block factor of width d
            (a symmetric eigendecomposition with eigenvectors; a Cholesky inverse with
            damping_mode="pi"), diagonal factors nothing.
        largest_factors: ``(layer, side, width)`` of the widest decomposed factors, widest
            first (at most five).
        wide_factors: ``(layer, side, width, storage, dense bytes)`` of the factors kept
            diagonal or block-diagonal because they are wider than ``max_factor_dim``.
    """

    layers: tuple[LayerSummary, ...]
    unpreconditioned: tuple[tuple[str, str], ...]
    diagonal: tuple[DiagonalSummary, ...] = ()
    ties: tuple[tuple[str, str], ...] = ()
    workspace_bytes: int = 0
    coverage: Coverage | None = None
    decomposition_flops: float = 0.0
    largest_factors: tuple[tuple[str, str, int], ...] = ()
    wide_factors: tuple[tuple[str, str, int, str, int], ...] = ()

    @property
    def total_bytes(self) -> int:
        """Planned bytes of all preconditioner state (factors, accumulators, decompositions)."""
        return sum(row.total_bytes for row in self.layers) + sum(
            row.total_bytes for row in self.diagonal
        )

    def __str__(self) -> str:
        header = ("layer", "kind", "blocks", "A", "G", "factors", "decomp.", "total")
        rows = [
            (
                r.name,
                r.kind,
                str(r.blocks),
                _factor_cell(r.a_shape, r.a_factor),
                _factor_cell(r.g_shape, r.g_factor),
                _fmt_bytes(r.factor_bytes),
                _fmt_bytes(r.decomposition_bytes),
                _fmt_bytes(r.total_bytes),
            )
            for r in self.layers
        ]
        rows.extend(
            (d.name, f"{d.kind} (diagonal EF)", "", str(d.numel), "", _fmt_bytes(d.state_bytes),
             "", _fmt_bytes(d.total_bytes))
            for d in self.diagonal
        )  # fmt: skip
        rows.append(("total", "", "", "", "", "", "", _fmt_bytes(self.total_bytes)))
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *rows)
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        work = _fmt_bytes(self.workspace_bytes)
        lines.append(f"step workspace (largest bucket, transient): {work}")
        if self.coverage is not None:
            lines.append(str(self.coverage))
        if self.decomposition_flops:
            widest = ", ".join(f"{n} {side} {d}" for n, side, d in self.largest_factors[:3])
            lines.append(
                f"decompositions: ~{self.decomposition_flops / 1e9:.3g} GFLOP each time (the "
                f"first step(), then every inv_update_steps); widest: {widest}. Trade it with "
                "inv_update_steps (how often), max_factor_dim / large_factor_block (how wide)"
            )
        if self.wide_factors:
            lines.append(
                "not dense (wider than max_factor_dim): "
                + ", ".join(
                    f"{n} {side} {d} ({st}; dense {_fmt_bytes(b)})"
                    for n, side, d, st, b in self.wide_factors
                )
            )
        if self.ties:
            lines.append("")
            lines.append("tied parameters:")
            lines.extend(f"  {names}: {what}" for names, what in self.ties)
        if self.unpreconditioned:
            lines.append("")
            lines.append("left to the optimizer (not preconditioned):")
            width = max(len(name) for name, _ in self.unpreconditioned)
            lines.extend(f"  {name.ljust(width)}  {why}" for name, why in self.unpreconditioned)
        return "\n".join(lines)


def build(est: Estimator) -> Summary:
    """The preconditioner's plan (``KFACPreconditioner.summary()``): layers, factor storage
    and bytes of state, diagonal parameters, tied weights, and parameters left to the
    optimizer, with why."""
    opts = est.options
    item = torch.empty((), dtype=opts.factor_dtype).element_size()
    rows = []
    for layer in est.layers:
        ad = layer.adapter
        a, g, b = ad.a_dim, ad.g_dim, ad.blocks
        dec_a = layer.a_spec.decomposition_numel(b, opts.damping_mode)
        dec_g = layer.g_spec.decomposition_numel(b, opts.damping_mode)
        scale = 0
        if opts.damping_mode in ("ekfac", "eigen_adam"):
            scale = _ekfac.scale_numel(b, layer.g_spec, layer.a_spec)
        if opts.damping_mode == "eigen_adam":
            scale += b  # the moment's update count per block
        if not est.comm.preconditions(layer):
            dec_a = dec_g = scale = 0  # another rank holds it (grad_worker_fraction < 1)
        keeps = est.comm.keeps(layer)  # sharded: another rank keeps its factors
        decomp = dec_a + dec_g + scale
        params = []
        for p in ad.parameters():
            params.append(_param_name(est, p))
        rows.append(
            LayerSummary(
                name=layer.name,
                kind=ad.kind,
                blocks=b,
                a_shape=(a, a),
                g_shape=(g, g),
                parameters=tuple(params),
                # running factors + accumulators
                factor_bytes=2 * layer.stats.nbytes() if keeps else 0,
                decomposition_bytes=decomp * item,
                a_factor=layer.a_spec.describe(),
                g_factor=layer.g_spec.describe(),
                # running factor + accumulator + decomposition, per side
                a_bytes=(2 * layer.a_spec.numel(b) * keeps + dec_a) * item,
                g_bytes=(2 * layer.g_spec.numel(b) * keeps + dec_g) * item,
            )
        )
    diag = [
        DiagonalSummary(
            name=d.name,
            kind=_kind_of(est, d),
            numel=d.param.numel(),
            state_bytes=4 * d.stats.nbytes(),  # running F, accumulator, 1/(F + ε), its F
        )
        for d in est.diagonal
    ]
    workspace = 0
    # Held calls (EKFAC, the exact constraint) are activations the size of the model's:
    # not counted here, as autograd's own are not.
    for bucket in est.buckets:
        blocks = sum(layer.adapter.blocks for layer in bucket.layers)
        # Gathered gradients, the products' intermediates and the result.
        size = 4 * blocks * bucket.g_spec.padded * bucket.a_spec.padded * item
        workspace = max(workspace, size)
    flops, largest = _decomposition_cost(est)
    return Summary(
        tuple(rows),
        tuple(est.unpreconditioned),
        diagonal=tuple(diag),
        ties=tuple(est.ties),
        workspace_bytes=workspace,
        coverage=_coverage.shares(est.coverage),
        decomposition_flops=flops,
        largest_factors=largest,
        wide_factors=tuple(_coverage.wide_factors(est.layers)),
    )


# Flops of one decomposition of a dense symmetric d×d factor, in units of d³: a symmetric
# eigendecomposition with eigenvectors (tridiagonal reduction 4/3 d³, divide and conquer
# and back-transformation ≈ 4 d³ more, rounded up: ≈ 9 d³ as commonly quoted for syevd);
# a Cholesky factorization and inverse ("pi") ≈ d³.
DECOMPOSITION_FLOPS_PER_D3 = {"exact": 9.0, "ekfac": 9.0, "eigen_adam": 9.0, "pi": 1.0}


def _decomposition_cost(est: Estimator) -> tuple[float, tuple[tuple[str, str, int], ...]]:
    """Estimated flops of one decomposition of every factor, and the widest factors."""
    per_d3 = DECOMPOSITION_FLOPS_PER_D3.get(est.options.damping_mode, 9.0)
    flops = 0.0
    sizes: list[tuple[str, str, int]] = []
    for layer in est.layers:
        blocks = layer.adapter.blocks
        for side, spec in (("A", layer.a_spec), ("G", layer.g_spec)):
            if spec.diagonal:
                continue
            flops += per_d3 * blocks * spec.nb * float(spec.bs) ** 3
            sizes.append((layer.name, side, spec.bs))
    sizes.sort(key=lambda t: -t[2])
    return flops, tuple(sizes[:5])


def _param_name(est: Estimator, p: nn.Parameter) -> str:
    for name, route in est.routes.items():
        module = route.adapter.module
        for pname, q in module.named_parameters():
            if q is p:
                return f"{name}.{pname}" if name else pname
    return "?"


def _kind_of(est: Estimator, entry: DiagonalParam) -> str:
    for route in est.routes.values():
        if any(p is entry.param for p, _ in route.params):
            return route.adapter.kind
    return "?"
