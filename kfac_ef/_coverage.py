"""How much of a model a preconditioner covers, and the warnings at construction.

Shares are counted over the **trainable** parameters, with and without embeddings: in a
language model the token embedding (often tied to the output layer) can hold most of the
parameters, so a share with embeddings can read 94% while no transformer block is covered.
The *weight matrices* share counts the trainable parameters of two or more dimensions
outside embeddings (the Linear, Conv, attention projection weights): the one that says
whether the blocks are covered, and the one the construction warning watches.

Embedding parameters are those of nn.Embedding modules (any subclass), including weights
tied to them (a language model's output layer), and learned position embeddings kept as
plain parameters (a name containing ``pos_emb``, ``pos_embed`` or ``position_emb``, as
torchvision's and timm's ViTs name them). A weight matrix is a parameter with at least two
dimensions larger than 1 (a class token of shape (1, 1, D) is not one).

Wide layers: a factor wider than ``max_factor_dim`` is kept diagonal (or block-diagonal,
``large_factor_block``) instead of dense; construction warns once, naming the layers and the
memory a dense factor would need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import _warn

if TYPE_CHECKING:
    from ._blocks import Layer
    from ._options import KFACOptions

# Construction warns when more than this share of the trainable non-embedding weight
# matrices (not skipped by the user) is left to the optimizer.
LEFT_OUT_WARNING_SHARE = 0.25
_POSITION_EMBEDDING = re.compile(r"pos(ition)?_?emb", re.IGNORECASE)


@dataclass
class ParamCoverage:
    """One parameter of the model.

    Attributes:
        name: its qualified name (first registration).
        numel: its number of entries.
        matrix: it has two or more dimensions (a weight matrix or kernel).
        embedding: it belongs to an embedding (or is tied to one).
        trainable: ``requires_grad``.
        covered: preconditioned (Kronecker or diagonal).
        reason: why it is left out (None if covered).
        pid: ``id()`` of the parameter.
    """

    name: str
    numel: int
    matrix: bool
    embedding: bool
    trainable: bool
    covered: bool
    reason: str | None = None
    pid: int = 0


@dataclass(frozen=True)
class Coverage:
    """Shares of the trainable parameters a preconditioner covers (``Summary.coverage``).

    Attributes:
        params: share of trainable entries preconditioned (with embeddings).
        params_without_embeddings: the same, embeddings left out of both counts.
        matrices: preconditioned / trainable non-embedding weight matrices, as counts
            ``(covered, total)``.
        embeddings: ``(covered, total)`` trainable embedding parameters.
    """

    params: float
    params_without_embeddings: float
    matrices: tuple[int, int]
    embeddings: tuple[int, int]

    def __str__(self) -> str:
        m_cov, m_all = self.matrices
        e_cov, e_all = self.embeddings
        return (
            f"coverage: {_pct(self.params)} of trainable entries "
            f"({_pct(self.params_without_embeddings)} without embeddings); "
            f"weight matrices {m_cov}/{m_all}, embeddings {e_cov}/{e_all}"
        )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def params_of(
    model: nn.Module, names: dict[int, str], order: list[nn.Parameter], left: dict[int, str]
) -> list[ParamCoverage]:
    """The coverage entry of every parameter (``left``: id -> reason of those left out)."""
    embedding_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
    }

    def lazy(p: nn.Parameter) -> bool:  # a lazy module's, not materialized: no size yet
        return isinstance(p, nn.parameter.UninitializedParameter)

    return [
        ParamCoverage(
            name=names[id(p)],
            numel=0 if lazy(p) else p.numel(),
            matrix=not lazy(p) and sum(size > 1 for size in p.shape) >= 2,
            embedding=id(p) in embedding_ids
            or bool(_POSITION_EMBEDDING.search(names[id(p)].rsplit(".", 1)[-1])),
            trainable=p.requires_grad,
            covered=id(p) not in left,
            reason=left.get(id(p)),
            pid=id(p),
        )
        for p in order
    ]


def shares(entries: list[ParamCoverage]) -> Coverage:
    """The shares of :class:`Coverage` from the entries."""
    train = [e for e in entries if e.trainable]
    plain = [e for e in train if not e.embedding]

    def share(es: list[ParamCoverage]) -> float:
        total = sum(e.numel for e in es)
        return sum(e.numel for e in es if e.covered) / total if total else 1.0

    mats = [e for e in plain if e.matrix]
    embs = [e for e in train if e.embedding]
    return Coverage(
        params=share(train),
        params_without_embeddings=share(plain),
        matrices=(sum(e.covered for e in mats), len(mats)),
        embeddings=(sum(e.covered for e in embs), len(embs)),
    )


def warn_left_out(entries: list[ParamCoverage]) -> None:
    """One warning when more than ``LEFT_OUT_WARNING_SHARE`` of the trainable non-embedding
    weight matrices (those the user did not skip) are left to the optimizer."""
    mats = [
        e
        for e in entries
        if e.trainable and e.matrix and not e.embedding and e.reason != "skipped by skip_layers"
    ]
    left = [e for e in mats if not e.covered]
    if not mats or len(left) <= LEFT_OUT_WARNING_SHARE * len(mats):
        return
    names = ", ".join(e.name for e in left[:3]) + (", ..." if len(left) > 3 else "")
    _warn.warn(
        f"kfac_ef: {len(left)} of {len(mats)} trainable non-embedding weight matrices are left "
        f"to the optimizer ({names}); summary() says why for each, and "
        "kfac_ef.register_module covers a class that computes a linear map or a norm"
    )


def _dense_bytes(dim: int, blocks: int, dtype: torch.dtype) -> int:
    return blocks * dim * dim * torch.empty((), dtype=dtype).element_size()


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def wide_factors(layers: list[Layer]) -> list[tuple[str, str, int, str, int]]:
    """``(layer, "A"/"G", width, storage, bytes of the dense factor)`` for every factor kept
    diagonal or block-diagonal because of its width (not by structure)."""
    out = []
    for layer in layers:
        blocks = layer.adapter.blocks
        for side, spec in (("A", layer.a_spec), ("G", layer.g_spec)):
            if spec.dense or spec.structural:
                continue
            dtype = layer.stats.dtype
            out.append(
                (layer.name, side, spec.dim, spec.describe(), _dense_bytes(spec.dim, blocks, dtype))
            )
    return out


def warn_wide(layers: list[Layer], opts: KFACOptions) -> None:
    """One warning naming the layers whose factors are wider than ``max_factor_dim`` and
    therefore diagonal; none when ``large_factor_block`` asks for block-diagonal factors (a
    plan the user chose; summary() shows it)."""
    wide = wide_factors(layers)
    if not wide or opts.large_factor_block > 1:
        return
    shown = ", ".join(
        f"{name} {side} ({dim} wide, {storage}; dense would need {_fmt(nbytes)})"
        for name, side, dim, storage, nbytes in wide[:6]
    )
    more = f" and {len(wide) - 6} more" if len(wide) > 6 else ""
    _warn.warn(
        f"kfac_ef: factors wider than max_factor_dim={opts.max_factor_dim} are not dense: "
        f"{shown}{more}. Raise max_factor_dim to keep them dense (memory above, and a d³ "
        "eigendecomposition each inv_update_steps), or set large_factor_block for "
        "block-diagonal blocks; summary() has the plan"
    )


__all__ = [
    "LEFT_OUT_WARNING_SHARE",
    "Coverage",
    "ParamCoverage",
    "params_of",
    "shares",
    "warn_left_out",
    "warn_wide",
    "wide_factors",
]
