"""The Ray Tune function trainable: one search trial is ``space.repeats`` (usually 1)
``newllm.run.train_run`` runs of its configuration, its replicates, with seeds seed, seed + 1, ...
A New-LLM trial and a baseline trial (LSTM, GRU, transformer) run through the same function.

Each row goes to Tune ``packed`` (``newllm.search.packing``): the numbers its scheduler and
searcher read, and the whole row as one compressed string.

The rows, each with ``phase``, ``step`` and ``replicate`` and all carrying ``objective``,
``family``, ``architecture``, ``num_params`` and ``num_params_non_embedding``; a baseline has
no ``phase1`` or ``analysis`` rows:

- ``phase1``, step = pass: cvfp/dist loss, converged ratio, train effective rank, lr, seconds;
- ``analysis``, step 0: fixed-point analysis of train and val contexts and the gate verdict,
  with a checkpoint (weights after Phase 1 and its history);
- ``phase2``, step = ``phase2_epoch`` = epoch: train/val loss, val perplexity and accuracy, and
  ``if_stopped``, the run's summary if a scheduler stopped it here; with a checkpoint at each
  epoch that improves on every earlier one (its weights, then the best, and the state that
  resumes Phase 2 after it). ``phase2_epoch`` is a scheduler's time: no other row has it;
- ``final``, step 0, once per trial: ``newllm.run.replicates_summary`` of the replicates (replicate
  0's summary and ``status``, the mean objective, val perplexity mean and std), with the final
  checkpoint: replicate 0's model, the one its columns describe.

Every row's ``objective`` comes from ``newllm.run.objective``: until a Phase 2 result exists
it is the gate-failed penalty the trial would get if it ended there; in Phase 2 it is the best
val perplexity so far. Every row also carries ``node_id`` (the Ray node that ran it; Tune adds
``hostname``) and ``phase1_restored``.

A retried trial (its node was lost) or a resumed one (the driver was restarted) starts from its
latest checkpoint, which also holds the summaries of the replicates before it (and replicate 0's
model): from a Phase 1 checkpoint it skips Phase 1 (``phase1_restored`` True), from a Phase 2 one
it continues after that epoch, from the final one it reports the saved summary again. A
baseline's run, which has no Phase 1 to keep, starts again from its seed instead (its Phase 2
checkpoints are there for what a scheduler's stop leaves).
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Literal

import ray
import torch
from ray import tune

from newllm.checkpoint import load_model, save_model
from newllm.config import TrainConfig
from newllm.data import TokenData
from newllm.phase1 import PassRecord
from newllm.phase2 import Phase2State
from newllm.run import (
    EpochReport,
    Model,
    Resume,
    TrainResult,
    build_model,
    checkpoint_record,
    objective,
    replicates_summary,
    resume_from,
    train_run,
)
from newllm.search.packing import packed
from newllm.space import SearchSpace

Phase = Literal["phase1", "analysis", "phase2", "final"]


def report(row: dict, metrics: list[str], checkpoint_dir: str | None = None) -> None:
    """Report ``row`` to Tune, ``packed``, with the checkpoint in ``checkpoint_dir`` if given."""
    checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    tune.report(packed(row, metrics), checkpoint=checkpoint)


def trial_resources() -> tuple[int, str]:
    """(CPU threads, device) from what Tune gave this trial."""
    assigned = ray.get_runtime_context().get_assigned_resources()
    threads = max(1, int(assigned.get("CPU", 1)))
    device = "cuda" if assigned.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    return threads, device


def run_trial(config: dict, space: SearchSpace, data: TokenData) -> None:
    """One trial: ``space.repeats`` runs of its configuration (replicates r = 0, 1, ... with seeds
    seed + r), then its final row, whose summary is ``replicates_summary`` of theirs, with the
    final checkpoint holding replicate 0's model."""
    cfg = space.trial_config(config)
    threads, device = trial_resources()
    torch.set_num_threads(threads)
    record = restored = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            restored, record = load_model(d, device)
    where = {"node_id": ray.get_runtime_context().get_node_id(), "phase1_restored": record is not None}

    if record is not None and "summary" in record:  # the trial had finished: nothing to redo
        where["phase1_restored"] = record["phase1_restored"]
        report({"phase": "final", "step": 0, "replicate": 0, **where, "threads": threads, "device": device,
                **record["summary"]}, space.metrics)
        return
    if record is not None and cfg.family == "baseline":
        where["phase1_restored"] = False
    # from a checkpoint: the summaries of the replicates that finished, and replicate 0's model
    summaries: list[dict] = list(record.get("replicates", [])) if record else []
    first_model: dict | None = record.get("first_model") if record else None
    for replicate in range(len(summaries), space.repeats):
        rcfg = dataclasses.replace(cfg, seed=cfg.seed + replicate)
        model, resume = build_model(rcfg, data.vocab_size, device), None
        if record is not None and cfg.family == "newllm":  # the checkpoint is of this replicate
            model, resume = restored, resume_from(record)
        record = None  # (a baseline's replicate starts again)
        kept = {"replicates": summaries, "first_model": first_model} if replicate else {"replicates": summaries}
        summaries.append(run_replicate(rcfg, data, model, resume, replicate, where, kept, space.metrics))
        if replicate == 0:
            first_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(first_model)
    summary = replicates_summary(summaries)
    with tempfile.TemporaryDirectory() as d:
        save_model(d, model, data.tokenizer_json, train_config=cfg.to_dict(), summary=summary,
                   phase1_restored=where["phase1_restored"])
        report({"phase": "final", "step": 0, "replicate": 0, **where, "threads": threads, "device": device,
                **summary}, space.metrics, d)


