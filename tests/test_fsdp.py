"""K-FAC under FSDP2 (``fully_shard``) against one process on the concatenated batch.

Each world size (2, 3, 4 ranks, gloo on the CPU, float64) runs its scenarios in one set of
spawned processes with a hard time limit; the tests compare the parameters after every
step (5 steps) with a one-process run of the same training (``distributed_workers``'s
reference: the global batch, with DDP's weighting for uneven local batches, which FSDP's
mean over ranks shares). The models shard unevenly: a conv with 4 output channels over 3
ranks leaves one rank none, 6 or 11 rows over 4 ranks give chunks of 2 or 3 and an empty one.
"""

from __future__ import annotations

import pytest
import torch

from . import distributed_harness as harness
from .distributed_workers import TOKEN_DIAG, TOKEN_KFAC, make, reference_run
from .fsdp_workers import (
    FSDPScenario,
    budget,
    dcp_load,
    dcp_save,
    dead_after_backward,
    default_workers,
    train_fsdp,
    unsupported,
    zoo_run,
)

TOKENS = TOKEN_KFAC | TOKEN_DIAG
KRON = {"constraint": "kronecker", "target_loss_change": 1e-3, "loss_change_unit": "absolute"}
EXACT = {"constraint": "exact", "target_loss_change": 0.5, "lr": 0.1}


def _sc(name: str, fraction: str, mode: str, reduction: str, **kw: object) -> FSDPScenario:
    return FSDPScenario(name, fraction, mode, reduction, steps=5, **kw)  # type: ignore[arg-type]


SCENARIOS: dict[int, list[FSDPScenario]] = {
    2: [
        _sc("mem_opt/exact/mean", "mem_opt", "exact", "mean"),
        _sc("comm_opt/pi/sum/uneven_batches", "comm_opt", "pi", "sum", sizes=(3, 5)),
        _sc(
            "tokens/mem_opt/eigen_adam/mean/no_reshard",
            "mem_opt",
            "eigen_adam",
            "mean",
            model="tokens",
            kfac=TOKENS,
            reshard=False,
        ),  # fmt: skip
        _sc(
            "tokens/comm_opt/ekfac/sum/grad_scaler/kronecker",
            "comm_opt",
            "ekfac",
            "sum",
            model="tokens",
            kfac=TOKENS | KRON | {"lr": 0.1},
            scaler=True,
        ),  # fmt: skip
        _sc(
            "mem_opt/exact/mean/accumulate_without_sync",
            "mem_opt",
            "exact",
            "mean",
            accumulate=True,
        ),  # fmt: skip
        _sc(
            "tokens/mem_opt/pi/mean/resume",
            "mem_opt",
            "pi",
            "mean",
            model="tokens",
            kfac=TOKENS,
            resume_at=2,
        ),  # fmt: skip
        _sc(
            "tokens/mem_opt/eigen_adam/mean/bf16_params",
            "mem_opt",
            "eigen_adam",
            "mean",
            model="tokens",
            kfac=TOKENS,
            mixed=True,
        ),  # fmt: skip
        _sc("comm_opt/exact/mean/bf16_params", "comm_opt", "exact", "mean", mixed=True),
        _sc("mem_opt/exact/mean/autocast_bf16", "mem_opt", "exact", "mean", autocast=True),
    ],
    3: [
        _sc("mem_opt/pi/mean/uneven_batches", "mem_opt", "pi", "mean", sizes=(2, 3, 4)),
        _sc(
            "tokens/comm_opt/exact/mean/exact_constraint",
            "comm_opt",
            "exact",
            "mean",
            model="tokens",
            kfac=TOKENS | EXACT,
            step_loss=True,
        ),  # fmt: skip
        _sc(
            "tokens/comm_opt/ekfac/mean", "comm_opt", "ekfac", "mean", model="tokens", kfac=TOKENS
        ),  # fmt: skip
        _sc(
            "tokens/mem_opt/eigen_adam/sum",
            "mem_opt",
            "eigen_adam",
            "sum",
            model="tokens",
            kfac=TOKENS,
        ),  # fmt: skip
    ],
    4: [
        _sc("mem_opt/exact/sum", "mem_opt", "exact", "sum"),
        _sc("comm_opt/exact/sum", "comm_opt", "exact", "sum"),
        _sc(
            "tokens/mem_opt/pi/mean/kronecker",
            "mem_opt",
            "pi",
            "mean",
            model="tokens",
            kfac=TOKENS | KRON | {"lr": 0.1},
        ),  # fmt: skip
        _sc(
            "tokens/comm_opt/ekfac/mean", "comm_opt", "ekfac", "mean", model="tokens", kfac=TOKENS
        ),  # fmt: skip
        _sc(
            "tokens/mem_opt/eigen_adam/mean/uneven_batches",
            "mem_opt",
            "eigen_adam",
            "mean",
            model="tokens",
            kfac=TOKENS,
            sizes=(2, 3, 4, 3),
        ),  # fmt: skip
    ],
}
CASES = [(w, sc) for w, scs in SCENARIOS.items() for sc in scs]


