"""Independent ground truth for the tests: no code from kfac_ef is used here.

- per-example parameter gradients from torch.func (vmap over grad);
- per-example layer inputs and output gradients δ_{n,t} = ∂ℓ_n/∂s_{n,t}, the same way: each
  example alone through a hook-free copy of the model, δ the gradient of ℓ_n with respect to
  a zero added to the module's output (a plain loop over the examples where vmap cannot run
  the model);
- conv patches gathered window by window from the padded input by their definition (vmap over
  the output positions; checked against the per-example gradients by
  ``test_reference_is_consistent``);
- factor definitions and dense solves straight from docs/math.md.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

PerExampleLoss = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> (N,) losses


def clean_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every module hook dropped (no preconditioner sees it)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        for hooks in (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            m._forward_hooks_with_kwargs,
            m._forward_pre_hooks_with_kwargs,
        ):
            hooks.clear()
    return twin


def per_example_grads(
    model: nn.Module, loss: PerExampleLoss, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """{parameter name: (N, *shape)} gradients of ℓ_n, via torch.func."""
    model = clean_copy(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        out = functional_call(model, p, (xn.unsqueeze(0),))
        return loss(out, yn.unsqueeze(0)).sum()

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def layer_io(
    model: nn.Module, module: nn.Module, loss: PerExampleLoss, x: Tensor, y: Tensor
) -> list[list[tuple[Tensor, Tensor]]]:
    """Per example n, per call of ``module``: (its raw input, ∂ℓ_n/∂(its output)).

    Runs each example alone through a hook-free copy of the model (vmap over the examples,
    batches of one inside), so the gradient is that of ℓ_n itself and no preconditioner
    attached to ``model`` sees these passes. The output gradient of each call is the gradient
    with respect to a zero "probe" added to that output. Models that vmap cannot run (e.g.
    random operations, in-place updates of buffers) go through :func:`_layer_io_loop`.
    """
    name = next(k for k, m in model.named_modules() if m is module)
    model = clean_copy(model)
    module = model.get_submodule(name)
    try:
        return _layer_io_vmap(model, module, loss, x, y)
    except RuntimeError:  # vmap cannot run this model: one example at a time instead
        return _layer_io_loop(model, module, loss, x, y)


def _layer_io_vmap(
    model: nn.Module, module: nn.Module, loss: PerExampleLoss, x: Tensor, y: Tensor
) -> list[list[tuple[Tensor, Tensor]]]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    outputs: list[Tensor] = []  # the calls of one example: shapes and dtypes of the probes
    h = module.register_forward_hook(lambda m, args, out: outputs.append(out))
    try:
        with torch.no_grad():
            functional_call(model, (params, buffers), (x[:1],))
    finally:
        h.remove()
    probes = [torch.zeros_like(out) for out in outputs]

    def loss_one(probes: list[Tensor], xn: Tensor, yn: Tensor) -> tuple[Tensor, list[Tensor]]:
        inputs: list[Tensor] = []

        def add_probe(m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            inputs.append(args[0])
            return out + probes[len(inputs) - 1]

        h = module.register_forward_hook(add_probe)
        try:
            out = functional_call(model, (params, buffers), (xn.unsqueeze(0),))
        finally:
            h.remove()
        if len(inputs) != len(probes):
            raise RuntimeError("the module's calls differ from example to example")
        return loss(out, yn.unsqueeze(0)).sum(), inputs

    with warnings.catch_warnings():
        # Ops without a batching rule (e.g. CPU flash attention) run one example at a time.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        deltas, inputs = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0))(probes, x, y)
    return [
        [(a[n, 0].detach(), d[n, 0].detach()) for a, d in zip(inputs, deltas)]
        for n in range(x.shape[0])
    ]


def _layer_io_loop(
    model: nn.Module, module: nn.Module, loss: PerExampleLoss, x: Tensor, y: Tensor
) -> list[list[tuple[Tensor, Tensor]]]:
    """:func:`layer_io` one example at a time through plain autograd."""
    result = []
    for n in range(x.shape[0]):
        calls: list[tuple[Tensor, Tensor]] = []

        def hook(m: nn.Module, args: tuple[Tensor, ...], out: Tensor, calls=calls) -> None:
            out.retain_grad()
            calls.append((args[0].detach(), out))

        h = module.register_forward_hook(hook)
        try:
            model.zero_grad()
            loss(model(x[n : n + 1]), y[n : n + 1]).sum().backward()
        finally:
            h.remove()
        result.append([(a[0], o.grad[0].detach()) for a, o in calls])
    model.zero_grad()
    return result


def _conv_padding(conv: nn.Module) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, from the documented conv semantics."""
    nd = len(conv.kernel_size)
    if conv.padding == "valid":
        return [(0, 0)] * nd
    if conv.padding == "same":
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in conv.padding]