def run_replicate(cfg: TrainConfig, data: TokenData, model: Model, resume: Resume | None, replicate: int,
                  where: dict, kept: dict, metrics: list[str]) -> dict:
    """One run of the trial (``newllm.run.train_run``), reporting its rows and checkpoints; returns its
    summary. ``kept``: what every checkpoint also holds, for a retry to pick up the trial;
    ``metrics``: the ones the searcher minimises (``report``)."""
    model_info = {"family": cfg.family, "architecture": cfg.architecture, "num_params": model.num_params(),
                  "num_params_non_embedding": model.num_params(non_embedding=True)}

    def send_row(phase: Phase, step: int, row: dict, checkpoint_dir: str | None = None) -> None:
        report({"phase": phase, "step": step, "replicate": replicate, **model_info, **where, **row}, metrics,
               checkpoint_dir)

    def save(d: str, result: TrainResult, state: Phase2State | None = None) -> None:
        save_model(d, model, data.tokenizer_json, train_config=cfg.to_dict(), **kept,
                   **checkpoint_record(result, state))

    def on_pass(r: PassRecord) -> None:
        send_row("phase1", r.pass_index, {**r.to_dict(),
               "objective": objective("gate_failed", train_er_fraction=r.effective_rank_fraction)})

    def on_gate(result: TrainResult) -> None:
        row = {**result.summary(), "objective": objective(
            "gate_failed", train_er_fraction=result.train_analysis.effective_rank_fraction)}
        if resume is not None:  # its checkpoint holds these weights already
            send_row("analysis", 0, row)
            return
        with tempfile.TemporaryDirectory() as d:
            save(d, result)
            send_row("analysis", 0, row, d)

    def on_epoch(epoch: EpochReport) -> None:
        stopped = epoch.if_stopped
        row = {**epoch.record.to_dict(), "phase2_epoch": epoch.record.epoch, "phase2_last_epoch": epoch.last,
               "objective": stopped.objective,
               "if_stopped": replicates_summary([*kept["replicates"], stopped.summary()])}
        if not epoch.best:
            send_row("phase2", epoch.record.epoch, row)
            return
        # the best epoch so far: its weights are what a scheduler's stop leaves this trial with
        with tempfile.TemporaryDirectory() as d:
            save(d, stopped, epoch.state)
            send_row("phase2", epoch.record.epoch, row, d)

    return train_run(cfg, data, model, resume=resume, on_pass=on_pass, on_gate=on_gate, on_epoch=on_epoch).summary()
