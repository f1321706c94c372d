"""``python -m newllm.train``: the seed's single-run command, one ``newllm.run.train_run`` run.

Prints the run as the seed's "Training Output Example" does (configuration, Phase 1 passes,
fixed-point analysis, gate, Phase 2 epochs), every figure from the run's own results, then writes ``summary.json`` and the checkpoint (``model.pt`` + ``tokenizer.json``)
to ``--out``, each file under a temporary name renamed into place. Every flag and file is checked
before anything is written or trained: a bad one is one ``error:`` line and exit code 2. ``--out``
must be new or empty (``--force`` writes into a non-empty one).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from newllm.checkpoint import save_model, write_atomic
from newllm.checks import check_new_out, path_arg
from newllm.config import TrainConfig, add_data_arguments, add_train_arguments, data_config_from_args, train_config_from_args
from newllm.data import DataConfig, TokenData, prepare_data
from newllm.metrics import FixedPointAnalysis
from newllm.phase1 import PassRecord, num_streams
from newllm.phase2 import EpochRecord
from newllm.run import build_model, set_threads, train_run

RULE = "=" * 70


def _banner(title: str) -> None:
    print(f"\n{RULE}\n{title}\n{RULE}\n", flush=True)


def print_configuration(cfg: TrainConfig, data_cfg: DataConfig, data: TokenData, device: str, threads: int) -> None:
    """The run's model, phases and data, as the seed prints them before training."""
    if cfg.family == "baseline":
        print_baseline_configuration(cfg, data_cfg, data, device, threads)
        return
    _banner(f"New-LLM {cfg.architecture} architecture")
    print("Model Architecture:")
    print(f"   Layers: {cfg.num_layers}")
    print(f"   Context dim: {cfg.context_dim}\n   Embed dim: {cfg.embed_dim}\n   Hidden dim: {cfg.hidden_dim}")
    if not cfg.phase1:
        print("\nPhase 1: none (phase1_max_iter 0): Phase 2 starts from the initial weights, no analysis or gate")
        print_data(cfg, data_cfg, data, device, threads)
        return
    print("\nPhase 1 Settings (CVFP):")
    streams = num_streams(len(data.train_ids), cfg)
    print(f"   Max passes: {cfg.phase1_max_iter}  ({cfg.phase1_mode} passes, {streams} streams of "
          f"{len(data.train_ids) // streams} tokens)")
    print(f"   Convergence threshold: {cfg.convergence_threshold}")
    print(f"   Min converged ratio: {cfg.min_converged_ratio}")
    print(f"   LR schedule: {cfg.phase1_lr_warmup} -> {cfg.phase1_lr_medium} -> {cfg.phase1_lr_finetune}")
    w = cfg.effective_dist_reg_weight
    print(f"   Distribution Reg: weight={w} ({1 - w:.0%} CVFP, {w:.0%} Dist)" if w else "   Distribution Reg: off")
    print(f"   Gate: train ER >= {cfg.gate_train_er:.0%} of C, val ER >= {cfg.gate_val_er:.0%} of C")
    print_data(cfg, data_cfg, data, device, threads)


def print_data(cfg: TrainConfig, data_cfg: DataConfig, data: TokenData, device: str, threads: int) -> None:
    """The data section: source, documents, tokens, vocabulary, device, threads, and the settings
    the architecture ignores."""
    print("\nData Settings:")
    print(f"   Source: {data_cfg.source}  ({data.num_train_docs} train / {data.num_val_docs} val documents)")
    print(f"   Tokens: {len(data.train_ids):,} train / {len(data.val_ids):,} val, vocab {data.vocab_size}")
    print(f"   Device: {device}, {threads} CPU threads, seed {cfg.seed}")
    if cfg.ignored():
        print(f"   Ignored by the {cfg.architecture} architecture: "
              + ", ".join(f"{k}={getattr(cfg, k)}" for k in cfg.ignored()))


def print_baseline_configuration(cfg: TrainConfig, data_cfg: DataConfig, data: TokenData, device: str,
                                 threads: int) -> None:
    """A baseline run's model and Phase 2 settings, and the New-LLM settings it ignores."""
    _banner(f"Baseline: {cfg.architecture} language model, trained end to end (no Phase 1, no gate)")
    print(f"   Layers: {cfg.num_layers}\n   Embed dim: {cfg.embed_dim}\n   Hidden dim: {cfg.hidden_dim}")
    if cfg.architecture == "transformer":
        print(f"   Context window: {cfg.context_window} tokens, {cfg.num_heads} heads")
    print(f"   Dropout: {cfg.dropout}")
    print_data(cfg, data_cfg, data, device, threads)


