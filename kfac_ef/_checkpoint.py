"""The checkpoint format of ``KFACPreconditioner.state_dict()`` (``kfac_ef.state/1``).

    {"format": "kfac_ef.state/1", "steps": int, "skipped_steps": 0-d int64 tensor | None,
     "options": KFACOptions.to_dict(), "stats_examples": float,
     "names": {"layers": [...], "diagonal": [...]},
     "layers": {name: Layer.state()}, "diagonal": {name: DiagonalParam.state()}}

Each block writes and restores its own entry (``Layer.state`` / ``load_state``); this module
checks that a checkpoint fits the model and holds values that can be right, decides which
decompositions carry over under the current options, and orders the restore.
tests/golden/ holds checkpoints of this format that every version must load.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._blocks import decomposition_keys

if TYPE_CHECKING:
    from ._estimator import Estimator

STATE_FORMAT = "kfac_ef.state/1"

# Prefixes that wrappers add to module names: DistributedDataParallel's and torch.compile's.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save(est: Estimator, steps: int, decompositions: bool) -> dict[str, Any]:
    """The checkpoint of the estimator's state after ``steps`` step() calls."""
    layers = {la.name: e for la in est.layers if (e := la.state(decompositions)) is not None}
    layers = est.comm.complete_state(layers)  # sharded: from the ranks that keep them
    return _with_layers(est, steps, decompositions, layers)


def _with_layers(
    est: Estimator, steps: int, decompositions: bool, layers: dict[str, Any]
) -> dict[str, Any]:
    diagonal = {d.name: e for d in est.diagonal if (e := d.state(decompositions)) is not None}
    return {
        "format": STATE_FORMAT,
        "steps": steps,
        "skipped_steps": (est.skipped_steps.clone() if est.skipped_steps is not None else None),
        "options": est.options.to_dict(),
        # Examples of the last statistics step: the "sum" Kronecker form divides by it
        # on the steps until the next statistics step.
        "stats_examples": float(est.stats_examples),
        "names": {
            "layers": [layer.name for layer in est.layers],
            "diagonal": [d.name for d in est.diagonal],
        },
        "layers": layers,
        "diagonal": diagonal,
    }


def load(est: Estimator, state: Mapping[str, Any], strict: bool) -> int:
    """Restore a checkpoint into the estimator; returns its step count.

    Raises:
        ValueError: if it is not a checkpoint of this format, does not fit the model (names,
            shapes; missing layers with ``strict``), or holds values that cannot be right.
            Nothing is changed then.
    """
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"not a KFACPreconditioner state (expected format {STATE_FORMAT!r}, got {got!r})"
        )
    saved = {_own_name(n, est.by_name): e for n, e in state["layers"].items()}
    saved_diag = {_own_name(n, est.diag_by_name): e for n, e in state.get("diagonal", {}).items()}
    problems = _fit_problems(est, state, saved, saved_diag, strict)
    problems += _value_problems(state, saved, saved_diag)
    if problems:
        raise ValueError("the checkpoint does not fit this model:\n  " + "\n  ".join(problems))
    opts = est.options
    saved_opts = state.get("options", {})
    # Eigenbases (and the EKFAC scale) do not depend on ε; damped inverses and the
    # blocks' relative ε do.
    same_eps = saved_opts.get("damping") == opts.damping and (
        saved_opts.get("damping_unit", "absolute") == opts.damping_unit
    )
    # The diagonal parameters' stored (F + ε)^p also depends on the exponent.
    same_power = same_eps and saved_opts.get("exponent", -1.0) == opts.exponent
    reuse = saved_opts.get("damping_mode") == opts.damping_mode and (
        same_power or (opts.damping_mode != "pi" and opts.damping_unit == "absolute")
    )
    dtype = opts.factor_dtype
    for layer in est.layers:
        keys = decomposition_keys(layer, opts.damping_mode, opts.damping_unit) if reuse else None
        if layer.load_state(saved.get(layer.name), keys, dtype):
            est.force_decompose = True
        if layer.skipped is not None:
            est.skipped_seen[layer.name] = int(layer.skipped.sum())
    for d in est.diagonal:
        relative = opts.damping_unit == "relative"
        d.load_state(
            saved_diag.get(d.name), same_power, opts.damping, relative, dtype, opts.exponent
        )
        if d.skipped is not None:
            est.skipped_seen[d.name] = int(d.skipped.sum())
    est.force_decompose = est.comm.after_load(est.force_decompose)
    for bucket in est.buckets:
        bucket.restack()
    # Older checkpoints lack it: the statistics step that follows sets it again.
    est.stats_examples = float(state.get("stats_examples", 1.0))
    skipped_steps = state.get("skipped_steps")
    est.skipped_steps = (
        skipped_steps.to(est.device()).clone() if skipped_steps is not None else None
    )
    est.skipped_reported = int(skipped_steps) if skipped_steps is not None else 0
    return int(state["steps"])


