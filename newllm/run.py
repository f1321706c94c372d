"""One training run: for New-LLM Phase 1, fixed-point analysis, gate, Phase 2; for a baseline
(``newllm.baselines``: LSTM, GRU, transformer) end-to-end training alone, its Phase 2.

A New-LLM run with ``phase1_max_iter`` 0 has no Phase 1: its initial weights go straight to
Phase 2, with no fixed-point analysis and no gate (their columns null, status ``passed`` unless
Phase 2 diverges). Phase 2 then starts each train stream from the context the initial weights
read there (``read_train_stream``), as it starts from Phase 1's fixed contexts otherwise: the
Phase 1 ablation of a search (``newllm.space.ABLATIONS``) is this run.

``train`` is the one implementation: the single-run command (``python -m newllm.train``), the
search's trainable and the tests all call it. A baseline's summary has the same columns, with
the Phase 1, analysis and gate ones null.

The objective (minimised, ``objective``): the val perplexity of a passed run's final model. A
run that fails the gate scores ``GATE_PENALTY * (2 - train ER fraction)`` (between 1e6 and
2e6, lower for less collapsed contexts) and a diverged run ``DIVERGED_PENALTY`` (1e7):
finite, and worse than any passed run, so a searcher learns to avoid those regions. A passed
run whose perplexity reached 1e6 is counted as diverged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from newllm.baselines import BaselineLM, baseline_stream_metrics, build_baseline, train_baseline
from newllm.config import TrainConfig
from newllm.data import TokenData
from newllm.metrics import FixedPointAnalysis, GateResult, fixed_point_analysis, gate
from newllm.model import NewLLM
from newllm.phase1 import FixedContexts, PassRecord, Phase1Result, fixed_contexts, train_phase1
from newllm.phase2 import (EpochEnd, EpochRecord, Phase2Result, Phase2State, ValMetrics, perplexity, read_contexts,
                           stream_metrics, train_phase2)

Status = Literal["passed", "gate_failed", "diverged"]
Model = NewLLM | BaselineLM

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
    "family": "string", "status": "string", "objective": "float64", "num_params": "Int64",
    "num_params_non_embedding": "Int64",
    "phase1_passes": "Int64", "phase1_stop_reason": "string", "converged_ratio": "float64",
    "fixed_passes": "Int64", "val_fixed_passes": "Int64", "val_converged_ratio": "float64",
    "train_effective_rank": "float64", "train_effective_rank_fraction": "float64",
    "val_effective_rank": "float64", "val_effective_rank_fraction": "float64",
    "gate_passed": "boolean", "gate_reason": "string",
    "phase2_epochs_run": "Int64", "phase2_best_epoch": "Int64", "phase2_stop_reason": "string",
    "phase2_streams": "Int64", "val_loss": "float64", "val_ppl": "float64", "val_acc": "float64",
    "val_passes": "Int64", "val_fallbacks": "Int64",
    "final_effective_rank_fraction": "float64", "final_converged_ratio": "float64",
    "phase1_seconds": "float64", "analysis_seconds": "float64", "phase2_seconds": "float64",
    "final_analysis_seconds": "float64",
}


# The trials table's columns over a trial's replicates (``replicates_summary``)
REPLICATE_DTYPES = {"replicates": "Int64", "replicates_passed": "Int64", "val_ppl_mean": "float64",
                    "val_ppl_std": "float64"}


def replicates_summary(summaries: list[dict]) -> dict:
    """A trial's summary over its replicates' (``TrainResult.summary``): replicate 0's columns,
    which describe the model the trial saves, with the objective replaced by the mean objective
    of the replicates (a replicate that failed the gate brings its penalty), and val perplexity
    mean and standard deviation over the replicates that passed."""
    ppl = [s["val_ppl"] for s in summaries if s["status"] == "passed"]
    return {**summaries[0], "objective": statistics.fmean(s["objective"] for s in summaries),
            "replicates": len(summaries), "replicates_passed": len(ppl),
            "val_ppl_mean": statistics.fmean(ppl) if ppl else None,
            "val_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else None}


@dataclass
class TrainResult:
    """One run's outcome: status, sizes, both phases, the analysis and the gate."""
    config: TrainConfig
    status: Status
    num_params: int
    num_params_non_embedding: int
    phase1: Phase1Result | None   # None for a baseline, and a New-LLM run without Phase 1
    train_analysis: FixedPointAnalysis | None = None
    val_analysis: FixedPointAnalysis | None = None
    fixed_passes: int | None = None       # frozen-weight passes to the train fixed contexts
    val_fixed_passes: int | None = None
    val_converged_ratio: float | None = None
    gate: GateResult | None = None
    phase2: Phase2Result | None = None
    val_loss: float | None = None  # the final model's, by phase2.stream_metrics (= the best epoch's)
    val_acc: float | None = None
    val_passes: int | None = None  # hand-over passes of that val read (None for a baseline)
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
        a, v, p1, p2, f = self.train_analysis, self.val_analysis, self.phase1, self.phase2, self.final_analysis
        row = {
            "family": self.config.family,
            "status": self.status,
            "objective": self.objective,
            "num_params": self.num_params,
            "num_params_non_embedding": self.num_params_non_embedding,
            "phase1_passes": p1.passes if p1 else None,
            "phase1_stop_reason": p1.stop_reason if p1 else None,
            "converged_ratio": p1.converged_ratio if p1 else None,
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
            "val_passes": self.val_passes,
            # Phase 2 epochs whose val read fell back to the sequential read (its hand-over did not settle)
            "val_fallbacks": sum(r.val_fallback for r in p2.history) if p2 and self.val_passes is not None else None,
            "final_effective_rank_fraction": f.effective_rank_fraction if f else None,
            "final_converged_ratio": self.final_converged_ratio,
            "phase1_seconds": p1.seconds if p1 else None,
            "analysis_seconds": self.seconds.get("analysis"),
            "phase2_seconds": p2.seconds if p2 else None,
            "final_analysis_seconds": self.seconds.get("final_analysis"),
        }
        assert row.keys() == SUMMARY_DTYPES.keys(), "summary and SUMMARY_DTYPES must name the same columns"
        return row

    def analysis_record(self) -> dict | None:
        """The fixed-point analysis and gate as plain values, for a checkpoint to restore (None
        for a run without Phase 1, which has neither)."""
        if self.train_analysis is None:
            return None
        return {"train": self.train_analysis.to_dict(), "val": self.val_analysis.to_dict(),
                "fixed_passes": self.fixed_passes, "val_fixed_passes": self.val_fixed_passes,
                "val_converged_ratio": self.val_converged_ratio, "gate": asdict(self.gate),
                "seconds": dict(self.seconds)}

    def restore_analysis(self, record: dict | None) -> None:
        if record is None:
            return
        self.train_analysis = FixedPointAnalysis(**record["train"])
        self.val_analysis = FixedPointAnalysis(**record["val"])
        self.fixed_passes, self.val_fixed_passes = record["fixed_passes"], record["val_fixed_passes"]
        self.val_converged_ratio = record["val_converged_ratio"]
        self.gate = GateResult(**record["gate"])
        self.seconds = dict(record["seconds"])

    def stopped_after(self, phase2: Phase2Result) -> TrainResult:
        """This run as it ends if Phase 2 is stopped from outside (by a search's scheduler) where
        ``phase2`` (``EpochEnd.so_far``) stands: with its best epoch's weights and val metrics."""
        if phase2.best_epoch == 0:  # no finite epoch yet
            return dataclasses.replace(self, status="diverged")
        best = phase2.best
        stopped = dataclasses.replace(self, status="passed", phase2=phase2, val_loss=best.val_loss,
                                      val_acc=best.val_acc, val_passes=best.val_passes, final_analysis=None,
                                      final_converged_ratio=None)
        if not stopped.val_ppl < GATE_PENALTY:
            stopped.status = "diverged"
        return stopped

    def phase2_done(self, phase2: Phase2Result, val: ValMetrics) -> None:
        """Record Phase 2's result and the val measurement of the weights the run ends with
        (and saves): what a user of the model gets; diverged if Phase 2 diverged or that
        perplexity reached GATE_PENALTY."""
        self.phase2 = phase2
        self.val_loss, self.val_acc, self.val_passes = val.loss, val.acc, val.passes
        if phase2.stop_reason == "diverged" or not self.val_ppl < GATE_PENALTY:
            self.status = "diverged"


