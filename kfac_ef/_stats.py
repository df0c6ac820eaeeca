"""Factor statistics of one layer between two step() calls, and their scaling.

Per call the hooks hand over the input ã and the observed output gradient ∂L/∂s. Raw sums
S_A = Σ ã ãᵀ and S_G = Σ (∂L/∂s)(∂L/∂s)ᵀ accumulate over calls and micro-batches, over rows
that are (example, position) pairs for "expand" and examples for "reduce" (ā_n the mean of
ã over positions, the gradient summed over positions). ``batch_factors`` then scales them
per docs/math.md:

    A = S_A / rows
    G = N · S_G   (loss_reduction="mean": ∂ℓ_n/∂s = N · ∂L/∂s, and G = (1/N) Σ δ δᵀ)
    G = S_G       (loss_reduction="sum": the empirical Fisher at the scale of the summed loss)

N counts the examples of the step: per pass (the calls between two backward passes, see
capture.py) the batch size of its calls, summed over passes. A module called k times in one
pass contributes k times its positions to the rows, with N counted once.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .kernels import factor_stats
from .layers import LayerAdapter


class LayerStatistics:
    """Accumulators S_A, S_G (``(blocks, d, d)``) of one layer and the counts that scale them."""

    def __init__(
        self, adapter: LayerAdapter, approx: str, dtype: torch.dtype, backend: str
    ) -> None:
        self.adapter = adapter
        self.approx = approx
        self.dtype = dtype
        self.backend = backend
        self._acc_a: Tensor | None = None
        self._acc_g: Tensor | None = None
        self.rows = 0
        self._examples: dict[int, int] = {}

    @property
    def empty(self) -> bool:
        return self.rows == 0

    def _rows(self, t: Tensor, reduce_op: str) -> Tensor:
        """``(N, T, blocks, d)`` -> ``(blocks, rows, d)`` for the chosen approximation."""
        n, t_len, blocks, d = t.shape
        if self.approx == "expand" or t_len == 1:
            return t.reshape(n * t_len, blocks, d).transpose(0, 1)
        summed = t.sum(dim=1, dtype=self.dtype)
        if reduce_op == "mean":
            summed = summed / t_len
        return summed.transpose(0, 1)

    def add(self, x: Tensor, grad: Tensor, pass_id: int) -> None:
        """Accumulate one call: its input ``x`` and the gradient ``grad`` w.r.t. its output."""
        ad = self.adapter
        inputs = ad.inputs(x)
        n = inputs.shape[0]
        xa = self._rows(inputs, "mean")
        dg = self._rows(ad.output_grads(grad), "sum")
        first = self.rows == 0
        if self._acc_a is None or self._acc_g is None:
            dev = ad.weight.device
            self._acc_a = torch.empty(ad.blocks, ad.a_dim, ad.a_dim, dtype=self.dtype, device=dev)
            self._acc_g = torch.empty(ad.blocks, ad.g_dim, ad.g_dim, dtype=self.dtype, device=dev)
        beta = 0.0 if first else 1.0
        factor_stats(xa, self._acc_a, beta=beta, append_ones=ad.has_bias, backend=self.backend)
        factor_stats(dg, self._acc_g, beta=beta, backend=self.backend)
        self.rows += xa.shape[1]
        seen = self._examples.get(pass_id)
        if seen is not None and seen != n:
            warnings.warn(
                f"{ad.kind} layer called with batch sizes {seen} and {n} in one forward pass; "
                f"counting {max(seen, n)} examples for it",
                stacklevel=2,
            )
        self._examples[pass_id] = max(n, seen or 0)

    def take(self, loss_reduction: str) -> tuple[Tensor, float, Tensor, float]:
        """This step's raw sums and their scales: A = s_A · S_A and G = s_G · S_G.

        Resets the counts. The returned tensors are the accumulators themselves: use them
        before the next ``add``, which overwrites them.
        """
        assert self._acc_a is not None and self._acc_g is not None and self.rows > 0
        examples = sum(self._examples.values())
        scale_g = float(examples) if loss_reduction == "mean" else 1.0
        scale_a = 1.0 / self.rows
        self.rows = 0
        self._examples.clear()
        return self._acc_a, scale_a, self._acc_g, scale_g

    def peek(self) -> tuple[Tensor | None, int, Tensor | None, int]:
        """The raw sums S_A, S_G so far with their row and example counts, without resetting.

        The tensors are the accumulators themselves (None before the first ``add``).
        """
        return self._acc_a, self.rows, self._acc_g, sum(self._examples.values())

    def discard(self) -> None:
        """Forget what was accumulated since the last step (buffers are kept)."""
        self.rows = 0
        self._examples.clear()

    def nbytes(self) -> int:
        ad = self.adapter
        item = torch.empty((), dtype=self.dtype).element_size()
        return item * ad.blocks * (ad.a_dim**2 + ad.g_dim**2)
