"""What each rank runs in the distributed tests, and the one-process runs they are compared to.

Everything is float64 (model, data, factors) so that "the same parameters" can be checked to
~1e-10. Data are generated from the step number alone: every rank, and the one-process
reference, see slices of the same global batch.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kfac_ef import DistributedOptions, KFACPreconditioner, mc_backward

from . import internals
from .helpers import seed_preconditioner
from .reference import clean_copy


@dataclass(frozen=True)
class Scenario:
    """One training run: K-FAC and distribution options, local batch sizes, steps."""

    name: str
    fraction: float | str = "comm_opt"
    mode: str = "exact"
    reduction: str = "mean"
    sizes: tuple[int, ...] = ()  # local batch size per rank (default: 4 each)
    accumulate: bool = False  # two micro-batches per rank, the first under no_sync()
    no_sync: bool = True  # False: accumulate with DDP syncing both micro-batches
    bucket_cap_mb: float = 25.0
    factor_sync: str = "update"
    overlap: bool = True
    steps: int = 4
    resume_at: int | None = None  # rebuild model + preconditioner from rank 0's checkpoint
    ranks: tuple[int, ...] | None = None  # train on this subgroup only
    kfac: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"  # "mlp" (make_model) or "tokens" (TokenNet: structured factors)
    scaler: bool = False  # loss scaled by a torch.amp.GradScaler (passed as grad_scaler)
    mc: bool = False  # fisher_type="mc" through mc_backward, targets drawn per global batch
    step_loss: bool = False  # step(loss=per-example losses) (relative constraint units)
    momentum: float = 0.0  # of the workers' SGD

    def local_sizes(self, world: int) -> list[int]:
        n = len(self.ranks) if self.ranks is not None else world
        return list(self.sizes) if self.sizes else [4] * n

    def kfac_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = dict(
            damping=0.1,
            factor_decay=0.5,
            inv_update_steps=2,
            loss_reduction=self.reduction,
            damping_mode=self.mode,
            factor_dtype=torch.float64,
        )
        if self.mc:
            opts["fisher_type"] = "mc"
        opts.update(self.kfac)
        return opts

    @property
    def measures(self) -> bool:
        """Whether step() keeps diagnostics (a constraint or track_loss_changes)."""
        return self.kfac.get("constraint", "none") != "none" or bool(
            self.kfac.get("track_loss_changes")
        )


def make_model(width: int = 6) -> nn.Module:
    """A grouped conv, Linears with and without bias, two of the same shape (one bucket)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, width),
        nn.Tanh(),
        nn.Linear(width, 6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 3, bias=False),
    ).double()


class TokenNet(nn.Module):
    """Every kind of factor storage and statistics unit, small enough for float64 processes:

    - ``pos``: an embedding (A diagonal by structure, 4 positions);
    - ``tok`` tied to ``head``: the head owns the tied weight, its G is vocabulary-wide (11);
    - ``attn``: nn.MultiheadAttention, four Linear layers over row blocks of one packed
      parameter (which may be preconditioned on different ranks);
    - ``norm``: a LayerNorm, diagonal with other_params="diagonal";
    - ``up`` (G 13 wide) and ``down`` (A 14 wide): past max_factor_dim=8 (see TOKEN_KFAC),
      block-diagonal or diagonal.
    """

    def __init__(self, vocab: int = 11, dim: int = 6, context: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 13)
        self.down = nn.Linear(13, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        n, t = idx.shape
        positions = torch.arange(t, device=idx.device).expand(n, t)  # per example
        h = self.tok(idx) + self.pos(positions)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h)
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


# Factor storage of TokenNet's scenarios: widths above 8 block-diagonal (blocks of ≤ 4) or,
# with large_factor_block=1, diagonal; norms and lone biases diagonal.
TOKEN_KFAC: dict[str, Any] = {"max_factor_dim": 8, "large_factor_block": 4}
TOKEN_DIAG: dict[str, Any] = {"other_params": "diagonal"}