@dataclass
class Resume:
    """Where a run restored from a search checkpoint picks up: after Phase 1, or, with the
    analysis and Phase 2's state, after Phase 2's best epoch so far (a run without Phase 1:
    ``phase1`` and ``analysis`` None)."""

    phase1: Phase1Result | None
    analysis: dict | None = None       # TrainResult.analysis_record()
    phase2: Phase2State | None = None


@dataclass
class EpochReport:
    """A Phase 2 epoch as a caller sees it: its record; the run as it ends if stopped now
    (``TrainResult.stopped_after``); whether it is the best so far; and then, for New-LLM, the
    state that resumes Phase 2 after it."""

    record: EpochRecord
    if_stopped: TrainResult
    best: bool                   # the best epoch so far: the model holds its weights
    state: Phase2State | None    # New-LLM's, when best; a baseline restarts instead
    last: bool                   # the run's last epoch: Phase 2 ends after it


def epoch_callback(result: TrainResult, on_epoch: Callable[[EpochReport], None] | None) -> Callable[[EpochEnd], None] | None:
    """``fit``'s ``on_epoch`` for ``result``'s run: each epoch to ``on_epoch`` as an ``EpochReport``."""
    if on_epoch is None:
        return None
    return lambda end: on_epoch(EpochReport(end.record, result.stopped_after(end.so_far), end.best, end.state,
                                                end.last))