def print_phase1_header() -> None:
    """The banner before the Phase 1 passes."""
    _banner("PHASE 1: FIXED-POINT CONTEXT LEARNING")


def print_pass(r: PassRecord) -> None:
    """One Phase 1 pass: losses, converged ratio, effective rank."""
    print(f"  Pass {r.pass_index}: Loss={r.loss:.6f} (CVFP={r.cvfp_loss:.6f}, Dist={r.dist_loss:.6f}), "
          f"Converged={r.converged_ratio:.1%}, ER={r.effective_rank:.2f} ({r.effective_rank_fraction:.0%}), "
          f"lr={r.lr:g}, {r.seconds:.2f}s", flush=True)


def print_analysis(title: str, a: FixedPointAnalysis) -> None:
    """The fixed-point analysis of one stream's contexts."""
    _banner(f"FIXED-POINT ANALYSIS ({title})")
    ok, bad = "OK", "FAIL"
    print("1. Global Attractor Detection:")
    print(f"   Average pairwise L2 distance: {a.mean_pairwise_l2:.3f}")
    print(f"   Average pairwise cosine similarity: {a.mean_pairwise_cosine:.5f}")
    print(f"   Status: {bad + ' global attractor' if a.global_attractor else ok + ' no global attractor (diverse fixed points)'}")
    print("\n2. Zero Solution Detection:")
    print(f"   Average norm: {a.mean_norm:.3f}")
    print(f"   Status: {bad + ' zero solution' if a.zero_solution else ok + ' non-zero solution'}")
    print("\n3. Distribution Statistics:")
    print(f"   Norm range: [{a.norm_min:.6f}, {a.norm_max:.6f}]")
    print(f"   Norm std: {a.norm_std:.6f}")
    print(f"   Sparsity (|v| < 0.01): {a.sparsity:.1%}")
    print("\n4. Information Content:")
    print(f"   Effective Rank: {a.effective_rank:.2f} / {a.context_dim} ({a.effective_rank_fraction:.1%})")
    print(f"   Top 5 Singular Values: [{', '.join(f'{s:.2f}' for s in a.top_singular_values)}]")


def print_epoch(r: EpochRecord) -> None:
    """One Phase 2 epoch: train and val loss, val perplexity and accuracy."""
    print(f"  Epoch {r.epoch}: train_loss={r.train_loss:.4f}, val_loss={r.val_loss:.4f}, "
          f"val_ppl={r.val_ppl:.2f}, val_acc={r.val_acc:.1%}, {r.seconds:.2f}s", flush=True)


def print_gate(result) -> None:
    """Phase 1 outcome, both analyses and the gate verdict (before Phase 2 starts)."""
    p1 = result.phase1
    print(f"\nPhase 1 stopped after {p1.passes} passes ({p1.stop_reason}, "
          f"{p1.converged_ratio:.1%} converged) in {p1.seconds:.1f}s")
    print(f"Fixed contexts with frozen weights: train after {result.fixed_passes} more passes (from Phase 1's "
          f"last), val after {result.val_fixed_passes} passes ({result.val_converged_ratio:.1%} converged)")
    print_analysis("Train", result.train_analysis)
    print_analysis("Val", result.val_analysis)
    t, v = result.train_analysis, result.val_analysis
    _banner("PHASE 1 SUCCESSFUL" if result.gate.passed else "PHASE 1 FAILED")
    print(f"  Train Effective Rank: {t.effective_rank:.2f}/{t.context_dim} ({t.effective_rank_fraction:.0%})")
    print(f"  Val Effective Rank:   {v.effective_rank:.2f}/{v.context_dim} ({v.effective_rank_fraction:.0%})")
    print(f"  Gate: {result.gate.reason}")
    if not result.gate.passed:
        print("\n  Skipping Phase 2: the contexts are not diverse enough to predict from.")
    elif not result.config.skip_phase2:
        print("\n  Proceeding to Phase 2...\n")