def make(name: str) -> nn.Module:
    return make_model() if name == "mlp" else TokenNet().double()


def batch(step: int, n: int, model: str = "mlp") -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    if model == "tokens":
        idx = torch.randint(0, 11, (n, 4), generator=g)
        return idx, torch.randint(0, 11, (n, 4), generator=g)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, y


def losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-example losses: squared error, or cross-entropy summed over positions (tokens)."""
    return losses_of(model(x), y)


def losses_of(out: Tensor, y: Tensor) -> Tensor:
    if out.dim() == 3:
        return nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)
    return ((out - y) ** 2).sum(dim=1)


def mc_noise(step: int, n: int, model: str) -> Tensor:
    """Noise of the sampled targets of a global batch (sliced like the data): Gumbel noise
    for the tokens' logits (argmax(logits + Gumbel) ~ softmax), standard normal for the
    regression outputs."""
    g = torch.Generator().manual_seed(2000 + step)
    if model == "tokens":
        u = torch.rand(n, 4, 11, generator=g, dtype=torch.float64)
        return -torch.log(-torch.log(u.clamp_min(1e-300)))
    return torch.randn(n, 3, generator=g, dtype=torch.float64)


def backward_pass(
    pre: KFACPreconditioner,
    model: nn.Module,
    sc: Scenario,
    x: Tensor,
    y: Tensor,
    loss_of: Any,
    noise: Tensor,
    scaler: torch.amp.GradScaler | None,
) -> Tensor:
    """One forward and backward (``loss_of(per-example losses)`` is the loss), through
    mc_backward with targets from ``noise`` for MC scenarios; returns the per-example losses."""
    out = model(x)
    values = losses_of(out, y)
    loss = loss_of(values)
    if scaler is not None:
        loss = scaler.scale(loss)
    if not sc.mc:
        loss.backward()
    elif out.dim() == 3:  # logits (N, T, V): class dimension second for cross-entropy
        targets = (out.detach() + noise).argmax(-1)
        mc_backward(pre, loss, out.transpose(1, 2), likelihood="categorical", targets=targets)
    else:
        mc_backward(pre, loss, out, likelihood="gaussian", targets=out.detach() + noise)
    return values.detach()


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


# ---------------------------------------------------------------------- ranks


def _local(x: Tensor, sizes: list[int], r: int) -> Tensor:
    lo = sum(sizes[:r])
    return x[lo : lo + sizes[r]]


def _train_ranks(sc: Scenario, group: Any, r: int, world: int) -> dict[str, Any]:
    sizes = sc.local_sizes(world)
    w = len(sizes)
    model = DistributedDataParallel(make(sc.model), process_group=group)
    opts = DistributedOptions(
        process_group=group,
        grad_worker_fraction=sc.fraction,
        factor_sync=sc.factor_sync,
        overlap=sc.overlap,
        bucket_cap_mb=sc.bucket_cap_mb,
    )
    scaler = _scaler(sc)
    pre = seed_preconditioner(model, distributed=opts, grad_scaler=scaler, **sc.kfac_options())
    assert pre.distributed is not None
    opt = _optimizer(sc, model, pre)
    out: dict[str, Any] = {
        "params": [],
        "launched_in_backward": [],
        "before_first_layer": [],
        "diagnostics": [],
    }
    seen: list[int] = []

    def before_first_layer(module: nn.Module, args: Any, output: Tensor) -> None:
        # The gradient of the first layer's activation arrives just before the first
        # layer's own: how many reductions of statistics have started by then?
        output.register_hook(lambda g: seen.append(pre.distributed.calls["statistics"]))  # type: ignore[union-attr]

    if sc.model == "mlp":
        model.module[1].register_forward_hook(before_first_layer)
    assert sc.resume_at is None or sc.bucket_cap_mb >= 1, "the probe does not survive resume"
    for step in range(sc.steps):
        if sc.resume_at is not None and step == sc.resume_at:
            state = [pre.state_dict() if r == 0 else None, model.module.state_dict()]
            dist.broadcast_object_list(state, src=dist.get_global_rank(group, 0), group=group)
            pre.remove()
            inner = make(sc.model)
            inner.load_state_dict(state[1])
            model = DistributedDataParallel(inner, process_group=group)
            pre = seed_preconditioner(model, distributed=opts, **sc.kfac_options())
            pre.load_state_dict(state[0])
            opt = _optimizer(sc, model, pre)
        assert pre.distributed is not None
        x, y = batch(step, sum(sizes), sc.model)
        x, y = _local(x, sizes, r), _local(y, sizes, r)
        noise = _local(mc_noise(step, sum(sizes), sc.model), sizes, r)
        opt.zero_grad()
        sent = pre.distributed.communicated().get("statistics", 0)
        calls = pre.distributed.calls["statistics"]
        if sc.accumulate:
            h = x.shape[0] // 2

            def half(v: Tensor) -> Tensor:
                return _reduce(v, sc.reduction, 2)

            with model.no_sync() if sc.no_sync else contextlib.nullcontext():
                first = backward_pass(pre, model, sc, x[:h], y[:h], half, noise[:h], scaler)
            second = backward_pass(pre, model, sc, x[h:], y[h:], half, noise[h:], scaler)
            values = torch.cat([first, second])
        else:

            def whole(v: Tensor) -> Tensor:
                return _reduce(v, sc.reduction, 1)

            values = backward_pass(pre, model, sc, x, y, whole, noise, scaler)
        out["launched_in_backward"].append(
            pre.distributed.communicated().get("statistics", 0) > sent
        )
        out["before_first_layer"].append(seen[-1] - calls if seen else None)
        _step(pre, opt, scaler, values if sc.step_loss else None)
        out["params"].append(flat_params(model))
        if sc.measures:
            out["diagnostics"].append(pre.diagnostics().as_dict())
    out["factors"] = pre.factors()
    out["fishers"] = pre.diagonal_fishers()
    out["state"] = pre.state_dict()
    out["bytes"] = pre.distributed.communicated()
    out["decomposition_bytes"] = {s.name: s.decomposition_bytes for s in pre.summary().layers}
    out["preconditions"] = {
        layer.name: pre.distributed.preconditions(layer) for layer in internals.layers(pre)
    }
    out["holds"] = {layer.name: layer.decomposition is not None for layer in internals.layers(pre)}
    out["world"] = w
    return out


def _optimizer(sc: Scenario, model: nn.Module, pre: KFACPreconditioner) -> torch.optim.SGD:
    """The workers' SGD; attached to the preconditioner under constrained_step="optimizer"
    or precondition_update."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=sc.momentum)
    if pre.options.constrained_step == "optimizer" or pre.options.precondition_update:
        pre.attach(opt)
    return opt


