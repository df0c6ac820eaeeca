"""Run a function on W processes with torch.distributed (gloo on the CPU), from a test.

Each rank runs ``fn(rank, world, *args)`` in a spawned process with one thread; its return
value (or its traceback) comes back through a file. Every run has a hard time limit: a rank
still alive when it expires is killed and the run fails, so a hang can never block the
suite. ``wait_for`` names the ranks whose results matter (the others are killed once those
are done), for tests where a rank is meant to die or hang.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    port: int,
    out_dir: str,
    pg_timeout_s: float,
    args: tuple[Any, ...],
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        result = fn(rank, world, *args)
        torch.save({"result": result}, out)
    except BaseException:  # noqa: BLE001 (report everything to the parent)
        torch.save({"error": traceback.format_exc()}, out)
    finally:
        # Exit without tearing down the group: a peer may be dead or hung on purpose, and
        # the parent only needs the file.
        os._exit(0)


class WorkerError(RuntimeError):
    pass


def run(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    time_limit_s: float = 120.0,
    pg_timeout_s: float = 60.0,
    wait_for: Sequence[int] | None = None,
) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]`` run on ``world`` processes.

    Raises:
        TimeoutError: if a waited-for rank is still running after ``time_limit_s``.
        WorkerError: with the rank's traceback, if ``fn`` raised on a waited-for rank.
    """
    ctx = mp.get_context("spawn")
    waited = list(range(world)) if wait_for is None else list(wait_for)
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        procs = [
            ctx.Process(
                target=_entry,
                args=(fn, r, world, port, tmp, pg_timeout_s, args),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + time_limit_s
        try:
            for r in waited:
                procs[r].join(max(0.0, deadline - time.monotonic()))
                if procs[r].is_alive():
                    raise TimeoutError(
                        f"rank {r} of {world} still running after {time_limit_s:.0f} s "
                        f"({fn.__name__}): a hang"
                    )
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
        results = []
        for r in waited:
            path = Path(tmp) / f"rank{r}.pt"
            if not path.exists():
                raise WorkerError(f"rank {r} exited with code {procs[r].exitcode} and no result")
            data = torch.load(path, weights_only=False)
            if "error" in data:
                raise WorkerError(f"rank {r} of {world} failed:\n{data['error']}")
            results.append(data["result"])
        return results
