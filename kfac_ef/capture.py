"""Module hooks: the only code that sees activations and output gradients as they pass.

One forward hook per module keeps what its adapter needs from the call (usually its input)
and registers a tensor hook on the call's output; that tensor hook receives ∂L/∂s, the
gradient of the (reduced) loss with respect to that output, and hands what was kept and the
gradient of *that call* to the preconditioner together. Tensor hooks on the output (rather
than module full-backward hooks) see the gradient with respect to the module's own output
even when an in-place activation later overwrites that tensor. Adapters that need state from
before the call (the random-number state of attention dropout) get a forward pre-hook too.

Nothing is captured in eval mode, when grad mode is off, or inside torch.func transforms
(vmap, grad, ...), whose wrapped tensors are not the model's real activations. On steps that
keep no calls (no statistics, and no per-example loss changes for the constraint), and in
eval mode, the tensor hook only reports that a backward pass happened.

Which backward passes count: those that accumulate into the ``.grad`` of the module's
parameters (``loss.backward()``), since ``p.grad`` is what step() preconditions and the
optimizer steps on. A ``torch.autograd.grad`` call or a ``backward(inputs=...)`` that leaves
the module's parameters alone (saliency maps, input-gradient penalties, gradient-norm logging)
passes the layer unrecorded and leaves its call for the backward that does. A second backward
that reaches the same call (two losses through a retained graph) and one with
``create_graph=True`` (a gradient penalty, whose second-order terms reach the weights without
passing through the module's output) cannot be expressed in the factors: they raise, unless
run inside the owner's ``ignored()`` block (see ``Capture.ignoring``).

Calls are grouped into *passes*: all forward calls between two backward passes belong to one
pass, so a module applied several times in one forward pass (shared weights across depth or
time) is recognised as such, while micro-batches of gradient accumulation (forward, backward,
forward, backward, ...) are separate passes. A forward call made *during* a backward pass is
a recomputation by activation checkpointing and belongs to the pass being backpropagated:
with reentrant checkpointing (``use_reentrant=True``) the first forward runs without grad
(nothing is kept), and the recomputed calls, whose gradients do arrive, are the module's
calls of that pass; with non-reentrant checkpointing the recomputed outputs receive no
gradient and record nothing.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._grads import is_dtensor
from .layers import ModuleAdapter


def _in_functorch_transform() -> bool:
    """Inside torch.func's vmap/grad/jacrev, tensors are wrapped: leave those calls alone."""
    return torch._C._functorch.peek_interpreter_stack() is not None


