"""One New-LLM training run: Phase 1, fixed-point analysis, gate, Phase 2.

``train`` is the one implementation: ``python -m newllm.train`` (the seed's single-run
command, ``main`` below) and the search's trainable both call it.

Objective (minimised): the best Phase 2 val perplexity of a passing run. A run that fails
the gate scores ``GATE_PENALTY * (2 - train ER fraction)`` (between 1e6 and 2e6, lower for
less collapsed contexts) and a diverged run ``DIVERGED_PENALTY`` (1e7): finite, and worse
than any passing run, so a searcher learns to avoid those regions. A passing run whose
perplexity reached 1e6 is counted as diverged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from newllm import report
from newllm.checkpoint import save_model
from newllm.config import TrainConfig, add_train_arguments, train_config_from_args
from newllm.data import DataConfig, TokenData, prepare_data
from newllm.metrics import FixedPointAnalysis, GateResult, analyse_fixed_points, gate
from newllm.model import NewLLM
from newllm.phase1 import Phase1Result, PassRecord, fixed_contexts, train_phase1
from newllm.phase2 import EpochRecord, Phase2Result, perplexity, stream_metrics, train_phase2

GATE_PENALTY = 1e6
DIVERGED_PENALTY = 1e7


def gate_failed_objective(train_er_fraction: float) -> float:
    return GATE_PENALTY * (2.0 - min(max(train_er_fraction, 0.0), 1.0))


@dataclass
class TrainResult:
    config: TrainConfig
    status: str  # passed | gate_failed | diverged
    num_params: int
    phase1: Phase1Result
    train_analysis: FixedPointAnalysis | None = None
    val_analysis: FixedPointAnalysis | None = None
    val_converged_ratio: float | None = None
    gate: GateResult | None = None
    phase2: Phase2Result | None = None
    val_loss: float | None = None  # the final model's, by phase2.stream_metrics (= the best epoch's)
    val_acc: float | None = None
    final_analysis: FixedPointAnalysis | None = None  # of the final weights, when Phase 2 moved them
    final_converged_ratio: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def val_ppl(self) -> float | None:
        return None if self.val_loss is None else perplexity(self.val_loss)

    @property
    def objective(self) -> float:
        if self.status == "diverged":
            return DIVERGED_PENALTY
        if self.status == "gate_failed":
            return gate_failed_objective(self.train_analysis.effective_rank_fraction)
        return self.val_ppl if self.val_ppl is not None else math.nan

    def summary(self) -> dict:
        """Flat, JSON-ready record of the run: one row of a search's trials table."""
        a, v, p2, f = self.train_analysis, self.val_analysis, self.phase2, self.final_analysis
        return {
            "status": self.status,
            "objective": self.objective,
            "num_params": self.num_params,
            "phase1_passes": self.phase1.passes,
            "phase1_stop_reason": self.phase1.stop_reason,
            "converged_ratio": self.phase1.converged_ratio,
            "val_converged_ratio": self.val_converged_ratio,
            "train_effective_rank": a.effective_rank if a else None,
            "train_effective_rank_fraction": a.effective_rank_fraction if a else None,
            "val_effective_rank": v.effective_rank if v else None,
            "val_effective_rank_fraction": v.effective_rank_fraction if v else None,
            "gate_passed": self.gate.passed if self.gate else None,
            "gate_reason": self.gate.reason if self.gate else None,
            "phase2_epochs_run": len(p2.history) if p2 else None,
            "phase2_best_epoch": p2.best_epoch if p2 else None,
            "phase2_stop_reason": p2.stop_reason if p2 else None,
            "phase2_streams": p2.streams if p2 else None,
            "val_loss": self.val_loss,
            "val_ppl": self.val_ppl,
            "val_acc": self.val_acc,
            "final_effective_rank_fraction": f.effective_rank_fraction if f else None,
            "final_converged_ratio": self.final_converged_ratio,
            "phase1_seconds": self.phase1.seconds,
            "analysis_seconds": self.seconds.get("analysis"),
            "final_analysis_seconds": self.seconds.get("final_analysis"),
            "phase2_seconds": p2.seconds if p2 else None,
        }


def build_model(cfg: TrainConfig, vocab_size: int, device: str = "cpu") -> NewLLM:
    """The run's freshly initialised model; the same seed gives the same weights."""
    torch.manual_seed(cfg.seed)
    return NewLLM(cfg.model_config(vocab_size)).to(device)


