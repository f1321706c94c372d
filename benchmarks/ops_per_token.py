"""Dispatched ops per token: what each phase would cost on a GPU, where small steps are bound by
kernel launches, measured on any device.

In one process, for each size, on weights as a trial measures val with them (``--weights
phase2``: a short Phase 1, then one Phase 2 epoch at 64 streams; ``phase1`` or ``random`` to
see the hand-over on weights that contract less), count the aten ops dispatched
(a ``TorchDispatchMode`` counter: forward, backward and optimiser alike) and time

  phase1_exact     one Phase 1 training pass (``newllm.phase1.run_pass``), B = --phase1-streams
  tbptt_S          ``--steps`` Phase 2 steps of truncated BPTT (``phase2.tbptt_epoch``) on S
                   streams x a window of --bptt tokens, for each S of --streams
  frozen_S         ``--steps`` steps of the frozen-context mode (``phase2.head_epoch``), batches
                   of S x --bptt positions
  val_sequential   the val stream read one token at a time (``phase2.sequential_stream_metrics``)
  val_parallel_128 the parallel hand-over read (``phase2.stream_metrics``) with B = 128 streams
  val_parallel     the same with the streams it chooses (``phase2.val_streams``)

and report ops per token, tokens per second and the share of the GEMM rate: useful FLOP/s
(2 x the multiply-adds of the update and head matmuls per token read, 6 x per token trained)
against a plain matmul of the blocks' first Linear at 1k-16k rows timed in this process (the
best of those). A low share at a low op count is compute bound; at a high op count, launch bound.

Goals (checked, and in the JSON line): the parallel read dispatches <= 1/20 of the sequential
read's ops per token at B = 128; at the laptop size its wall time is >= 5x lower; at the
default size, 1M val tokens take <= 10% of one Phase 2 epoch at 64 streams over the train
tokens that go with them (4M at the default 0.8 split), extrapolated per token from the
stream measured here (``--val-tokens`` repeats the val stream to measure at any length).

    .venv/bin/python benchmarks/ops_per_token.py [--sizes laptop,default] [--device cuda]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from newllm import phase1, phase2
from newllm.config import TrainConfig
from newllm.data import DataConfig, prepare_data
from newllm.model import NewLLM
from newllm.run import build_model, set_threads

SIZES = {
    "default": dict(context_dim=256, embed_dim=256, hidden_dim=512, num_layers=4),
    "laptop": dict(context_dim=32, embed_dim=32, hidden_dim=64, num_layers=2),
}
TRAIN_FRACTION = 0.8  # DataConfig's train_val_split: 1M val tokens go with 4M train tokens


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (backward ops included: autograd carries the
    mode to the thread that runs them)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def count_ops(fn: Callable[[], object]) -> int:
    with OpCounter() as counter:
        fn()
    return counter.ops


def matmul_macs(model: NewLLM) -> tuple[int, int]:
    """Multiply-adds per token of (the context update, the head)."""
    cfg = model.cfg
    update = sum(m.in_features * m.out_features for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    if cfg.architecture == "residual":  # the last layer computes its context half only
        update -= (cfg.context_dim + cfg.embed_dim) * (cfg.hidden_dim - cfg.context_dim)
    return update, cfg.context_dim * cfg.vocab_size


def gemm_rate(model: NewLLM, device: str, seconds: float = 0.3) -> float:
    """FLOP/s of the blocks' first Linear on 1k-16k rows, the best of those."""
    lin = next(m for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    best = 0.0
    with torch.no_grad():
        for rows in (1024, 4096, 16384):
            a = torch.randn(rows, lin.in_features, device=device)
            lin(a)
            sync(device)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                lin(a)
                n += 1
            sync(device)
            best = max(best, 2 * rows * lin.in_features * lin.out_features * n / (time.perf_counter() - t0))
    return best


def measure(fn: Callable[[], object], tokens: int, flops_per_token: int, gemm: float, device: str,
            repeats: int) -> dict:
    """Ops per token (the counted run is also the warm-up), tokens/s (median of ``repeats``
    timed runs) and the useful FLOP/s as a share of ``gemm``."""
    ops = count_ops(fn)
    seconds = statistics.median(timed(fn, device) for _ in range(repeats))
    rate = tokens / seconds
    return {"tokens": tokens, "ops_per_token": ops / tokens, "tokens_per_s": rate, "seconds": seconds,
            "gemm_share": rate * flops_per_token / gemm}


def size_rows(size: str, args: argparse.Namespace, data, device: str) -> dict:
    """Every workload of one size: name -> its measure()."""
    cfg = TrainConfig(**SIZES[size], phase1_streams=args.phase1_streams, phase1_max_iter=3, seed=args.seed)
    model = build_model(cfg, data.vocab_size, device)
    train_ids, val_ids = data.train_ids.to(device), data.val_ids.to(device)
    if args.weights != "random":
        phase1.train_phase1(model, train_ids[:args.phase1_tokens], cfg)
    if args.weights == "phase2":  # one epoch through the recurrence: the weights val reads after epoch 1
        with torch.no_grad():
            e = phase1.as_streams(model.embed(train_ids[:-1]), 64)
        params = list(model.head.parameters()) + model.context_parameters()
        phase2.tbptt_epoch(model, torch.optim.Adam(params, lr=1e-3), params, e, phase1.as_streams(train_ids[1:], 64),
                           model.initial_context((64,)), args.bptt)
    if args.val_tokens:
        val_ids = val_ids.repeat(-(-args.val_tokens // len(val_ids)))[:args.val_tokens]
    gemm = gemm_rate(model, device)
    update, head = matmul_macs(model)
    rows: dict[str, dict] = {"gemm_flops": gemm}

    def run(name: str, fn: Callable[[], object], tokens: int, flops_per_token: int, repeats: int = args.repeats):
        rows[name] = measure(fn, tokens, flops_per_token, gemm, device, repeats)
        r = rows[name]
        print(f"{size:8} {name:18} {r['ops_per_token']:10.3f} {r['tokens_per_s']:12,.0f} {r['gemm_share']:8.2%}",
              flush=True)

    ids = train_ids[:args.phase1_tokens]
    e = phase1.embedded_streams(model, ids, cfg)
    previous = phase1.first_pass(model, e, cfg)
    p1_model = copy.deepcopy(model)
    p1_optimizer = torch.optim.Adam(p1_model.context_parameters())
    run("phase1_exact", lambda: phase1.run_pass(p1_model, e, previous, cfg, [], p1_optimizer),
        e.shape[0] * e.shape[1], 6 * update)

    for streams in args.streams:
        length = args.steps * args.bptt
        with torch.no_grad():
            e2 = phase1.as_streams(model.embed(train_ids[:-1]), streams)[:, :length]
        targets = phase1.as_streams(train_ids[1:], streams)[:, :length]
        if e2.shape[1] < length:
            raise SystemExit(f"{len(train_ids):,} train tokens are too few for {streams} streams x {length}")
        m = copy.deepcopy(model)
        params = list(m.head.parameters()) + m.context_parameters()
        optimizer = torch.optim.Adam(params, lr=1e-4)
        start = m.initial_context((streams,))
        run(f"tbptt_{streams}", lambda: phase2.tbptt_epoch(m, optimizer, params, e2, targets, start, args.bptt),
            streams * length, 6 * (update + head))
        batch = streams * args.bptt
        contexts = torch.randn(args.steps * batch, cfg.context_dim, device=device)
        head_targets = train_ids[1:len(contexts) + 1]
        mh = copy.deepcopy(model)
        head_params = list(mh.head.parameters())
        head_optimizer = torch.optim.Adam(head_params, lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        run(f"frozen_{streams}", lambda: phase2.head_epoch(mh, head_optimizer, head_params, contexts, head_targets,
                                                             batch, generator), len(contexts), 6 * head)

    val_flops = 2 * (update + head)
    seq_ids = val_ids[:args.sequential_tokens + 1] if args.sequential_tokens else val_ids
    run("val_sequential", lambda: phase2.sequential_stream_metrics(model, seq_ids), len(seq_ids) - 1, val_flops,
        repeats=1)
    for name, streams in (("val_parallel_128", 128), ("val_parallel", None)):
        read = phase2.stream_metrics(model, val_ids, streams=streams)
        run(name, lambda: phase2.stream_metrics(model, val_ids, streams=streams), len(val_ids) - 1, val_flops)
        rows[name].update(passes=read.passes, fallback=read.fallback,
                          streams=streams or phase2.val_streams(len(val_ids) - 1))
        print(f"{'':8} {'':18} {read.passes} passes over {rows[name]['streams']} streams"
              f"{', FELL BACK to the sequential read' if read.fallback else ''}")
    return rows


def goals(results: dict) -> dict:
    """The issue's three speed goals, as ratios measured above."""
    out = {}
    for size, rows in results.items():
        seq, par = rows["val_sequential"], rows["val_parallel"]
        out[size] = {
            "ops_ratio_parallel_128": rows["val_parallel_128"]["ops_per_token"] / seq["ops_per_token"],
            "wall_speedup": par["tokens_per_s"] / seq["tokens_per_s"],
        }
        if "tbptt_64" in rows:
            val_s = 1e6 / par["tokens_per_s"]
            epoch_s = 1e6 * TRAIN_FRACTION / (1 - TRAIN_FRACTION) / rows["tbptt_64"]["tokens_per_s"]
            out[size].update(val_1m_seconds=val_s, epoch_4m_seconds_at_64_streams=epoch_s,
                             val_share_of_epoch=val_s / epoch_s)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="laptop,default", help="comma-separated of: " + ", ".join(SIZES))
    p.add_argument("--streams", default="4,16,64,256", help="Phase 2 side-by-side streams, comma-separated")
    p.add_argument("--bptt", type=int, default=TrainConfig.phase2_bptt)
    p.add_argument("--steps", type=int, default=20, help="Phase 2 steps timed per workload")
    p.add_argument("--phase1-streams", type=int, default=TrainConfig.phase1_streams)
    p.add_argument("--phase1-tokens", type=int, default=20_000, help="tokens of the Phase 1 pass (and training)")
    p.add_argument("--val-tokens", type=int, default=0, help="val stream repeated to this length (0: as it is)")
    p.add_argument("--sequential-tokens", type=int, default=0,
                   help="time the sequential read on this prefix only (0: all; its cost per token is constant)")
    p.add_argument("--weights", choices=["phase2", "phase1", "random"], default="phase2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    sizes = args.sizes.split(",")
    if unknown := set(sizes) - set(SIZES):
        p.error(f"unknown size(s) {sorted(unknown)}; choose from {list(SIZES)}")
    threads = set_threads(args.threads)
    data = prepare_data(DataConfig(num_samples=40, vocab_size=500))  # the laptop space's data
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {threads} threads"
    print(f"device: {device_name}; {len(data.train_ids):,} train and {len(data.val_ids):,} val tokens; "
          f"weights: {args.weights}")
    print(f"{'size':8} {'workload':18} {'ops/token':>10} {'tokens/s':>12} {'GEMM':>8}")
    results = {size: size_rows(size, args, data, args.device) for size in sizes}
    checked = goals(results)
    for size, g in checked.items():
        line = (f"{size}: parallel val at B = 128 dispatches 1/{1 / g['ops_ratio_parallel_128']:.0f} of the "
                f"sequential read's ops per token; wall time {g['wall_speedup']:.1f}x lower")
        if "val_share_of_epoch" in g:
            line += (f"; 1M val tokens {g['val_1m_seconds']:.1f} s = {g['val_share_of_epoch']:.1%} of a Phase 2 "
                     f"epoch over 4M train tokens at 64 streams ({g['epoch_4m_seconds_at_64_streams']:.0f} s)")
        print(line)
    print(json.dumps({"benchmark": "ops_per_token", "device": args.device, "threads": threads,
                      "weights": args.weights, "bptt": args.bptt, "results": results, "goals": checked}))


if __name__ == "__main__":
    main()