def print_result(result) -> None:
    """How the run ended: divergence, Phase 2's best epoch, status and objective."""
    if result.phase1 is not None and result.train_analysis is None:
        _banner(f"DIVERGED after {result.phase1.passes} Phase 1 passes (non-finite loss or contexts)")
    p2 = result.phase2
    if p2 is not None:
        mode = "head only" if result.config.freeze_context and result.config.family == "newllm" else \
            f"{p2.streams} streams x {p2.window}-token windows"
        print(f"\nPhase 2 ({mode}): {len(p2.history)} epochs ({p2.stop_reason}) in {p2.seconds:.1f}s; "
              f"best epoch {p2.best_epoch}")
        reading = "in sliding windows" if result.config.architecture == "transformer" else "from zero context"
        print(f"Final model, reading the val stream {reading}: val_loss={result.val_loss:.4f}, "
              f"val_ppl={result.val_ppl:.2f}, val_acc={result.val_acc:.1%}")
        if result.final_analysis is not None and result.phase1 is None:
            print(f"Final weights: effective rank {result.final_analysis.effective_rank_fraction:.1%} of C "
                  f"(no Phase 1)")
        elif result.final_analysis is not None:
            print(f"Final weights: effective rank {result.final_analysis.effective_rank_fraction:.1%} of C, "
                  f"{result.final_converged_ratio:.1%} converged (Phase 1 ended at "
                  f"{result.train_analysis.effective_rank_fraction:.1%} and {result.phase1.converged_ratio:.1%})")
    elif result.gate is not None and result.gate.passed:
        print("\n  Phase 2 skipped (--skip-phase2).")
    print(f"\nStatus: {result.status}, objective {result.objective:.6g}")


# --- the command ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The seed's flags, the data flags and --seed, --threads, --out, --force."""
    parser = argparse.ArgumentParser(prog="python -m newllm.train", description="One New-LLM run: Phase 1 (CVFP), gate, Phase 2.")
    add_train_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = all cores (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output directory, new or empty (default: results/runs/<time>)")
    parser.add_argument("--force", action="store_true",
                        help="write into an --out that is not empty, replacing its files of the same names")
    return parser.parse_args(argv)


def check_device(device: str) -> None:
    """ValueError unless ``device`` is cpu, or cuda[:N] with such a CUDA device present."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"--device {device!r} is not a device: give cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but torch sees no CUDA device: give --device cpu")
        count = torch.cuda.device_count()
        if match[1] is not None and int(match[1]) >= count:
            raise ValueError(f"--device {device}: torch sees {count} CUDA devices, cuda:0 to cuda:{count - 1}")


def main(argv: list[str] | None = None) -> int:
    """The command: check everything, train one run, print it, save its summary and checkpoint."""
    args = parse_args(argv)
    try:
        cfg = train_config_from_args(args)
        data_cfg = data_config_from_args(args)
        check_device(args.device)
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = all cores), got {args.threads}")
        out = Path("results") / "runs" / time.strftime("%Y%m%d-%H%M%S") if args.out is None \
            else path_arg(args.out, "--out")
        check_new_out(out, args.force)
        data = prepare_data(data_cfg)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = set_threads(args.threads)
    print_configuration(cfg, data_cfg, data, args.device, threads)
    if cfg.family == "newllm" and cfg.phase1:
        print_phase1_header()
    model = build_model(cfg, data.vocab_size, args.device)
    result = train_run(cfg, data, model, on_pass=print_pass, on_gate=print_gate,
                   on_epoch=lambda epoch: print_epoch(epoch.record))
    print_result(result)
    summary = {"config": cfg.to_dict(), "data": {**data_cfg.to_dict(), **data.summary()},
               **result.summary(),
               "phase1_history": [r.to_dict() for r in result.phase1.history] if result.phase1 else None,
               "phase2_history": [r.to_dict() for r in result.phase2.history] if result.phase2 else None,
               "train_analysis": result.train_analysis.to_dict() if result.train_analysis else None,
               "val_analysis": result.val_analysis.to_dict() if result.val_analysis else None,
               "final_analysis": result.final_analysis.to_dict() if result.final_analysis else None}
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "summary.json",
                     lambda tmp: tmp.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n"))
        save_model(out, model, data.tokenizer_json, train_config=cfg.to_dict())
    except OSError as e:  # checked before training, but the disk may fill or the directory go
        print(f"error: cannot write the results to --out {str(out)!r}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"\nWrote {out / 'summary.json'} and the checkpoint {out / 'model.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
