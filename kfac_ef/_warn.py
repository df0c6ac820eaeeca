"""Warnings attributed to the user's code.

A warning raised inside the package can be several frames deep, and reached from several
places: step(), a forward hook, a tensor hook run by the autograd engine during
``loss.backward()``, a compiler-disabled wrapper. A fixed ``stacklevel`` points at the right
line from one of them only. :func:`warn` walks the stack instead and attributes the warning
to the first frame outside this package and outside torch: the user's ``precond.step()``,
``model(x)`` or ``loss.backward()`` line.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_internal: tuple[str, ...] = ()


def _is_internal(filename: str) -> bool:
    global _internal
    if not _internal:
        from . import kernels  # installed as kfac_ef.kernels, from the top-level kernels/

        _internal = tuple(
            os.path.dirname(os.path.abspath(path)) + os.sep
            for path in (__file__, kernels.__file__ or "", torch.__file__ or "")
        )
    return os.path.abspath(filename).startswith(_internal)


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message, category)`` with the stacklevel of the first caller outside
    kfac_ef and torch (the direct caller when every frame is internal)."""
    frame = sys._getframe(1)
    level = 2  # 1 is this function, 2 its caller
    while frame.f_back is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    if _is_internal(frame.f_code.co_filename):
        level = 2
    warnings.warn(message, category, stacklevel=level)
