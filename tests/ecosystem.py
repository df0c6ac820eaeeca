"""Importing the optional libraries of the zoo and integration tests (transformers, peft,
timm, lightning), or skipping with the reason.

transformers (5.x) requires a package named ``kernels``; this repository has a top-level
``kernels/`` directory (installed as ``kfac_ef.kernels``) that shadows it whenever the
repository root is on ``sys.path``, as pytest puts it. The libraries are therefore imported
with the repository root out of ``sys.path`` (restored afterwards), so that ``kernels``
resolves to the installed package; kfac_ef itself never imports a top-level ``kernels``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def _without_repo_root() -> Iterator[None]:
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]
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