def _own_name(name: str, known: Mapping[str, Any]) -> str:
    """A checkpointed layer or parameter name as this preconditioner names it: a name
    saved with the ``module.`` prefix of a DistributedDataParallel wrapper or the
    ``_orig_mod.`` of a torch.compile wrapper maps to the unwrapped name."""
    bare = name
    while bare not in known and bare.startswith(_WRAPPER_PREFIXES):
        bare = bare.split(".", 1)[1]
    return bare if bare in known else name


def _fit_problems(
    est: Estimator,
    state: Mapping[str, Any],
    saved: Mapping[str, Any],
    saved_diag: Mapping[str, Any],
    strict: bool,
) -> list[str]:
    """Names and shapes of the checkpoint that do not fit this model."""
    problems = [
        f"{n}: not a preconditioned layer of this model"
        for n in sorted(set(saved) - set(est.by_name))
    ]
    problems += [
        f"{n}: not a diagonally preconditioned parameter of this model"
        for n in sorted(set(saved_diag) - set(est.diag_by_name))
    ]
    names = state.get("names")  # absent from checkpoints of older versions
    if strict and names is not None:
        had = {_own_name(n, est.by_name) for n in names["layers"]}
        had |= {_own_name(n, est.diag_by_name) for n in names["diagonal"]}
        problems += [
            f"{n}: preconditioned in this model, not in the checkpoint's (strict=False "
            "starts it afresh)"
            for n in sorted((est.by_name.keys() | est.diag_by_name.keys()) - had)
        ]
    for name, entry in saved.items():
        layer = est.by_name.get(name)
        if layer is None:
            continue
        blocks = layer.adapter.blocks
        want = {"A": layer.a_spec.shape(blocks), "G": layer.g_spec.shape(blocks)}
        for key, shape in want.items():
            got = tuple(entry[key].shape)
            if got != shape:
                problems.append(f"{name}: {key} has shape {got}, this model needs {shape}")
    for name, entry in saved_diag.items():
        d = est.diag_by_name.get(name)
        if d is not None and entry["F"].numel() != d.param.numel():
            problems.append(
                f"{name}: F has {entry['F'].numel()} entries, this model needs {d.param.numel()}"
            )
    return problems