def _scaler(sc: Scenario) -> torch.amp.GradScaler | None:
    # A power of two: scaling and unscaling are exact, so the comparison stays at ~1e-10.
    return torch.amp.GradScaler("cpu", init_scale=2.0**10) if sc.scaler else None


def _step(
    pre: KFACPreconditioner,
    opt: torch.optim.Optimizer,
    scaler: Any,
    step_loss: Tensor | None = None,
) -> None:
    """The documented order with a GradScaler: unscale_, precondition, step, update."""
    if scaler is None:
        pre.step(loss=step_loss)
        opt.step()
        return
    scaler.unscale_(opt)
    pre.step(loss=step_loss)
    scaler.step(opt)
    scaler.update()


def _reduce(values: Tensor, reduction: str, micro: int) -> Tensor:
    """Mean over the micro-batch, divided by the number of micro-batches; or the plain sum."""
    return values.mean() / micro if reduction == "mean" else values.sum()


def train_scenarios(rank: int, world: int, scenarios: list[Scenario]) -> dict[str, Any]:
    """Every scenario on this rank; results by scenario name (None where not a member)."""
    results: dict[str, Any] = {}
    for sc in scenarios:
        if sc.ranks is None:
            group = dist.group.WORLD
            results[sc.name] = _train_ranks(sc, group, rank, world)
        else:
            group = dist.new_group(list(sc.ranks))  # every rank calls new_group
            if rank in sc.ranks:
                results[sc.name] = _train_ranks(sc, group, list(sc.ranks).index(rank), world)
            else:
                results[sc.name] = None
    return results