@pytest.fixture(scope="module")
def runs():
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = harness.run(train_fsdp, world, SCENARIOS[world], time_limit_s=300.0)
        return cache[world]

    return get


EXACT_CASES = [(w, sc) for w, sc in CASES if not (sc.mixed or sc.autocast)]
MIXED_CASES = [(w, sc) for w, sc in CASES if sc.mixed or sc.autocast]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world", "sc"), MIXED_CASES, ids=[f"{w}-{sc.name}" for w, sc in MIXED_CASES]
)
def test_bf16_compute_follows_the_float64_run(runs, world, sc):
    """MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32), or a float32 model
    under torch.autocast(bfloat16): the hooks see bf16 activations and output gradients
    (folded in the factor dtype); the training stays
    within bf16's rounding of the float64 one-process run: the parameters' change after 5
    steps agrees to 10% (a wrong scaling or a lost layer would be off by O(1))."""
    ref = reference_run(sc, world)
    start = torch.cat([p.detach().flatten() for p in make(sc.model).parameters()])
    for r in range(world):
        got = runs(world)[r][sc.name]["params"][-1]
        moved = ref["params"][-1] - start
        err = (got - ref["params"][-1]).norm() / moved.norm()
        assert err < 0.1, (r, float(err))
        assert moved.norm() > 0.1


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world", "sc"), EXACT_CASES, ids=[f"{w}-{sc.name}" for w, sc in EXACT_CASES]
)
def test_same_parameters_as_one_process(runs, world, sc):
    ref = reference_run(sc, world)
    for r in range(world):
        got = runs(world)[r][sc.name]
        assert len(got["params"]) == sc.steps == 5
        for step, (a, b) in enumerate(zip(got["params"], ref["params"])):
            torch.testing.assert_close(
                a, b, rtol=1e-9, atol=1e-9, msg=lambda m, r=r, s=step: f"rank {r} step {s}: {m}"
            )
        if sc.measures:
            for a, b in zip(got["diagnostics"], ref["diagnostics"]):
                assert a["nu"] == pytest.approx(b["nu"], rel=1e-9)
            assert any(d["nu"] != 1.0 for d in got["diagnostics"])
    # Each layer's running factors are those of the global batch, on the ranks that keep
    # them: every rank ("comm_opt") or exactly one ("mem_opt").
    keepers: dict[str, int] = {}
    for r in range(world):
        got = runs(world)[r][sc.name]
        for name, (a, g) in got["factors"].items():
            keepers[name] = keepers.get(name, 0) + 1
            torch.testing.assert_close(a, ref["factors"][name][0], rtol=1e-7, atol=1e-12)
            torch.testing.assert_close(g, ref["factors"][name][1], rtol=1e-7, atol=1e-12)
        assert got["preconditions"] == {n: n in got["factors"] for n in got["preconditions"]}
    assert set(keepers) == set(ref["factors"])
    assert set(keepers.values()) == {world if sc.fraction == "comm_opt" else 1}
    # state_dict() is complete on every rank (gathered from the keepers).
    for r in range(world):
        state = runs(world)[r][sc.name]["state"]
        assert set(state["layers"]) == set(ref["state"]["layers"])
        for name, entry in ref["state"]["layers"].items():
            torch.testing.assert_close(
                state["layers"][name]["A"], entry["A"], rtol=1e-7, atol=1e-12
            )


@pytest.mark.distributed
def test_per_rank_state_falls_with_the_world_size(runs):
    """mem_opt: each rank's planned state (factors, decompositions) is its own layers'; the
    ranks' shares add up to the comm_opt total, and none exceeds total/W + the largest layer."""
    world = 4
    mem = [runs(world)[r]["mem_opt/exact/sum"]["state_bytes"] for r in range(world)]
    comm = [runs(world)[r]["comm_opt/exact/sum"]["state_bytes"] for r in range(world)]
    assert len(set(comm)) == 1
    total = comm[0]
    assert sum(mem) == total
    largest = runs(world)[0]["comm_opt/exact/sum"]["largest_layer_bytes"]
    assert max(mem) <= total / world + largest
    assert max(mem) < total


