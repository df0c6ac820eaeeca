"""Importing the optional libraries of the zoo and integration tests (transformers, peft,
timm, lightning), or skipping with the reason.

transformers (5.x) requires a package named ``kernels``; this repository has a top-level
``kernels/`` directory (installed as ``kfac_ef.kernels``) and a ``benchmarks/kernels.py``
that shadow it whenever their directory is on ``sys.path`` (pytest puts the repository root
there, a script its own directory). The libraries are therefore imported with those
directories out of ``sys.path`` (restored afterwards), so that ``kernels`` resolves to the
installed package; kfac_ef itself never imports a top-level ``kernels``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest


def _is_checkout(path: str) -> bool:
    """A directory of a kfac_ef checkout whose ``kernels`` (the repository root's kernels/,
    benchmarks/kernels.py) would shadow the installed ``kernels`` package."""
    path = os.path.abspath(path or os.getcwd())
    return "site-packages" not in path and (
        os.path.exists(os.path.join(path, "kernels", "_guard.py"))
        or os.path.exists(os.path.join(path, "kernels.py"))
    )


@contextlib.contextmanager
def _without_repo_root() -> Iterator[None]:
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if not _is_checkout(p)]
    try:
        yield
    finally:
        sys.path[:] = saved


def load(name: str, *submodules: str) -> ModuleType:
    """``import name`` (and its ``submodules``), or skip the test with the reason."""
    try:
        with _without_repo_root():
            module = importlib.import_module(name)
            for sub in submodules:
                importlib.import_module(f"{name}.{sub}")
    except Exception as exc:  # noqa: BLE001 - a broken install (e.g. a CUDA-only wheel) too
        pytest.skip(f"{name} is not usable here ({type(exc).__name__}: {str(exc)[:200]})")
    return module


def transformers() -> ModuleType:
    tf = load("transformers", "integrations.hub_kernels", "pytorch_utils")
    tf.logging.set_verbosity_error()
    return tf
