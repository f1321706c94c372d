"""The objective invariant: every passed trial's val_ppl is what its saved model does on the
val stream, read the way a user reads it, through the newllm checkpoint and the exported
Hugging Face model alike."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from newllm import experiment, export
from newllm.checkpoint import load_model
from newllm.phase2 import sequential_stream_metrics
from newllm.space import load_space


@pytest.mark.slow
def test_reported_val_ppl_is_the_saved_models_real_perplexity(tiny_search, tmp_path):
    trials, iterations = experiment.load(tiny_search.directory)
    passed = trials[trials.status == "passed"]
    assert len(passed) >= 2 and (passed.phase2_lr >= 1e-3).all() and not passed.freeze_context.any()
    val_ids = tiny_search.data.val_ids
    for row in passed.itertuples():
        # when the search ends a trial keeps its first checkpoint (after Phase 1) and its latest
        checkpoint = Path(experiment.checkpoint_dir(tiny_search.directory, row.checkpoint_path))
        after_phase1, latest = sorted(checkpoint.parent.glob("checkpoint_*"))
        assert latest == checkpoint
        model, _ = load_model(latest)
        # Phase 2 trained the context layers themselves, not only the head
        moved = [k for k, v in model.state_dict().items()
                 if k.startswith("blocks.") and not torch.equal(v, load_model(after_phase1)[0].state_dict()[k])]
        assert moved, f"trial {row.trial_id}: Phase 2 left every context layer unchanged"
        real = math.exp(sequential_stream_metrics(model, val_ids)[0])  # the oracle, not the parallel read
        assert real == pytest.approx(row.val_ppl, rel=1e-2)
        assert row.objective == row.val_ppl
        # the best Phase 2 epoch reported during the search is the same number
        epochs = iterations[(iterations.trial_id == row.trial_id) & (iterations.phase == "phase2")]
        assert epochs.val_ppl.min() == pytest.approx(row.val_ppl, rel=1e-6)
        if row.phase2_stop_reason != "scheduler":  # a stopped trial never reached its final analysis
            assert 0 <= row.final_effective_rank_fraction <= 1 and 0 <= row.final_converged_ratio <= 1


@pytest.mark.slow
def test_exported_model_has_the_reported_val_ppl(tiny_search, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import newllm.hf  # noqa: F401  (registers the model type)

    trials, _ = experiment.load(tiny_search.directory)
    val_ids = tiny_search.data.val_ids[None]
    for row in trials[trials.status == "passed"].itertuples():
        out = tmp_path / row.trial_id
        assert export.main([str(tiny_search.directory), "--trial", row.trial_id, "--out", str(out)]) == 0
        model = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            loss = model(input_ids=val_ids, labels=val_ids).loss
        assert math.exp(float(loss)) == pytest.approx(row.val_ppl, rel=1e-2)


def test_a_space_may_search_both_phase2_modes(tmp_path):
    space_file = tmp_path / "modes.yaml"
    space_file.write_text("params:\n  freeze_context: {type: categorical, choices: [true, false]}\n"
                          "  phase2_bptt: {type: categorical, choices: [4, 8]}\n")
    space = load_space(space_file)
    assert space.trial_config({"freeze_context": True, "phase2_bptt": 4}).freeze_context is True
    assert space.trial_config({"freeze_context": False, "phase2_bptt": 8}).phase2_bptt == 8
