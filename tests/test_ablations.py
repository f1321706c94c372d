"""Ablations: a run without Phase 1, the statistics of paired trials, the space's ablations
section and the search's sibling trials."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_SPACE, tiny_space_text

from newllm import run, stats
from newllm.config import TrainConfig
from newllm.data import DataConfig, prepare_data
from newllm.run import SUMMARY_DTYPES, build_model, checkpoint_record, resume_from, train_run
from newllm.space import parse_space

# what only a run with Phase 1 fills: its passes, the fixed-point analysis and the gate
PHASE1_COLUMNS = ["phase1_passes", "phase1_stop_reason", "converged_ratio", "fixed_passes", "val_fixed_passes",
                  "val_converged_ratio", "train_effective_rank", "train_effective_rank_fraction",
                  "val_effective_rank", "val_effective_rank_fraction", "gate_passed", "gate_reason",
                  "phase1_seconds", "analysis_seconds", "final_converged_ratio"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    space = parse_space(TINY_SPACE % "", "tiny.yaml")
    return prepare_data(DataConfig(**space.data, cache_dir=str(tmp_path_factory.mktemp("cache"))))


def no_phase1_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"context_dim": 8, "embed_dim": 8, "hidden_dim": 16, "num_layers": 1, "phase1_max_iter": 0,
                          "phase2_epochs": 2, "phase2_lr": 1e-3, "phase2_batch_size": 64, "seed": 3, **overrides})


def test_phase1_off_is_a_setting_and_needs_a_phase2():
    assert not no_phase1_config().phase1 and TrainConfig().phase1
    with pytest.raises(ValueError, match="phase1_max_iter must be >= 0"):
        no_phase1_config(phase1_max_iter=-1)
    with pytest.raises(ValueError, match="nothing to run"):
        no_phase1_config(skip_phase2=True)


@pytest.mark.parametrize("freeze_context", [False, True])
def test_without_phase1_phase2_trains_the_initial_weights_and_no_phase1_code_runs(tiny_data, monkeypatch,
                                                                                   freeze_context):
    def phase1_ran(*args, **kwargs):
        raise AssertionError("Phase 1 code ran")

    monkeypatch.setattr(run, "train_phase1", phase1_ran)
    monkeypatch.setattr(run, "fixed_contexts", phase1_ran)
    monkeypatch.setattr(run, "fixed_point_analysis" if freeze_context else "gate", phase1_ran)
    entering = []
    train_phase2 = run.train_phase2

    def spy(model, *args, **kwargs):
        entering.append({k: v.clone() for k, v in model.state_dict().items()})
        return train_phase2(model, *args, **kwargs)

    monkeypatch.setattr(run, "train_phase2", spy)
    cfg = no_phase1_config(freeze_context=freeze_context)
    torch.set_num_threads(1)
    model = build_model(cfg, tiny_data.vocab_size)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    epochs = []
    result = train_run(cfg, tiny_data, model, on_pass=pytest.fail, on_gate=pytest.fail, on_epoch=epochs.append)

    assert len(entering) == 1 and entering[0].keys() == initial.keys()
    assert all(torch.equal(entering[0][k], initial[k]) for k in initial)
    summary = result.summary()
    assert summary.keys() == SUMMARY_DTYPES.keys()
    assert summary["status"] == "passed" and summary["family"] == "newllm"
    assert all(summary[k] is None for k in PHASE1_COLUMNS), {k: summary[k] for k in PHASE1_COLUMNS}
    assert summary["phase2_epochs_run"] == 2 and math.isfinite(summary["val_ppl"])
    assert (summary["final_effective_rank_fraction"] is None) == freeze_context
    assert summary["val_ppl"] < tiny_data.vocab_size  # it learned something from the initial weights

    # a search checkpoint of a Phase 2 epoch resumes it, with no Phase 1 to restore
    best = next(e for e in reversed(epochs) if e.best)
    resume = resume_from(checkpoint_record(best.if_stopped, best.state))
    assert resume.phase1 is None and resume.analysis is None and resume.phase2 is not None


# --- statistics ----------------------------------------------------------------------------------


def test_the_t_quantiles_are_the_tables():
    # two-sided 95% critical values of Student's t, from any statistics table
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 5: 2.5706, 8: 2.3060, 30: 2.0423}
    for df, t in table.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)


def test_the_paired_interval_is_the_hand_computed_one():
    # three configurations' val_ppl with and without Phase 1, at the same seeds: +10%, +20%, +0%
    with_phase1, without = [110.0, 60.0, 40.0], [100.0, 50.0, 40.0]
    # by hand: differences 10, 20, 0; mean 10; s = 10; t(0.975, 2) = 4.302653; half = 4.302653 * 10 / sqrt(3)
    half = 4.302653 * 10 / math.sqrt(3)
    interval = stats.paired_interval(with_phase1, without)
    assert (interval.mean, interval.n) == (pytest.approx(10.0), 3)
    assert interval.low == pytest.approx(10 - half, abs=1e-4) and interval.high == pytest.approx(10 + half, abs=1e-4)
    assert not interval.excludes_zero()
    absolute = stats.paired_interval(with_phase1, without, relative=False)
    assert absolute.mean == pytest.approx(20 / 3)
    one = stats.paired_interval([2.0], [1.0])
    assert one.mean == pytest.approx(100.0) and math.isnan(one.low) and math.isnan(one.high)
    with pytest.raises(ValueError, match="as many"):
        stats.paired_interval([1.0], [1.0, 2.0])


# --- the space's ablations section ---------------------------------------------------------------


def test_the_ablations_section_round_trips_and_an_unknown_name_is_a_clear_error():
    from newllm.space import ABLATION, MATCHED, SpaceError

    space = parse_space(TINY_SPACE % "" + "ablations: [no_phase1, no_dist_reg]\n", "s.yaml")
    assert space.ablations == ("no_phase1", "no_dist_reg")
    assert parse_space(space.to_yaml(), "again.yaml").ablations == space.ablations
    parent = {"context_dim": 16, "num_layers": 2, "dist_reg_weight": 0.5}
    sibling = space.sibling_trial("no_dist_reg", "t0", parent)
    assert sibling == {**parent, ABLATION: "no_dist_reg", MATCHED: "t0"}
    a, b = space.trial_config(parent).to_dict(), space.trial_config(sibling).to_dict()
    assert {k for k in a if a[k] != b[k]} == {"dist_reg_weight"} and b["dist_reg_weight"] == 0.0
    for bad in ("[no_cvfp]", "[no_phase1, no_phase1]", "no_phase1", "[[no_phase1]]"):
        with pytest.raises(SpaceError, match="ablations must be a list of distinct names from"):
            parse_space(TINY_SPACE % "" + f"ablations: {bad}\n", "s.yaml")
    with pytest.raises(SpaceError, match="no_phase1 removes what the space's fixed settings already remove"):
        parse_space(tiny_space_text("phase1_max_iter: 0") + "\nablations: [no_phase1]\n", "s.yaml")


# --- what the summary and the report say ---------------------------------------------------------


def ablation_rows():
    """Two configurations, each with a no_phase1 sibling, two seeds each: val_ppl with Phase 1
    100, 50 / 60, 30 against 90, 50 / 50, 25 without (+11.1%, 0%, +20%, +20%); one more sibling
    whose replicate 1 failed the gate (no Phase 2 rows) and replicate 0 diverged (no pair)."""
    import pandas as pd

    trials = pd.DataFrame({
        "trial_id": ["p1", "s1", "p2", "s2", "s3"], "status": ["passed"] * 4 + ["diverged"],
        "family": ["newllm"] * 5, "architecture": ["gated", "gated", "residual", "residual", "gated"],
        "context_dim": [16, 16, 32, 32, 16], "seed": [7, 7, 9, 9, 7], "objective": [75.0, 70, 45, 37.5, 1e7],
        "val_ppl": [100.0, 90, 60, 50, None], "matched_trial_id": [None, "p1", None, "p2", "p1"],
        "ablation": [None, "no_phase1", None, "no_phase1", "no_dist_reg"],
        "replicates": [2] * 5, "replicates_passed": [2, 2, 2, 2, 0]})
    epochs = {("p1", 0): [120, 100], ("p1", 1): [50, 55], ("s1", 0): [90, 95], ("s1", 1): [60, 50],
              ("p2", 0): [60, 70], ("p2", 1): [30, 31], ("s2", 0): [50, 50], ("s2", 1): [25, 26],
              ("s3", 0): [80, float("nan")]}
    iterations = pd.DataFrame([{"trial_id": t, "replicate": r, "phase": "phase2", "step": i + 1, "val_ppl": v}
                               for (t, r), values in epochs.items() for i, v in enumerate(values)])
    return trials, iterations


def test_the_summary_gives_the_paired_change_and_its_interval_computed_from_the_runs():
    from newllm.analyze import ablation_lines, ablations_section
    from newllm.trials import ablation_pairs, ablation_table

    trials, iterations = ablation_rows()
    pairs = ablation_pairs(trials, iterations)
    assert list(pairs.sibling_id) == ["s1", "s1", "s2", "s2"] and list(pairs.seed) == [7, 8, 9, 10]
    assert list(pairs.val_ppl) == [100, 50, 60, 30] and list(pairs.val_ppl_without) == [90, 50, 50, 25]
    changes = [100 * (100 / 90 - 1), 0.0, 20.0, 20.0]
    mean, s = sum(changes) / 4, math.sqrt(sum((c - sum(changes) / 4) ** 2 for c in changes) / 3)
    half = 3.182446 * s / 2  # t(0.975, 3) * s / sqrt(4)
    phase1, dist_reg = ablation_lines(trials, iterations)
    assert phase1.startswith(f"Phase 1 changes val_ppl by {mean:+.1f}% (95% CI [{mean - half:+.0f}%, "
                             f"{mean + half:+.0f}%], 4 pairs): ")
    assert ("removing it helps" if mean - half > 0 else "no clear effect") in phase1
    assert "with it 60.00 [" in phase1 and "without 53.75 [" in phase1
    assert "did not pass" not in phase1
    assert dist_reg == ("dist-reg: no pair of a New-LLM run and its no_dist_reg sibling's at the same seed has both "
                        "passed: no comparison; runs that did not pass (no pair): 0 of 2 with it, 2 of 2 without.")
    table = ablation_table(pairs)
    assert list(table.configuration) == ["gated, C = 16", "residual, C = 32", "all configurations"]
    assert list(table.pairs) == [2, 2, 4] and table.change.iloc[1] == "+20.0% [+20.0%, +20.0%]"
    assert ablations_section(trials, iterations).title == "Ablations"
