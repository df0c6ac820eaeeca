"""GPT-style language model: AdamW alone vs AdamW + KFACPreconditioner, steps/s and peak memory.

The model is tests/models.GPT (token and position embeddings, blocks alternating
nn.MultiheadAttention and nn.Linear + F.scaled_dot_product_attention attention, MLPs,
LayerNorms, an LM head tied to the token embedding over a 50257-token vocabulary), trained on
random tokens (only time and memory matter here). Every configuration runs in its own process,
side by side in one invocation:

- adamw: AdamW alone;
- kfac inv=k: AdamW on gradients preconditioned by KFACPreconditioner(other_params="diagonal",
  factor_update_steps=1, inv_update_steps=k), for several k;
- kfac inv=k fus=f: statistics every f steps only.

Timing: ``--steps`` steps after ``--warmup`` ones; with ``--steps`` a multiple of every k, the
timed steps hold exactly steps/k decompositions, amortized as in training. The configurations
run in ``--rounds`` interleaved rounds; each reports its fastest round, the one least disturbed
by other load, with the median beside it; "CPU ms" is the process's CPU time per step (all
threads; its minimum over rounds), much less sensitive to other load than wall time on a
shared machine (peak memory: the largest round).
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; on the CPU the
growth of the peak resident set size over the process's size after building model and
optimizer (includes the allocator's caching: approximate). The planned bytes of the
preconditioner's state (``summary().total_bytes``) are reported beside them.

Prints a table and appends it to benchmarks/results/transformer.csv. On a shared CPU the
timings are noisy: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import RESULTS, append_csv, machine, seed_options  # noqa: E402

from tests.models import GPT  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in a fresh process: returns its timings and memory."""
    from kfac_ef import KFACPreconditioner

    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    torch.manual_seed(0)
    model = GPT(
        vocab=config["vocab"],
        dim=config["dim"],
        heads=config["heads"],
        context=config["seq"],
        attention=tuple(config["attention"]),
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pre = None
    planned = 0
    if config["inv"] is not None:
        pre = KFACPreconditioner(
            model,
            **seed_options(
                damping=1e-2,
                other_params="diagonal",
                factor_update_steps=config["fus"],
                inv_update_steps=config["inv"],
            ),
        )
        planned = pre.summary().total_bytes
    x = torch.randint(0, config["vocab"], (config["batch"], config["seq"] + 1), device=device)
    base_rss = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    loss = torch.zeros(())
    t0 = c0 = 0.0
    for step in range(config["warmup"] + config["steps"]):
        if step == config["warmup"]:
            _sync(device)
            t0 = time.perf_counter()
            c0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        if pre is not None:
            pre.step()
        opt.step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base_cuda
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {
        "steps_per_s": config["steps"] / elapsed,
        "ms_per_step": 1e3 * elapsed / config["steps"],
        "cpu_ms_per_step": 1e3 * cpu / config["steps"],
        "peak_extra_mib": peak / 2**20,
        "planned_state_mib": planned / 2**20,
        "final_loss": float(loss.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="alternating MHA / SDPA blocks")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--inv", type=int, nargs="*", default=[1, 5, 10])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3, help="median over interleaved rounds")
    args = parser.parse_args()
    attention = ["mha" if i % 2 == 0 else "sdpa" for i in range(args.layers)]
    base = {
        "device": args.device,
        "vocab": args.vocab,
        "dim": args.dim,
        "heads": args.heads,
        "attention": attention,
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "threads": args.threads,
    }
    configs: list[tuple[str, dict[str, Any]]] = [("adamw", {**base, "inv": None, "fus": 1})]
    for k in args.inv:
        configs.append((f"kfac inv={k}", {**base, "inv": k, "fus": 1}))
    k_max = max(args.inv)
    configs.append((f"kfac inv={k_max} fus=5", {**base, "inv": k_max, "fus": 5}))

    ctx = mp.get_context("spawn")
    meta = machine()
    print(
        f"GPT vocab {args.vocab}, dim {args.dim}, {args.layers} blocks ({'/'.join(attention)}), "
        f"batch {args.batch} x {args.seq} tokens, device {args.device}, {args.threads} threads"
    )
    header = (
        f"{'config':<22}{'steps/s':>9}{'ms/step':>10}{'median':>9}{'CPU ms':>9}{'peak MiB':>10}"
        f"{'state MiB':>11}"
    )
    lines = [header, "-" * len(header)]
    # Rounds interleave the configurations so that load changes of a shared machine hit them
    # alike; each configuration reports its median round.
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in configs}
    for r in range(args.rounds):
        for name, config in configs:
            with ctx.Pool(1) as pool:
                results[name].append(pool.apply(run, (config,)))
            print(f"round {r + 1}/{args.rounds} {name}: {results[name][-1]['ms_per_step']:.1f} ms")
    rows = []
    baseline = None
    for name, config in configs:
        runs = sorted(results[name], key=lambda res: res["ms_per_step"])
        # The fastest round is the least disturbed by other load (as timeit's minimum).
        result = {
            **runs[0],
            "rounds": len(runs),
            "ms_per_step_median": runs[len(runs) // 2]["ms_per_step"],
            "cpu_ms_per_step": min(res["cpu_ms_per_step"] for res in runs),
        }
        result["peak_extra_mib"] = max(res["peak_extra_mib"] for res in runs)
        baseline = baseline or result
        lines.append(
            f"{name:<22}{result['steps_per_s']:>9.2f}{result['ms_per_step']:>10.1f}"
            f"{result['ms_per_step_median']:>9.1f}{result['cpu_ms_per_step']:>9.1f}"
            f"{result['peak_extra_mib']:>10.1f}"
            f"{result['planned_state_mib']:>11.2f}"
        )
        rows.append(
            {
                "config": name,
                "inv_update_steps": config["inv"] or "",
                "factor_update_steps": config["fus"] if config["inv"] else "",
                **{k: v for k, v in config.items() if k not in ("inv", "fus", "attention")},
                "blocks": "/".join(attention),
                **result,
                "slowdown_vs_adamw": baseline["steps_per_s"] / result["steps_per_s"],
                **meta,
            }
        )
    print("\n" + "\n".join(lines))
    append_csv(RESULTS / "transformer.csv", rows)
    print(f"\nappended to {RESULTS / 'transformer.csv'}")


if __name__ == "__main__":
    main()