def train(cfg: TrainConfig, data: TokenData, model: NewLLM, *, phase1: Phase1Result | None = None,
          on_pass: Callable[[PassRecord], None] | None = None,
          on_gate: Callable[[TrainResult], None] | None = None,
          on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Run Phase 1 (unless ``phase1`` says a checkpointed ``model`` already did), the
    analysis, the gate and Phase 2. ``model`` ends with its final (best) weights."""
    device = model.head.weight.device
    train_ids, val_ids = data.train_ids.to(device), data.val_ids.to(device)
    if phase1 is None:
        phase1 = train_phase1(model, train_ids, cfg, on_pass=on_pass)
    result = TrainResult(cfg, "diverged", model.num_params(), phase1)
    if phase1.stop_reason == "diverged":
        return result

    t0 = time.perf_counter()
    train_fixed = fixed_contexts(model, train_ids, cfg)
    val_fixed = fixed_contexts(model, val_ids, cfg)
    if not (torch.isfinite(train_fixed.contexts).all() and torch.isfinite(val_fixed.contexts).all()):
        return result
    result.train_analysis = analyse_fixed_points(train_fixed.contexts, seed=cfg.seed)
    result.val_analysis = analyse_fixed_points(val_fixed.contexts, seed=cfg.seed)
    result.val_converged_ratio = val_fixed.converged_ratio
    result.gate = gate(result.train_analysis, result.val_analysis, cfg.gate_train_er, cfg.gate_val_er)
    result.seconds["analysis"] = time.perf_counter() - t0
    if on_gate is not None:
        on_gate(result)
    if not result.gate.passed:
        result.status = "gate_failed"
        return result
    result.status = "passed"
    if cfg.skip_phase2:
        return result
    result.phase2 = train_phase2(model, train_fixed, val_ids, cfg, on_epoch=on_epoch)
    # measured again on the weights the run ends with (and saves): what a user of the model gets
    result.val_loss, result.val_acc = stream_metrics(model, val_ids)
    if not cfg.freeze_context:
        t0 = time.perf_counter()
        final = fixed_contexts(model, train_ids, cfg)
        if torch.isfinite(final.contexts).all():
            result.final_analysis = analyse_fixed_points(final.contexts, seed=cfg.seed)
            result.final_converged_ratio = final.converged_ratio
        result.seconds["final_analysis"] = time.perf_counter() - t0
    if result.phase2.stop_reason == "diverged" or not result.val_ppl < GATE_PENALTY:
        result.status = "diverged"
    return result


def set_threads(threads: int) -> int:
    """Set torch's CPU threads explicitly (0 = every core this process may use)."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


# --- the single-run command line ------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Data flags; with ``defaults=False`` unset flags stay None (a search space may set them)."""
    d = DataConfig() if defaults else argparse.Namespace(**{k: None for k in DataConfig().to_dict()})
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=d.source,
                   help="builtin (offline default), a directory of .txt, a .txt/.parquet/.jsonl file, or hf:NAME")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="documents used, 0 = all (default: %(default)s)")
    g.add_argument("--train-val-split", type=float, default=d.train_val_split, help="train fraction of documents (default: %(default)s)")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size (default: %(default)s)")
    g.add_argument("--text-column", default=d.text_column, help="text column of table data (default: %(default)s)")
    g.add_argument("--hf-split", default=d.hf_split, help="split of an hf: data set (default: %(default)s)")
    g.add_argument("--hf-config", default=None, help="configuration name of an hf: data set")
    g.add_argument("--tokenizer", default=None, help="an existing tokenizer.json instead of training one")


def data_config_from_args(args: argparse.Namespace, base: dict | None = None) -> DataConfig:
    """DataConfig from the flags given, over ``base`` (a search space's data section)."""
    given = {"source": args.data, "num_samples": args.num_samples, "train_val_split": args.train_val_split,
             "vocab_size": args.vocab_size, "text_column": args.text_column, "hf_split": args.hf_split,
             "hf_config": args.hf_config, "tokenizer": args.tokenizer}
    return DataConfig(**{**(base or {}), **{k: v for k, v in given.items() if v is not None}})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m newllm.train", description="One New-LLM run: Phase 1 (CVFP), gate, Phase 2.")
    add_train_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = all cores (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output directory (default: results/runs/<time>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = train_config_from_args(args)
        data_cfg = data_config_from_args(args)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        threads = set_threads(args.threads)
        data = prepare_data(data_cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("results") / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    report.print_configuration(cfg, data_cfg, data, args.device, threads)
    report.print_phase1_header()
    model = build_model(cfg, data.vocab_size, args.device)
    result = train(cfg, data, model, on_pass=report.print_pass, on_gate=report.print_gate,
                   on_epoch=report.print_epoch)
    report.print_result(result)
    summary = {"config": cfg.to_dict(), "data": {**data_cfg.to_dict(), **data.summary()},
               **result.summary(), "phase1_history": [r.to_dict() for r in result.phase1.history],
               "phase2_history": [r.to_dict() for r in result.phase2.history] if result.phase2 else None,
               "train_analysis": result.train_analysis.to_dict() if result.train_analysis else None,
               "val_analysis": result.val_analysis.to_dict() if result.val_analysis else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    save_model(out, model, data.tokenizer_json, train_config=cfg.to_dict())
    print(f"\nWrote {out / 'summary.json'} and the checkpoint {out / 'model.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
