"""Distributed K-FAC against one process on the concatenated global batch (gloo, CPU).

Each world size runs all its scenarios in one set of spawned processes (module-scoped
fixtures), with a hard time limit; the tests then compare every rank's parameters, step
after step, with a one-process run. The plan (LPT, grid) is unit-tested without processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kfac_ef import DistributedOptions, KFACOptions
from kfac_ef._distributed import groups as kfac_groups
from kfac_ef.distributed import Grid, Plan, _check_supported, grad_workers, lpt, resolve

from . import distributed_harness as harness
from . import internals
from .distributed_workers import (
    TOKEN_DIAG,
    TOKEN_KFAC,
    Scenario,
    TokenNet,
    dead_before_backward,
    dead_peer,
    identical_training,
    launch_fails,
    make_model,
    mismatched_layers,
    partly_used_layers,
    reference_run,
    train_scenarios,
)
from .helpers import seed_preconditioner

# The loss-change constraint (lr: the workers' SGD learning rate).
ABSOLUTE = {"loss_change_unit": "absolute", "lr": 0.1}
EXACT_ABS = {"constraint": "exact", "target_loss_change": 0.05} | ABSOLUTE
EXACT_SPREAD = {"constraint": "exact", "target_loss_change": 0.5, "lr": 0.1}
RELATIVE = {"damping_unit": "relative", "damping": 0.03}
KRON_ABS = {"constraint": "kronecker", "target_loss_change": 1e-3} | ABSOLUTE

SCENARIOS: dict[int, list[Scenario]] = {
    2: [
        Scenario("comm_opt/exact/mean", "comm_opt", "exact", "mean"),
        Scenario("mem_opt/pi/mean", "mem_opt", "pi", "mean"),
        Scenario("hybrid/exact/sum/uneven", "hybrid", "exact", "sum", sizes=(3, 5)),
        Scenario("comm_opt/pi/mean/uneven", "comm_opt", "pi", "mean", sizes=(2, 6)),
        Scenario("comm_opt/exact/mean/no_sync", "comm_opt", "exact", "mean", accumulate=True),
        Scenario(
            "comm_opt/exact/mean/accumulate_with_sync/tiny_buckets",
            "comm_opt",
            "exact",
            "mean",
            accumulate=True,
            no_sync=False,
            bucket_cap_mb=1e-4,
        ),
        Scenario(
            "mem_opt/pi/sum/no_sync/no_overlap",
            "mem_opt",
            "pi",
            "sum",
            accumulate=True,
            overlap=False,
        ),
        Scenario(
            "mem_opt/exact/mean/sync_at_decomposition",
            "mem_opt",
            "exact",
            "mean",
            factor_sync="decomposition",
        ),
        Scenario("mem_opt/exact/mean/resume", "mem_opt", "exact", "mean", resume_at=2),
        Scenario(
            "comm_opt/exact/mean/cadence",
            "comm_opt",
            "exact",
            "mean",
            steps=5,
            kfac={"factor_update_steps": 2, "inv_update_steps": 3},
        ),
        # TokenNet: diagonal A (embedding), block-diagonal / diagonal wide factors, a tied
        # weight, attention, LayerNorm through the diagonal empirical Fisher.
        Scenario(
            "tokens/comm_opt/exact/mean/blocks",
            "comm_opt",
            "exact",
            "mean",
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG,
        ),
        # damping_unit="relative": every rank computes the blocks' ε from the synced factors
        # (decompositions arrive without it); checkpoints carry it.
        Scenario(
            "tokens/mem_opt/exact/mean/relative/resume",
            "mem_opt",
            "exact",
            "mean",
            resume_at=2,
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG | RELATIVE,
        ),
        Scenario(
            "tokens/comm_opt/exact/sum/relative/sync_at_decomposition",
            "comm_opt",
            "exact",
            "sum",
            factor_sync="decomposition",
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG | RELATIVE,
        ),
        Scenario(
            "tokens/comm_opt/eigen_adam/mean/relative",
            "comm_opt",
            "eigen_adam",
            "mean",
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG | RELATIVE,
        ),
        Scenario(
            "tokens/comm_opt/ekfac/mean/relative",
            "comm_opt",
            "ekfac",
            "mean",
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG | RELATIVE,
        ),
        Scenario(
            "tokens/mem_opt/pi/sum/uneven/diagonal",
            "mem_opt",
            "pi",
            "sum",
            sizes=(3, 5),
            model="tokens",
            kfac={"max_factor_dim": 8, "large_factor_block": 1} | TOKEN_DIAG,
        ),
        Scenario(
            "tokens/comm_opt/exact/sum/grad_scaler",
            "comm_opt",
            "exact",
            "sum",
            model="tokens",
            scaler=True,
            kfac=TOKEN_KFAC | TOKEN_DIAG,
        ),
        Scenario(
            "tokens/mem_opt/exact/mean/sync_at_decomposition",
            "mem_opt",
            "exact",
            "mean",
            factor_sync="decomposition",
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG,
        ),
        # The constraint over the global batch: per-example losses of every rank (spread
        # units), one gradient worker per layer (forms summed over a row), uneven batches.
        Scenario(
            "constraint/hybrid/exact/sum/uneven/spread",
            "hybrid",
            "exact",
            "sum",
            sizes=(3, 5),
            step_loss=True,
            kfac=EXACT_SPREAD,
        ),
        Scenario(
            "constraint/mem_opt/pi/mean/kronecker",
            "mem_opt",
            "pi",
            "mean",
            kfac=KRON_ABS | {"track_loss_changes": True},
        ),
        # EKFAC (S reduced like G) with structured factors, attention, a tied weight, the
        # diagonal Fisher and the exact constraint; then with a GradScaler and sum reduction.
        Scenario(
            "tokens/comm_opt/ekfac/mean/blocks/constraint",
            "comm_opt",
            "ekfac",
            "mean",
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG | EXACT_ABS,
        ),
        Scenario(
            "tokens/comm_opt/ekfac/mean/resume",
            "comm_opt",
            "ekfac",
            "mean",
            resume_at=1,
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG,
        ),
        Scenario(
            "tokens/comm_opt/ekfac/sum/grad_scaler/kronecker",
            "comm_opt",
            "ekfac",
            "sum",
            model="tokens",
            scaler=True,
            step_loss=True,
            kfac=TOKEN_KFAC
            | TOKEN_DIAG
            | KRON_ABS
            | {"loss_change_unit": "loss", "target_loss_change": 0.01, "track_loss_changes": True},
        ),
        # The true Fisher: sampled-target statistics reduced like the empirical ones.
        Scenario("mc/comm_opt/exact/mean/uneven", "comm_opt", "exact", "mean", (2, 6), mc=True),
        Scenario(
            "mem_opt/exact/mean/uneven/constrained_optimizer_step/momentum",
            "mem_opt",
            "exact",
            "mean",
            sizes=(3, 5),
            momentum=0.9,
            step_loss=True,
            kfac=EXACT_SPREAD | {"lr": None, "constrained_step": "optimizer"},
        ),
        Scenario(
            "comm_opt/exact/sum/constrained_optimizer_step/momentum",
            "comm_opt",
            "exact",
            "sum",
            momentum=0.9,
            kfac=EXACT_ABS | {"lr": None, "constrained_step": "optimizer"},
        ),
        # The optimizer's update preconditioned once more (every rank has the same Δθ; the
        # workers precondition it and share the results as in step())
        Scenario(
            "mem_opt/exact/mean/uneven/precondition_update/momentum",
            "mem_opt",
            "exact",
            "mean",
            sizes=(3, 5),
            momentum=0.9,
            kfac={"precondition_update": True, "exponent": -0.5},
        ),
        Scenario(
            "tokens/comm_opt/pi/sum/precondition_update/diagonal",
            "comm_opt",
            "pi",
            "sum",
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG | {"precondition_update": True},
        ),
        Scenario(
            "tokens/mc/mem_opt/pi/mean/no_sync/diagonal/constraint",
            "mem_opt",
            "pi",
            "mean",
            accumulate=True,
            mc=True,
            model="tokens",
            kfac={"max_factor_dim": 8, "large_factor_block": 1} | TOKEN_DIAG | EXACT_ABS,
        ),
    ],
    3: [
        Scenario("comm_opt/exact/mean", "comm_opt", "exact", "mean"),
        Scenario("mem_opt/pi/mean/uneven", "mem_opt", "pi", "mean", sizes=(1, 3, 4)),
        Scenario("hybrid/exact/sum/uneven", "hybrid", "exact", "sum", sizes=(2, 5, 3)),
        Scenario("0.7/pi/mean/no_sync", 0.7, "pi", "mean", accumulate=True),
        Scenario(
            "comm_opt/pi/sum/sync_at_decomposition",
            "comm_opt",
            "pi",
            "sum",
            factor_sync="decomposition",
        ),
        Scenario("subgroup{0,2}/comm_opt/exact/mean", "comm_opt", "exact", "mean", ranks=(0, 2)),
        Scenario(
            "tokens/mem_opt/exact/mean/no_sync/diagonal",
            "mem_opt",
            "exact",
            "mean",
            accumulate=True,
            model="tokens",
            kfac={"max_factor_dim": 8, "large_factor_block": 1} | TOKEN_DIAG,
        ),
        # A decomposition every step: these factors are rank-deficient, and S of batches
        # between decompositions depends on the basis chosen in the null space, which the
        # last bits of the (differently summed) factors decide.
        Scenario(
            "mc/comm_opt/ekfac/mean/no_sync/uneven",
            "comm_opt",
            "ekfac",
            "mean",
            sizes=(2, 4, 6),
            accumulate=True,
            mc=True,
            kfac={"inv_update_steps": 1},
        ),
        Scenario(
            "constraint/mem_opt/exact/mean/loss_unit",
            "mem_opt",
            "exact",
            "mean",
            step_loss=True,
            kfac=EXACT_ABS | {"loss_change_unit": "loss"},
        ),
    ],
    4: [
        Scenario("comm_opt/exact/mean", "comm_opt", "exact", "mean"),
        Scenario("mem_opt/pi/mean", "mem_opt", "pi", "mean"),
        Scenario("hybrid/exact/mean", "hybrid", "exact", "mean", bucket_cap_mb=1e-4),
        Scenario("hybrid/pi/sum/uneven", "hybrid", "pi", "sum", sizes=(1, 2, 3, 6)),
        Scenario("hybrid/exact/mean/no_sync", "hybrid", "exact", "mean", accumulate=True),
        Scenario(
            "hybrid/pi/mean/sync_at_decomposition",
            "hybrid",
            "pi",
            "mean",
            factor_sync="decomposition",
        ),
        Scenario("hybrid/exact/mean/resume", "hybrid", "exact", "mean", resume_at=2),
        Scenario("hybrid/pi/mean/relative", "hybrid", "pi", "mean", kfac=RELATIVE),
        Scenario(
            "tokens/hybrid/pi/mean/resume",
            "hybrid",
            "pi",
            "mean",
            resume_at=2,
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG,
        ),
        Scenario(
            "tokens/mem_opt/exact/mean/statistics_stride",
            "mem_opt",
            "exact",
            "mean",
            steps=5,
            model="tokens",
            kfac=TOKEN_KFAC | {"statistics_stride": 3, "factor_update_steps": 1},
        ),
        Scenario(
            "tokens/hybrid/exact/mean/tiny_buckets",
            "hybrid",
            "exact",
            "mean",
            bucket_cap_mb=1e-4,
            model="tokens",
            kfac=TOKEN_KFAC | TOKEN_DIAG,
        ),
    ],
}

CASES = [(w, sc) for w, scs in SCENARIOS.items() for sc in scs]


@pytest.fixture(scope="module")
def runs():
    """World size -> list over ranks of {scenario name: result}; run once, lazily."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = harness.run(train_scenarios, world, SCENARIOS[world], time_limit_s=240.0)
        return cache[world]

    return get


