"""What the preconditioner needs to know about the model and its hooks, apart from the
math: sharding, wrappers, the structure it was built on, weak callbacks, snapshots of what a
forward call saved."""

from __future__ import annotations

import dataclasses
import sys
import weakref
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from ._blocks import DiagonalParam, Layer


def check_sharding(model: nn.Module) -> bool:
    """Whether the model is sharded by FSDP2's ``fully_shard`` (DTensor parameters, which
    the sharded distributor handles); raise for sharding it does not handle: FSDP1's
    ``FullyShardedDataParallel`` (flat parameters) and DTensor parameters outside
    ``fully_shard`` (tensor parallelism). Checked without importing
    torch.distributed.tensor: a DTensor parameter exists only if that module was imported."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    sharded = [
        name
        for name, p in model.named_parameters()
        if dtensor is not None and isinstance(p, dtensor)
    ]
    wrappers = [
        name or "<root>"
        for name, m in model.named_modules()
        if type(m).__name__ == "FullyShardedDataParallel"
    ]
    if wrappers:
        raise NotImplementedError(
            f"the model has FullyShardedDataParallel modules ({', '.join(wrappers[:5])}): "
            "FSDP1's flat parameters are not supported. Shard the model with FSDP2's "
            "torch.distributed.fsdp.fully_shard (docs/distributed.md, FSDP), or use "
            "DistributedDataParallel."
        )
    if not sharded:
        return False
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    wrapped: set[int] = set()
    if fsdp is not None:
        for m in model.modules():
            if isinstance(m, fsdp):
                wrapped |= {id(p) for p in m.parameters()}
    outside = [n for n, p in model.named_parameters() if n in sharded and id(p) not in wrapped]
    if outside:
        raise NotImplementedError(
            f"the model has DTensor parameters outside fully_shard ({', '.join(outside[:5])}"
            + (", ..." if len(outside) > 5 else "")
            + "): tensor parallelism is not supported yet; FSDP2's fully_shard is "
            "(docs/distributed.md)"
        )
    return True


def connected_groups(keys: Sequence[Iterable[Hashable]]) -> list[list[int]]:
    """Indices 0..n-1 grouped by shared keys (union-find: i and j are in one group when
    ``keys[i]`` and ``keys[j]`` have a key in common, directly or through others); groups in
    order of their first member, members in order."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Hashable, int] = {}
    for i, ks in enumerate(keys):
        for k in ks:
            parent[find(i)] = find(first.setdefault(k, i))
    groups: dict[int, list[int]] = {}
    for i in range(len(keys)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def unique_parameters(
    layers: Iterable[Layer], diagonal: Iterable[DiagonalParam]
) -> list[nn.Parameter]:
    """The parameters of these Kronecker layers and diagonal entries, each once (a tied
    weight belongs to several layers)."""
    out: dict[int, nn.Parameter] = {}
    for layer in layers:
        for p in layer.adapter.parameters():
            out.setdefault(id(p), p)
    for d in diagonal:
        out.setdefault(id(d.param), d.param)
    return list(out.values())


def uncompiled(model: nn.Module) -> nn.Module:
    """The module inside a torch.compile wrapper (so that layer names carry no
    ``_orig_mod.``; the wrapper's forward runs the inner modules, whose hooks fire)."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return model


def structure_of(model: nn.Module) -> list[tuple[str, str, int, tuple[int, ...], tuple[bool, ...]]]:
    """Modules with parameters: name, type, identity, parameter identities, trainability.

    Covers every module discovery looks at: a tied weight appears under each module that
    registers it (so untying or re-tying shows), and the projections of a MultiheadAttention
    (its packed ``in_proj_weight`` and its ``out_proj`` submodule) are listed although the
    attention's adapter, not their own, reads them.
    """
    out = []
    for name, module in model.named_modules():
        direct = list(module.parameters(recurse=False))
        if direct:
            out.append(
                (
                    name or "<model>",
                    type(module).__name__,
                    id(module),
                    tuple(id(p) for p in direct),
                    tuple(p.requires_grad for p in direct),
                )
            )
    return out


def weak_method(method: Any, default: Any) -> Any:
    """``method`` called through a weak reference to its object (``default`` once the object
    is gone): the hooks must not keep the preconditioner alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return default if bound is None else bound(*args)

    return call


def snapshot(saved: Any) -> Any:
    """A copy of the tensors in what a call saved (tuples, lists, dicts and dataclasses of
    them walked through; other values kept as they are)."""
    if isinstance(saved, Tensor):
        return saved.clone()
    if isinstance(saved, tuple | list):
        return type(saved)(snapshot(x) for x in saved)
    if isinstance(saved, dict):
        return {k: snapshot(v) for k, v in saved.items()}
    if dataclasses.is_dataclass(saved) and not isinstance(saved, type):
        changes = {
            f.name: snapshot(getattr(saved, f.name)) for f in dataclasses.fields(saved) if f.init
        }
        return dataclasses.replace(saved, **changes)
    return saved
