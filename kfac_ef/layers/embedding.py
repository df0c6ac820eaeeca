"""nn.Embedding as a Linear (no bias) on one-hot inputs.

The lookup s = weight[i] is s = Wᵀ onehot(i) with W = weight (num_embeddings × dim), i.e. a
Linear whose weight matrix is weightᵀ: g_dim = embedding_dim, a_dim = num_embeddings. Per
position the gradient of that matrix is δ ⊗ onehot(i), so

    A = (1/(N·T)) Σ_{n,t} onehot onehotᵀ = diag(token counts) / (N·T)     ("expand")

is diagonal by structure and is stored as a vector whatever the vocabulary size; G is the
Linear's G over embedding_dim. Dimensions: as for a Linear on the one-hot tensor, the first
index dimension is the batch and the others are positions (a 1-D index tensor is a batch of
single tokens). With "reduce", ā_n = (1/T) Σ_t onehot(i_{n,t}) and A keeps the diagonal of
(1/N) Σ_n ā_n ā_nᵀ (the off-diagonal part, tokens co-occurring in a sequence, is dropped).

``padding_idx``: that row never receives a gradient (torch zeroes it), so a padding token is
the zero input vector: it adds nothing to A (but its position still counts as a row, and its
output gradient enters G as for any Linear position). ``max_norm`` renormalizes rows in the
forward pass, outside autograd; the gradient is still that of the lookup and is preconditioned
as usual. ``sparse=True`` and ``scale_grad_by_freq=True`` are left to the optimizer (see
:func:`unsupported`).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import LayerAdapter, OneHotInputs, flatten_positions, is_batched


def unsupported(module: nn.Embedding) -> str | None:
    """Why this embedding cannot be preconditioned, or None."""
    if module.sparse:
        return (
            "Embedding(sparse=True): its gradient is a sparse tensor whose row count is "
            "data-dependent, and rewriting it would need a host synchronization every step; "
            "left to the (sparse) optimizer"
        )
    if module.scale_grad_by_freq:
        return (
            "Embedding(scale_grad_by_freq=True): rows are scaled by their frequency in the "
            "batch, which couples the examples (no per-example Kronecker form)"
        )
    return None


class EmbeddingAdapter(LayerAdapter):
    kind = "Embedding"
    one_hot_inputs = True

    def __init__(self, module: nn.Embedding) -> None:
        super().__init__(
            module, blocks=1, a_dim0=module.num_embeddings, g_dim=module.embedding_dim, bias=None
        )
        self.padding_idx = module.padding_idx

    def inputs(self, x: Tensor) -> OneHotInputs:
        idx = x.reshape(1, 1) if x.dim() == 0 else x
        if x.dim() > 0:
            batched = is_batched(idx, 0, self.batch_dim) if self.batch_dim else True
            idx = flatten_positions(idx.unsqueeze(-1), batched, True, self.batch_dim)[..., 0]
        idx = idx.long()
        if self.padding_idx is not None:
            idx = idx.masked_fill(idx == self.padding_idx, -1)
        return OneHotInputs(idx, self.a_dim0)

    def output_grads(self, grad: Tensor) -> Tensor:
        if grad.dim() == 1:
            return grad.reshape(1, 1, 1, -1)
        batched = is_batched(grad, 1, self.batch_dim) if self.batch_dim else True
        t = flatten_positions(grad, batched, channels_last=True, batch_dim=self.batch_dim)
        return t.unsqueeze(2)

    def weight_matrix(self, t: Tensor) -> Tensor:
        # The Linear's weight is weightᵀ: (embedding_dim, num_embeddings), a transposed view.
        return t.t().unsqueeze(0)