def mismatched_layers(rank: int, world: int) -> str:
    """Rank 1 builds a wider model: every rank must raise the same clear error.

    (No DDP wrapper here: DDP checks parameter shapes itself; K-FAC's check also covers
    data-parallel training without it and options that differ.)
    """
    model = make_model(width=6 if rank != 1 else 7)
    try:
        seed_preconditioner(model)
    except ValueError as exc:
        return str(exc)
    return "no error"


def dead_peer(rank: int, world: int, how: str) -> dict[str, Any]:
    """One step together, then rank 1 exits (or hangs); rank 0's next step() must fail."""
    model = make_model()  # no DDP: K-FAC's own collectives are the ones to notice
    pre = seed_preconditioner(model, distributed=True, **Scenario("x").kfac_options())
    x, y = batch(0, 4)
    losses(model, x, y).mean().backward()
    pre.step()
    if rank == 1:
        if how == "exit":
            os._exit(3)
        time.sleep(600)
    model.zero_grad()
    losses(model, x, y).mean().backward()
    start = time.monotonic()
    try:
        pre.step()
    except RuntimeError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def dead_before_backward(rank: int, world: int, ddp: bool) -> dict[str, Any]:
    """One step together, then rank 1 exits before its next backward; rank 0's next
    backward and step() (K-FAC's collectives launch during the backward) must fail with an
    error that says what happened."""
    model: nn.Module = make_model()
    if ddp:  # no buffers to broadcast: the next forward sends nothing
        model = DistributedDataParallel(model, broadcast_buffers=False)
    pre = seed_preconditioner(model, distributed=True, **Scenario("x").kfac_options())
    x, y = batch(0, 4)
    for _ in range(2):  # DDP rebuilds its buckets after the first iteration (a broadcast)
        model.zero_grad()
        losses(model, x, y).mean().backward()
        pre.step()
    if rank == 1:
        os._exit(3)
    time.sleep(0.5)  # let the peer's exit reach the connections
    return _next_step_error(model, pre, x, y)


def _next_step_error(
    model: nn.Module, pre: KFACPreconditioner, x: Tensor, y: Tensor
) -> dict[str, Any]:
    """The error of one more backward and step(), if any."""
    model.zero_grad()
    try:
        losses(model, x, y).mean().backward()
        pre.step()
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"error": None}


