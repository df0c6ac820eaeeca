"""nn.MultiheadAttention as four Linear layers: the q, k, v input projections and out_proj.

The module applies its projections functionally (F.multi_head_attention_forward), so no
module hook sees them and the tensors K-FAC needs are internal: the projections' outputs
q, k, v (whose gradients are G's rows) and the attention's output before out_proj (A's rows of
out_proj). What the hooks do see: the inputs query, key, value (A's rows of the q, k, v
projections) and the gradient w.r.t. the module's output (G's rows of out_proj).

The rest is recomputed in the backward pass, on statistics steps only, with torch's own
attention code: the projections are applied here, and their outputs are fed to a hook-free
twin of the module whose projection weights are identity matrices and which has no biases.
Multiplying by the identity is exact in floating point, so the twin's output is exactly the
attention output before out_proj, and back-propagating ∂L/∂(that output) = ∂L/∂y · W_out
through it gives ∂L/∂q, ∂L/∂k, ∂L/∂v. Masks, ``is_causal``, ``need_weights``,
``add_zero_attn`` and ``bias_k``/``bias_v`` go through unchanged; attention dropout draws the
same mask because the random-number state of the forward call is replayed (and restored
after); the autocast state of the forward call is restored too. Cost: on statistics steps,
about one more forward and backward pass of the module.

Layout: (L, N, E) inputs, or (N, L, E) with batch_first, or unbatched (L, E). The q projection
has the query's L positions, k and v the key's S positions. Packed weights
(``in_proj_weight``, 3E × E) are three layers over row blocks of one parameter; with
``kdim``/``vdim`` different from E the separate ``q/k/v_proj_weight`` are used, and the bias is
always the packed ``in_proj_bias``. Gradients that reach the module through the returned
attention weights (need_weights=True and a loss that uses them) are not part of the
statistics. ``bias_k`` / ``bias_v`` are left to the optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._grads import is_dtensor
from .base import LayerAdapter, ModuleAdapter, Observation

_NAMES = ("q_proj", "k_proj", "v_proj")


class _Projection(LayerAdapter):
    """One projection of a MultiheadAttention as a Linear layer (never hooked itself)."""

    kind = "MultiheadAttention"

    def __init__(
        self,
        mha: nn.MultiheadAttention,
        suffix: str,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        rows: slice | None,
        bias_rows: slice | None,
        in_dim: int,
    ) -> None:
        super().__init__(
            mha, blocks=1, a_dim0=in_dim, g_dim=mha.embed_dim, weight=weight, bias=bias,
            suffix=suffix,
        )  # fmt: skip
        self.rows = rows
        self.bias_rows = bias_rows

    def regions(self) -> list[tuple[nn.Parameter, Any]]:
        def key(rows: slice | None) -> Any:
            return None if rows is None else (rows.start, rows.stop)

        out: list[tuple[nn.Parameter, Any]] = [(self.weight, key(self.rows))]
        if self.bias is not None:
            out.append((self.bias, key(self.bias_rows)))
        return out

    def inputs(self, x: Tensor) -> Tensor:
        return x.unsqueeze(2)  # already (N, T, features)

    def output_grads(self, grad: Tensor) -> Tensor:
        return grad.unsqueeze(2)

    def weight_matrix(self, t: Tensor) -> Tensor:
        t = t if self.rows is None else t[self.rows]
        return t.reshape(1, self.g_dim, self.a_dim0)

    def bias_matrix(self, t: Tensor) -> Tensor:
        t = t if self.bias_rows is None else t[self.bias_rows]
        return t.reshape(1, self.g_dim, 1)


@dataclass
class _Call:
    query: Tensor
    key: Tensor
    value: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    self_attention: bool
    training: bool
    rng: tuple[Tensor, torch.device, Tensor | None] | None
    autocast: tuple[str, bool, torch.dtype]


@contextlib.contextmanager
def _replay_rng(state: tuple[Tensor, torch.device, Tensor | None] | None) -> Iterator[None]:
    """Run with the random-number state of a forward call; restore the current one after."""
    if state is None:
        yield
        return
    cpu_state, device, device_state = state
    devices = [device] if device_state is not None else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.set_rng_state(cpu_state)
        if device_state is not None:
            torch.get_device_module(device.type).set_rng_state(device_state, device)
        yield


class MultiheadAttentionAdapter(ModuleAdapter):
    """nn.MultiheadAttention: layers ``.q_proj``, ``.k_proj``, ``.v_proj``, ``.out_proj``."""

    kind = "MultiheadAttention"
    needs_pre_hook = True

    def __init__(self, module: nn.MultiheadAttention) -> None:
        super().__init__(module)
        self.mha = module
        m = module
        e = m.embed_dim
        bias = m.in_proj_bias if isinstance(m.in_proj_bias, nn.Parameter) else None
        projections: list[LayerAdapter] = []
        if m._qkv_same_embed_dim:
            w = m.in_proj_weight
            assert isinstance(w, nn.Parameter)
            if w.requires_grad:
                for i, name in enumerate(_NAMES):
                    rows = slice(i * e, (i + 1) * e)
                    projections.append(_Projection(m, "." + name, w, bias, rows, rows, e))
        else:
            dims = (e, m.kdim, m.vdim)
            for i, (name, dim) in enumerate(zip(_NAMES, dims)):
                w = getattr(m, name + "_weight")
                if w.requires_grad:
                    rows = slice(i * e, (i + 1) * e)
                    projections.append(_Projection(m, "." + name, w, bias, None, rows, dim))
        out_w, out_b = m.out_proj.weight, m.out_proj.bias
        if isinstance(out_w, nn.Parameter) and out_w.requires_grad:
            out_bias = out_b if isinstance(out_b, nn.Parameter) else None
            projections.append(_Projection(m, ".out_proj", out_w, out_bias, None, None, e))
        self._layers = projections
        self._twin: nn.MultiheadAttention | None = None

    @property
    def layers(self) -> Sequence[LayerAdapter]:
        return self._layers

    def unsupported_reason(self, param: nn.Parameter) -> str:
        m = self.mha
        if param is m.bias_k or param is m.bias_v:
            return (
                "MultiheadAttention bias_k/bias_v: appended to the keys/values inside the "
                "attention, no per-example rule"
            )
        return (
            "MultiheadAttention: bias of a frozen projection weight (no Kronecker layer); "
            "left to the optimizer"
        )

    # ------------------------------------------------------------------ forward side
    def check_compiled(self, name: str) -> None:
        """Attention dropout under torch.compile: the recomputation replays the eager
        random-number stream, which inductor's compiled dropout does not draw from unless
        ``torch._inductor.config.fallback_random`` is set."""
        m = self.mha
        if not (m.training and m.dropout > 0):
            return
        import torch._inductor.config as inductor_config  # loaded: compilation is in use

        if inductor_config.fallback_random:
            return
        raise RuntimeError(
            f"MultiheadAttention {name!r} with dropout={m.dropout} in a torch.compile'd "
            "model: K-FAC recomputes the attention in the backward pass with the forward "
            "call's random-number state, but compiled dropout draws its masks from "
            "inductor's own generator, so the statistics would not match the forward pass. "
            "Set torch._inductor.config.fallback_random = True (compiled dropout then draws "
            "from torch's generator), use dropout=0, or leave the attention out "
            "(skip_layers)"
        )

    def before_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        m = self.mha
        if not (m.training and m.dropout > 0):
            return None
        query = args[0] if args else kwargs["query"]
        device = query.device
        device_state = None
        if device.type != "cpu":
            device_state = torch.get_device_module(device.type).get_rng_state(device)
        return torch.get_rng_state(), device, device_state

    def save(self, args: tuple[Any, ...], kwargs: dict[str, Any], before: Any) -> Any:
        kwargs = dict(kwargs)
        qkv = list(args[:3])
        for name in ("query", "key", "value")[len(qkv) :]:
            qkv.append(kwargs.pop(name))
        query, key, value = qkv
        device_type = query.device.type
        return _Call(
            query=query.detach(),
            key=key.detach(),
            value=value.detach(),
            args=tuple(args[3:]),
            kwargs=kwargs,
            self_attention=query is key and key is value,
            training=self.mha.training,
            rng=before,
            autocast=(
                device_type,
                torch.is_autocast_enabled(device_type),
                torch.get_autocast_dtype(device_type),
            ),
        )

    def output(self, out: Any) -> Tensor | None:
        return out[0] if isinstance(out, tuple) and isinstance(out[0], Tensor) else None

    # ------------------------------------------------------------------ backward side
    # (The weights are read whole: under FSDP2, step() recomputes calls (EKFAC, the exact
    # form) after the parameters were resharded; every rank does it in the same order.)
    def _twin_module(self) -> nn.MultiheadAttention:
        """A hook-free copy of the module's configuration (its parameters are set per call)."""
        if self._twin is None:
            m = self.mha
            with torch.random.fork_rng(devices=[]):  # initialization must not draw numbers
                self._twin = nn.MultiheadAttention(
                    m.embed_dim,
                    m.num_heads,
                    dropout=m.dropout,
                    bias=False,
                    add_bias_kv=m.bias_k is not None,
                    add_zero_attn=m.add_zero_attn,
                    batch_first=m.batch_first,
                    device="meta",
                )
        return self._twin

    def _projections(self, call: _Call) -> tuple[Tensor, Tensor, Tensor]:
        m = self.mha
        b = _whole(m.in_proj_bias) if m.in_proj_bias is not None else None
        if m._qkv_same_embed_dim:
            w = _whole(m.in_proj_weight)
            if call.self_attention:
                q, k, v = F.linear(call.query, w, b).chunk(3, dim=-1)
                return q, k, v
            ws = w.chunk(3)
        else:
            ws = (_whole(m.q_proj_weight), _whole(m.k_proj_weight), _whole(m.v_proj_weight))
        bs = b.chunk(3) if b is not None else (None, None, None)
        return (
            F.linear(call.query, ws[0], bs[0]),
            F.linear(call.key, ws[1], bs[1]),
            F.linear(call.value, ws[2], bs[2]),
        )

    def _recompute(self, call: _Call, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The attention output before out_proj and ∂L/∂q, ∂L/∂k, ∂L/∂v of one call."""
        m = self.mha
        twin = self._twin_module()
        e = m.embed_dim
        w_out = _whole(m.out_proj.weight)
        eye = torch.eye(e, dtype=w_out.dtype, device=w_out.device)
        twin.in_proj_weight = nn.Parameter(eye.repeat(3, 1), requires_grad=False)
        twin.out_proj.weight = nn.Parameter(eye, requires_grad=False)
        if m.bias_k is not None and m.bias_v is not None:
            twin.bias_k = nn.Parameter(_whole(m.bias_k), requires_grad=False)
            twin.bias_v = nn.Parameter(_whole(m.bias_v), requires_grad=False)
        twin.dropout = m.dropout
        twin.train(call.training)
        device_type, enabled, dtype = call.autocast
        try:
            with (
                torch.enable_grad(),
                _replay_rng(call.rng),
                torch.autocast(device_type, dtype=dtype, enabled=enabled),
            ):
                q, k, v = (t.detach().requires_grad_() for t in self._projections(call))
                ctx = nn.MultiheadAttention.forward(twin, q, k, v, *call.args, **call.kwargs)[0]
                grad_ctx = (grad.to(w_out.dtype) @ w_out).to(ctx.dtype)
                dq, dk, dv = torch.autograd.grad(ctx, (q, k, v), grad_ctx, allow_unused=True)
        finally:
            # Drop the per-call tensors: the twin holds nothing between calls.
            twin.in_proj_weight = None  # type: ignore[assignment]
            twin.out_proj.weight = None  # type: ignore[assignment]
            twin.bias_k = twin.bias_v = None
        grads = tuple(
            torch.zeros_like(t) if d is None else d for d, t in zip((dq, dk, dv), (q, k, v))
        )
        return ctx.detach(), grads[0], grads[1], grads[2]

    def _layout(self, t: Tensor) -> Tensor:
        """(L, N, E) / (N, L, E) / (L, E) -> (N, L, E)."""
        if t.dim() == 2:
            return t.unsqueeze(0)
        return t if self.mha.batch_first else t.transpose(0, 1)

    def observe(
        self, saved: Any, grad: Tensor, layers: Sequence[int], params: Sequence[nn.Parameter]
    ) -> Observation:
        obs = Observation()
        if not layers:
            return obs
        call: _Call = saved
        ctx, dq, dk, dv = self._recompute(call, grad)
        rows = {
            ".q_proj": (call.query, dq),
            ".k_proj": (call.key, dk),
            ".v_proj": (call.value, dv),
            ".out_proj": (ctx, grad),
        }
        for i in layers:
            layer = self._layers[i]
            x, g = rows[layer.suffix]
            obs.kron.append((i, layer.inputs(self._layout(x)), layer.output_grads(self._layout(g))))
        return obs


def _whole(t: Tensor) -> Tensor:
    """A parameter's values, detached; all of them for a sharded one (a collective)."""
    t = t.detach()
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]
