"""Coverage by what a module computes, not by its class name.

The exact torch classes (nn.Linear, nn.Conv2d, nn.LayerNorm, ...) have their adapters. Every
other module with parameters is matched here by the formula it is expected to compute, and
covered only if **a probe at construction** confirms it: one forward call on a small random
input (with random values for its small parameters, so that an initialisation such as
γ = 1, β = 0 cannot hide a different formula), compared with the formula. A module whose
probe disagrees, or raises, is left to the optimizer with the reason.

Where the expected formula comes from:

1. a rule registered by the user for the module's class or a base class
   (:func:`register_module`);
2. the torch class it subclasses (a subclass of nn.Linear must compute x Wᵀ + b; timm's
   ``LayerNorm`` is an nn.LayerNorm);
3. built-in rules for classes of other libraries, by class name, without importing them:
   transformers' ``Conv1D`` (y = x W + b, W of shape (in, out)), RMSNorm variants (HF's
   ``LlamaRMSNorm``, ``Qwen2RMSNorm``, ...), ``LayerNorm`` look-alikes, timm's
   ``LayerNorm2d`` (a LayerNorm over the channels of an NCHW tensor) and LayerScale
   (y = x ⊙ γ).

The formulas (``computes``), with D the feature width, x̂ the normalized input:

- ``"linear"``: y = x Wᵀ + b, W of shape (out, in) — a Kronecker layer, as nn.Linear;
- ``"linear_transposed"``: y = x W + b, W of shape (in, out) — the same Kronecker layer on
  Wᵀ: G over the out features, A over the in features (plus the bias coordinate), and the
  preconditioned gradient written back transposed;
- ``"layer_norm"``: y = x̂ ⊙ γ + β, x̂ = (x - mean) / sqrt(var + eps) over the last dim;
- ``"rms_norm"``: y = x̂ ⊙ γ (+ β), x̂ = x / sqrt(mean(x²) + eps) over the last dim;
- ``"channel_layer_norm"``: ``"layer_norm"`` over dim 1 of an (N, C, ...) input;
- ``"scale"``: y = x ⊙ γ over the last dim; ``"channel_scale"``: over dim 1.

The norm and scale formulas have per-example gradients Σ_t δ ⊙ x̂ (γ) and Σ_t δ (β): their
parameters are preconditioned by their diagonal empirical Fisher with
``other_params="diagonal"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .base import LayerAdapter, ModuleAdapter, module_class
from .diagonal import AffineDiagonalAdapter, _compute_dtype
from .linear import FeatureRows

COMPUTES = (
    "linear",
    "linear_transposed",
    "layer_norm",
    "rms_norm",
    "channel_layer_norm",
    "scale",
    "channel_scale",
)
_NORMS = ("layer_norm", "rms_norm", "channel_layer_norm", "scale", "channel_scale")
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
# Parameters up to this size get random values for the probe (norm scales, biases, small
# weights); larger ones keep theirs (a random copy of a large weight would cost memory).
_PROBE_RANDOM_NUMEL = 1 << 16


@dataclass(frozen=True)
class ModuleRule:
    """What a module class computes, for :func:`register_module`.

    Attributes:
        computes: one of ``COMPUTES`` (see the module docstring).
        weight: attribute name of W (linear kinds) or γ (norms, scales).
        bias: attribute name of b / β, or None (no bias; an attribute that is None or absent
            also means none).
        eps: the norm's ε: a number, or the attribute holding it; None looks for
            ``eps``, ``variance_epsilon`` and ``epsilon``.
    """

    computes: str
    weight: str = "weight"
    bias: str | None = "bias"
    eps: str | float | None = None

    def __post_init__(self) -> None:
        if self.computes not in COMPUTES:
            raise ValueError(f"Invalid computes={self.computes!r}: must be one of {COMPUTES}")


_USER_RULES: dict[type, ModuleRule] = {}


def register_module(
    cls: type[nn.Module],
    computes: str,
    *,
    weight: str = "weight",
    bias: str | None = "bias",
    eps: str | float | None = None,
) -> None:
    """Declare what the modules of ``cls`` (and of its subclasses) compute, so that
    preconditioners built afterwards cover them.

    Each module is still checked at construction by one probe forward call against the
    formula; a module that computes something else is left to the optimizer with the
    reason. Registering a class again replaces its rule.

    Example::

        class MyProjection(nn.Module):          # y = x W + b, W of shape (in, out)
            def __init__(self, d_in, d_out):
                super().__init__()
                self.w = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
                self.b = nn.Parameter(torch.zeros(d_out))

            def forward(self, x):
                return x @ self.w + self.b

        kfac_ef.register_module(MyProjection, "linear_transposed", weight="w", bias="b")

    Args:
        cls: the module class.
        computes: one of ``"linear"`` (y = x Wᵀ + b), ``"linear_transposed"`` (y = x W + b),
            ``"layer_norm"``, ``"rms_norm"``, ``"channel_layer_norm"``, ``"scale"``,
            ``"channel_scale"`` (docs/models.md gives the formulas).
        weight: attribute name of the weight (γ for norms and scales).
        bias: attribute name of the bias (β), or None.
        eps: a norm's ε, or the attribute holding it (default: ``eps``,
            ``variance_epsilon`` or ``epsilon``).

    Raises:
        TypeError: if ``cls`` is not an nn.Module subclass.
        ValueError: if ``computes`` is not one of the above.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"Invalid cls={cls!r}: must be an nn.Module subclass")
    _USER_RULES[cls] = ModuleRule(computes, weight, bias, eps)


