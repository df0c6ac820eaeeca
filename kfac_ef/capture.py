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

Calls are grouped into *passes*: all forward calls between two backward passes belong to one
pass, so a module applied several times in one forward pass (shared weights across depth or
time) is recognised as such, while micro-batches of gradient accumulation (forward, backward,
forward, backward, ...) are separate passes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layers import ModuleAdapter


def _in_functorch_transform() -> bool:
    """Inside torch.func's vmap/grad/jacrev, tensors are wrapped: leave those calls alone."""
    return torch._C._functorch.peek_interpreter_stack() is not None


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
        hold_inputs: hand what a call saved to ``record`` on *every* gradient that reaches its
            output (several backward passes through a retained graph, as the sampled-target
            backward of ``fisher_type="mc"`` does) and keep it until ``release()``, instead
            of releasing it at the first gradient.
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
    ) -> None:
        self._wants_calls = wants_calls
        self._hold_inputs = hold_inputs
        self._held: list[list[Any]] = []
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
        for holder in self._held:
            holder[0] = None
        self._held.clear()

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
            if self._backward_since_forward:
                self._pass_id += 1
                self._backward_since_forward = False
            keep = module.training and self._wants_calls()
            # What the call saved lives in a one-slot holder released when the gradient
            # arrives (with hold_inputs: at release()), so a caller that keeps the output
            # alive does not keep the input alive through us.
            holder: list[Any] = [adapter.save(args, kwargs, before) if keep else None]
            pass_id = self._pass_id
            hold = self._hold_inputs
            if holder[0] is not None:
                if hold:
                    self._held.append(holder)
                if self._on_call is not None:
                    self._on_call(name, pass_id)

            def on_grad(grad: Tensor) -> None:
                self._backward_since_forward = True
                self._on_backward()
                saved = holder[0]
                if not hold:
                    holder[0] = None
                if saved is not None:
                    self._record(name, saved, grad, pass_id)

            watched.register_hook(_tensor_hook(on_grad))

        return _eager_when_compiling(hook)


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