@pytest.mark.distributed
@pytest.mark.parametrize(("world", "sc"), CASES, ids=[f"{w}-{sc.name}" for w, sc in CASES])
def test_same_parameters_as_one_process(runs, world, sc):
    ref = reference_run(sc, world)
    members = sc.ranks if sc.ranks is not None else range(world)
    # eigen_adam divides by the root of the gradient's own second moment, which scales the
    # float64 rounding of the all-reduce's summation order up by about |g|/√S, and the
    # trajectory (so the later factors) follows: parameters to 1e-9 absolute, factors to 1e-7
    # relative. An error in the method would show at O(1).
    loose = sc.mode == "eigen_adam"
    params_tol = {"rtol": 1e-9, "atol": 1e-9 if loose else 1e-10}
    factors_tol = {"rtol": 1e-7 if loose else 1e-9, "atol": 1e-12}
    for r in members:
        got = runs(world)[r][sc.name]
        assert len(got["params"]) == sc.steps
        for step, (a, b) in enumerate(zip(got["params"], ref["params"])):
            torch.testing.assert_close(
                a, b, **params_tol, msg=lambda m, r=r, s=step: f"rank {r} step {s}: {m}"
            )
    if sc.factor_sync == "update":
        # The running factors are those of the global batch on every rank.
        for r in members:
            got = runs(world)[r][sc.name]["factors"]
            assert set(got) == set(ref["factors"])
            for name, (a, g) in ref["factors"].items():
                torch.testing.assert_close(got[name][0], a, **factors_tol)
                torch.testing.assert_close(got[name][1], g, **factors_tol)
        for r in members:  # the diagonal empirical Fishers too
            got = runs(world)[r][sc.name]["fishers"]
            assert set(got) == set(ref["fishers"])
            for name, f in ref["fishers"].items():
                torch.testing.assert_close(got[name], f, **factors_tol)
    if sc.measures:
        # ν, the target and E[(Δℓ)²] in both forms are those of the global batch.
        keys = ("nu", "target", "kronecker", "exact")
        for r in members:
            got = runs(world)[r][sc.name]["diagnostics"]
            assert len(got) == len(ref["diagnostics"]) == sc.steps
            for step, (a, b) in enumerate(zip(got, ref["diagnostics"])):
                for k in keys:
                    assert (a[k] is None) == (b[k] is None), (r, step, k)
                    if b[k] is not None:
                        assert a[k] == pytest.approx(b[k], rel=1e-9), (r, step, k)
            assert any(d["nu"] != 1.0 for d in got)
    others = set(range(world)) - set(members)
    assert all(runs(world)[r][sc.name] is None for r in others)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3, 4])
