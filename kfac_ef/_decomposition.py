"""A layer's decomposition: what step() applies, typed.

Every tensor stacks the layer's stored blocks (``spec.nb`` per Kronecker block, see
_factors); a bucket stacks its layers' along the same dimension.

- "exact" and "ekfac": eigenbases ``qg``, ``qa`` (None for a diagonal factor, whose basis is
  the identity) and eigenvalues ``lg``, ``la``, so that (G⊗A + εI)⁻¹ is applied in the
  eigenbasis; "ekfac" adds the scale ``s`` that replaces λ_G λ_Aᵀ; relative damping adds
  ``eps``, one ε per Kronecker block. "eigen_adam": the eigenbases and eigenvalues of
  "exact", the running second moment ``s`` of the minibatch gradient in them and its update
  count ``n`` per Kronecker block (Adam's bias correction).
- "pi": damped inverses ``ig`` = (G + c_G I)⁻¹ and ``ia`` = (A + c_A I)⁻¹ and their shifts
  ``cg``, ``ca`` (one per stored block).

In a checkpoint a decomposition is the dict of its present fields (``parts()``), under the
fields' names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Decomposition:
    qg: Tensor | None = None
    lg: Tensor | None = None
    qa: Tensor | None = None
    la: Tensor | None = None
    ig: Tensor | None = None
    ia: Tensor | None = None
    cg: Tensor | None = None
    ca: Tensor | None = None
    s: Tensor | None = None
    eps: Tensor | None = None
    n: Tensor | None = None

    @classmethod
    def of_sides(
        cls, g: Mapping[str, Tensor], a: Mapping[str, Tensor], **extra: Tensor
    ) -> Decomposition:
        """From each side's parts: eigenbasis "q" (absent for a diagonal factor) and
        eigenvalues "l", or damped inverse "i" (see ``_blocks.decompose``)."""
        return cls(
            qg=g.get("q"),
            lg=g.get("l"),
            ig=g.get("i"),
            qa=a.get("q"),
            la=a.get("l"),
            ia=a.get("i"),
            **extra,
        )

    @classmethod
    def from_parts(cls, parts: Mapping[str, Tensor]) -> Decomposition:
        """From a checkpoint's dict (``parts()``)."""
        return cls(**dict(parts))

    def parts(self) -> dict[str, Tensor]:
        """The present fields by name (the checkpoint's form)."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def keys(self) -> set[str]:
        return set(self.parts())

    def map(self, fn: Callable[[Tensor], Tensor]) -> Decomposition:
        """``fn`` applied to every present field (a copy, a move to a device or dtype)."""
        return replace(self, **{k: fn(v) for k, v in self.parts().items()})

    @staticmethod
    def stack(decs: list[Decomposition]) -> Decomposition:
        """The decompositions of same-shaped layers (same fields), stacked along the blocks."""
        keys = decs[0].keys()
        return Decomposition.from_parts({k: torch.cat([getattr(d, k) for d in decs]) for k in keys})
