"""The contract between module kinds and the preconditioner's math.

Two roles:

- A **Kronecker layer** (:class:`LayerAdapter`) is one weight matrix [W | b] preconditioned as
  ``blocks`` Kronecker blocks G ⊗ A of shape (g_dim, a_dim). It says how the gradient reads as
  ``(blocks, g_dim, a_dim)`` matrices (:meth:`LayerAdapter.gradient_parts`, views into the
  parameters' ``.grad``) and, for a call, lays out its inputs as ``(N, T, blocks, a_dim0)`` and
  its output gradients as ``(N, T, blocks, g_dim)``: N examples, T shared positions.
- A **module adapter** (:class:`ModuleAdapter`) is what the hooks see of one module: what to
  keep from a forward call, which output's gradient to watch, and what one call contributes
  to its Kronecker layers and to the per-example gradients of its other parameters (for the
  diagonal empirical Fisher). Most modules are one Kronecker layer and adapt themselves
  (LayerAdapter is a ModuleAdapter); nn.MultiheadAttention feeds four layers, norm layers
  feed none (only per-example gradients).

With s = W a + b per position, the gradient of [W | b] for one position is δ ãᵀ with
ã = [a; 1]; flattened row-major that is δ ⊗ ã, hence the block G ⊗ A (torch order).
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .._grads import grad_of


def module_class(module: nn.Module) -> type:
    """The class whose computation ``module`` performs: its own, or for a module wrapped by
    FSDP2's ``fully_shard`` (an ``FSDP<Class>`` made on the fly, whose forward is the
    original one with hooks around it) the original class. Checked without importing
    torch.distributed.fsdp: a wrapped module exists only if that package was imported."""
    cls = type(module)
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp is not None and isinstance(module, fsdp):
        mro = cls.__mro__
        return mro[min(int(getattr(cls, "_orig_cls_mro_index", 2)), len(mro) - 1)]
    return cls


@dataclass(frozen=True)
class OneHotInputs:
    """Inputs of a Linear on one-hot vectors (an embedding), kept as indices.

    Attributes:
        indices: ``(N, T)`` class indices; -1 marks a position whose input is the zero vector
            (an embedding's ``padding_idx``: that row never receives a gradient).
        num_classes: width of the one-hot vectors.
    """

    indices: Tensor
    num_classes: int

    @property
    def shape(self) -> tuple[int, int]:
        n, t = self.indices.shape
        return n, t


Inputs = Tensor | OneHotInputs


@dataclass
class Observation:
    """What one call of a module contributes.

    Attributes:
        kron: ``(layer index, inputs, output gradients)`` per active Kronecker layer, inputs
            ``(N, T, blocks, a_dim0)`` (or one-hot indices), gradients ``(N, T, blocks, g_dim)``.
        per_example: ``{id(parameter): (N, *parameter.shape)}`` per-example gradients (of
            the reduced loss, as observed) of the requested parameters.
    """

    kron: list[tuple[int, Inputs, Tensor]] = field(default_factory=list)
    per_example: dict[int, Tensor] = field(default_factory=dict)


class ModuleAdapter(ABC):
    """The hooks' view of one module (see the module docstring).

    Attributes:
        module: the wrapped module.
        kind: a short name for tables ("Linear", "MultiheadAttention", ...).
        batch_dim: where the batch is in the module's inputs: 0, or 1 inside sequence-first
            models (nn.Transformer* with batch_first=False); set by discovery.
        needs_pre_hook: whether :meth:`before_call` must run before each forward call.
    """

    kind: str = "?"
    needs_pre_hook: bool = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.batch_dim = 0

    @property
    def layers(self) -> Sequence[LayerAdapter]:
        """The Kronecker layers this module feeds."""
        return ()

    def diagonal_candidates(self) -> list[nn.Parameter]:
        """Trainable parameters with a cheap per-example gradient rule (:meth:`observe`).

        Used for the diagonal empirical Fisher of parameters no Kronecker layer covers.
        """
        return []

    def before_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Runs before a forward call whose statistics are kept (only if needs_pre_hook)."""
        return None

    def check_compiled(self, name: str) -> None:
        """Raise if a call of this module from torch.compile'd code cannot be observed
        exactly (runs before each such call whose statistics are kept; only if
        needs_pre_hook)."""
        return None

    def save(self, args: tuple[Any, ...], kwargs: dict[str, Any], before: Any) -> Any:
        """What the backward side needs from a forward call (default: the input, detached)."""
        x = args[0] if args else kwargs.get("input")
        return x.detach() if isinstance(x, Tensor) else None

    def output(self, out: Any) -> Tensor | None:
        """The output tensor whose gradient is observed."""
        return out if isinstance(out, Tensor) else None

    @abstractmethod
    def observe(
        self, saved: Any, grad: Tensor, layers: Sequence[int], params: Sequence[nn.Parameter]
    ) -> Observation:
        """What one call contributes to the requested layers (indices into ``layers``) and to
        the per-example gradients of the requested parameters, from the saved call and the
        gradient w.r.t. the output."""

    def unsupported_reason(self, param: nn.Parameter) -> str:
        """Why ``param`` (not covered by a layer nor by a per-example rule) is left out."""
        return f"{self.kind}: no Kronecker or diagonal rule for this parameter"


class LayerAdapter(ModuleAdapter):
    """One Kronecker-factored layer (and, by default, the module adapter of its own module).

    Attributes:
        module: the module the layer belongs to.
        weight: the (trainable) parameter holding W, or its rows (see gradient_parts).
        bias: the parameter holding b if it exists *and* is trainable, else None. A frozen
            bias is constant: its homogeneous coordinate is left out of A.
        blocks: number of Kronecker blocks (the groups of a grouped conv, else 1).
        a_dim0: input width of one block, without the homogeneous coordinate.
        g_dim: output width of one block.
        one_hot_inputs: inputs are one-hot vectors, so A is diagonal by structure.
        suffix: appended to the module name to name the layer (".q_proj" for attention).
    """

    kind = "?"
    one_hot_inputs = False

    def __init__(
        self,
        module: nn.Module,
        blocks: int,
        a_dim0: int,
        g_dim: int,
        *,
        weight: nn.Parameter | None = None,
        bias: Any = "module",
        suffix: str = "",
    ) -> None:
        super().__init__(module)
        w = module.weight if weight is None else weight
        assert isinstance(w, nn.Parameter)
        self.weight: nn.Parameter = w
        if isinstance(bias, str):
            bias = getattr(module, "bias", None)
        self.bias: nn.Parameter | None = (
            bias if isinstance(bias, nn.Parameter) and bias.requires_grad else None
        )
        self.blocks = blocks
        self.a_dim0 = a_dim0
        self.g_dim = g_dim
        self.suffix = suffix

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def a_dim(self) -> int:
        """Width of A: the input width plus the homogeneous coordinate when there is a bias."""
        return self.a_dim0 + (1 if self.has_bias else 0)

    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def regions(self) -> list[tuple[nn.Parameter, Any]]:
        """``(parameter, region)`` pairs this layer's matrix is made of; two layers overlap
        (share weights) when they have a pair in common. The region tells row blocks of one
        packed parameter apart (the q, k, v projections of attention); None: all of it."""
        return [(p, None) for p in self.parameters()]

    @property
    def layers(self) -> Sequence[LayerAdapter]:
        # A frozen weight is constant: no layer (a trainable bias may still be diagonal).
        return (self,) if self.weight.requires_grad else ()

    def diagonal_candidates(self) -> list[nn.Parameter]:
        # The bias has a per-example rule (Σ_t δ): used when the weight is not preconditioned
        # by this layer (a tied weight owned by another module).
        return [self.bias] if self.bias is not None else []

    @abstractmethod
    def inputs(self, x: Any) -> Inputs:
        """The layer input of one call as ``(N, T, blocks, a_dim0)`` (may be a view)."""

    @abstractmethod
    def output_grads(self, grad: Tensor) -> Tensor:
        """The gradient w.r.t. the layer output of one call as ``(N, T, blocks, g_dim)``."""

    def observe(
        self, saved: Any, grad: Tensor, layers: Sequence[int], params: Sequence[nn.Parameter]
    ) -> Observation:
        obs = Observation()
        dg = self.output_grads(grad)
        if layers:
            obs.kron.append((0, self.inputs(saved), dg))
        if self.bias is not None and any(p is self.bias for p in params):
            obs.per_example[id(self.bias)] = dg.sum(dim=1).reshape(-1, *self.bias.shape)
        return obs

    def weight_matrix(self, t: Tensor) -> Tensor:
        """A weight-shaped tensor as ``(blocks, g_dim, a_dim0)`` (row-major flattening)."""
        return t.reshape(self.blocks, self.g_dim, self.a_dim0)

    def bias_matrix(self, t: Tensor) -> Tensor:
        """A bias-shaped tensor as ``(blocks, g_dim, 1)``."""
        return t.reshape(self.blocks, self.g_dim, 1)

    def gradient_parts(self) -> GradientParts | None:
        """The parameters' ``.grad`` as ``(blocks, g_dim, width)`` matrices, each with its
        first column in [∇W | ∇b]; None when a gradient is missing.

        Writing into the matrices and then calling ``flush()`` writes the gradients (the
        preconditioner's only write). They are views into ``.grad`` when it is contiguous;
        a gradient in another layout (a channels_last conv) is copied, and ``flush()`` copies
        the result back into it, so ``p.grad`` keeps its identity and its strides.
        """
        parts = GradientParts()
        gw = parts.matrix(self.weight, self.weight_matrix)
        if gw is None:
            return None
        parts.append((gw, 0))
        if self.bias is not None:
            gb = parts.matrix(self.bias, self.bias_matrix)
            if gb is None:
                return None
            parts.append((gb, self.a_dim0))
        return parts

    def describe(self) -> str:
        return self.kind


class GradientParts(list[tuple[Tensor, int]]):
    """``(matrix, first column)`` pairs of one layer's gradient (see
    :meth:`LayerAdapter.gradient_parts`), with the copies to write back."""

    def __init__(self) -> None:
        super().__init__()
        self._writeback: list[tuple[Tensor, Tensor]] = []

    def matrix(self, p: nn.Parameter, as_matrix: Any) -> Tensor | None:
        """``as_matrix(p.grad)``: a view when ``p.grad`` is contiguous, else a copy that
        :meth:`flush` writes back. None without a gradient."""
        g = grad_of(p)
        if g is None:
            return None
        if g.is_contiguous():
            return as_matrix(g)
        m = as_matrix(g.contiguous())
        self._writeback.append((g, m))
        return m

    def flush(self) -> None:
        """Write the copied matrices back into the gradients they came from."""
        for g, m in self._writeback:
            g.copy_(m.reshape(g.shape))


def _prod(xs: tuple[int, ...]) -> int:
    return int(math.prod(xs))


def is_batched(t: Tensor, feature_dims: int, batch_dim: int) -> bool:
    """Whether ``t`` has a batch dimension: more dims than features (+ one position dim when
    the batch is not the first dim, as in sequence-first ``(T, N, features)``)."""
    return t.dim() > feature_dims + (1 if batch_dim else 0)


def flatten_positions(t: Tensor, batched: bool, channels_last: bool, batch_dim: int = 0) -> Tensor:
    """Reshape to ``(N, T, features)``.

    Args:
        t: ``(N, *positions, features)`` if ``channels_last`` else ``(N, features, *positions)``;
            without the leading N when ``batched`` is False (one example).
        batched: whether ``t`` has a batch dimension.
        channels_last: where the feature dimension is.
        batch_dim: where N is (1 for sequence-first tensors ``(T, N, ..., features)``).
    """
    if not batched:
        t = t.unsqueeze(0)
    elif batch_dim != 0:
        t = t.movedim(batch_dim, 0)
    if channels_last:
        return t.reshape(t.shape[0], -1, t.shape[-1])
    n, c = t.shape[0], t.shape[1]
    return t.reshape(n, c, -1).transpose(1, 2)


__all__ = [
    "GradientParts",
    "Inputs",
    "LayerAdapter",
    "ModuleAdapter",
    "Observation",
    "OneHotInputs",
    "flatten_positions",
    "is_batched",
    "module_class",
]
