"""Phase 2 step cost: newllm's training steps against a plain PyTorch loop of the same maths.

In one process, from the same weights and optimiser state, on the same token stream (the
embedded corpus), time ``--steps`` optimiser steps of

  default mode  ``newllm.phase2.tbptt_epoch``: truncated BPTT over ``batch // bptt`` streams,
                windows of ``bptt`` tokens through ``NewLLM.scan``, the context carried
  plain         the textbook loop of the same: ``model.update`` per position, head, cross-
                entropy, backward, clip, Adam step, detach
  freeze mode   ``newllm.phase2.head_epoch``: the head alone on shuffled fixed contexts
  plain         the textbook loop of the same

in interleaved rounds (a slow spell of a shared machine hits both alike); the medians are
reported, with the ratio newllm / plain per mode. An epoch also measures val
(``stream_metrics``: the parallel hand-over read; the sequential read, its oracle, is timed
beside it) and, after an improving epoch, copies the best weights and the state that resumes
Phase 2; their cost per epoch is reported beside the steps'.

    .venv/bin/python benchmarks/phase2_step.py [--size default|laptop] [--device cuda]

The last line printed is one JSON object. Goal: newllm / plain close to 1 in both modes.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from newllm import phase2
from newllm.config import TrainConfig
from newllm.data import DataConfig, prepare_data
from newllm.phase1 import as_streams
from newllm.run import build_model, set_threads

SIZES = {
    "default": dict(context_dim=256, embed_dim=256, hidden_dim=512, num_layers=4),
    "laptop": dict(context_dim=32, embed_dim=32, hidden_dim=64, num_layers=2),
}


def plain_tbptt(model, optimizer, params, e, targets, start, window):
    c = start
    for s in range(0, e.shape[1], window):
        outs = []
        for t in range(s, min(s + window, e.shape[1])):
            c = model.update(e[:, t], c)
            outs.append(c)
        logits = model.head(torch.stack(outs, dim=1))
        loss = F.cross_entropy(logits.flatten(0, 1), targets[:, s:s + window].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        c = c.detach()


def plain_head(model, optimizer, params, contexts, targets, batch_size, generator):
    order = torch.randperm(len(targets), generator=generator).to(targets.device)
    for idx in order.split(batch_size):
        loss = F.cross_entropy(model.head(contexts[idx]), targets[idx])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--architecture", choices=["residual", "gated"], default="residual")
    p.add_argument("--batch-size", type=int, default=TrainConfig.phase2_batch_size)
    p.add_argument("--bptt", type=int, default=TrainConfig.phase2_bptt)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    threads = set_threads(args.threads)
    cfg = TrainConfig(**SIZES[args.size], architecture=args.architecture, phase2_batch_size=args.batch_size,
                      phase2_bptt=args.bptt)
    data = prepare_data(DataConfig(num_samples=40, vocab_size=500))
    model = build_model(cfg, data.vocab_size, args.device)
    ids = data.train_ids.to(args.device)
    val_ids = data.val_ids.to(args.device)
    streams = phase2.num_phase2_streams(len(ids), cfg.phase2_batch_size, cfg.phase2_bptt)
    with torch.no_grad():
        e = as_streams(model.embed(ids[:-1]), streams)[:, : args.steps * args.bptt]
    targets = as_streams(ids[1:], streams)[:, : args.steps * args.bptt]
    start = model.initial_context((streams,))
    # freeze mode trains on fixed contexts: any [M, C] contexts time the same
    m = args.steps * args.batch_size
    contexts = torch.randn(m, cfg.context_dim, device=args.device)
    head_targets = ids[1:m + 1]
    print(f"{args.size} size ({cfg.context_dim}/{cfg.embed_dim}/{cfg.hidden_dim} x {cfg.num_layers}, "
          f"{args.architecture}), batch {args.batch_size} = {streams} streams x {args.bptt}, {args.steps} steps, "
          f"{args.device}, {threads} threads", flush=True)

    def side(freeze: bool):
        """A fresh copy of the model and its Adam for one timed run (same start every time)."""
        m_ = copy.deepcopy(model)
        params = list(m_.head.parameters()) + ([] if freeze else m_.context_parameters())
        return m_, torch.optim.Adam(params, lr=1e-4), params

    runs = {
        "default": lambda: phase2.tbptt_epoch(*side(False), e, targets, start, args.bptt),
        "default_plain": lambda: plain_tbptt(*side(False), e, targets, start, args.bptt),
        "freeze": lambda: phase2.head_epoch(*side(True), contexts, head_targets, args.batch_size,
                                            torch.Generator().manual_seed(0)),
        "freeze_plain": lambda: plain_head(*side(True), contexts, head_targets, args.batch_size,
                                           torch.Generator().manual_seed(0)),
    }
    for fn in runs.values():  # warm-up: allocator, kernels
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, args.device))
    step_ms = {k: statistics.median(v) / args.steps * 1e3 for k, v in times.items()}

    # per epoch beyond the steps: val by the one definition, and an improving epoch's copies
    val_s = statistics.median(timed(lambda: phase2.stream_metrics(model, val_ids), args.device) for _ in range(3))
    val_sequential_s = timed(lambda: phase2.sequential_stream_metrics(model, val_ids), args.device)
    m_, optimizer, params = side(False)
    phase2.tbptt_epoch(m_, optimizer, params, e, targets, start, args.bptt)  # Adam has its state
    copy_s = statistics.median(timed(lambda: (copy.deepcopy(m_.state_dict()), copy.deepcopy(optimizer.state_dict())),
                                     args.device) for _ in range(5))
    full_steps = len(ids) // args.batch_size
    epoch_train_s = step_ms["default"] * full_steps / 1e3

    for mode in ("default", "freeze"):
        print(f"{mode:8} mode: newllm {step_ms[mode]:.3f} ms/step, plain {step_ms[mode + '_plain']:.3f} ms/step, "
              f"ratio {step_ms[mode] / step_ms[mode + '_plain']:.3f}")
    print(f"an epoch of {len(ids):,} train tokens: {full_steps} steps {epoch_train_s:.2f} s; val "
          f"({len(val_ids):,} tokens) {val_s:.2f} s (sequential read {val_sequential_s:.2f} s); best-epoch copies "
          f"{copy_s * 1e3:.1f} ms")
    print(json.dumps({"benchmark": "phase2_step", "size": args.size, "architecture": args.architecture,
                      "device": args.device, "threads": threads, "batch_size": args.batch_size, "bptt": args.bptt,
                      "streams": streams, "steps": args.steps,
                      "step_ms": {k: round(v, 4) for k, v in step_ms.items()},
                      "ratio_default": round(step_ms["default"] / step_ms["default_plain"], 4),
                      "ratio_freeze": round(step_ms["freeze"] / step_ms["freeze_plain"], 4),
                      "epoch_train_s": round(epoch_train_s, 3), "epoch_val_s": round(val_s, 3),
                      "epoch_val_sequential_s": round(val_sequential_s, 3),
                      "best_epoch_copy_ms": round(copy_s * 1e3, 3)}))


if __name__ == "__main__":
    main()
