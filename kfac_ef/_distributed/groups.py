"""Process groups of K-FAC's own (copies of the user's group), made once per program."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _group_timeout(group: Any) -> timedelta | None:
    """The timeout of a process group, to give the same one to the groups made from it."""
    try:
        for device in (torch.device("cpu"), torch.device("cuda")):
            try:
                backend = group._get_backend(device)
            except Exception:  # noqa: BLE001 (no backend for this device type)
                continue
            timeout = backend.options._timeout
            if isinstance(timeout, timedelta):
                return timeout
    except Exception:  # noqa: BLE001 (private API of torch.distributed; fall back)
        pass
    return None


# Groups made by this module, by (parent group, global ranks): every preconditioner of a
# program reuses them instead of opening new connections each time. Forgotten when the
# default group changes (destroy_process_group, then a new init_process_group). Each entry
# holds its parent too, so that the parent's id cannot be reused by another group.
_GROUPS: dict[tuple[int, tuple[int, ...]], tuple[Any, Any]] = {}
_GROUPS_WORLD: list[Any] = [None]


def _new_group(parent: Any, ranks: list[int], everyone: bool) -> Any:
    """A process group over ``ranks`` (global ranks), cached.

    ``everyone``: all ranks of the world call this in the same order (torch's default
    ``new_group`` protocol); otherwise only the members do (``use_local_synchronization``).
    """
    if _GROUPS_WORLD[0] is not dist.group.WORLD:
        _GROUPS.clear()
        _GROUPS_WORLD[0] = dist.group.WORLD  # held, so that its id is not reused
    key = (id(parent), tuple(ranks))
    if key not in _GROUPS:
        timeout = _group_timeout(parent)
        if everyone:
            group = dist.new_group(ranks, timeout=timeout)
        elif dist.get_rank() in ranks:
            group = dist.new_group(ranks, timeout=timeout, use_local_synchronization=True)
        else:
            group = None
        _GROUPS[key] = (parent, group)
    return _GROUPS[key][1]