def launch_fails(rank: int, world: int) -> dict[str, Any]:
    """Rank 0's next statistics all-reduce fails to launch (as gloo does when a peer's
    connection is already closed): the error from its backward pass names kfac_ef."""
    model = make_model()
    pre = seed_preconditioner(model, distributed=True, **Scenario("x").kfac_options())
    x, y = batch(0, 4)
    losses(model, x, y).mean().backward()
    pre.step()
    if rank == 1:
        return {"error": None}

    def closed(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Connection closed by peer")

    dist.all_reduce = closed  # this process only
    return _next_step_error(model, pre, x, y)


class Branchy(nn.Module):
    """A trunk, a head, a branch used only when asked, and a layer never used."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)
        self.extra = nn.Linear(4, 3)
        self.never = nn.Linear(4, 3)

    def forward(self, x: Tensor, use_extra: bool) -> Tensor:
        h = torch.tanh(self.trunk(x))
        return self.head(h) + (self.extra(h) if use_extra else 0.0)


def branch_batch(rank: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(50 + rank)
    return torch.randn(3 + rank, 5, generator=g), torch.randn(3 + rank, 3, generator=g)


def partly_used_layers(rank: int, world: int, distributed: bool) -> dict[str, Any]:
    """Rank 0 alone uses ``extra``; nobody uses ``never``. Factors after one step."""
    model = Branchy().double()
    opts: Any = DistributedOptions(overlap=False) if distributed else False
    pre = seed_preconditioner(model, factor_dtype=torch.float64, distributed=opts)
    x, y = branch_batch(rank)
    ((model(x.double(), use_extra=rank == 0) - y.double()) ** 2).sum(1).mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "never" has no statistics
        pre.step()
    assert pre.distributed is not None or not distributed
    return {
        "factors": pre.factors(),
        "updates": {layer.name: layer.updates for layer in internals.layers(pre)},
        "grads": {k: p.grad for k, p in model.named_parameters() if p.grad is not None},
    }


def identical_training(rank: int, world: int, fraction: str) -> list[Tensor]:
    """A short training run (float32, default options): parameters after every step."""
    torch.manual_seed(0)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    )
    opts = DistributedOptions(grad_worker_fraction=fraction)
    pre = seed_preconditioner(model, damping=0.05, inv_update_steps=3, distributed=opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(10):
        x = torch.randn(8, 8, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
        out.append(flat_params(model))
    return out


# ---------------------------------------------------------------------- one process


def reference_run(sc: Scenario, world: int) -> dict[str, Any]:
    """The same training on one process, on the concatenated global batch.

    Its loss is the one whose gradient DDP produces: the global mean for "mean" (with even
    local batches), Σ ℓ_n / W for "sum". With uneven local batches and "mean", DDP's gradient
    weights rank r's examples by 1/(W·n_r); the factors still come from the global mean
    loss (the definition), and the gradient handed to step() is replaced by DDP's.
    """
    sizes = sc.local_sizes(world)
    w = len(sizes)
    model = make(sc.model)
    scaler = _scaler(sc)
    pre = seed_preconditioner(model, distributed=False, grad_scaler=scaler, **sc.kfac_options())
    opt = _optimizer(sc, model, pre)
    uneven = len(set(sizes)) > 1
    assert not (scaler is not None and uneven), "DDP's gradient replacement assumes no scaler"
    params = []
    diagnostics = []

    def reduce(v: Tensor) -> Tensor:
        return v.mean() if sc.reduction == "mean" else v.sum() / w

    for step in range(sc.steps):
        x, y = batch(step, sum(sizes), sc.model)
        noise = mc_noise(step, sum(sizes), sc.model)
        opt.zero_grad()
        values = backward_pass(pre, model, sc, x, y, reduce, noise, scaler)
        if uneven and sc.reduction == "mean":
            twin = clean_copy(model)
            ddp_loss = sum(
                losses(twin, _local(x, sizes, r), _local(y, sizes, r)).mean() for r in range(w)
            )
            (ddp_loss / w).backward()  # type: ignore[operator]
            for p, q in zip(model.parameters(), twin.parameters()):
                p.grad.copy_(q.grad)  # type: ignore[union-attr]
        # The per-example losses of this loss: Σ ℓ_n / W for "sum".
        step_loss = (values if sc.reduction == "mean" else values / w) if sc.step_loss else None
        _step(pre, opt, scaler, step_loss)
        params.append(flat_params(model))
        if sc.measures:
            diagnostics.append(pre.diagnostics().as_dict())
    return {
        "diagnostics": diagnostics,
        "params": params,
        "factors": pre.factors(),
        "fishers": pre.diagonal_fishers(),
        "state": pre.state_dict(),
    }


__all__ = [
    "TOKEN_DIAG",
    "TOKEN_KFAC",
    "Scenario",
    "TokenNet",
    "asdict",
    "backward_pass",
    "losses_of",
    "mc_noise",
    "dead_peer",
    "identical_training",
    "make_model",
    "mismatched_layers",
    "partly_used_layers",
    "reference_run",
    "train_scenarios",
]
