"""Phase 1 throughput: the seed's per-token pass against newllm's fast exact and Jacobi passes.

In one process, on the same weights and the same token stream (the embedded corpus), for the
default size (256/256/512 x 4) and the seed's quick-test size (16/16/32 x 2), time one
Phase 1 training pass of

  reference  the seed's per-token loop (B = 1, corrected targets; newllm.reference): contexts,
             loss, backward, Adam step
  exact      the fast exact pass as train_phase1 runs it (newllm.phase1.run_pass): no-grad
             sequential pass over B streams keeping its matmul outputs, loss, effective rank,
             converged ratio, chunked batched backward from the kept outputs, Adam step
  exact_recompute  the same with --phase1-keep-gib 0: the backward computes the forward again
  jacobi     the same with the Jacobi pass: one batched computation, no sequential part
  gemm       a plain matmul of the blocks' shapes, for this machine's matmul rate (the best
             of 1k, 4k and 16k rows)

The fast passes and the GEMM are timed in interleaved rounds, so that a slow spell of a shared
machine hits each alike, and their medians reported; the reference, at a few hundred tokens per
second, is one pass over the whole stream.

and report token-passes per second, the ratios against the reference, and useful FLOP/s
(6 x the multiply-adds the context update needs per token: forward plus backward) as a
fraction of the GEMM rate. Then it trains Phase 1 to its stop with the exact and the Jacobi pass from the same
weights and reports how many passes each needed and what converged ratio and effective rank
they reached; the Jacobi-trained weights are also checked with the exact recurrence.

``--memory-tokens 1000000`` instead runs Phase 1 passes 0-2 (one backward and optimiser step)
on that many tokens at the default size and reports the peak RSS.

    .venv/bin/python benchmarks/phase1_throughput.py                 # CPU, 2 threads
    .venv/bin/python benchmarks/phase1_throughput.py --device cuda
    .venv/bin/python benchmarks/phase1_throughput.py --memory-tokens 1000000

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F

from newllm import phase1
from newllm.config import TrainConfig
from newllm.data import DataConfig, prepare_data
from newllm.metrics import effective_rank, singular_values
from newllm.model import NewLLM
from newllm.reference import reference_pass
from newllm.run import build_model, set_threads

SIZES = {
    "default": dict(context_dim=256, embed_dim=256, hidden_dim=512, num_layers=4),
    "quick": dict(context_dim=16, embed_dim=16, hidden_dim=32, num_layers=2),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def useful_flops_per_token(model: NewLLM) -> int:
    """Forward plus backward of the matmuls the context update needs: 6 x multiply-adds per token
    (the residual model's last layer computes only its context half, 6L(C+E)H less that)."""
    macs = sum(m.in_features * m.out_features for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    if model.cfg.architecture == "residual":
        macs -= (model.cfg.context_dim + model.cfg.embed_dim) * (model.cfg.hidden_dim - model.cfg.context_dim)
    return 6 * macs


def gemm_rate(model: NewLLM, device: str, seconds: float = 0.5) -> float:
    """FLOP/s of the blocks' first Linear on 1k-16k rows, the best of those: this machine's matmul
    rate for these shapes (the best, so that fractions of it are conservative)."""
    lin = next(m for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    best = 0.0
    with torch.no_grad():
        for rows in (1024, 4096, 16384):
            a = torch.randn(rows, lin.in_features, device=device)
            for _ in range(3):
                F.linear(a, lin.weight, lin.bias)
            sync(device)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                F.linear(a, lin.weight, lin.bias)
                n += 1
            sync(device)
            best = max(best, 2 * rows * lin.in_features * lin.out_features * n / (time.perf_counter() - t0))
    return best


def fast_passes(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig, device: str) -> Iterator[float]:
    """Seconds of successive fast Phase 1 training passes, each exactly as train_phase1 runs it:
    contexts, loss, effective rank, converged ratio, gradient and Adam step."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.context_parameters())
    with torch.no_grad():
        e = phase1.as_streams(model.embed(ids), phase1.num_streams(len(ids), cfg))
    previous = phase1.first_pass(model, e, cfg)
    while True:
        sync(device)
        t0 = time.perf_counter()
        _, _, previous, reason = phase1.run_pass(model, e, previous, cfg, [], optimizer)
        sync(device)
        assert reason is None, reason  # a first pass never stops Phase 1 unless it diverged
        yield time.perf_counter() - t0


def breakdown(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig, device: str, repeats: int) -> dict:
    """Where an exact training pass's time goes, each part timed alone on the same inputs
    (medians): the no-grad sequential pass, the batched recompute of the forward, the batched
    forward + backward that accumulate_gradient runs, and the loss, effective rank and converged
    ratio; plus the GEMM fraction the pass would reach if the backward needed no recompute."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        e = phase1.as_streams(model.embed(ids), phase1.num_streams(len(ids), cfg))
    previous = phase1.first_pass(model, e, cfg)
    inputs, outputs = phase1.next_pass(model, e, previous, cfg)
    _, _, _, grad = phase1.loss_and_output_grad(outputs, previous, cfg.effective_dist_reg_weight)

    def metrics():
        phase1.loss_and_output_grad(outputs, previous, cfg.effective_dist_reg_weight)
        effective_rank(singular_values(outputs.flatten(0, 1)))
        phase1.converged_ratio(outputs, previous, cfg.convergence_threshold)

    parts = {
        "sequential": lambda: phase1.next_pass(model, e, previous, cfg),
        "batched_forward": lambda: phase1.batched_update(model, e, inputs, cfg.phase1_chunk_tokens),
        "batched_forward_backward": lambda: phase1.accumulate_gradient(model, e, inputs, grad, cfg.phase1_chunk_tokens),
        "metrics": metrics,
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in parts.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    seconds = {k: statistics.median(v[1:]) for k, v in times.items()}
    total = seconds["sequential"] + seconds["batched_forward_backward"] + seconds["metrics"]
    return {"seconds": seconds, "share": {k: v / total for k, v in seconds.items() if k != "batched_forward"},
            "without_recompute_s": total - seconds["batched_forward"]}


def time_reference(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig, device: str) -> float:
    """Seconds of one Phase 1 training pass of the seed's per-token loop on the whole stream."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.context_parameters())
    with torch.no_grad():
        e = model.embed(ids)[None]
        previous = phase1.sequential_pass(model, e, model.initial_context((1,)))[1]
    reference_pass(model, e[:, :200], previous[:, -1], previous[:, :200], cfg.effective_dist_reg_weight)  # warm-up
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    reference_pass(model, e, previous[:, -1], previous, cfg.effective_dist_reg_weight)
    optimizer.step()
    sync(device)
    return time.perf_counter() - t0


def convergence(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig) -> dict:
    """Phase 1 to its stop with each pass from the same weights (the Jacobi pass may take 4x the
    passes); the Jacobi-trained weights are then judged by the exact recurrence too."""
    out = {}
    for mode, max_iter in (("exact", cfg.phase1_max_iter), ("jacobi", 4 * cfg.phase1_max_iter)):
        m = copy.deepcopy(model)
        mode_cfg = replace(cfg, phase1_mode=mode, phase1_max_iter=max_iter)
        t0 = time.perf_counter()
        result = phase1.train_phase1(m, ids, mode_cfg)
        out[mode] = {"passes": result.passes, "stop_reason": result.stop_reason, "seconds": time.perf_counter() - t0,
                     "converged_ratio": result.converged_ratio,
                     "effective_rank_fraction": result.history[-1].effective_rank_fraction,
                     "history": [(r.converged_ratio, r.effective_rank_fraction) for r in result.history]}
        if mode == "jacobi":  # the same weights judged by the exact recurrence
            fixed = phase1.fixed_contexts(m, ids, replace(cfg, phase1_mode="exact"))
            out[mode]["exact_recurrence"] = {"passes": fixed.passes, "converged_ratio": fixed.converged_ratio,
                                             "effective_rank_fraction": effective_rank(singular_values(fixed.contexts))
                                             / cfg.context_dim}
    return out


def run_size(name: str, ids: torch.Tensor, vocab_size: int, args: argparse.Namespace) -> dict:
    cfg = TrainConfig(**SIZES[name], phase1_streams=args.streams, seed=args.seed)
    model = build_model(cfg, vocab_size, args.device)
    ids = ids.to(args.device)
    flops = useful_flops_per_token(model)
    reference = len(ids) / time_reference(model, ids, cfg, args.device)
    exact = fast_passes(model, ids, cfg, args.device)
    recompute = fast_passes(model, ids, replace(cfg, phase1_keep_gib=0.0), args.device)
    jacobi = fast_passes(model, ids, replace(cfg, phase1_mode="jacobi"), args.device)
    next(exact), next(recompute), next(jacobi)  # warm-up passes
    rounds = [(gemm_rate(model, args.device), len(ids) / next(exact), len(ids) / next(recompute),
               len(ids) / next(jacobi)) for _ in range(args.repeats)]
    gemm = statistics.median(r[0] for r in rounds)
    rate = {"reference": reference, "exact": statistics.median(r[1] for r in rounds),
            "exact_recompute": statistics.median(r[2] for r in rounds),
            "jacobi": statistics.median(r[3] for r in rounds)}
    parts = breakdown(model, ids, cfg, args.device, args.repeats)
    parts["gemm_fraction_without_recompute"] = len(ids) * flops / parts["without_recompute_s"] / gemm
    row = {"size": name, **SIZES[name], "tokens": len(ids), "streams": phase1.num_streams(len(ids), cfg),
           "token_passes_per_s": rate, "fast_over_reference": rate["exact"] / rate["reference"],
           "jacobi_over_reference": rate["jacobi"] / rate["reference"], "gemm_flops": gemm,
           "useful_flops_per_token_pass": flops,
           "gemm_fraction": {k: r * flops / gemm for k, r in rate.items()}, "exact_breakdown": parts}
    if not args.no_convergence:
        row["convergence"] = convergence(model, ids, cfg)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"\n{'size':8} {'method':10} {'tok-pass/s':>11} {'x ref':>7} {'GFLOP/s':>8} {'of GEMM':>8}")
    for row in rows:
        for k, r in row["token_passes_per_s"].items():
            print(f"{row['size']:8} {k:10} {r:11.0f} {r / row['token_passes_per_s']['reference']:7.1f} "
                  f"{r * row['useful_flops_per_token_pass'] / 1e9:8.1f} {row['gemm_fraction'][k]:8.1%}")
        print(f"{row['size']:8} {'gemm':10} {'':11} {'':7} {row['gemm_flops'] / 1e9:8.1f} {'100.0%':>8}")
    for row in rows:
        b = row["exact_breakdown"]
        share = ", ".join(f"{k} {v:.0%}" for k, v in b["share"].items())
        print(f"{row['size']:8} exact pass: {share} (of which the forward recompute "
              f"{b['seconds']['batched_forward'] / sum(b['seconds'][k] for k in b['share']):.0%}); without the "
              f"recompute: {b['gemm_fraction_without_recompute']:.1%} of GEMM")
    for row in rows:
        conv = row.get("convergence")
        if conv:
            for mode in ("exact", "jacobi"):
                c = conv[mode]
                print(f"{row['size']:8} {mode:8} converge: {c['passes']:2d} passes ({c['stop_reason']}), "
                      f"converged {c['converged_ratio']:.1%}, ER {c['effective_rank_fraction']:.1%} of C, "
                      f"{c['seconds']:.1f}s")
            er = conv["jacobi"]["exact_recurrence"]
            print(f"{row['size']:8} Jacobi weights under the exact recurrence: converged {er['converged_ratio']:.1%} "
                  f"after {er['passes']} passes, ER {er['effective_rank_fraction']:.1%} of C")


def memory_run(ids: torch.Tensor, vocab_size: int, args: argparse.Namespace) -> dict:
    """Phase 1 passes 0-2 (pass 1 with its backward and optimiser step) on ``len(ids)`` tokens at
    the default size; peak RSS."""
    cfg = TrainConfig(**SIZES["default"], phase1_streams=args.streams, phase1_max_iter=2, seed=args.seed)
    model = build_model(cfg, vocab_size, args.device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    result = phase1.train_phase1(model, ids.to(args.device), cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    stored = len(ids) * cfg.context_dim * 4 / 2**30
    out = {"tokens": len(ids), "passes": result.passes + 1, "seconds": time.perf_counter() - t0,
           "peak_rss_gib": peak, "rss_before_gib": before, "one_context_matrix_gib": stored}
    print(f"Phase 1 on {len(ids):,} tokens (default size): {out['passes']} passes (one backward) in "
          f"{out['seconds']:.0f}s, "
          f"peak RSS {peak:.2f} GiB (one N x C float32 matrix is {stored:.2f} GiB)")
    if args.device.startswith("cuda"):
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=20_000, help="token-stream length (default: %(default)s)")
    p.add_argument("--sizes", default="default,quick", help="comma-separated of: " + ", ".join(SIZES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--streams", type=int, default=TrainConfig.phase1_streams, help="--phase1-streams (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, medians taken (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-convergence", action="store_true", help="skip the passes-to-converge comparison")
    p.add_argument("--memory-tokens", type=int, default=0, help="instead: peak memory of Phase 1 on this many tokens")
    args = p.parse_args(argv)
    sizes = args.sizes.split(",")
    if unknown := set(sizes) - set(SIZES):
        p.error(f"unknown size(s) {sorted(unknown)}; choose from {list(SIZES)}")
    threads = set_threads(args.threads)
    data = prepare_data(DataConfig(num_samples=0, vocab_size=1000))
    stream = data.train_ids
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {threads} threads"
    print(f"device: {device_name}; torch {torch.__version__}; corpus: builtin, {len(stream):,} train tokens")
    if args.memory_tokens:
        ids = stream.repeat(args.memory_tokens // len(stream) + 1)[: args.memory_tokens]
        out = {"device": device_name, "memory": memory_run(ids, data.vocab_size, args)}
    else:
        if args.tokens > len(stream):
            p.error(f"--tokens {args.tokens} is more than the corpus's {len(stream)} train tokens")
        ids = stream[: args.tokens]
        rows = []
        for name in sizes:
            print(f"timing {name} size on {len(ids):,} tokens ...", file=sys.stderr, flush=True)
            rows.append(run_size(name, ids, data.vocab_size, args))
        print_table(rows)
        out = {"device": device_name, "sizes": rows}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