def unregister_module(cls: type[nn.Module]) -> None:
    """Forget the rule registered for ``cls`` (nothing if there is none)."""
    _USER_RULES.pop(cls, None)


def _builtin_rule(module: nn.Module) -> ModuleRule | None:
    """Rules for other libraries' classes, by name (their packages are never imported)."""
    cls = module_class(module)
    name, where = cls.__name__, cls.__module__
    if name == "Conv1D" and where.startswith("transformers"):
        return ModuleRule("linear_transposed")
    if name.endswith("RMSNorm"):
        return ModuleRule("rms_norm")
    if name.endswith("LayerNorm2d"):
        return ModuleRule("channel_layer_norm")
    if name.endswith("LayerNorm"):
        return ModuleRule("layer_norm")
    if name == "LayerScale2d":
        return ModuleRule("channel_scale", weight="gamma", bias=None)
    if name == "LayerScale":
        return ModuleRule("scale", weight="gamma", bias=None)
    return None


def find_rule(module: nn.Module) -> tuple[ModuleRule, str] | None:
    """The rule a module is expected to follow and where it comes from, or None."""
    for cls in type(module).__mro__:
        rule = _USER_RULES.get(cls)
        if rule is not None:
            return rule, f"registered for {cls.__name__}"
    rule = _builtin_rule(module)
    return (rule, "built-in rule") if rule is not None else None


# ------------------------------------------------------------------ formulas and probes


def _param(module: nn.Module, name: str | None) -> nn.Parameter | None:
    if name is None:
        return None
    p = getattr(module, name, None)
    return p if isinstance(p, nn.Parameter) else None


def _eps(module: nn.Module, rule: ModuleRule) -> float | None:
    if isinstance(rule.eps, (int, float)):
        return float(rule.eps)
    names = (rule.eps,) if isinstance(rule.eps, str) else _EPS_ATTRS
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _normalize(computes: str, x: Tensor, eps: float) -> Tensor:
    """x̂ of the norm and scale formulas (no affine part), in x's dtype."""
    if computes in ("scale", "channel_scale"):
        return x
    if computes == "channel_layer_norm":
        return F.layer_norm(x.movedim(1, -1), (x.shape[1],), None, None, eps).movedim(-1, 1)
    d = (x.shape[-1],)
    if computes == "rms_norm":
        return F.rms_norm(x, d, None, eps)
    return F.layer_norm(x, d, None, None, eps)


def _formula(computes: str, x: Tensor, w: Tensor, b: Tensor | None, eps: float | None) -> Tensor:
    if computes == "linear":
        return F.linear(x, w, b)
    if computes == "linear_transposed":
        y = x @ w
        return y + b if b is not None else y
    assert eps is not None or computes in ("scale", "channel_scale")
    xhat = _normalize(computes, x, eps or 0.0)
    channel = computes.startswith("channel")
    shape = (1, -1, *([1] * (x.dim() - 2))) if channel else (-1,)
    y = xhat * w.reshape(shape)
    return y + b.reshape(shape) if b is not None else y


def _probe_input(computes: str, w: Tensor, gen: torch.Generator) -> Tensor:
    if computes == "linear":
        shape: tuple[int, ...] = (2, 3, w.shape[-1])
    elif computes == "linear_transposed":
        shape = (2, 3, w.shape[0])
    elif computes.startswith("channel"):
        shape = (2, w.numel(), 3, 2)
    else:
        shape = (2, 3, w.numel())
    dtype = w.dtype if w.dtype.is_floating_point else torch.float32
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(w.device, dtype)


