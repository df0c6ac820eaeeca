"""The checkpoint format stays readable: checkpoints written by an earlier version
(tests/golden/, made by tests/golden/make_golden.py) load, round-trip and continue.

Loading then saving gives back the very tensors saved (bitwise: nothing is lost or
transformed on the way in). The step after loading gives the gradients and state the run
gave when the file was written; that comparison allows float64 round-off, since the file was
written on another machine (another BLAS may differ in the last bits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kfac_ef import KFACPreconditioner

from .golden.spec import CONFIGS, make_model, train_step

GOLDEN = Path(__file__).resolve().parent / "golden"


def _tensors(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested state, by path."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= _tensors(v, f"{prefix}/{k}")
        return out
    if isinstance(tree, list | tuple) and not any(isinstance(v, torch.Tensor) for v in tree):
        return {prefix: tuple(tree)}
    return {prefix: tree}


def _same(got: Any, expected: Any, exact: bool, where: str) -> None:
    a, b = _tensors(got), _tensors(expected)
    assert set(a) == set(b), f"{where}: keys differ: {sorted(set(a) ^ set(b))}"
    for key, want in b.items():
        have = a[key]
        if isinstance(want, torch.Tensor):
            if exact:
                assert have.dtype == want.dtype and torch.equal(have, want), f"{where} {key}"
            else:
                torch.testing.assert_close(have, want, rtol=1e-9, atol=1e-12, msg=f"{key}")
        else:
            assert have == want, f"{where} {key}: {have!r} != {want!r}"


# Options added after the files were made, with the values that reproduce the files' runs: the
# state of today's version names them, the files do not.
ADDED_SINCE = {
    "exponent": -1.0,
    "grafting": "none",
    "wide_layers": "diagonal",
    "statistics_stride": 1,
    "constrained_step": "gradient",
    "precondition_update": False,
}


def _without_added(state: dict[str, Any]) -> dict[str, Any]:
    options = dict(state["options"])
    for key, value in ADDED_SINCE.items():
        assert options.pop(key) == value, key
    return {**state, "options": options}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_golden_checkpoint_loads_round_trips_and_continues(name, float64):
    golden = torch.load(GOLDEN / f"{name}.pt", weights_only=True)
    options = CONFIGS[name]
    model = make_model()
    model.load_state_dict(golden["model"])
    pre = KFACPreconditioner(model, **options)
    pre.load_state_dict(golden["kfac"])
    _same(_without_added(pre.state_dict()), golden["kfac"], exact=True, where="round trip")
    x, y = golden["batch"]
    grads = train_step(model, pre, x, y, options)
    for key, g in golden["grads"].items():
        torch.testing.assert_close(grads[key], g, rtol=1e-9, atol=1e-12, msg=key)
    _same(_without_added(pre.state_dict()), golden["after"], exact=False, where="after a step")
