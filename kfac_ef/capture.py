"""Module hooks: the only code that sees activations and output gradients as they pass.

One forward hook per layer reads the call's input and registers a tensor hook on the call's
output; that tensor hook receives ∂L/∂s, the gradient of the (reduced) loss with respect to
the layer output, and hands input and gradient of *that call* to the preconditioner together. Tensor
hooks on the output (rather than module full-backward hooks) see the gradient with respect
to the layer's own output even when an in-place activation later overwrites that tensor.

Nothing is captured in eval mode, when grad mode is off, or inside torch.func transforms
(vmap, grad, ...), whose wrapped tensors are not the model's real activations. On steps that
collect no statistics, and in eval mode, the tensor hook only reports that a backward pass
happened.

Calls are grouped into *passes*: all forward calls between two backward passes belong to one
pass, so a module applied several times in one forward pass (shared weights across depth or
time) is recognised as such, while micro-batches of gradient accumulation (forward, backward,
forward, backward, ...) are separate passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def _in_functorch_transform() -> bool:
    """Inside torch.func's vmap/grad/jacrev, tensors are wrapped: leave those calls alone."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _call_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    x = args[0] if args else kwargs.get("input")
    return x if isinstance(x, Tensor) else None


class Capture:
    """Registers and owns the hooks on a set of named modules.

    Args:
        modules: the modules to watch, by name.
        wants_statistics: asked at each forward call whether this step collects statistics.
        on_backward: called whenever an output gradient of a watched module arrives.
        record: ``record(name, x, grad, pass_id)`` with the input of one call and the
            gradient w.r.t. that call's output.
        on_call: optional ``on_call(name, pass_id)``, told in the forward pass of every call
            whose statistics will be recorded (so that a listener knows when a layer's
            statistics of a pass are complete: one ``record`` per announced call).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        wants_statistics: Callable[[], bool],
        on_backward: Callable[[], None],
        record: Callable[[str, Tensor, Tensor, int], None],
        on_call: Callable[[str, int], None] | None = None,
    ) -> None:
        self._wants_statistics = wants_statistics
        self._on_call = on_call
        self._on_backward = on_backward
        self._record = record
        self._pass_id = 0
        self._backward_since_forward = False
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._forward_hook(name), with_kwargs=True)
            for name, module in modules.items()
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, name: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            if not torch.is_grad_enabled() or not isinstance(out, Tensor) or not out.requires_grad:
                return
            if _in_functorch_transform():
                return
            if self._backward_since_forward:
                self._pass_id += 1
                self._backward_since_forward = False
            x = _call_input(args, kwargs)
            keep = module.training and x is not None and self._wants_statistics()
            # The input lives in a one-slot holder released when the gradient arrives, so a
            # caller that keeps the output alive does not keep the input alive through us.
            holder: list[Tensor | None] = [x.detach() if keep and x is not None else None]
            pass_id = self._pass_id
            if keep and self._on_call is not None:
                self._on_call(name, pass_id)

            def on_grad(grad: Tensor) -> None:
                self._backward_since_forward = True
                self._on_backward()
                x_call, holder[0] = holder[0], None
                if x_call is not None:
                    self._record(name, x_call, grad, pass_id)

            out.register_hook(on_grad)

        eager: list[Callable[..., None]] = []

        def dispatch(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            if not torch.compiler.is_compiling():
                return hook(module, args, kwargs, out)
            # Under torch.compile the hook must run eagerly, on real tensors: traced, it would
            # run once at compile time and the tensor hook on the output would never fire.
            # The wrapper (and with it torch._dynamo, which imports triton) is made only
            # when compilation is actually in use.
            if not eager:
                eager.append(torch.compiler.disable(hook, recursive=True))
            return eager[0](module, args, kwargs, out)

        return dispatch
