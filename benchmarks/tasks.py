"""Training tasks on data that ships with installed packages, and one timed training loop.

Shared by time_to_target.py, autoencoder.py and peer.py. Three tasks:

- ``autoencoder``: the deep autoencoder, the classic K-FAC benchmark (Hinton & Salakhutdinov's
  MNIST autoencoder, scaled to scikit-learn's 8x8 digits): MLP 64-128-64-16-64-128-64 with
  tanh, linear output, loss the mean squared error over the 64 pixels; metric the MSE on
  the 1347 training images; batch 128.
- ``classification``: MLP 64-128-128-10 (tanh) on the same digits, cross-entropy; metric the
  training loss (and test accuracy at the end); batch 64.
- ``chargpt``: a character-level GPT (common.gpt: two pre-norm blocks of scaled-dot-product
  attention and MLP, dim 64, context 64, tied head, GPT-2's initialization) on 400k characters of
  Python's standard-library source; metric the validation loss (nats per character) on a
  fixed set of held-out windows; batch 32 windows.

The loop (:func:`train`) times only the training steps: the clock stops for every
evaluation of the metric, which runs every ``eval_every`` steps. Time and steps are both
recorded, so runs can be compared at equal steps (insensitive to other load on the machine)
as well as at equal wall time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from common import SEED_UPDATE, digits, gpt, mlp, stdlib_text
from torch import Tensor, nn

from kfac_ef import KFACPreconditioner


@dataclass
class Data:
    """Tensors of a task, built once per process."""

    train: dict[str, Tensor]
    eval: dict[str, Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A model, its data, its per-example loss and its metric."""

    name: str
    batch: int
    budget_s: float  # default wall-clock budget of one run
    eval_every: int  # steps between metric evaluations (not timed)
    metric: str  # what the metric is, for tables and plots
    build: Callable[[Data], nn.Module]
    load: Callable[[], Data]
    sample: Callable[[Data, int, torch.Generator, int], tuple[Tensor, Tensor]]
    # per-example losses (N,) from model output and target
    losses: Callable[[Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module, Data], float]


# ---------------------------------------------------------------------------------- digits
def _digits_data() -> Data:
    x_tr, y_tr, x_te, y_te = digits()
    return Data({"x": x_tr, "y": y_tr}, {"x": x_te, "y": y_te})


def _epoch_sampler(data: Data, batch: int, gen: torch.Generator, step: int):
    """Shuffled epochs of the training set (the last incomplete batch of each is dropped)."""
    x = data.train["x"]
    per_epoch = len(x) // batch
    state = data.extra.setdefault("perm", {})
    epoch, i = divmod(step, per_epoch)
    if state.get("epoch") != (id(gen), epoch):
        state["epoch"] = (id(gen), epoch)
        state["perm"] = torch.randperm(len(x), generator=gen)
    return state["perm"][i * batch : (i + 1) * batch]


def _ae_sample(data: Data, batch: int, gen: torch.Generator, step: int):
    idx = _epoch_sampler(data, batch, gen, step)
    x = data.train["x"][idx]
    return x, x


def _mse_losses(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).square().mean(dim=1)


def _ae_eval(model: nn.Module, data: Data) -> float:
    x = data.train["x"]
    return float(_mse_losses(model(x), x).mean())


def _cls_sample(data: Data, batch: int, gen: torch.Generator, step: int):
    idx = _epoch_sampler(data, batch, gen, step)
    return data.train["x"][idx], data.train["y"][idx]