def _random_like(p: Tensor, gen: torch.Generator) -> Tensor:
    return (1.0 + torch.rand(p.shape, generator=gen, dtype=torch.float32)).to(p.device, p.dtype)


def _close(y: Any, ref: Tensor) -> bool:
    if not isinstance(y, Tensor) or y.shape != ref.shape:
        return False
    y, ref = y.float(), ref.float()
    tol = 1e-3 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool(torch.isfinite(y).all()) and bool(((y - ref).abs() <= tol * (1.0 + scale)).all())


def _probe(
    module: nn.Module,
    call_formula: Callable[[dict[str, Tensor], Tensor], Tensor],
    params: dict[str, nn.Parameter],
    x: Tensor,
    gen: torch.Generator,
) -> str | None:
    """Compare one forward call of ``module`` (its small parameters set to random values)
    with the formula; None if they agree, else what went wrong."""
    values = {
        name: _random_like(p, gen) if p.numel() <= _PROBE_RANDOM_NUMEL else p.detach()
        for name, p in params.items()
    }
    try:
        with torch.no_grad():
            ref = call_formula(values, x)
            y = functional_call(module, values, (x.clone(),), strict=False)
    except Exception as exc:  # noqa: BLE001 - any failure means "not this formula"
        return f"the probe call raised {type(exc).__name__}: {str(exc)[:120]}"
    if isinstance(y, (tuple, list)) and y:
        y = y[0]
    if not _close(y, ref):
        return "its output differs from the formula on a probe input"
    return None


def _generator() -> torch.Generator:
    # The probe never touches the global random state (a run with or without the
    # preconditioner draws the same numbers).
    return torch.Generator().manual_seed(0)


def check_rule(module: nn.Module, rule: ModuleRule) -> str | None:
    """Whether ``module`` computes ``rule``'s formula: None if it does, else why not."""
    w = _param(module, rule.weight)
    if w is None:
        return f"no parameter named {rule.weight!r}"
    b = _param(module, rule.bias)
    if w.device.type == "meta":
        return "its parameters are on the meta device (the probe cannot run)"
    computes = rule.computes
    if computes in ("linear", "linear_transposed"):
        if w.dim() != 2:
            return f"{rule.weight!r} is not a matrix (shape {tuple(w.shape)})"
        out = w.shape[0] if computes == "linear" else w.shape[1]
        if b is not None and b.shape != (out,):
            return f"{rule.bias!r} has shape {tuple(b.shape)}, expected ({out},)"
    else:
        if w.dim() != 1 or (b is not None and b.shape != w.shape):
            return f"{rule.weight!r}/{rule.bias!r} are not vectors of one width"
    eps = _eps(module, rule) if computes in _NORMS[:3] else None
    if computes in _NORMS[:3] and eps is None:
        return "no eps attribute (name it in register_module(..., eps=...))"
    gen = _generator()
    x = _probe_input(computes, w, gen)
    wname, bname = rule.weight, rule.bias
    params = {wname: w}
    if b is not None and bname is not None:
        params[bname] = b

    def call(values: dict[str, Tensor], xx: Tensor) -> Tensor:
        bb = values.get(bname) if bname is not None else None
        return _formula(computes, xx, values[wname], bb, eps)

    return _probe(module, call, params, x, gen)


# Subclasses of the exact torch classes: the probe compares with the base class's formula.
def _base_formula(base: type[nn.Module], module: Any) -> Callable[..., Tensor] | None:
    if base is nn.Linear:
        return lambda v, x: F.linear(x, v["weight"], v.get("bias"))
    if base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return lambda v, x: base._conv_forward(module, x, v["weight"], v.get("bias"))  # type: ignore[attr-defined]
    if base is nn.LayerNorm:
        return lambda v, x: F.layer_norm(
            x, module.normalized_shape, v.get("weight"), v.get("bias"), module.eps
        )
    if base is nn.RMSNorm:
        return lambda v, x: F.rms_norm(x, module.normalized_shape, v.get("weight"), module.eps)
    if base is nn.GroupNorm:
        return lambda v, x: F.group_norm(
            x, module.num_groups, v.get("weight"), v.get("bias"), module.eps
        )
    if base is nn.Embedding:
        return lambda v, x: F.embedding(x, v["weight"], module.padding_idx)
    if base is nn.PReLU:
        return lambda v, x: F.prelu(x, v["weight"])
    return None