def phase1_record(p1: Phase1Result) -> dict:
    """Phase 1's result as a checkpoint keeps it (its contexts left out)."""
    return {"history": [r.to_dict() for r in p1.history], "stop_reason": p1.stop_reason, "seconds": p1.seconds}


def checkpoint_record(result: TrainResult, state: Phase2State | None = None) -> dict:
    """What a search checkpoint saves beside the weights to resume ``result``'s run: Phase 1's
    record (None without Phase 1); after a Phase 2 epoch also the analysis and the Phase 2 state
    (nothing for a baseline, which has no Phase 1 and starts again)."""
    if result.config.family == "baseline":  # it restarts, and its state is its weights
        return {}
    record = {"phase1": None if result.phase1 is None else phase1_record(result.phase1)}
    if state is not None:
        record.update(analysis=result.analysis_record(), phase2=state.to_dict())
    return record


def resume_from(record: dict) -> Resume:
    """The ``Resume`` of a checkpoint record that ``checkpoint_record`` wrote."""
    p1 = record["phase1"]
    phase1 = None if p1 is None else Phase1Result([PassRecord(**r) for r in p1["history"]], p1["stop_reason"],
                                                  p1["seconds"])
    if "phase2" not in record:
        return Resume(phase1)
    return Resume(phase1, record["analysis"], Phase2State.from_dict(record["phase2"]))


def build_model(cfg: TrainConfig, vocab_size: int, device: str = "cpu") -> Model:
    """The run's freshly initialised model (New-LLM or a baseline); the same seed gives the
    same weights."""
    if cfg.family == "baseline":
        return build_baseline(cfg.baseline_config(), vocab_size).to(device)
    torch.manual_seed(cfg.seed)
    return NewLLM(cfg.model_config(vocab_size)).to(device)