def _ce_losses(out: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(out, target, reduction="none")


def _cls_eval(model: nn.Module, data: Data) -> float:
    return float(_ce_losses(model(data.train["x"]), data.train["y"]).mean())


def test_accuracy(model: nn.Module, data: Data) -> float:
    with torch.no_grad():
        return float((model(data.eval["x"]).argmax(1) == data.eval["y"]).float().mean())


# ---------------------------------------------------------------------------------- chargpt
CONTEXT = 64


def _text_data(context: int = CONTEXT) -> Data:
    text = stdlib_text()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    # A fixed evaluation set: 64 evenly spaced windows of the held-out text.
    starts = torch.linspace(0, len(val) - context - 2, 64).long()
    windows = val[starts.unsqueeze(1) + torch.arange(context + 1)]
    return Data({"ids": train}, {"windows": windows}, {"vocab": len(chars), "context": context})


def _text_sample(data: Data, batch: int, gen: torch.Generator, step: int):
    ids, context = data.train["ids"], data.extra["context"]
    starts = torch.randint(0, len(ids) - context - 1, (batch,), generator=gen)
    windows = ids[starts.unsqueeze(1) + torch.arange(context + 1)]
    return windows[:, :-1], windows[:, 1:]


def _lm_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sequence mean next-character cross-entropy, (N,)."""
    n, t, v = logits.shape
    return (
        F.cross_entropy(logits.reshape(n * t, v), targets.reshape(-1), reduction="none")
        .view(n, t)
        .mean(dim=1)
    )


def _text_eval(model: nn.Module, data: Data) -> float:
    w = data.eval["windows"]
    return float(_lm_losses(model(w[:, :-1]), w[:, 1:]).mean())


def text_task(
    name: str,
    *,
    dim: int,
    blocks: int,
    context: int,
    batch: int,
    budget_s: float = 30.0,
    eval_every: int = 25,
) -> Task:
    """A character-level GPT (common.gpt, ``blocks`` pre-norm blocks of width ``dim``, tied
    head) on the standard-library text, windows of ``context`` characters."""
    return Task(
        name,
        batch=batch,
        budget_s=budget_s,
        eval_every=eval_every,
        metric="validation loss (nats/char)",
        build=lambda data: gpt(data.extra["vocab"], dim, context, blocks=blocks),
        load=lambda: _text_data(context),
        sample=_text_sample,
        losses=_lm_losses,
        evaluate=_text_eval,
    )


TASKS: dict[str, Task] = {
    "autoencoder": Task(
        "autoencoder",
        batch=128,
        budget_s=20.0,
        eval_every=10,
        metric="train MSE",
        build=lambda data: mlp([64, 128, 64, 16, 64, 128, 64]),
        load=_digits_data,
        sample=_ae_sample,
        losses=_mse_losses,
        evaluate=_ae_eval,
    ),
    "classification": Task(
        "classification",
        batch=64,
        budget_s=10.0,
        eval_every=21,
        metric="train loss",
        build=lambda data: mlp([64, 128, 128, 10]),
        load=_digits_data,
        sample=_cls_sample,
        losses=_ce_losses,
        evaluate=_cls_eval,
    ),
    "chargpt": text_task("chargpt", dim=64, blocks=2, context=CONTEXT, batch=32),
}

_DATA: dict[str, Data] = {}


def data_of(task: Task) -> Data:
    """The task's data, loaded once per process."""
    if task.name not in _DATA:
        _DATA[task.name] = task.load()
    return _DATA[task.name]


# ---------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """An optimizer, optionally on gradients preconditioned by KFACPreconditioner.

    ``kfac`` holds the preconditioner's options (None: no preconditioner). When they hold a
    loss-change constraint, ``lr`` is passed to the preconditioner too and step() receives
    the per-example losses. ``warmup`` (benchmark-side) collects statistics for that many
    steps while the optimizer still receives the raw gradients.
    """

    name: str
    optimizer: str  # "adamw" or "sgd"
    lr: float
    momentum: float = 0.9  # SGD only
    kfac: dict[str, Any] | None = None
    warmup: int = 0
    # False: options not in ``kfac`` are the seed's update (common.SEED_UPDATE), what the
    # time-to-target and autoencoder benchmarks measured; True: the library's defaults.
    library_defaults: bool = False

    def with_lr(self, lr: float) -> Method:
        return Method(
            self.name, self.optimizer, lr, self.momentum, self.kfac, self.warmup,
            self.library_defaults,
        )  # fmt: skip

    def describe(self) -> str:
        parts = [f"lr={self.lr:g}"]
        if self.optimizer == "sgd":
            parts.append(f"momentum={self.momentum:g}")
        if self.kfac:
            parts += [f"{k}={v}" for k, v in self.kfac.items()]
        if self.warmup:
            parts.append(f"warmup={self.warmup}")
        return ", ".join(parts)


def constrained(kfac: dict[str, Any] | None) -> bool:
    """Whether these preconditioner options ask for the loss-change constraint."""
    if not kfac:
        return False
    return kfac.get("constraint", "none") not in ("none", None) or any(
        k in kfac for k in ("target_loss_change", "max_loss_change")
    )


def make_optimizer(
    model: nn.Module, method: Method
) -> tuple[torch.optim.Optimizer, KFACPreconditioner | None]:
    params = [p for p in model.parameters() if p.requires_grad]
    if method.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=method.lr)
    elif method.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=method.lr, momentum=method.momentum)
    else:
        raise ValueError(f"unknown optimizer {method.optimizer!r}")
    pre = None
    if method.kfac is not None:
        kw = dict(method.kfac) if method.library_defaults else {**SEED_UPDATE, **method.kfac}
        if constrained(kw):
            kw["lr"] = method.lr
        pre = KFACPreconditioner(model, **kw)
    return opt, pre


# ---------------------------------------------------------------------------------- training
@dataclass
class Run:
    """One training run: the metric along steps and training wall time."""

    task: str
    method: Method
    seed: int
    curve: list[tuple[int, float, float]]  # (step, training seconds, metric)
    steps: int = 0
    seconds: float = 0.0
    diverged: bool = False
    error: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> float:
        return self.curve[-1][2] if self.curve else math.nan

    @property
    def best(self) -> float:
        finite = [m for _, _, m in self.curve if math.isfinite(m)]
        return min(finite) if finite else math.nan

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else math.nan

    def reach(self, target: float) -> tuple[float, int] | None:
        """(seconds, steps) of the first evaluation at or below ``target``; None if never."""
        for step, seconds, metric in self.curve:
            if metric <= target:
                return seconds, step
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One training step of a method on a model: forward, backward, precondition, update."""

    def __init__(self, task: Task, model: nn.Module, method: Method) -> None:
        self.task = task
        self.method = method
        self.opt, self.pre = make_optimizer(model, method)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.needs_loss = self.pre is not None and constrained(method.kfac)
        self.count = 0

    def step(self, x: Tensor, y: Tensor) -> None:
        opt, pre = self.opt, self.pre
        opt.zero_grad(set_to_none=True)
        losses = self.task.losses(self.model(x), y)
        losses.mean().backward()
        if pre is not None:
            if self.count < self.method.warmup:
                raw = [p.grad.clone() if p.grad is not None else None for p in self.params]
                pre.step(loss=losses.detach()) if self.needs_loss else pre.step()
                for p, g in zip(self.params, raw):
                    p.grad = g
            elif self.needs_loss:
                pre.step(loss=losses.detach())
            else:
                pre.step()
        opt.step()
        self.count += 1

    def close(self) -> None:
        if self.pre is not None:
            self.pre.remove()


def train(
    task: Task,
    method: Method,
    seed: int,
    budget_s: float | None = None,
    max_steps: int | None = None,
    device: str = "cpu",
    progress: Any = None,
    eval_every: int | None = None,
    stepper: Callable[[Task, nn.Module, Method], Any] = Stepper,
) -> Run:
    """Train from a seeded initialization until ``budget_s`` seconds of training steps (or
    ``max_steps`` steps), evaluating the metric every ``eval_every`` steps (clock stopped).

    A run whose metric becomes non-finite or 100x its initial value is stopped and marked
    diverged; one whose step raises (e.g. a failed decomposition) is stopped with the error.
    ``progress`` (a tqdm bar, optional) advances by training seconds. ``stepper`` builds the
    object whose ``step(x, y)`` trains one step (default: :class:`Stepper`, the method's
    optimizer and preconditioner) and ``close()`` releases it.
    """
    dev = torch.device(device)
    data = data_of(task)
    budget = task.budget_s if budget_s is None else budget_s
    every = eval_every or task.eval_every
    torch.manual_seed(seed)
    model = task.build(data).to(dev)
    gen = torch.Generator().manual_seed(seed)
    run = Run(task.name, method, seed, [])

    def evaluate() -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            value = task.evaluate(model, data)
        model.train(was)
        return value

    initial = evaluate()
    run.curve.append((0, 0.0, initial))
    step = 0
    elapsed = 0.0
    trainer = None
    try:
        trainer = stepper(task, model, method)
        while elapsed < budget and (max_steps is None or step < max_steps):
            count = every if max_steps is None else min(every, max_steps - step)
            batches = [task.sample(data, task.batch, gen, step + i) for i in range(count)]
            batches = [(x.to(dev), y.to(dev)) for x, y in batches]
            _sync(dev)
            t0 = time.perf_counter()
            for x, y in batches:
                trainer.step(x, y)
                step += 1
            _sync(dev)
            dt = time.perf_counter() - t0
            elapsed += dt
            metric = evaluate()
            run.curve.append((step, elapsed, metric))
            if progress is not None:
                progress.update(min(elapsed, budget) - min(elapsed - dt, budget))
            if not math.isfinite(metric) or metric > 100 * initial:
                run.diverged = True
                break
    except (RuntimeError, ValueError, torch.linalg.LinAlgError) as exc:  # a crash is a result
        run.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        if trainer is not None:
            trainer.close()
    run.steps, run.seconds = step, elapsed
    if task.name == "classification":
        model.eval()
        run.extra["test_acc"] = test_accuracy(model, data)
    return run