def _base_input(base: type[nn.Module], module: Any, gen: torch.Generator) -> Tensor | None:
    w: Tensor = module.weight
    dtype = w.dtype if w.dtype.is_floating_point else torch.float32

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen).to(w.device, dtype)

    if base is nn.Linear:
        return randn(2, 3, module.in_features)
    if base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        nd = len(module.kernel_size)
        size = [
            d * (k - 1) + 1 + max(s, 2)
            for k, s, d in zip(module.kernel_size, module.stride, module.dilation)
        ]
        return randn(2, module.in_channels, *size[:nd])
    if base in (nn.LayerNorm, nn.RMSNorm):
        return randn(2, 3, *module.normalized_shape)
    if base is nn.GroupNorm:
        return randn(2, module.num_channels, 3)
    if base is nn.Embedding:
        idx = torch.randint(0, module.num_embeddings, (2, 3), generator=gen)
        return idx.to(w.device)
    if base is nn.PReLU:
        return randn(2, max(module.num_parameters, 1), 3)
    return None


def check_subclass(module: nn.Module, base: type[nn.Module]) -> str | None:
    """Whether a module of a subclass of ``base`` computes what ``base`` computes."""
    formula = _base_formula(base, module)
    params = dict(module.named_parameters(recurse=False))
    w = params.get("weight")
    if formula is None or w is None:
        return f"no probe for subclasses of nn.{base.__name__}"
    if w.device.type == "meta":
        return "its parameters are on the meta device (the probe cannot run)"
    gen = _generator()
    x = _base_input(base, module, gen)
    if x is None:
        return f"no probe for subclasses of nn.{base.__name__}"
    return _probe(module, formula, params, x, gen)


# ------------------------------------------------------------------ adapters


class RuleLinearAdapter(FeatureRows, LayerAdapter):
    """A module following ``"linear"`` (W of shape (out, in)) or ``"linear_transposed"``
    (W of shape (in, out): the Kronecker layer is over Wᵀ, G over the out features)."""

    def __init__(self, module: nn.Module, rule: ModuleRule) -> None:
        w = _param(module, rule.weight)
        assert w is not None
        self.transposed = rule.computes == "linear_transposed"
        d_out, d_in = (w.shape[1], w.shape[0]) if self.transposed else tuple(w.shape)
        super().__init__(
            module, blocks=1, a_dim0=d_in, g_dim=d_out, weight=w, bias=_param(module, rule.bias)
        )
        self.kind = module_class(module).__name__

    def weight_matrix(self, t: Tensor) -> Tensor:
        # W of shape (in, out) reads as the Linear weight Wᵀ (out, in): a transposed view,
        # so the preconditioned gradient is written back in W's own layout.
        return t.t().unsqueeze(0) if self.transposed else t.unsqueeze(0)


class RuleNormAdapter(AffineDiagonalAdapter):
    """A module following a norm or scale formula: per-example gradients Σ_t δ ⊙ x̂ of γ
    and Σ_t δ of β, summed over the positions (every dim but the batch and the feature dim:
    the last one, or dim 1 for the channel formulas)."""

    def __init__(self, module: nn.Module, rule: ModuleRule) -> None:
        super().__init__(module)
        self.computes = rule.computes
        self.eps = _eps(module, rule) or 0.0
        self.weight = _param(module, rule.weight)
        self.bias = _param(module, rule.bias)
        self.channel = rule.computes.startswith("channel")

    def _normalized(self, x: Tensor) -> Tensor:
        return _normalize(self.computes, x.to(_compute_dtype(x)), self.eps)

    def _per_example(self, t: Tensor, x: Tensor) -> Tensor:
        if self.channel:
            return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)
        if self.batch_dim:
            t = t.movedim(self.batch_dim, 0)
        return t.reshape(t.shape[0], -1, t.shape[-1]).sum(dim=1)


def adapt(module: nn.Module, rule: ModuleRule) -> ModuleAdapter:
    if rule.computes in ("linear", "linear_transposed"):
        return RuleLinearAdapter(module, rule)
    return RuleNormAdapter(module, rule)


__all__ = [
    "COMPUTES",
    "ModuleRule",
    "RuleLinearAdapter",
    "RuleNormAdapter",
    "adapt",
    "check_rule",
    "check_subclass",
    "find_rule",
    "register_module",
    "unregister_module",
]