def conv_patches(conv: nn.Module, x: Tensor) -> Tensor:
    """Patches of one example ``x`` (C, *spatial) as (T, groups, C/groups · prod(k)).

    By the definition: for output position o (row-major over the output's spatial dims) the
    window is xp[c, o·s + k·d] for every channel c and kernel offset k (row-major), xp the
    padded input; one window per output position, vmapped.
    """
    pads = _conv_padding(conv)
    flat = [v for before_after in reversed(pads) for v in before_after]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x.unsqueeze(0), flat, mode=mode)[0]
    c = xp.shape[0]
    spatial = xp.shape[1:]
    ks, ss, ds = conv.kernel_size, conv.stride, conv.dilation
    out_sizes = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(spatial, ks, ss, ds)]
    offsets = torch.tensor(list(itertools.product(*[range(k) for k in ks])))  # (K, nd)
    outs = torch.tensor(list(itertools.product(*[range(n) for n in out_sizes])))  # (T, nd)
    stride, dilation = torch.tensor(ss), torch.tensor(ds)

    def window(o: Tensor) -> Tensor:  # o: (nd,) one output position -> (C, K)
        idx = o * stride + offsets * dilation  # (K, nd): input positions of the window
        return xp[(slice(None), *idx.unbind(-1))]

    patches = vmap(window)(outs).reshape(outs.shape[0], -1)  # (T, C * K)
    g = conv.groups
    return patches.reshape(patches.shape[0], g, c // g * math.prod(ks))


def positions(module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """One call of one example as (T, blocks, d_in) inputs and (T, blocks, d_out) gradients."""
    if isinstance(module, nn.Linear):
        return a.reshape(-1, 1, a.shape[-1]), d.reshape(-1, 1, d.shape[-1])
    g = module.groups
    patches = conv_patches(module, a)
    dd = d.reshape(d.shape[0], -1).T  # (T, C_out)
    return patches, dd.reshape(dd.shape[0], g, dd.shape[1] // g)


def homogeneous(a: Tensor, bias: bool) -> Tensor:
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if bias else a


def reference_factors(
    module: nn.Module,
    io: list[list[tuple[Tensor, Tensor]]],
    *,
    approx: str = "expand",
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """A and G per DESIGN.md, as (blocks, d, d), from per-example inputs and δ's.

    expand: A = 1/(N·T) Σ_{n,t} ã ãᵀ,  G = 1/N Σ_{n,t} δ δᵀ
    reduce: A = 1/N Σ_n ā ā ᵀ (ā = mean_t ã),  G = 1/N Σ_n (Σ_t δ)(Σ_t δ)ᵀ
    sum reduction: G multiplied by N. Several calls of one module per example are several
    position groups (expand over calls).
    """
    bias = module.bias is not None and module.bias.requires_grad
    n_examples = len(io)
    a_rows, d_rows = [], []
    for calls in io:
        for a, d in calls:
            pa, pd = positions(module, a, d)
            pa = homogeneous(pa, bias)
            if approx == "expand":
                a_rows.append(pa)
                d_rows.append(pd)
            else:
                a_rows.append(pa.mean(0, keepdim=True))
                d_rows.append(pd.sum(0, keepdim=True))
    a_all = torch.cat(a_rows)  # (rows, blocks, d)
    d_all = torch.cat(d_rows)
    A = torch.einsum("rbi,rbj->bij", a_all, a_all) / a_all.shape[0]
    G = torch.einsum("rbi,rbj->bij", d_all, d_all) / n_examples
    if reduction == "sum":
        G = G * n_examples
    return A, G


def grad_matrix(module: nn.Module, gw: Tensor, gb: Tensor | None) -> Tensor:
    """(blocks, g_dim, a_dim) from weight- and bias-shaped gradients."""
    blocks = getattr(module, "groups", 1)
    out = gw.shape[0]
    m = gw.reshape(blocks, out // blocks, -1)
    if gb is not None:
        m = torch.cat([m, gb.reshape(blocks, out // blocks, 1)], dim=-1)
    return m


def dense_exact(A: Tensor, G: Tensor, grad_m: Tensor, damping: float) -> Tensor:
    """(G⊗A + εI)⁻¹ vec(∇) per block, by a dense solve (row-major vec)."""
    out = []
    for a, g, gm in zip(A, G, grad_m):
        c = torch.kron(g, a)
        sol = torch.linalg.solve(c + damping * torch.eye(c.shape[0], dtype=c.dtype), gm.reshape(-1))
        out.append(sol.reshape(gm.shape))
    return torch.stack(out)


def dense_pi(A: Tensor, G: Tensor, grad_m: Tensor, damping: float) -> Tensor:
    """(G + (√ε/π) I)⁻¹ ∇ (A + √ε·π I)⁻¹ per block, π = sqrt((tr A/dim A)/(tr G/dim G))."""
    out = []
    for a, g, gm in zip(A, G, grad_m):
        pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
        ia = torch.linalg.inv(a + math.sqrt(damping) * pi * torch.eye(a.shape[0], dtype=a.dtype))
        ig = torch.linalg.inv(g + math.sqrt(damping) / pi * torch.eye(g.shape[0], dtype=g.dtype))
        out.append(ig @ gm @ ia)
    return torch.stack(out)


def mse_per_example(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out - y).pow(2).reshape(out.shape[0], -1).sum(1)


def ce_per_example(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


# --------------------------------------------------------------------------- embeddings
def one_hot_rows(indices: Tensor, num_classes: int, padding_idx: int | None) -> Tensor:
    """One-hot float rows of ``indices`` (any shape) as (positions, V); padding rows are 0."""
    flat = indices.reshape(-1)
    rows = F.one_hot(flat, num_classes).to(torch.get_default_dtype())
    if padding_idx is not None:
        rows[flat == padding_idx] = 0.0
    return rows


def embedding_factors(
    module: nn.Embedding,
    io: list[list[tuple[Tensor, Tensor]]],
    *,
    approx: str = "expand",
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Dense A (V×V) and G (D×D) of an embedding as a Linear (no bias) on one-hot inputs.

    ``io`` from :func:`layer_io` with the embedding as module: per example, per call, the
    index tensor of that example and ∂ℓ_n/∂(output). Definitions of docs/math.md.
    """
    n_examples = len(io)
    a_rows, d_rows = [], []
    for calls in io:
        for idx, d in calls:
            a = one_hot_rows(idx, module.num_embeddings, module.padding_idx)
            dd = d.reshape(-1, d.shape[-1])
            if approx == "expand":
                a_rows.append(a)
                d_rows.append(dd)
            else:
                a_rows.append(a.mean(0, keepdim=True))
                d_rows.append(dd.sum(0, keepdim=True))
    a_all, d_all = torch.cat(a_rows), torch.cat(d_rows)
    A = a_all.T @ a_all / a_all.shape[0]
    G = d_all.T @ d_all / n_examples
    return A, G * n_examples if reduction == "sum" else G


# --------------------------------------------------------------------------- attention
def mha_explicit(
    m: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """nn.MultiheadAttention written out (no dropout), batch-first (N, L, E) tensors.

    Returns the output and the internal tensors: the projections q, k, v (before bias_k /
    zero attention are appended) and ctx, the attention output before out_proj. Masks as in
    torch: boolean True = not allowed, float = added to the scores.
    """
    e, h = m.embed_dim, m.num_heads
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq, bk, bv = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3
    q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    internals = {"q": q, "k": k, "v": v}
    n = q.shape[0]
    kk, vv = k, v
    extra = 0
    if m.bias_k is not None:
        kk = torch.cat([kk, m.bias_k.reshape(1, 1, e).expand(n, 1, e)], 1)
        vv = torch.cat([vv, m.bias_v.reshape(1, 1, e).expand(n, 1, e)], 1)
        extra += 1
    if m.add_zero_attn:
        kk = torch.cat([kk, kk.new_zeros(n, 1, e)], 1)
        vv = torch.cat([vv, vv.new_zeros(n, 1, e)], 1)
        extra += 1
    hd = e // h

    def heads(t: Tensor) -> Tensor:
        return t.reshape(n, t.shape[1], h, hd).transpose(1, 2)

    scores = heads(q) @ heads(kk).transpose(-1, -2) / math.sqrt(hd)  # (N, H, L, S')
    bias = torch.zeros_like(scores)
    if attn_mask is not None:
        am = attn_mask
        if am.dim() == 3:  # (N·H, L, S)
            am = am.reshape(n, h, *am.shape[1:])
        am = F.pad(am, (0, extra))
        bias = bias + (
            torch.zeros_like(am, dtype=scores.dtype).masked_fill(am, float("-inf"))
            if am.dtype == torch.bool
            else am
        )
    if key_padding_mask is not None:
        kpm = F.pad(key_padding_mask, (0, extra))[:, None, None, :]
        bias = bias.masked_fill(kpm, float("-inf"))
    ctx = (torch.softmax(scores + bias, -1) @ heads(vv)).transpose(1, 2).reshape(n, -1, e)
    internals["ctx"] = ctx
    return F.linear(ctx, m.out_proj.weight, m.out_proj.bias), internals


class ExplicitMHA(nn.Module):
    """Stands in for an nn.MultiheadAttention (same parameters) and records its internals."""

    def __init__(self, m: nn.MultiheadAttention) -> None:
        super().__init__()
        self.m = m
        self.calls: list[dict[str, Tensor]] = []

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):  # fmt: skip
        bf = self.m.batch_first or query.dim() == 2
        unbatched = query.dim() == 2

        def to_bf(t: Tensor) -> Tensor:
            if unbatched:
                return t.unsqueeze(0)
            return t if bf else t.transpose(0, 1)

        out, internals = mha_explicit(
            self.m, to_bf(query), to_bf(key), to_bf(value), key_padding_mask, attn_mask
        )
        internals.update(query=to_bf(query), key=to_bf(key), value=to_bf(value), out=out)
        for t in internals.values():
            if t.requires_grad:
                t.retain_grad()
        self.calls.append(internals)
        out = out[0] if unbatched else (out if bf else out.transpose(0, 1))
        return out, None


def mha_io(
    model: nn.Module, mha: nn.MultiheadAttention, loss: PerExampleLoss, x, y: Tensor
) -> list[list[dict[str, Tensor]]]:
    """Per example n, per call of ``mha``: its inputs, internals and their gradients ∂ℓ_n/∂·.

    Runs each example alone through a hook-free copy of the model whose attention is
    :class:`ExplicitMHA`. ``x`` is a tensor (batch first) or a tuple of them. Keys of each call:
    query, key, value, q, k, v, ctx, out and d_q, d_k, d_v, d_ctx, d_out (batch-first, N = 1
    squeezed).
    """
    name = next(k for k, m in model.named_modules() if m is mha)
    model = clean_copy(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    explicit = ExplicitMHA(getattr(parent, child))
    setattr(parent, child, explicit)
    xs = x if isinstance(x, tuple) else (x,)
    result = []
    for n in range(y.shape[0]):
        explicit.calls.clear()
        model.zero_grad()
        loss(model(*(t[n : n + 1] for t in xs)), y[n : n + 1]).sum().backward()
        calls = []
        for c in explicit.calls:
            rec = {k: v.detach()[0] for k, v in c.items()}
            for k in ("q", "k", "v", "ctx", "out"):
                rec["d_" + k] = c[k].grad[0].detach()
            calls.append(rec)
        result.append(calls)
    return result


def linear_factors_from_rows(
    a_rows: list[Tensor], d_rows: list[Tensor], n_examples: int, bias: bool, reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """Expand-mode A, G from per-(example, call) row blocks (T, d_in), (T, d_out)."""
    a_all = homogeneous(torch.cat(a_rows), bias)
    d_all = torch.cat(d_rows)
    A = a_all.T @ a_all / a_all.shape[0]
    G = d_all.T @ d_all / n_examples
    return A, G * n_examples if reduction == "sum" else G


def dense_exact_matrix(A: Tensor, G: Tensor, grad_m: Tensor, damping: float) -> Tensor:
    """(G⊗A + εI)⁻¹ vec(∇) for one block with arbitrary (e.g. diagonal-embedded) A and G."""
    return dense_exact(A.unsqueeze(0), G.unsqueeze(0), grad_m.unsqueeze(0), damping)[0]


def block_diagonal_part(M: Tensor, block: int) -> Tensor:
    """M with everything outside diagonal blocks of size ``block`` zeroed (last block shorter)."""
    out = torch.zeros_like(M)
    for s in range(0, M.shape[0], block):
        out[s : s + block, s : s + block] = M[s : s + block, s : s + block]
    return out