def test_statistics_launched_during_backward(runs, world):
    """With overlap (default), the all-reduce of statistics starts before step()."""
    for sc in SCENARIOS[world]:
        flags = runs(world)[0][sc.name]
        if flags is None or sc.factor_sync != "update":
            continue
        launched = flags["launched_in_backward"]
        fu = sc.kfac.get("factor_update_steps", 1)
        expected = [sc.overlap and s % fu == 0 for s in range(sc.steps)]
        assert launched == expected, sc.name
        if sc.bucket_cap_mb < 1e-3 and sc.overlap and sc.model == "mlp":
            # One layer per bucket: the four later layers' reductions start while backward
            # still has the first layer to go (in every pass, when DDP syncs every pass).
            passes = 2 if sc.accumulate and not sc.no_sync else 1
            assert flags["before_first_layer"] == [5 * (passes - 1) + 4] * sc.steps, sc.name


@pytest.mark.distributed
def test_traffic_follows_the_strategy(runs):
    """comm_opt sends decompositions and no gradients; mem_opt the reverse; hybrid both."""
    by_name = runs(4)[0]
    comm = by_name["comm_opt/exact/mean"]["bytes"]
    mem = by_name["mem_opt/pi/mean"]["bytes"]
    hybrid = by_name["hybrid/exact/mean"]["bytes"]
    assert comm.get("gradients", 0) == 0 and comm["decompositions"] > 0
    assert mem.get("decompositions", 0) == 0 and mem["gradients"] > 0
    assert hybrid["decompositions"] > 0 and hybrid["gradients"] > 0
    assert hybrid["decompositions"] < comm["decompositions"]
    # Statistics: one triangle per factor per step, float64 (plus two counts per layer).
    model = make_model()
    pre = seed_preconditioner(model, distributed=False)
    tri = sum(
        s.blocks * (s.a_shape[0] * (s.a_shape[0] + 1) // 2 + s.g_shape[0] * (s.g_shape[0] + 1) // 2)
        + 2
        for s in pre.summary().layers
    )
    assert comm["statistics"] == 4 * 8 * tri
    # mem_opt: each layer's decomposition lives on one rank (summary() counts it there).
    for name in by_name["mem_opt/pi/mean"]["preconditions"]:
        holders = [r for r in range(4) if runs(4)[r]["mem_opt/pi/mean"]["preconditions"][name]]
        assert len(holders) == 1
        held = [runs(4)[r]["mem_opt/pi/mean"]["decomposition_bytes"][name] for r in range(4)]
        assert [r for r in range(4) if held[r] > 0] == holders
        assert [r for r in range(4) if runs(4)[r]["mem_opt/pi/mean"]["holds"][name]] == holders
    sync = runs(2)[0]["mem_opt/exact/mean/sync_at_decomposition"]["bytes"]
    assert sync.get("statistics", 0) == 0 and sync["factors"] > 0


@pytest.mark.distributed
def test_checkpoint_names_have_no_ddp_prefix(runs):
    """A state saved from a DDP-wrapped model loads into an unwrapped one, and back."""
    got = runs(2)[0]["comm_opt/exact/mean"]["state"]
    ref = reference_run(SCENARIOS[2][0], 2)
    assert set(got["layers"]) == set(ref["state"]["layers"]) == {"0", "3", "5", "7", "9"}
    model = make_model()
    pre = seed_preconditioner(model, distributed=False, **SCENARIOS[2][0].kfac_options())
    pre.load_state_dict(got)
    for name, (a, g) in pre.factors().items():
        torch.testing.assert_close(a, ref["factors"][name][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, ref["factors"][name][1], rtol=1e-9, atol=1e-12)
    # Names saved with the wrapper's prefix are mapped to the unwrapped names.
    prefixed = dict(got, layers={f"module.{k}": v for k, v in got["layers"].items()})
    pre.load_state_dict(prefixed)
    assert set(pre.factors()) == set(ref["factors"])


@pytest.mark.distributed
def test_structured_checkpoint_loads_into_one_process(runs):
    """Block-diagonal and diagonal factors and diagonal Fishers saved by a rank (names with
    or without DDP's ``module.`` prefix) load into a one-process preconditioner."""
    sc = next(sc for sc in SCENARIOS[2] if sc.name == "tokens/comm_opt/exact/mean/blocks")
    got = runs(2)[1][sc.name]["state"]
    ref = reference_run(sc, 2)
    assert got["diagonal"] and set(got["diagonal"]) == set(ref["state"]["diagonal"])
    prefixed = dict(
        got,
        layers={f"module.{k}": v for k, v in got["layers"].items()},
        diagonal={f"module.{k}": v for k, v in got["diagonal"].items()},
    )
    for state in (got, prefixed):
        pre = seed_preconditioner(TokenNet().double(), distributed=False, **sc.kfac_options())
        pre.load_state_dict(state)
        assert set(pre.factors()) == set(ref["factors"])
        for name, (a, g) in ref["factors"].items():
            torch.testing.assert_close(pre.factors()[name][0], a, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(pre.factors()[name][1], g, rtol=1e-9, atol=1e-12)
        for name, f in ref["fishers"].items():
            torch.testing.assert_close(pre.diagonal_fishers()[name], f, rtol=1e-9, atol=1e-12)


@pytest.mark.distributed
@pytest.mark.parametrize("fraction", ["comm_opt", "mem_opt"])
def test_training_keeps_ranks_identical(fraction):
    """Different data per rank, float32, momentum: parameters stay equal across ranks."""
    runs = harness.run(identical_training, 3, fraction, time_limit_s=120.0)
    for step in range(len(runs[0])):
        assert torch.isfinite(runs[0][step]).all()
        for r in (1, 2):
            assert torch.equal(runs[r][step], runs[0][step]), (fraction, r, step)
    assert not torch.equal(runs[0][0], runs[0][-1])


@pytest.mark.distributed
def test_layer_used_on_some_ranks_only():
    """A layer with data on rank 0 only gets rank 0's factors on every rank; a layer with
    data nowhere gets no update (and is not counted as a skipped one)."""
    got = harness.run(partly_used_layers, 2, True, time_limit_s=90.0)
    alone = partly_used_layers(0, 1, False)  # rank 0's batch, one process
    for r in range(2):
        extra = got[r]["factors"]["extra"]
        torch.testing.assert_close(extra[0], alone["factors"]["extra"][0])
        torch.testing.assert_close(extra[1], alone["factors"]["extra"][1])
        assert got[r]["updates"]["never"].tolist() == [0]
        assert got[r]["updates"]["extra"].tolist() == [1]
    assert "never" not in alone["factors"]
    # The trunk's factors are the same on both ranks (global), and differ from rank 0's own.
    torch.testing.assert_close(got[0]["factors"]["trunk"][0], got[1]["factors"]["trunk"][0])
    assert not torch.allclose(got[0]["factors"]["trunk"][0], alone["factors"]["trunk"][0])


@pytest.mark.distributed
def test_different_layers_across_ranks_is_a_clear_error_on_every_rank():
    messages = harness.run(mismatched_layers, 2, time_limit_s=90.0)
    for msg in messages:
        assert "differ across ranks" in msg
        assert "rank 1" in msg and "'3: Linear" in msg and "G 7x7" in msg


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_dead_or_hung_rank_fails_the_others_within_the_timeout(how):
    timeout = 4.0
    (res,) = harness.run(dead_peer, 2, how, time_limit_s=90.0, pg_timeout_s=timeout, wait_for=[0])
    assert res["error"] is not None, "step() returned although its peer is gone"
    assert "kfac_ef:" in res["error"] and "another rank" in res["error"]
    assert res["seconds"] < timeout + 20


@pytest.mark.distributed
@pytest.mark.parametrize("ddp", [False, True], ids=["kfac-only", "ddp"])
def test_a_rank_dead_before_its_backward_is_named(ddp):
    """The survivor's error names kfac_ef and the likely cause whenever K-FAC's own
    collectives meet the dead peer. With DDP, DDP's gradient all-reduce meets it first and
    raises gloo's own error from backward(), K-FAC's launched collectives still in flight."""
    (res,) = harness.run(
        dead_before_backward, 2, ddp, time_limit_s=90.0, pg_timeout_s=4.0, wait_for=[0]
    )
    assert res["error"] is not None
    if not ddp or "kfac_ef" in res["error"]:
        assert "kfac_ef:" in res["error"] and "another rank" in res["error"], res["error"]


@pytest.mark.distributed
def test_a_collective_that_fails_to_launch_is_named():
    (res,) = harness.run(launch_fails, 2, time_limit_s=90.0, pg_timeout_s=4.0, wait_for=[0])
    assert res["error"] is not None and res["error"].startswith("kfac_ef:"), res["error"]
    assert "Connection closed by peer" in res["error"]


# ---------------------------------------------------------------------- no processes


def test_group_cache_keeps_the_parent_its_key_names(tmp_path):
    """Cached groups are keyed by id(parent): the entry holds the parent, so that the id
    cannot be reused by another group while the entry lives."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        parent = dist.new_group([0])
        group = kfac_groups._new_group(parent, [0], everyone=True)
        key = (id(parent), (0,))
        assert kfac_groups._GROUPS[key] == (parent, group)
    finally:
        kfac_groups._GROUPS.clear()
        dist.destroy_process_group()


def test_lpt_balances_and_is_deterministic():
    costs = [7.0, 5.0, 4.0, 3.0, 3.0, 2.0]
    bins = lpt(costs, 2)
    assert bins == lpt(costs, 2)
    loads = [sum(c for c, b in zip(costs, bins) if b == k) for k in range(2)]
    assert sorted(loads) == [12.0, 12.0]
    assert lpt([1.0], 3) == [0]


@pytest.mark.parametrize(
    ("fraction", "world", "expected"),
    [
        ("comm_opt", 4, 4),
        ("mem_opt", 4, 1),
        ("hybrid", 4, 2),
        ("hybrid", 2, 1),
        ("hybrid", 3, 1),
        (0.5, 6, 3),
        (0.6, 6, 3),
        (1.0, 5, 5),
        (0.3, 8, 2),
    ],
)
def test_grad_workers_is_the_nearest_divisor(fraction, world, expected):
    assert grad_workers(fraction, world) == expected


def test_plan_puts_big_factors_on_different_ranks():
    model = torch.nn.Sequential(
        torch.nn.Linear(63, 31), torch.nn.Linear(31, 63), torch.nn.Linear(63, 2)
    )
    pre = seed_preconditioner(model, distributed=False)
    layers = internals.layers(pre)
    comm = Plan.build(layers, Grid(rows=2, columns=1))
    # Three 64³-sized factors (A of 0 and 2: 63+1; G of 1: 63) and small ones: a rank
    # gets at most two of the big ones.
    owners = [comm.owner[(n, s)] for n, s in (("0", "A"), ("1", "G"), ("2", "A"))]
    assert sorted(owners).count(0) in (1, 2)
    assert max(comm.loads(layers)) < sum(comm.loads(layers))
    mem = Plan.build(layers, Grid(rows=1, columns=2))
    for layer in layers:  # one column per layer: its owner decomposes both factors
        assert mem.owner[(layer.name, "A")] == mem.owner[(layer.name, "G")]
        assert mem.owner[(layer.name, "A")] == mem.column[layer.name]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grad_worker_fraction": "fast"}, "grad_worker_fraction"),
        ({"grad_worker_fraction": 0.0}, "grad_worker_fraction"),
        ({"grad_worker_fraction": 1.5}, "grad_worker_fraction"),
        ({"grad_worker_fraction": True}, "grad_worker_fraction"),
        ({"factor_sync": "never"}, "factor_sync"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb"),
        ({"overlap": 1}, "overlap"),
        ({"process_group": "world"}, "process_group"),
    ],
)
def test_bad_distributed_options_name_themselves(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DistributedOptions(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "world", "match"),
    [
        ({"grad_worker_fraction": "mem_opt"}, 2, "grad_worker_fraction='mem_opt'"),
        ({"grad_worker_fraction": "hybrid"}, 4, "every rank must hold every eigenbasis"),
        ({"grad_worker_fraction": 0.5}, 2, "comm_opt"),
        ({"factor_sync": "decomposition"}, 2, "factor_sync='update'"),
    ],
)
def test_ekfac_needs_every_eigenbasis_on_every_rank(kwargs, world, match):
    """Combinations EKFAC cannot compute exactly are construction errors (no processes:
    the check runs before any collective)."""
    kfac = KFACOptions(damping_mode="ekfac")
    with pytest.raises(ValueError, match=match):
        _check_supported(kfac, DistributedOptions(**kwargs), world)
    _check_supported(kfac, DistributedOptions(), world)  # comm_opt, update: fine
    exact = KFACOptions(damping_mode="exact")
    _check_supported(exact, DistributedOptions(**kwargs), world)  # exact: fine


def test_single_process_without_torch_distributed():
    assert not dist.is_initialized()
    assert resolve(None) is None and resolve(False) is None
    with pytest.raises(RuntimeError, match="init_process_group"):
        seed_preconditioner(make_model(), distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        seed_preconditioner(make_model(), distributed=DistributedOptions())
    with pytest.raises(TypeError, match="distributed"):
        seed_preconditioner(make_model(), distributed="yes")  # type: ignore[arg-type]
    assert seed_preconditioner(make_model()).distributed is None