@pytest.mark.distributed
def test_traffic(runs):
    """mem_opt gathers each rank's layers and returns the rows; comm_opt gathers to every
    rank and returns nothing (bytes received per rank, float64)."""
    world = 4
    for r in range(world):
        mem = runs(world)[r]["mem_opt/exact/sum"]["bytes"]
        comm = runs(world)[r]["comm_opt/exact/sum"]["bytes"]
        assert mem["gather"] > 0 and mem["return"] > 0
        assert comm["gather"] > 0 and "return" not in comm
        # mem_opt reduces each layer's statistics to its owner; comm_opt all-reduces them.
        assert mem["statistics_to_owner"] > 0 and "statistics_to_owner" not in comm
    total_mem = sum(runs(world)[r]["mem_opt/exact/sum"]["bytes"]["gather"] for r in range(world))
    total_ret = sum(runs(world)[r]["mem_opt/exact/sum"]["bytes"]["return"] for r in range(world))
    assert total_mem == total_ret  # every row that went to a worker comes back


@pytest.mark.distributed
@pytest.mark.parametrize("fraction", ["mem_opt", "comm_opt"])
def test_checkpoints_saved_under_two_ranks_load_under_one_and_three(tmp_path, fraction):
    path = str(tmp_path / "ckpt")
    saved = harness.run(dcp_save, 2, path, fraction, time_limit_s=120.0)
    state = saved[0]["state"]
    assert saved[0]["state"]["layers"].keys() == saved[1]["state"]["layers"].keys()
    written = set(saved[0]["written"]) | set(saved[1]["written"])
    if fraction == "mem_opt":  # each rank holds (and writes) its own layers only
        assert set(saved[0]["written"]) & set(saved[1]["written"]) == {"meta"}
    assert {f"layer/{n}" for n in state["layers"]} <= written
    # The collective state_dict() of 2 ranks, saved with torch.save, loads the same way.
    full = str(tmp_path / "state.pt")
    torch.save(state, full)
    for world, source, how in [(1, path, "dcp"), (3, path, "dcp"), (1, full, "state_dict"),
                               (3, full, "state_dict")]:  # fmt: skip
        loaded = harness.run(dcp_load, world, source, fraction, how, time_limit_s=120.0)
        held: set[str] = set()
        for res in loaded:
            assert res["steps"] == 3
            for name, a in res["A"].items():
                if a is None:
                    continue
                held.add(name)
                torch.testing.assert_close(a, state["layers"][name]["A"], rtol=0, atol=0)
            for name, s in res["s"].items():
                torch.testing.assert_close(
                    s, state["layers"][name]["decomposition"]["s"], rtol=0, atol=0
                )
        assert held == set(state["layers"])


@pytest.mark.distributed
def test_a_rank_dead_after_backward_fails_the_step_clearly():
    timeout = 4.0
    (res,) = harness.run(
        dead_after_backward, 2, time_limit_s=90.0, pg_timeout_s=timeout, wait_for=[0]
    )
    assert res["error"] is not None and "kfac_ef" in res["error"] and "rank 0 of 2" in res["error"]
    assert res["seconds"] < timeout + 20


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("hybrid", "one rank each .'mem_opt'"),
        ("not_distributed", "must run distributed"),
        ("precondition_update", "precondition_update=True is not supported under FSDP2"),
        ("constrained_step", "constrained_step='optimizer' is not supported under FSDP2"),
    ],
)
def test_unsupported_setups_are_clear_errors_on_every_rank(what, match):
    import re

    got = harness.run(unsupported, 4, what, time_limit_s=90.0)
    assert all(re.search(match, msg) for msg in got), got


@pytest.mark.distributed
def test_memory_budget_is_per_rank():
    got = harness.run(budget, 4, time_limit_s=90.0)
    for res in got:
        assert res["mine"] <= res["limit"] < res["total"]
        assert res["error"] is not None and "exceeds memory_budget" in res["error"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hugging_face_models_sharded_per_block(name):
    """transformers' Llama (RMSNorm by rule, diagonal) and GPT-2 (Conv1D by rule, tied head)
    with fully_shard on each decoder block and the root, 2 ranks, float64: the parameters of
    3 steps equal one process on the whole batch, and the same layers are preconditioned."""
    ref = zoo_run(0, 1, name)
    got = harness.run(zoo_run, 2, name, time_limit_s=200.0)
    for r in range(2):
        assert got[r]["layers"] == ref["layers"]
        for step, (a, b) in enumerate(zip(got[r]["params"], ref["params"])):
            torch.testing.assert_close(
                a, b, rtol=1e-9, atol=1e-9, msg=lambda m, r=r, s=step: f"rank {r} step {s}: {m}"
            )


@pytest.mark.distributed
def test_default_strategy_is_mem_opt_under_fsdp():
    """Left automatic, FSDP2 gets mem_opt (measured faster and lighter, benchmarks/fsdp.py),
    comm_opt where every rank needs every layer; DDP keeps comm_opt."""
    (res, _) = harness.run(default_workers, 2, time_limit_s=90.0)
    assert res == {
        "fsdp": "mem_opt",
        "fsdp ekfac": "comm_opt",
        "fsdp exact constraint": "comm_opt",
        "ddp": "comm_opt",
    }