def _value_problems(
    state: Mapping[str, Any], layers: Mapping[str, Any], diagonal: Mapping[str, Any]
) -> list[str]:
    """What in a checkpoint's values cannot be loaded: non-finite factors, decompositions
    or inverses (they would turn every gradient into NaN), negative counters."""
    problems: list[str] = []

    def count(where: str, value: Any) -> None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not ok and isinstance(value, Tensor):
            ok = not value.is_floating_point() and bool((value >= 0).all())
        if not ok:
            problems.append(f"{where} must be a non-negative integer count, got {value!r}")

    def finite(where: str, value: Any, minimum: float | None = None) -> None:
        if not isinstance(value, Tensor):
            problems.append(f"{where} must be a tensor, got {type(value).__name__}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            problems.append(f"{where} has {bad} non-finite entries")
        elif minimum is not None and value.numel() and float(value.min()) < minimum:
            problems.append(f"{where} has entries below {minimum}")

    count("steps", state.get("steps"))
    if state.get("skipped_steps") is not None:
        count("skipped_steps", state["skipped_steps"])
    examples = state.get("stats_examples", 1.0)
    if not (isinstance(examples, int | float) and math.isfinite(examples) and examples > 0):
        problems.append(f"stats_examples must be a finite number > 0, got {examples!r}")
    for name, entry in layers.items():
        for key in ("A", "G"):
            finite(f"{name}: {key}", entry.get(key))
        for key in ("updates", "skipped", "scale_updates"):
            if entry.get(key) is not None:
                count(f"{name}: {key}", entry[key])
        for n in entry.get("failures", (0, 0)):
            count(f"{name}: failures", n)
        for key, value in (entry.get("decomposition") or {}).items():
            finite(f"{name}: decomposition {key!r}", value)
    for name, entry in diagonal.items():
        finite(f"{name}: F", entry.get("F"))
        for key in ("updates", "skipped"):
            count(f"{name}: {key}", entry.get(key))
        if entry.get("inverse") is not None:
            finite(f"{name}: inverse", entry["inverse"], minimum=0.0)
        if entry.get("curvature") is not None:
            finite(f"{name}: curvature", entry["curvature"], minimum=0.0)
    return problems


# ---------------------------------------------------------------- torch.distributed.checkpoint

_META = "meta"
_LAYER = "layer/"


def _pack(obj: Any) -> bytes:
    """An entry as bytes (tensors on the CPU): DCP saves bytes as they are, where it would
    split a dict of tensors into items that must be preallocated to load."""
    buf = io.BytesIO()
    torch.save(to_device(obj, torch.device("cpu")), buf)
    return buf.getvalue()


def _unpack(value: Any) -> Any:
    if isinstance(value, io.BytesIO):
        value.seek(0)
        value = value.read()
    if isinstance(value, bytes | bytearray):
        return torch.load(io.BytesIO(bytes(value)), weights_only=True)
    return value


def to_device(obj: Any, device: torch.device) -> Any:
    """A checkpoint entry (nested dicts, lists, tuples) with its tensors moved to ``device``
    (detached)."""
    if isinstance(obj, Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class DistributedState:
    """The preconditioner as a ``torch.distributed.checkpoint`` Stateful
    (``KFACPreconditioner.dcp_state()``): each rank writes and reads only its share.

    ``state_dict()`` holds one item ``"meta"`` (counters, options, names, the diagonal
    parameters' state; the same on every rank) and one item ``"layer/<name>"`` per layer
    this rank keeps (under FSDP2 with "mem_opt", only the rank that preconditions it; else
    every rank, with the same entry), each as bytes; DCP writes each item once. To load,
    every rank asks for the meta and the layers it keeps under its own plan, whatever the
    world size at saving.
    """

    def __init__(self, precond: Any, decompositions: bool = True) -> None:
        self._precond = precond
        self._decompositions = decompositions

    def _est(self) -> Estimator:
        return self._precond._est  # type: ignore[no-any-return]

    def state_dict(self) -> dict[str, Any]:
        est = self._est()
        comm = est.comm
        meta = _with_layers(est, self._precond.steps, self._decompositions, {})
        out: dict[str, Any] = {_META: _pack(meta)}
        for layer in est.layers:
            if comm.keeps(layer):  # (ranks keeping the same layer hold the same entry)
                out[_LAYER + layer.name] = _pack(layer.state(self._decompositions))
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        meta = _unpack(state[_META])
        if not isinstance(meta, Mapping):
            raise ValueError("not a KFACPreconditioner.dcp_state() checkpoint (no meta item)")
        est = self._est()
        unknown = [
            n
            for n in meta.get("names", {}).get("layers", [])
            if _own_name(n, est.by_name) not in est.by_name
        ]
        if unknown:
            raise ValueError(
                "the checkpoint does not fit this model:\n  "
                + "\n  ".join(f"{n}: not a preconditioned layer of this model" for n in unknown)
            )
        layers = {}
        for key, value in state.items():
            if key.startswith(_LAYER) and (entry := _unpack(value)) is not None:
                layers[key[len(_LAYER) :]] = entry
        self._precond._load(dict(meta) | {"layers": layers}, True)
