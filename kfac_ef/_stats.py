"""Factor statistics between two step() calls, and their scaling.

Kronecker layers (:class:`LayerStatistics`). Per call the hooks hand over the input ã and the
observed output gradient ∂L/∂s. Raw sums S_A = Σ ã ãᵀ and S_G = Σ (∂L/∂s)(∂L/∂s)ᵀ accumulate
over calls and micro-batches, over rows that are (example, position) pairs for "expand" and
examples for "reduce" (ā_n the mean of ã over positions, the gradient summed over positions),
restricted to each factor's stored blocks (dense, diagonal or block-diagonal, see _factors).
``take`` then returns them with their scales (``_scaling.g_scale``, the one scaling rule):

    A = S_A / rows
    G = N · S_G / σ²   (loss_reduction="mean": ∂ℓ_n/∂s = N · ∂L/∂s, and G = (1/N) Σ δ δᵀ)
    G = S_G / σ²       (loss_reduction="sum": the empirical Fisher at the scale of the summed loss)

σ is the loss scale of a torch.amp.GradScaler (1 without one): the observed gradients are
those of σ·L. It is a device tensor, so unscaling needs no host synchronization.

N counts the examples of the step: per pass (the calls between two backward passes, see
capture.py) the batch size of its calls, summed over passes. A module called k times in one
pass contributes k times its positions to the rows, with N counted once.

Parameters outside the Kronecker form (:class:`DiagonalStatistics`): per-example gradients
ĝ_n (of the reduced loss, as observed) summed over the calls of a pass, then S = Σ_n ĝ_n²,
scaled like G: F = N · S / σ² ("mean") or S / σ² ("sum"), the diagonal of the empirical Fisher.

With ``fisher_type="mc"`` (``per_example=True``) the observed gradients are those of the
sampled loss Σ_n ℓ̂_n (kfac_ef.mc, times σ), i.e. per-example gradients whatever the
reduction, so G = S_G / (N σ²) ("mean") or S_G / σ² ("sum"): the same conventions, and
gradient accumulation needs no knowledge of how the user's loss is divided.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _warn
from ._factors import FactorSpec, gram_, one_hot_counts_
from ._scaling import Scale, g_scale
from .layers import Inputs, LayerAdapter, OneHotInputs


class _PassCounter:
    """Examples per pass: a module called several times in one pass counts its batch once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.examples: dict[int, int] = {}

    def add(self, pass_id: int, n: int) -> None:
        seen = self.examples.get(pass_id)
        if seen is not None and seen != n:
            _warn.warn(
                f"{self.what} called with batch sizes {seen} and {n} in one forward pass; "
                f"counting {max(seen, n)} examples for it",
            )
        self.examples[pass_id] = max(n, seen or 0)

    def total(self) -> int:
        return sum(self.examples.values())

    def clear(self) -> None:
        self.examples.clear()