def train_run(cfg: TrainConfig, data: TokenData, model: Model, *, resume: Resume | None = None,
          on_pass: Callable[[PassRecord], None] | None = None,
          on_gate: Callable[[TrainResult], None] | None = None,
          on_epoch: Callable[[EpochReport], None] | None = None) -> TrainResult:
    """Run Phase 1, the analysis, the gate and Phase 2, or what is left of them after
    ``resume`` (``model`` then holds the checkpoint's weights); without Phase 1
    (``phase1_max_iter`` 0) Phase 2 alone, from ``model``'s weights as given. A baseline
    (``cfg.family``) trains end to end instead, from the start. ``on_pass`` and ``on_gate`` are
    called only where there is a Phase 1. ``model`` ends with its final (best) weights."""
    if cfg.family == "baseline":
        return train_baseline_run(cfg, data, model, on_epoch=on_epoch)
    device = model.head.weight.device
    train_ids, val_ids = data.train_ids.to(device), data.val_ids.to(device)
    phase1 = None
    if resume is not None:
        phase1 = resume.phase1
    elif cfg.phase1:
        phase1 = train_phase1(model, train_ids, cfg, on_pass=on_pass)
    result = TrainResult(cfg, "diverged", model.num_params(), model.num_params(non_embedding=True), phase1)
    if phase1 is not None and phase1.stop_reason == "diverged":
        return result

    phase2_state = resume.phase2 if resume is not None else None
    if not cfg.phase1:
        train_fixed = read_train_stream(model, train_ids)
    elif phase2_state is not None:
        # the analysis was of Phase 1's weights, which Phase 2 has moved since: restore it; the
        # train stream's contexts are only Phase 2's data order here (the state holds the carry)
        result.restore_analysis(resume.analysis)
        train_fixed = fixed_contexts(model, train_ids, cfg)
    else:
        t0 = time.perf_counter()
        # the train stream starts from Phase 1's last pass (same weights): a pass or two to converge
        train_fixed = fixed_contexts(model, train_ids, cfg, start=phase1.contexts)
        phase1.contexts = None  # N x C, needed only as that start: free it before Phase 2
        val_fixed = fixed_contexts(model, val_ids, cfg)
        if not (torch.isfinite(train_fixed.contexts).all() and torch.isfinite(val_fixed.contexts).all()):
            return result
        result.train_analysis = fixed_point_analysis(train_fixed.contexts, seed=cfg.seed)
        result.val_analysis = fixed_point_analysis(val_fixed.contexts, seed=cfg.seed)
        result.fixed_passes, result.val_fixed_passes = train_fixed.passes, val_fixed.passes
        result.val_converged_ratio = val_fixed.converged_ratio
        result.gate = gate(result.train_analysis, result.val_analysis, cfg.gate_train_er, cfg.gate_val_er)
        result.seconds["analysis"] = time.perf_counter() - t0
        if on_gate is not None:
            on_gate(result)
    if result.gate is not None and not result.gate.passed:
        result.status = "gate_failed"
        return result
    result.status = "passed"
    if cfg.skip_phase2:
        return result

    phase2 = train_phase2(model, train_fixed, val_ids, cfg, on_epoch=epoch_callback(result, on_epoch),
                          resume=phase2_state)
    result.phase2_done(phase2, stream_metrics(model, val_ids))
    if not cfg.freeze_context:
        t0 = time.perf_counter()
        # without Phase 1 there are no passes to converge (nor a cap on them): the analysis is of
        # the train stream's read, and no converged ratio
        final = fixed_contexts(model, train_ids, cfg) if cfg.phase1 else read_train_stream(model, train_ids)
        if torch.isfinite(final.contexts).all():
            result.final_analysis = fixed_point_analysis(final.contexts, seed=cfg.seed)
            result.final_converged_ratio = final.converged_ratio if cfg.phase1 else None
        result.seconds["final_analysis"] = time.perf_counter() - t0
    return result


def read_train_stream(model: NewLLM, train_ids: torch.Tensor) -> FixedContexts:
    """Phase 2's train stream in a run without Phase 1: the contexts ``model`` reads it with
    from zero context (``read_contexts``, as val is read), over every token but the last. With
    Phase 1 these are its fixed contexts: the same read, by the weights Phase 1 left."""
    read = read_contexts(model, train_ids)
    inputs = torch.cat([torch.zeros_like(read.contexts[:1]), read.contexts[:-1]])
    return FixedContexts(train_ids[:-1], inputs, read.contexts, [])


def train_baseline_run(cfg: TrainConfig, data: TokenData, model: BaselineLM, *,
                       on_epoch: Callable[[EpochReport], None] | None = None) -> TrainResult:
    """A baseline's run: ``newllm.baselines.train_baseline`` with the Phase 2 settings (lr,
    epochs, patience, batch = streams x ``phase2_bptt`` window), measured on the val stream
    as every model is, then again on the weights it ends with."""
    device = next(model.parameters()).device
    train_ids, val_ids = data.train_ids.to(device), data.val_ids.to(device)
    result = TrainResult(cfg, "passed", model.num_params(), model.num_params(non_embedding=True), None)
    phase2 = train_baseline(model, train_ids, val_ids, lr=cfg.phase2_lr, epochs=cfg.phase2_epochs,
                            patience=cfg.phase2_patience, batch_size=cfg.phase2_batch_size, bptt=cfg.phase2_bptt,
                            seed=cfg.seed, on_epoch=epoch_callback(result, on_epoch))
    result.phase2_done(phase2, ValMetrics(*baseline_stream_metrics(model, val_ids)))
    return result


def set_threads(threads: int) -> int:
    """Set torch's CPU threads explicitly (0 = every core this process may use)."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n