_will_execute = getattr(torch._C, "_will_engine_execute_node", None)
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (a forward call
    now is a recomputation by activation checkpointing)."""
    return _graph_task_id is not None and _graph_task_id() != -1


def _accumulators(params: list[nn.Parameter]) -> list[Any]:
    """The autograd nodes that accumulate into these parameters' ``.grad`` (grad mode on).

    Holding them keeps them alive, so the engine reuses the same node for every graph.
    Parameters sharded by FSDP2 have none: its forward computes with unsharded copies and
    its own hooks write ``.grad``, so every backward through them is taken to reach it."""
    nodes: list[Any] = []
    for p in params:
        if is_dtensor(p):
            continue
        view: Any = p.view_as(p)
        nodes.append(view.grad_fn.next_functions[0][0])
    return nodes


def _reaches_grads(accumulators: list[Any]) -> bool:
    """Inside a backward pass: whether it accumulates into any of these parameters' ``.grad``.

    False for ``torch.autograd.grad`` (whose results are returned, not accumulated) and for
    ``backward(inputs=...)`` that leaves them out.
    """
    if _will_execute is None or not accumulators:
        return True
    for node in accumulators:
        try:
            if _will_execute(node):
                return True
        except RuntimeError:
            # torch.autograd.grad with the parameter among its inputs: its gradient is
            # returned to the caller, never accumulated into .grad.
            return False
    return False


class _Holder:
    """What one forward call saved, until the gradient that feeds the factors arrives.

    Attributes:
        saved: what the adapter saved (None once released, or when the call keeps nothing).
        fed: gradients of the user's backward passes (not sampled ones) recorded so far.
    """

    __slots__ = ("__weakref__", "fed", "saved")

    def __init__(self, saved: Any) -> None:
        self.saved = saved
        self.fed = 0


class BackwardError(RuntimeError):
    """A backward pass whose gradient the factors cannot hold (raised inside ``backward()``)."""


class Capture:
    """Registers and owns the hooks on a set of named modules.

    Args:
        adapters: the modules to watch, by name, through their adapters: the adapter says what
            to keep from a call (``save``, after an optional ``before_call`` pre-hook) and
            which output's gradient to watch (``output``).
        wants_calls: asked at each forward call whether this step keeps what calls save
            (for statistics, or for the per-example loss changes of the constraint).
        on_backward: called whenever an output gradient of a watched module arrives.
        record: ``record(name, saved, grad, pass_id)`` with what was saved from one call and
            the gradient w.r.t. that call's output.
        on_call: optional ``on_call(name, pass_id)``, told in the forward pass of every call
            whose statistics will be recorded (so that a listener knows when a module's
            statistics of a pass are complete: one ``record`` per announced call).
        hold_inputs: hand what a call saved to ``record`` on the sampled-target backward
            of ``fisher_type="mc"`` *and* on the user's backward through the retained graph,
            and keep it until ``release()`` (or until the call's graph is freed), instead of
            releasing it at the first gradient.
        sampling: tells whether the backward pass running now is the sampled-target one
            (``torch.autograd.grad`` by design: it feeds the factors all the same).
    """

    def __init__(
        self,
        adapters: dict[str, ModuleAdapter],
        *,
        wants_calls: Callable[[], bool],
        on_backward: Callable[[], None],
        record: Callable[[str, Any, Tensor, int], None],
        on_call: Callable[[str, int], None] | None = None,
        hold_inputs: bool = False,
        sampling: Callable[[], bool] | None = None,
    ) -> None:
        self._wants_calls = wants_calls
        self._hold_inputs = hold_inputs
        self._sampling = sampling if sampling is not None else lambda: False
        # Weak: a call whose graph was freed without a backward (a forward never
        # backpropagated) must not keep its inputs alive until release().
        self._held: weakref.WeakSet[_Holder] = weakref.WeakSet()
        self._ignoring = 0
        self._accumulators: dict[str, list[Any]] = {}
        self._params = {
            name: [p for p in adapter.module.parameters() if p.requires_grad]
            for name, adapter in adapters.items()
        }
        self._on_call = on_call
        self._on_backward = on_backward
        self._record = record
        self._pass_id = 0
        self._backward_since_forward = False
        self._before: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = []
        for name, adapter in adapters.items():
            module = adapter.module
            if adapter.needs_pre_hook:
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._pre_hook(name, adapter), with_kwargs=True
                    )
                )
            self._handles.append(
                module.register_forward_hook(self._forward_hook(name, adapter), with_kwargs=True)
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.release()

    def release(self) -> None:
        """Drop what calls saved for further backward passes (``hold_inputs``)."""
        for holder in list(self._held):
            holder.saved = None
        self._held.clear()

    @contextlib.contextmanager
    def ignoring(self) -> Iterator[None]:
        """A context in which backward passes reaching watched outputs are not recorded,
        do not count as a backward pass, and raise nothing: for gradients the caller
        knowingly leaves out of the factors (a gradient penalty's ``create_graph``
        backward, an auxiliary loss)."""
        self._ignoring += 1
        try:
            yield
        finally:
            self._ignoring -= 1

    def _accumulators_of(self, name: str) -> list[Any]:
        nodes = self._accumulators.get(name)
        if nodes is None:
            nodes = self._accumulators[name] = _accumulators(self._params[name])
        return nodes

    def _keeps(self, module: nn.Module) -> bool:
        return (
            torch.is_grad_enabled()
            and module.training
            and not _in_functorch_transform()
            and self._wants_calls()
        )

    def _pre_hook(self, name: str, adapter: ModuleAdapter) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # Overwritten by every call: a call that raised leaves nothing stale behind.
            self._before[name] = adapter.before_call(args, kwargs) if self._keeps(module) else None

        def compiled(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._keeps(module):
                adapter.check_compiled(name)
            hook(module, args, kwargs)

        return _eager_when_compiling(hook, compiled)

    def _forward_hook(self, name: str, adapter: ModuleAdapter) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            before = self._before.pop(name, None)
            watched = adapter.output(out)
            if not torch.is_grad_enabled() or watched is None or not watched.requires_grad:
                return
            if _in_functorch_transform():
                return
            if self._backward_since_forward and not _in_backward():
                # A forward call made during a backward pass is a recomputation (activation
                # checkpointing): its calls belong to the pass being backpropagated.
                self._pass_id += 1
                self._backward_since_forward = False
            keep = module.training and self._wants_calls()
            # What the call saved lives in a holder released when the gradient arrives
            # (with hold_inputs: at release()), so a caller that keeps the output alive does
            # not keep the input alive through us.
            holder = _Holder(adapter.save(args, kwargs, before) if keep else None)
            kept = holder.saved is not None
            pass_id = self._pass_id
            hold = self._hold_inputs
            nodes = self._accumulators_of(name)
            if kept:
                if hold:
                    self._held.add(holder)
                if self._on_call is not None:
                    self._on_call(name, pass_id)

            def on_grad(grad: Tensor) -> None:
                if self._ignoring:
                    return
                sampling = self._sampling()
                if not sampling:
                    if kept and torch.is_grad_enabled():
                        raise BackwardError(_create_graph_message(name))
                    if not _reaches_grads(nodes):
                        return  # leaves p.grad alone: the call waits for the backward that doesn't
                    if kept and holder.fed:
                        raise BackwardError(_second_backward_message(name))
                    holder.fed += 1
                self._backward_since_forward = True
                self._on_backward()
                saved = holder.saved
                if not hold:
                    holder.saved = None
                if saved is not None and grad.numel() > 0:  # an empty batch adds nothing
                    self._record(name, saved, grad, pass_id)

            watched.register_hook(_tensor_hook(on_grad))

        return _eager_when_compiling(hook)


def _create_graph_message(name: str) -> str:
    return (
        f"kfac_ef: a backward pass with create_graph=True reached the output of {name!r} "
        "(a gradient penalty or another higher-order gradient). Terms built from such "
        "gradients reach the weights' .grad without passing through the layer's output, so "
        "the factors could not hold the gradient the optimizer steps on. Run that "
        "torch.autograd.grad(..., create_graph=True) inside `with precond.ignored():` to leave "
        "those terms out of the factors knowingly (their gradient still reaches p.grad and is "
        "preconditioned), or leave the layer out with skip_layers."
    )


def _second_backward_message(name: str) -> str:
    return (
        f"kfac_ef: a second backward pass reached the output of {name!r} from the same forward "
        "call (several losses through a retained graph). p.grad holds the sum of their "
        "gradients, but the factors need each example's summed gradient, which the separate "
        "passes do not give: add the losses and call backward() once, or run the extra "
        "backward inside `with precond.ignored():` to leave its gradient out of the factors."
    )


def _eager_when_compiling(
    hook: Callable[..., None], compiled: Callable[..., None] | None = None
) -> Callable[..., None]:
    """``hook`` as called by torch: directly in eager mode; while torch.compile traces the
    module, through a compiler-disabled call (of ``compiled`` if given: the hook for calls
    from compiled code).

    Under torch.compile a hook must run eagerly, on real tensors: traced, it would run once at
    compile time and the tensor hook on the output would never fire. Each hooked module thus
    costs a graph break before and after it; the module's own forward is compiled.
    """
    in_compiled = compiled if compiled is not None else hook

    def dispatch(*args: Any) -> None:
        if not torch.compiler.is_compiling():
            return hook(*args)
        return call_eagerly(in_compiled, args)

    return dispatch


def _call(hook: Callable[..., None], *args: Any) -> None:
    return hook(*args)


# One compiler-disabled caller for every hook, made on first use: making it imports
# torch._dynamo (and with it triton), which an eager-only program never needs. Shared, it is
# made once, so the frames that torch.compile resumes after it hold no per-hook object (a
# per-hook wrapper made while tracing invalidates the resumed frame's cache at every call).
_EAGER: list[Callable[..., None]] = []


def _eager() -> Callable[..., None]:
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(_call, recursive=True))
    return _EAGER[0]


def call_eagerly(hook: Callable[..., None], args: tuple[Any, ...]) -> None:
    """``hook(*args)`` with the compiler disabled (for calls made while compiling)."""
    return _eager()(hook, *args)


def _tensor_hook(hook: Callable[[Tensor], None]) -> Callable[[Tensor], None]:
    """``hook`` to register on an output tensor. Once torch.compile is loaded, through the
    compiler-disabled caller: the autograd engine runs tensor hooks while a compiled
    function's frames are active (its ``loss.backward()`` or ``precond.step()`` run eagerly
    between graphs), and the compiler would otherwise trace every hook, guarding on its
    closure (a recompilation per backward pass)."""
    if "torch._dynamo" not in sys.modules:
        return hook
    return functools.partial(_eager(), hook)