class LayerStatistics:
    """Accumulators S_A, S_G of one Kronecker layer and the counts that scale them.

    Args:
        adapter: the layer.
        a_spec, g_spec: storage of A and G (dense, diagonal or block-diagonal).
        approx: "expand" or "reduce".
        dtype: factor dtype.
        backend: kernel backend.
        per_example: the observed gradients are per-example ones (fisher_type="mc").
        stride: with "expand", every ``stride``-th position of each call (``statistics_stride``),
            from the position ``offset`` mod ``stride``.
    """

    def __init__(
        self,
        adapter: LayerAdapter,
        approx: str,
        dtype: torch.dtype,
        backend: str,
        a_spec: FactorSpec | None = None,
        g_spec: FactorSpec | None = None,
        per_example: bool = False,
        stride: int = 1,
    ) -> None:
        self.adapter = adapter
        self.stride = stride
        # The index of the statistics step being captured, set by the preconditioner from its
        # step count (the same on every rank, and after a checkpoint is loaded).
        self.offset = 0
        self.per_example = per_example
        self.approx = approx
        self.dtype = dtype
        self.backend = backend
        self.a_spec = a_spec or FactorSpec(adapter.a_dim, adapter.a_dim)
        self.g_spec = g_spec or FactorSpec(adapter.g_dim, adapter.g_dim)
        self._acc_a: Tensor | None = None
        self._acc_g: Tensor | None = None
        self.rows = 0
        self._passes = _PassCounter(f"{adapter.kind} layer")

    @property
    def empty(self) -> bool:
        return self.rows == 0

    @property
    def examples(self) -> int:
        """Examples accumulated since the last ``take()``/``discard()`` (summed over passes)."""
        return self._passes.total()

    def examples_per_pass(self) -> dict[int, int]:
        """The batch size of this layer's calls in each pass since the last ``take()``."""
        return dict(self._passes.examples)

    def _rows(self, t: Tensor, reduce_op: str) -> Tensor:
        """``(N, T, blocks, d)`` -> ``(blocks, rows, d)`` for the chosen approximation."""
        n, t_len, blocks, d = t.shape
        if self.approx == "expand" or t_len == 1:
            return t.reshape(n * t_len, blocks, d).transpose(0, 1)
        summed = t.sum(dim=1, dtype=self.dtype)
        if reduce_op == "mean":
            summed = summed / t_len
        return summed.transpose(0, 1)

    def _sampled(self, inputs: Inputs, grads: Tensor) -> tuple[Inputs, Tensor]:
        """Every ``stride``-th position (``statistics_stride``) of a call with shared
        positions, from this statistics step's offset; the output gradients scaled by
        √(T / positions kept), so that G's per-example sum over positions keeps its
        expectation (A is a mean over the rows kept)."""
        t_len, s = grads.shape[1], self.stride
        if s == 1 or self.approx != "expand" or t_len <= 1:
            return inputs, grads
        offset = self.offset % min(s, t_len)
        kept = len(range(offset, t_len, s))
        grads = grads[:, offset::s] * math.sqrt(t_len / kept)
        if isinstance(inputs, OneHotInputs):
            return OneHotInputs(inputs.indices[:, offset::s], inputs.num_classes), grads
        return inputs[:, offset::s], grads

    def buffers(self) -> tuple[Tensor, Tensor]:
        """The accumulators S_A, S_G (allocated on first use; their content is undefined
        while the row count is 0)."""
        if self._acc_a is None or self._acc_g is None:
            ad = self.adapter
            dev = ad.weight.device
            self._acc_a = torch.empty(self.a_spec.shape(ad.blocks), dtype=self.dtype, device=dev)
            self._acc_g = torch.empty(self.g_spec.shape(ad.blocks), dtype=self.dtype, device=dev)
        return self._acc_a, self._acc_g

    def add(self, inputs: Inputs, grads: Tensor, pass_id: int) -> None:
        """Accumulate one call: inputs ``(N, T, blocks, a_dim0)`` (or one-hot indices) and
        output gradients ``(N, T, blocks, g_dim)``."""
        ad = self.adapter
        n = inputs.shape[0]
        inputs, grads = self._sampled(inputs, grads)
        first = self.rows == 0
        acc_a, acc_g = self.buffers()
        beta = 0.0 if first else 1.0
        if isinstance(inputs, OneHotInputs):
            rows = one_hot_counts_(inputs.indices, acc_a, beta, self.approx, inputs.num_classes)
        else:
            xa = self._rows(inputs, "mean")
            gram_(xa, acc_a, self.a_spec, beta, ad.has_bias, self.backend)
            rows = xa.shape[1]
        dg = self._rows(grads, "sum")
        gram_(dg, acc_g, self.g_spec, beta, False, self.backend)
        self.rows += rows
        self._passes.add(pass_id, n)

    def take(
        self, loss_reduction: str, loss_scale: Tensor | None = None
    ) -> tuple[Tensor, Scale, Tensor, Scale]:
        """This step's raw sums and their scales: A = s_A · S_A and G = s_G · S_G.

        Resets the counts. The returned tensors are the accumulators themselves: use them
        before the next ``add``, which overwrites them.
        """
        assert self._acc_a is not None and self._acc_g is not None and self.rows > 0
        scale_g = g_scale(self._passes.total(), loss_reduction, loss_scale, self.per_example)
        scale_a = 1.0 / self.rows
        self.rows = 0
        self._passes.clear()
        return self._acc_a, scale_a, self._acc_g, scale_g

    def peek(self) -> tuple[Tensor | None, int, Tensor | None, int]:
        """The raw sums S_A, S_G so far with their row and example counts, without resetting.

        The tensors are the accumulators themselves (None before the first ``add``; stale
        when the row count is 0).
        """
        return self._acc_a, self.rows, self._acc_g, self._passes.total()

    def discard(self) -> None:
        """Forget what was accumulated since the last step (buffers are kept)."""
        self.rows = 0
        self._passes.clear()

    def release(self) -> None:
        """Forget what was accumulated and free the buffers (a rank that keeps no factors
        of this layer: they are allocated again at the next statistics step)."""
        self.discard()
        self._acc_a = self._acc_g = None

    def nbytes(self) -> int:
        """Bytes of the two accumulators (the running factors have the same size)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        blocks = self.adapter.blocks
        return item * (self.a_spec.numel(blocks) + self.g_spec.numel(blocks))


class DiagonalStatistics:
    """Σ_n ĝ_n² of one parameter, from per-example gradients summed over a pass's calls."""

    def __init__(
        self,
        name: str,
        numel: int,
        dtype: torch.dtype,
        device: torch.device,
        per_example: bool = False,
    ) -> None:
        self.name = name
        self.per_example = per_example
        self.numel = numel
        self.dtype = dtype
        self.device = device
        self._acc: Tensor | None = None
        self._stale = True  # the accumulator holds a previous step's sum
        self._pending: dict[int, Tensor] = {}
        self._passes = _PassCounter(f"parameter {name!r}")

    @property
    def empty(self) -> bool:
        return not self._pending and self._passes.total() == 0

    @property
    def examples(self) -> int:
        """Examples accumulated since the last ``take()``/``discard()`` (summed over passes)."""
        return self._passes.total()

    def examples_per_pass(self) -> dict[int, int]:
        """The batch size of this parameter's calls in each pass since the last ``take()``."""
        return dict(self._passes.examples)

    def add(self, per_example: Tensor, pass_id: int) -> None:
        """Add one call's per-example gradients ``(N, *shape)`` to its pass."""
        n = per_example.shape[0]
        g = per_example.reshape(n, -1).to(self.dtype)
        pending = self._pending.get(pass_id)
        if pending is not None and pending.shape[0] == n:
            pending.add_(g)  # the same examples again: their gradients add up
        elif pending is not None:
            self._fold(pending)  # another batch size in the same pass (warned below)
            self._pending[pass_id] = g.clone()
        else:
            self._pending[pass_id] = g.clone()
        self._passes.add(pass_id, n)

    def _fold(self, g: Tensor) -> None:
        sq = g.square().sum(dim=0)
        if self._acc is None:
            self._acc = sq
        elif self._stale:
            self._acc.copy_(sq)
        else:
            self._acc.add_(sq)
        self._stale = False

    def _fold_pending(self) -> None:
        for g in self._pending.values():
            self._fold(g)
        self._pending.clear()

    def take(self, loss_reduction: str, loss_scale: Tensor | None = None) -> tuple[Tensor, Scale]:
        """S = Σ_n ĝ_n² of this step (``(numel,)``) and its scale; resets the counts.

        The returned tensor is the accumulator itself: use it before the next ``add``.
        """
        self._fold_pending()
        if self._acc is None:
            self._acc = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        elif self._stale:
            self._acc.zero_()
        self._stale = True
        scale = g_scale(self._passes.total(), loss_reduction, loss_scale, self.per_example)
        self._passes.clear()
        return self._acc, scale

    def buffer(self) -> Tensor:
        """The accumulator S (allocated on first use; stale until the next ``add``)."""
        if self._acc is None:
            self._acc = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        return self._acc

    def peek(self) -> tuple[Tensor | None, int]:
        """S = Σ_n ĝ_n² so far (None if nothing was added) and the example count, without
        resetting. Completes the pending passes: call it only once their calls are all in
        (a later call of the same pass would then count as other examples).
        """
        self._fold_pending()
        return (None if self._stale else self._acc), self._passes.total()

    def discard(self) -> None:
        self._pending.clear()
        self._passes.clear()
        self._stale = True

    def release(self) -> None:
        """Forget what was accumulated and free the accumulator."""
        self.discard()
        self._acc = None

    def nbytes(self) -> int:
        """Bytes of the accumulator (the per-pass buffers, N × numel, are transient)."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()
