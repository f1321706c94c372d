"""The Ray Tune function trainable: one search trial is one ``newllm.run.train`` run.

Reported rows, each with ``phase`` and ``step`` and all carrying ``objective`` and
``num_params`` (Tune checks the metric in every report; OptunaSearch reads the last one):

- ``phase1``, step = pass: cvfp/dist loss, converged ratio, train effective rank, lr, seconds;
- ``analysis``, step 0: fixed-point analysis of train and val contexts and the gate verdict,
  with a checkpoint (weights after Phase 1 and its history);
- ``phase2``, step = ``phase2_epoch`` = epoch: train/val loss, val perplexity and accuracy, and
  ``if_stopped``, the run's summary if a scheduler stopped it here; with a checkpoint at each
  epoch that improves on every earlier one (its weights, then the best, and the state that
  resumes Phase 2 after it). ``phase2_epoch`` is a scheduler's time: no other row has it;
- ``final``, step 0: the run's summary and ``status``, with the final checkpoint.

Every row's ``objective`` comes from ``newllm.run.objective``: until a Phase 2 result exists
it is the gate-failed penalty the trial would get if it ended there; in Phase 2 it is the best
val perplexity so far. Every row also carries ``node_id`` (the Ray node that ran it; Tune adds
``hostname``) and ``phase1_restored``.

A retried trial (its node was lost) or a resumed one (the driver was restarted) starts from its
latest checkpoint: from the Phase 1 checkpoint it skips Phase 1 (``phase1_restored`` True), from
a Phase 2 one it continues after that epoch, from the final one it reports the saved summary again.
"""

from __future__ import annotations

import tempfile
from typing import Literal

import ray
import torch
from ray import tune

from newllm.checkpoint import load_model, save_model
from newllm.data import TokenData
from newllm.phase1 import PassRecord
from newllm.run import EpochReport, TrainResult, build_model, checkpoint_record, objective, resume_from, train
from newllm.space import SearchSpace

Phase = Literal["phase1", "analysis", "phase2", "final"]


def trial_resources() -> tuple[int, str]:
    """(CPU threads, device) from what Tune gave this trial."""
    assigned = ray.get_runtime_context().get_assigned_resources()
    threads = max(1, int(assigned.get("CPU", 1)))
    device = "cuda" if assigned.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    return threads, device


def run_trial(config: dict, space: SearchSpace, data: TokenData) -> None:
    cfg = space.trial_config(config)
    threads, device = trial_resources()
    torch.set_num_threads(threads)
    model = build_model(cfg, data.vocab_size, device)
    num_params = model.num_params()
    record = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model, record = load_model(d, device)
    where = {"node_id": ray.get_runtime_context().get_node_id(), "phase1_restored": record is not None}

    def report(phase: Phase, step: int, row: dict, checkpoint_dir: str | None = None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({"phase": phase, "step": step, "num_params": num_params, **where, **row}, checkpoint=checkpoint)

    if record is not None and "summary" in record:  # the run had finished: nothing to redo
        where["phase1_restored"] = record["phase1_restored"]
        report("final", 0, {"threads": threads, "device": device, **record["summary"]})
        return

    def on_pass(r: PassRecord) -> None:
        report("phase1", r.pass_index, {**r.to_dict(),
               "objective": objective("gate_failed", train_er_fraction=r.effective_rank_fraction)})

    def on_gate(result: TrainResult) -> None:
        row = {**result.summary(), "objective": objective(
            "gate_failed", train_er_fraction=result.train_analysis.effective_rank_fraction)}
        if where["phase1_restored"]:  # its checkpoint holds these weights already
            report("analysis", 0, row)
            return
        with tempfile.TemporaryDirectory() as d:
            save_model(d, model, data.tokenizer_json, train_config=cfg.to_dict(), **checkpoint_record(result))
            report("analysis", 0, row, d)

    def on_epoch(epoch: EpochReport) -> None:
        stopped = epoch.if_stopped
        row = {**epoch.record.to_dict(), "phase2_epoch": epoch.record.epoch, "objective": stopped.objective,
               "if_stopped": stopped.summary()}
        if epoch.state is None:
            report("phase2", epoch.record.epoch, row)
            return
        # the best epoch so far: its weights are what a scheduler's stop leaves this trial with
        with tempfile.TemporaryDirectory() as d:
            save_model(d, model, data.tokenizer_json, train_config=cfg.to_dict(),
                       **checkpoint_record(stopped, epoch.state))
            report("phase2", epoch.record.epoch, row, d)

    resume = resume_from(record) if record is not None else None
    result = train(cfg, data, model, resume=resume, on_pass=on_pass, on_gate=on_gate, on_epoch=on_epoch)
    with tempfile.TemporaryDirectory() as d:
        save_model(d, model, data.tokenizer_json, train_config=cfg.to_dict(), summary=result.summary(),
                   phase1_restored=where["phase1_restored"])
        report("final", 0, {"threads": threads, "device": device, **result.summary()}, d)
