"""One New-LLM training run: Phase 1, fixed-point analysis, gate, Phase 2.

``train`` is the one implementation: the single-run command (``python -m newllm.train``), the
search's trainable and the tests all call it.

The objective (minimised, ``objective``): the val perplexity of a passed run's final model. A
run that fails the gate scores ``GATE_PENALTY * (2 - train ER fraction)`` (between 1e6 and
2e6, lower for less collapsed contexts) and a diverged run ``DIVERGED_PENALTY`` (1e7):
finite, and worse than any passed run, so a searcher learns to avoid those regions. A passed
run whose perplexity reached 1e6 is counted as diverged.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from newllm.config import TrainConfig
from newllm.data import TokenData
from newllm.metrics import FixedPointAnalysis, GateResult, analyse_fixed_points, gate
from newllm.model import NewLLM
from newllm.phase1 import PassRecord, Phase1Result, fixed_contexts, train_phase1
from newllm.phase2 import EpochRecord, Phase2Result, perplexity, stream_metrics, train_phase2

Status = Literal["passed", "gate_failed", "diverged"]

GATE_PENALTY = 1e6
DIVERGED_PENALTY = 1e7


def objective(status: Status, *, val_ppl: float | None = None, train_er_fraction: float | None = None) -> float:
    """The number a search minimises: val perplexity if passed, else the penalty of the status.
    Before Phase 2 has a result, a trial's rows carry the gate-failed penalty it would get if
    it ended there (``status="gate_failed"``)."""
    if status == "diverged":
        return DIVERGED_PENALTY
    if status == "gate_failed":
        return GATE_PENALTY * (2.0 - min(max(train_er_fraction, 0.0), 1.0))
    return val_ppl if val_ppl is not None else math.nan


# The trials table's columns that a run's summary fills, with their pandas dtypes (nullable:
# null where the run did not get that far). ``TrainResult.summary`` must produce exactly these.
SUMMARY_DTYPES = {
    "status": "string", "objective": "float64", "num_params": "Int64",
    "phase1_passes": "Int64", "phase1_stop_reason": "string", "converged_ratio": "float64",
    "fixed_passes": "Int64", "val_fixed_passes": "Int64", "val_converged_ratio": "float64",
    "train_effective_rank": "float64", "train_effective_rank_fraction": "float64",
    "val_effective_rank": "float64", "val_effective_rank_fraction": "float64",
    "gate_passed": "boolean", "gate_reason": "string",
    "phase2_epochs_run": "Int64", "phase2_best_epoch": "Int64", "phase2_stop_reason": "string",
    "phase2_streams": "Int64", "val_loss": "float64", "val_ppl": "float64", "val_acc": "float64",
    "final_effective_rank_fraction": "float64", "final_converged_ratio": "float64",
    "phase1_seconds": "float64", "analysis_seconds": "float64", "phase2_seconds": "float64",
    "final_analysis_seconds": "float64",
}


@dataclass
class TrainResult:
    config: TrainConfig
    status: Status
    num_params: int
    phase1: Phase1Result
    train_analysis: FixedPointAnalysis | None = None
    val_analysis: FixedPointAnalysis | None = None
    fixed_passes: int | None = None       # frozen-weight passes to the train fixed contexts
    val_fixed_passes: int | None = None
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
        er = self.train_analysis.effective_rank_fraction if self.train_analysis else None
        return objective(self.status, val_ppl=self.val_ppl, train_er_fraction=er)

    def summary(self) -> dict:
        """Flat, JSON-ready record of the run: one row of a search's trials table."""
        a, v, p2, f = self.train_analysis, self.val_analysis, self.phase2, self.final_analysis
        row = {
            "status": self.status,
            "objective": self.objective,
            "num_params": self.num_params,
            "phase1_passes": self.phase1.passes,
            "phase1_stop_reason": self.phase1.stop_reason,
            "converged_ratio": self.phase1.converged_ratio,
            "fixed_passes": self.fixed_passes,
            "val_fixed_passes": self.val_fixed_passes,
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
            "phase2_seconds": p2.seconds if p2 else None,
            "final_analysis_seconds": self.seconds.get("final_analysis"),
        }
        assert row.keys() == SUMMARY_DTYPES.keys(), "summary and SUMMARY_DTYPES must name the same columns"
        return row


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
    # the train stream starts from Phase 1's last pass (same weights): a pass or two to converge
    train_fixed = fixed_contexts(model, train_ids, cfg, start=phase1.contexts)
    phase1.contexts = None  # N x C, needed only as that start: free it before Phase 2
    val_fixed = fixed_contexts(model, val_ids, cfg)
    if not (torch.isfinite(train_fixed.contexts).all() and torch.isfinite(val_fixed.contexts).all()):
        return result
    result.train_analysis = analyse_fixed_points(train_fixed.contexts, seed=cfg.seed)
    result.val_analysis = analyse_fixed_points(val_fixed.contexts, seed=cfg.seed)
    result.fixed_passes, result.val_fixed_passes = train_fixed.passes, val_fixed.passes
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
