"""The search report: its numbers on constructed data with known answers, the report of a real
search (finished, running, one trial), the CLI's errors, and a real headless browser drawing it."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna.distributions as od
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from newllm import analyze, figures
from newllm.experiment import load
from newllm.trials import (
    curve_density,
    curves,
    drawn_curves,
    drawn_points,
    gate_importance,
    gate_saving,
    gate_table,
    history,
    infer_distributions,
    objective_importance,
    pareto_front,
    top_trials,
    trial_status,
)

PENALTY = {"gate_failed": 1.5e6, "diverged": 1e7}


def make_trials(**columns) -> pd.DataFrame:
    """A trials table with the columns the figures read; ``columns`` override or add."""
    n = len(next(iter(columns.values())))
    status = pd.Series(columns.pop("status", ["passed"] * n), dtype="string")
    val_ppl = pd.Series(columns.pop("val_ppl", np.linspace(50, 100, n)), dtype="float64").where(status == "passed")
    passed = (status == "passed").to_numpy()
    base = {
        "trial_id": [f"t{i:03d}" for i in range(n)], "status": status,
        "objective": np.where(passed, val_ppl, [PENALTY.get(s, np.nan) for s in status]),
        "val_ppl": val_ppl, "val_acc": np.where(passed, 0.1, np.nan), "num_params": np.arange(1000, 1000 + n),
        "gate_passed": pd.array(status != "gate_failed", dtype="boolean"),
        "train_effective_rank_fraction": np.full(n, 0.3), "val_effective_rank_fraction": np.full(n, 0.2),
        "phase1_passes": np.full(n, 3), "phase1_seconds": np.full(n, 2.0), "analysis_seconds": np.full(n, 0.5),
        "phase2_seconds": np.where(passed, 4.0, np.nan), "gate_train_er": np.full(n, 0.2),
        "gate_val_er": np.full(n, 0.08),
    }
    return pd.DataFrame({**base, **columns})


def write_experiment(directory: Path, trials: pd.DataFrame, iterations: pd.DataFrame) -> Path:
    """An experiment directory holding ``trials`` and ``iterations`` as one part each (a table
    with no rows is not written, as before its first write)."""
    for name, table in (("trials.parquet", trials), ("iterations.parquet", iterations)):
        if len(table):
            (directory / name).mkdir(parents=True)
            table.to_parquet(directory / name / "part-000001.parquet", index=False)
    return directory


# --- numbers on constructed data ------------------------------------------------------------


def test_infer_distributions_from_config_columns():
    trials = make_trials(context_dim=[8, 16, 16], embed_dim=[8, 8, 8], hidden_dim=[16, 24, 24],
                         num_layers=[1, 3, 2], dist_reg_weight=[0.1, 0.5, 0.3], architecture=["gated", "residual",
                         "gated"], freeze_context=[True, False, True], phase2_lr=[1e-3] * 3)
    d = infer_distributions(trials)
    # varying columns only; hidden_dim follows context_dim + embed_dim, so it was not searched
    assert set(d) == {"context_dim", "num_layers", "dist_reg_weight", "architecture", "freeze_context"}
    assert d["num_layers"] == od.IntDistribution(1, 3)
    assert d["dist_reg_weight"] == od.FloatDistribution(0.1, 0.5)
    assert d["architecture"] == od.CategoricalDistribution(["gated", "residual"])
    assert d["freeze_context"] == od.CategoricalDistribution([False, True])
    # a searched hidden_dim is a parameter
    assert "hidden_dim" in infer_distributions(trials.assign(hidden_dim=[16, 32, 20]))


def test_one_deciding_parameter_ranks_first_in_importance():
    rng = np.random.default_rng(0)
    n = 40
    dist_reg = rng.uniform(0, 1, n)
    layers = rng.integers(1, 5, n)
    arch = rng.choice(["gated", "residual"], n)
    context = rng.choice([8, 16, 32], n)
    # val perplexity depends on dist_reg_weight alone; passing on context_dim alone
    status = np.where(context == 32, "gate_failed", "passed")
    trials = make_trials(status=status, val_ppl=50 + 100 * dist_reg, dist_reg_weight=dist_reg, num_layers=layers,
                         architecture=arch, context_dim=context)
    space = {"dist_reg_weight": od.FloatDistribution(0, 1), "num_layers": od.IntDistribution(1, 4),
             "architecture": od.CategoricalDistribution(["gated", "residual"]),
             "context_dim": od.CategoricalDistribution([8, 16, 32])}
    objective, why = objective_importance(trials, space)
    assert list(objective)[0] == "dist_reg_weight" and objective["dist_reg_weight"] > 0.5, objective
    assert why == f"{(status == 'passed').sum()} passed trials"
    gate, _ = gate_importance(trials, space)
    assert list(gate)[0] == "context_dim" and gate["context_dim"] > 0.5, gate
    # the same from distributions inferred from the columns
    assert list(objective_importance(trials, infer_distributions(trials))[0])[0] == "dist_reg_weight"
    fig = figures.importance_figure(objective, gate)
    assert [t.name for t in fig.data] == ["val perplexity (passed trials)", "passing (all trials)"]
    assert fig.data[0].y[-1] == "dist_reg_weight"  # most important drawn on top


def test_importance_with_too_few_trials_says_why():
    space = {"dist_reg_weight": od.FloatDistribution(0, 1)}
    trials = make_trials(status=["passed", "gate_failed", "passed"], dist_reg_weight=[0.1, 0.2, 0.3])
    assert objective_importance(trials, space) == (None, "needs at least 4 passed trials, has 2")
    assert gate_importance(trials, space) == (None, "needs at least 4 trials, has 3")
    all_passed = make_trials(dist_reg_weight=[0.1, 0.2, 0.3, 0.4, 0.5])
    values, why = gate_importance(all_passed, space)
    assert values is None and "every trial passed" in why
    assert objective_importance(all_passed, {})[0] is None


def test_pareto_front_is_the_non_dominated_points():
    points = np.array([[1, 9], [2, 5], [3, 5], [4, 1], [5, 4], [2, 5], [6, 1], [1, 10], [3, 3]])
    # [3,5] is dominated by [2,5] (equal in one, better in the other); [2,5] twice: neither dominates
    # the other; [6,1] by [4,1]; [1,10] by [1,9]; [5,4] by [4,1]
    assert pareto_front(points).tolist() == [True, True, False, True, False, True, False, False, True]
    by_brute_force = [not any((q <= p).all() and (q < p).any() for q in points) for p in points]
    assert pareto_front(points).tolist() == by_brute_force
    many = np.random.default_rng(0).integers(0, 30, size=(400, 2))  # many ties in both columns
    assert pareto_front(many).tolist() == [not any((q <= p).all() and (q < p).any() for q in many) for p in many]
    assert pareto_front(np.zeros((0, 2))).tolist() == []
    trials = make_trials(status=["passed", "passed", "passed", "gate_failed"], val_ppl=[60, 50, 70, 10],
                         num_params=[100, 200, 300, 50])
    fig = figures.pareto_figure(trials)
    dominated, front = fig.data
    assert list(front.x) == [100, 200] and list(dominated.x) == [300]  # the gate-failed trial is not drawn


def test_gate_map_reproduces_pass_rates_counted_by_hand():
    # context_dim 8: 1 of 4 passed, 16: 2 of 2, 32: 0 of 3
    context = [8, 8, 8, 8, 16, 16, 32, 32, 32]
    status = ["passed", "gate_failed", "gate_failed", "gate_failed", "passed", "passed",
              "gate_failed", "gate_failed", "gate_failed"]
    er = [0.5, 0.1, 0.1, 0.1, 0.4, 0.6, 0.0, 0.1, 0.2]
    weight = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.95]
    trials = make_trials(status=status, context_dim=context, train_effective_rank_fraction=er,
                         dist_reg_weight=weight)
    space = {"context_dim": od.CategoricalDistribution([8, 16, 32]), "dist_reg_weight": od.FloatDistribution(0, 1)}
    table = gate_table(trials, "context_dim", space["context_dim"])
    assert list(table.index) == ["8", "16", "32"]
    assert table.trials.tolist() == [4, 2, 3] and table.passed.tolist() == [1, 2, 0]
    assert table.pass_rate.tolist() == [0.25, 1.0, 0.0]
    assert table.train_er.tolist() == pytest.approx([0.2, 0.5, 0.1])
    # 0..1 in five bins: 0-0.2 holds 0.05, 0.15 (1 of 2 passed), 0.2-0.4: 0.25, 0.35 (0 of 2), 0.4-0.6: 0.45, 0.55
    # (2 of 2), 0.6-0.8: 0.65, 0.75 (0 of 2), 0.8-1: 0.95 (0 of 1)
    table = gate_table(trials, "dist_reg_weight", space["dist_reg_weight"])
    assert table.trials.tolist() == [2, 2, 2, 2, 1] and table.pass_rate.tolist() == [0.5, 0.0, 1.0, 0.0, 0.0]
    fig = figures.gate_map_figure(trials, space)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [list(b.y) for b in bars] == [[0.25, 1.0, 0.0], [0.5, 0.0, 1.0, 0.0, 0.0]]


def test_history_has_one_point_per_trial_with_penalised_ones_apart():
    status = ["passed", "gate_failed", "passed", "diverged", "passed", "gate_failed"]
    trials = make_trials(status=status, val_ppl=[80, 0, 60, 0, 70, 0])
    h = history(trials)
    assert h.number.tolist() == [1, 2, 3, 4, 5, 6]
    assert h.value.isna().tolist() == [s != "passed" for s in status]
    assert h.best.tolist() == [80, 80, 60, 60, 60, 60]
    fig = figures.history_figure(trials)
    points = [(t.name, t.yaxis, list(t.x), list(t.y)) for t in fig.data if t.mode == "markers"]
    assert sum(len(x) for _, _, x, _ in points) == len(trials)
    top = [p for p in points if p[1] == "y"]
    assert top == [("passed trial", "y", [1, 3, 5], [80, 60, 70])]  # no penalty squashes the axis
    assert {(name, tuple(x)) for name, axis, x, _ in points if axis == "y2"} == {("gate failed", (2, 6)),
                                                                                 ("diverged", (4,))}


def test_history_draws_siblings_apart_and_leaves_them_out_of_the_best():
    trials = make_trials(status=["passed"] * 4, val_ppl=[80, 60, 70, 50])
    trials = trials.assign(ablation=[None, "no_phase1", None, "no_dist_reg"])
    h = history(trials)
    assert h.best.tolist() == [80, 80, 70, 70]  # the siblings' 60 and 50 were never proposed
    markers = {t.name: list(t.x) for t in figures.history_figure(trials).data if t.mode == "markers"}
    assert markers == {"passed trial": [1, 3], "no_phase1 sibling": [2], "no_dist_reg sibling": [4]}


def test_curves_keep_each_trials_latest_attempt():
    rows = [("a", 1, "phase1", 1, 0.5), ("a", 1, "phase1", 2, 0.6),   # attempt 1, lost
            ("a", 2, "phase1", 1, 0.7), ("a", 2, "phase2", 1, 0.0),
            ("b", 1, "phase1", 2, 0.9), ("b", 1, "phase1", 1, 0.8)]
    iterations = pd.DataFrame(rows, columns=["trial_id", "attempt", "phase", "step", "converged_ratio"])
    c = curves(iterations, "phase1", ["converged_ratio"])
    assert c.values.tolist() == [["a", 1, 0.7], ["b", 1, 0.8], ["b", 2, 0.9]]
    trials = make_trials(status=["gate_failed"]).assign(trial_id=["b"])
    assert trial_status(trials, ["a", "b"]) == ["running", "gate_failed"]


def test_many_trials_draw_the_best_curves_over_a_density_of_all():
    n, epochs = 300, 4
    trials = make_trials(val_ppl=np.linspace(100, 40, n))  # the last trials are the best
    ids = list(trials.trial_id)
    iterations = pd.DataFrame({"trial_id": np.repeat(ids, epochs), "phase": "phase2", "attempt": 1,
                               "step": np.tile(np.arange(1, epochs + 1), n),
                               "val_ppl": np.repeat(trials.val_ppl.to_numpy(), epochs) + np.tile([30, 20, 10, 0], n)})
    best = drawn_curves(trials, ids, figures.MAX_CURVES)
    assert best == ids[-figures.MAX_CURVES:]
    assert drawn_curves(trials, ids[:5] + ["running"], figures.MAX_CURVES) == ids[:5] + ["running"]
    steps, centres, counts = curve_density(curves(iterations, "phase2", ["val_ppl"]), "val_ppl", bins=10)
    assert steps.tolist() == [1, 2, 3, 4] and counts.shape == (10, 4)
    assert counts.sum(axis=0).tolist() == [n] * epochs  # every trial's point of every epoch, once
    assert centres[0] < 45 and centres[-1] > 120
    fig = figures.phase2_figure(iterations, trials)
    lines = [t for t in fig.data if t.type == "scatter"]
    assert sorted({t.hovertemplate.split("<br>")[0] for t in lines}) == sorted(best)
    (density,) = [t for t in fig.data if t.type == "heatmap"]
    assert np.nansum(np.array(density.z, dtype=float)) == n * epochs
    caption = analyze.phase2_section(trials, iterations).caption
    assert f"the {figures.MAX_CURVES} trials of lowest objective" in caption and f"all {n} trials" in caption
    # the figures of a few trials are as before: every curve a line, no density
    few = iterations[iterations.trial_id.isin(ids[:3])]
    assert {t.type for t in figures.phase2_figure(few, trials).data} == {"scatter"}
    assert "lowest objective" not in analyze.phase2_section(trials, few).caption
    seconds = figures.time_figure(trials)
    assert {t.type for t in seconds.data} == {"histogram"} and len(seconds.data[0].x) == n


def test_drawn_points_keep_the_best_and_draw_the_rest_fairly():
    trials = make_trials(val_ppl=np.random.default_rng(0).uniform(40, 100, 5000))
    drawn = trials[drawn_points(trials.val_ppl, 1000)]
    assert len(drawn) == 1000 and drawn.index.is_monotonic_increasing
    assert set(trials.val_ppl.nsmallest(100).index) <= set(drawn.index)
    rest = drawn.drop(trials.val_ppl.nsmallest(100).index)
    assert 60 < rest.val_ppl.median() < 80  # the rest: a fair draw, not the next best
    assert drawn_points(trials.val_ppl.iloc[:10], 1000).all()


def test_a_large_search_draws_a_sample_of_markers_and_says_so():
    n = 3 * figures.MAX_POINTS
    rng = np.random.default_rng(1)
    status = np.where(rng.random(n) < 0.2, "gate_failed", "passed")
    trials = make_trials(status=status, val_ppl=rng.uniform(40, 100, n), num_params=rng.integers(100, 5000, n))
    trials["objective"] = np.where(status == "passed", trials.val_ppl, 1e6)
    fig = figures.history_figure(trials)
    markers = [t for t in fig.data if t.mode == "markers"]
    assert sum(len(t.x) for t in markers) == figures.MAX_POINTS
    passed = trials.val_ppl.where(status == "passed")
    assert passed.min() in next(t for t in markers if t.name == "passed trial").y  # the best is always drawn
    best = next(t for t in fig.data if t.name == "best so far")
    h = history(trials)
    assert list(best.x)[-1] == n and len(best.x) < 50  # its steps and the last trial, not a point a trial
    assert [h.best[h.number <= x].iloc[-1] for x in best.x] == list(best.y)
    assert "Markers: 1,000 of the 3,000" in analyze.history_section(trials).caption

    fig = figures.pareto_figure(trials)
    dominated, front = fig.data
    on_front = pareto_front(trials.loc[status == "passed", ["num_params", "val_ppl"]].to_numpy())
    assert len(front.x) == on_front.sum() and len(dominated.x) == figures.MAX_POINTS
    assert "the front is drawn whole" in analyze.pareto_section(trials).caption
    assert "Markers" not in analyze.pareto_section(trials.iloc[:100]).caption


def test_gate_saving_as_print_summary_estimates_it():
    trials = make_trials(status=["passed", "gate_failed", "passed", "gate_failed", "gate_failed"],
                         phase2_seconds=[3.0, np.nan, 5.0, np.nan, np.nan])
    assert gate_saving(trials) == (3, 4.0, 12.0)
    failed, mean, saved = gate_saving(make_trials(status=["gate_failed"]))
    assert failed == 1 and math.isnan(mean) and math.isnan(saved)


# --- baselines and floors ---------------------------------------------------------------------

FLOORS = {"unigram_ppl": 400.0, "bigram_ppl": 150.0, "unigram_k": 1.0, "bigram_k": 0.1}
BASELINE_NULLS = ["gate_passed", "train_effective_rank_fraction", "val_effective_rank_fraction", "phase1_passes",
                  "phase1_seconds", "analysis_seconds", "gate_train_er", "gate_val_er", "context_dim",
                  "dist_reg_weight"]


def with_baselines(**columns) -> pd.DataFrame:
    """Six New-LLM trials (t000-t005) and four baselines (t006-t009), as a search with baselines
    writes them: the baselines' Phase 1, gate and New-LLM configuration columns null. The best
    New-LLM trial is t002 (val_ppl 80, 2000 non-embedding parameters); the best baseline at no more
    is the LSTM t006 (75 at 1900); the GRU t007 (70) is larger."""
    base = dict(
        status=["passed", "gate_failed", "passed", "passed", "gate_failed", "passed",
                "passed", "passed", "diverged", "passed"],
        val_ppl=[90, 0, 80, 85, 0, 95, 75, 70, 0, 85],
        family=["newllm"] * 6 + ["baseline"] * 4,
        architecture=["residual", "gated", "gated", "residual", "gated", "residual", "lstm", "gru", "transformer",
                      "lstm"],
        num_params=np.arange(10, 20) * 1000,
        num_params_non_embedding=pd.array([1000, 1100, 2000, 1500, 900, 800, 1900, 2200, 1000, 1000], dtype="Int64"),
        matched_trial_id=pd.array([None] * 6 + ["t002", "t002", "t000", "t000"], dtype="string"),
        context_dim=[8, 32, 16, 8, 32, 16, 0, 0, 0, 0], dist_reg_weight=[.1, .9, .3, .2, .8, .4, 0, 0, 0, 0],
    )
    trials = make_trials(**{**base, **columns})
    trials.loc[trials.family == "baseline", BASELINE_NULLS] = None
    return trials


def test_comparison_line_picks_the_best_of_each_family_at_no_more_parameters():
    trials = with_baselines()
    assert analyze.comparison_line(trials) == (
        "Best New-LLM trial t002 (val_ppl 80.00, 2,000 non-embedding parameters) against the best baseline with no "
        "more non-embedding parameters, lstm t006 (val_ppl 75.00, 1,900 non-embedding parameters): lstm is better, "
        "New-LLM's val_ppl 6.7% higher (1.07x).")
    # the LSTM t006 worse: the best at no more parameters is now t009 (85 at 1000), and New-LLM is better
    line = analyze.comparison_line(with_baselines(val_ppl=[90, 0, 80, 85, 0, 95, 88, 70, 0, 85]))
    assert "lstm t009 (val_ppl 85.00, 1,000 non-embedding" in line and line.endswith(
        "New-LLM is better, its val_ppl 5.9% lower (0.94x).")
    # every baseline larger than New-LLM's best: said so, with the best baseline overall
    larger = with_baselines(num_params_non_embedding=[1000, 1100, 2000, 1500, 900, 800, 2100, 2200, 2300, 2400])
    assert analyze.comparison_line(larger) == (
        "Best New-LLM trial t002 (val_ppl 80.00, 2,000 non-embedding parameters): no passed baseline has as few "
        "non-embedding parameters or fewer; the best baseline overall is gru t007 (val_ppl 70.00, 2,200 "
        "non-embedding parameters).")


def test_comparison_line_without_a_side_to_compare():
    assert analyze.comparison_line(make_trials(val_ppl=[60, 70])) is None  # an old table: no family column
    assert analyze.comparison_line(with_baselines(family=["newllm"] * 10)) is None
    no_newllm = with_baselines(status=["gate_failed"] * 6 + ["passed", "passed", "diverged", "passed"])
    assert analyze.comparison_line(no_newllm) == (
        "No New-LLM trial passed, so there is nothing to compare; the best baseline is gru t007 (val_ppl 70.00, "
        "2,200 non-embedding parameters).")
    no_baseline = with_baselines(status=["passed"] * 6 + ["diverged"] * 4)
    assert analyze.comparison_line(no_baseline).endswith(
        ": no baseline trial passed (4 diverged), so there is nothing to compare it with.")
    neither = with_baselines(status=["gate_failed"] * 6 + ["diverged"] * 4)
    assert analyze.comparison_line(neither) == "Neither a New-LLM nor a baseline trial passed: nothing to compare."


def test_summary_names_the_best_newllm_trial_the_comparison_and_the_floors():
    space = {"context_dim": od.CategoricalDistribution([8, 16, 32])}
    lines = analyze.summary(with_baselines(), pd.DataFrame(), space, FLOORS)
    assert lines[0] == "10 trials finished: 7 passed, 2 gate_failed, 1 diverged"
    assert lines[1] == "Of them 4 baselines (2 lstm, 1 gru, 1 transformer), 3 passed."
    assert lines[2] == ("Best New-LLM trial t002: val_ppl 80.00, val_acc 10.0%, 12,000 parameters (2,000 "
                        "non-embedding); context_dim=16")  # not the better GRU
    assert lines[3] == analyze.comparison_line(with_baselines())
    # the gate's saving counts New-LLM trials only: the baselines' Phase 2 time is not New-LLM's
    assert lines[4] == analyze.gate_saving_line(with_baselines().iloc[:6]) and "2 trials" in lines[4]
    assert lines[5].startswith("Floors on the val tokens") and "400.00" in lines[5]
    # an old table: the lines as before, no comparison, no floors
    old = analyze.summary(make_trials(val_ppl=[60, 70]), pd.DataFrame(), {})
    assert old == ["2 trials finished: 2 passed", "Best trial t000: val_ppl 60.00, val_acc 10.0%, 1,000 parameters; ",
                   "The gate skipped no Phase 2."]


def test_summary_gives_the_best_trials_replicates_after_it():
    replicates = dict(replicates=pd.array([3, 3], dtype="Int64"), replicates_passed=pd.array([2, 3], dtype="Int64"),
                      val_ppl_mean=[61.5, 70.0], val_ppl_std=[1.25, 0.5])
    lines = analyze.summary(make_trials(val_ppl=[60, 70], **replicates), pd.DataFrame(), {})
    assert lines[1].startswith("Best trial t000: val_ppl 60.00")
    assert lines[2] == ("  over its 3 replicates (seeds): objective 60.00, val_ppl 61.50 ± 1.25 over the 2 that "
                        "passed; the figures above are replicate 0's, the saved model's")
    # no spread without a std; no line for a trial of one replicate
    one = analyze.summary(make_trials(val_ppl=[60, 70], **{**replicates, "val_ppl_std": [np.nan, 0.5]}),
                          pd.DataFrame(), {})
    assert one[2].startswith("  over its 3 replicates (seeds): objective 60.00, val_ppl 61.50 over the 2 that")
    single = {**replicates, "replicates": pd.array([1, 1], dtype="Int64")}
    assert not any("replicates" in line for line in analyze.summary(make_trials(val_ppl=[60, 70], **single),
                                                                     pd.DataFrame(), {}))


def test_summary_counts_the_trials_asha_stopped_by_family_where_there_are_baselines():
    stopped = dict(phase2_stop_reason=pd.array(["scheduler", None, "max_epochs", "scheduler"], dtype="string"),
                   phase2_epochs_run=pd.array([2, None, 5, 3], dtype="Int64"))
    lines = analyze.summary(make_trials(status=["passed", "gate_failed", "passed", "passed"], **stopped),
                            pd.DataFrame(), {})
    assert lines[-2] == ("ASHA stopped Phase 2 of 2 passed trials early, after 5 epochs in all; their val_ppl is their "
                         "best epoch's, which their checkpoints hold")
    assert lines[-1] == analyze.gate_saving_line(make_trials(status=["passed", "gate_failed", "passed", "passed"]))
    reasons = ["scheduler", None, "scheduler", "scheduler", None, None, "scheduler", "scheduler", None, "max_epochs"]
    lines = analyze.summary(with_baselines(phase2_stop_reason=pd.array(reasons, dtype="string"),
                                           phase2_epochs_run=pd.array([1, None, 2, 3, None, 5, 1, 4, None, 2],
                                                                      dtype="Int64")), pd.DataFrame(), {})
    assert lines[4] == ("ASHA stopped Phase 2 of 5 passed trials early (3 newllm, 2 baseline), after 11 epochs in all; "
                        "their val_ppl is their best epoch's, which their checkpoints hold")
    assert lines[3] == analyze.comparison_line(with_baselines()) and lines[5].startswith("The gate skipped")
    never = analyze.summary(make_trials(val_ppl=[60, 70], phase2_stop_reason=pd.array(["max_epochs", None],
                                                                                      dtype="string")),
                            pd.DataFrame(), {})
    assert not any(line.startswith("ASHA") for line in never)


def test_trials_table_text_is_by_objective_with_the_searched_columns():
    trials = make_trials(status=["passed", "gate_failed", "passed", "diverged"], val_ppl=[70, 0, 60.125, 0],
                         context_dim=[8, 16, 32, 8], phase2_epochs_run=pd.array([4, None, 5, None], dtype="Int64"))
    text = analyze.trials_table_text(trials, ["context_dim", "not_in_the_table"], None)
    header, *rows = text.splitlines()
    assert header.split() == ["trial_id", "status", "context_dim", "phase1_passes", "train_effective_rank_fraction",
                              "phase2_epochs_run", "val_ppl", "objective"]
    assert [row.split()[0] for row in rows] == ["t002", "t000", "t001", "t003"]
    assert rows[0].split()[-2:] == ["60.12", "60.12"] and rows[2].split()[-1] == "1.5e+06"  # 4 significant digits
    # with baselines: each trial's architecture after its status, then size and the baselines' parameters
    trials = with_baselines(hidden_size=[None] * 6 + [64, 32, 64, 16])
    header, *rows = analyze.trials_table_text(trials, ["context_dim"], ["hidden_size", "context_dim"]).splitlines()
    assert header.split() == ["trial_id", "status", "architecture", "context_dim", "phase1_passes",
                              "train_effective_rank_fraction", "val_ppl", "objective", "num_params_non_embedding",
                              "hidden_size"]
    assert [row.split()[0] for row in rows] == ["t007", "t006", "t002", "t003", "t009", "t000", "t005", "t001",
                                                "t004", "t008"]


def test_figures_of_newllm_only_ignore_the_baselines():
    trials = with_baselines()
    newllm = trials.iloc[:6]
    space = infer_distributions(trials)
    assert space == infer_distributions(newllm)
    assert space["architecture"] == od.CategoricalDistribution(["gated", "residual"])  # no "lstm"
    for name, distribution in space.items():
        pd.testing.assert_frame_equal(gate_table(trials, name, distribution),
                                      gate_table(newllm, name, distribution))
    # 4 New-LLM trials passed; with the baselines counted it would be 7 of 10
    assert gate_importance(trials, space)[1] == "4 of 6 trials passed"
    assert objective_importance(trials, space)[1] == "4 passed trials"
    assert gate_saving(trials) == gate_saving(newllm)
    bars = [t for t in figures.gate_map_figure(trials, space).data if t.type == "bar"]
    assert sum(int(n.split("/")[1]) for n in bars[0].text) == 6
    assert [set(t.y) for t in figures.time_figure(trials).data] == [set(newllm.trial_id)] * 3


def test_history_and_pareto_draw_baselines_apart_and_the_floors():
    trials = with_baselines()
    h = history(trials)
    assert h.best.tolist() == [90, 90, 80, 80, 80, 80, 80, 80, 80, 80]  # New-LLM's: the GRU's 70 does not count
    fig = figures.history_figure(trials, FLOORS)
    markers = {t.name: list(t.x) for t in fig.data if t.mode == "markers"}
    assert markers["New-LLM passed trial"] == [1, 3, 4, 6]
    assert markers["lstm (baseline)"] == [7, 10] and markers["gru (baseline)"] == [8]
    assert markers["diverged"] == [9]  # the diverged transformer with the penalised trials
    assert [t.marker.symbol for t in fig.data if t.name == "lstm (baseline)"] == ["triangle-up"]
    assert [(s.y0, s.line.dash) for s in fig.layout.shapes] == [(400.0, "dash"), (150.0, "dash")]
    assert {a.text for a in fig.layout.annotations} >= {"unigram floor 400", "bigram floor 150"}

    fig = figures.pareto_figure(with_baselines(val_ppl=[90, 0, 80, 92, 0, 95, 75, 70, 0, 85]), FLOORS)
    assert [t.name for t in fig.data] == ["dominated", "Pareto front", "gru (baseline)", "gru front",
                                          "lstm (baseline)", "lstm front"]
    traces = {t.name: t for t in fig.data}
    assert list(traces["Pareto front"].x) == [800, 1000, 2000] and list(traces["dominated"].x) == [1500]
    assert list(traces["lstm (baseline)"].x) == [1000, 1900] and list(traces["lstm front"].x) == [1000, 1900]
    assert fig.layout.xaxis.title.text == "non-embedding parameters" and len(fig.layout.shapes) == 2
    # without floors and baselines, as before
    assert figures.history_figure(trials.iloc[:6]).layout.shapes == ()
    old = figures.pareto_figure(make_trials(val_ppl=[60, 50], num_params=[100, 200]))
    assert [t.name for t in old.data] == ["dominated", "Pareto front"] and old.layout.xaxis.title.text == "parameters"


def test_phase2_curves_draw_baselines_dashed_by_architecture():
    trials = with_baselines()
    rows = [(t, 1, "phase2", e, 100.0 - e) for t in ("t000", "t006", "t007") for e in (1, 2)]
    rows += [("t006", 1, "final", 2, 98.0), ("t001", 1, "phase1", 1, np.nan)]
    iterations = pd.DataFrame(rows, columns=["trial_id", "attempt", "phase", "step", "val_ppl"])
    fig = figures.phase2_figure(iterations, trials)
    assert [(t.name, t.line.dash) for t in fig.data] == [("passed", "solid"), ("lstm (baseline)", "dash"),
                                                         ("gru (baseline)", "dash")]
    assert "t006, lstm baseline, passed" in fig.data[1].hovertemplate
    assert fig.data[1].line.color != fig.data[2].line.color
    # a baseline still running (no trials row yet) is known by its reported rows
    running = pd.DataFrame([("t010", 1, "phase2", 1, 99.0, "baseline", "gru")],
                           columns=["trial_id", "attempt", "phase", "step", "val_ppl", "family", "architecture"])
    fig = figures.phase2_figure(pd.concat([iterations.assign(family=None, architecture=None), running]), trials)
    assert ("gru (baseline)", "dash") in [(t.name, t.line.dash) for t in fig.data]
    assert any("t010, gru baseline, running" in t.hovertemplate for t in fig.data)


def test_report_with_baselines_and_floors(tmp_path, capsys):
    from newllm.floors import record_floors

    trials = with_baselines()
    rows = [(t, 1, 0, "phase2", 1, 90.0) for t in trials.trial_id[trials.status == "passed"]]
    iterations = pd.DataFrame(rows, columns=["trial_id", "attempt", "replicate", "phase", "step", "val_ppl"])
    directory = write_experiment(tmp_path / "baselines", trials, iterations)
    record_floors(str(directory), FLOORS)
    assert analyze.main([str(directory)]) == 0
    out = capsys.readouterr().out
    assert analyze.comparison_line(trials) in out and "Floors on the val tokens" in out
    html = (directory / "report.html").read_text()
    assert section_titles(html) == ["Optimisation history", "Parameter importance",
                                    "Val perplexity against each parameter", "Perplexity against size", "Gate map",
                                    "Phase 1 (CVFP)", "Phase 2", "Time per phase", "Top trials"]
    assert "non-embedding parameter count" in html and '"name":"lstm (baseline)"' in html
    assert "unigram floor 400" in html and "<th>family</th>" in html and "<th>non-embedding params</th>" in html
    table = top_trials(trials, {})
    assert list(table.columns[:4]) == ["trial_id", "status", "family", "architecture"]
    # the New-LLM trials first (the configurations searched), then the best of each baseline architecture
    assert table.trial_id.tolist() == ["t002", "t003", "t000", "t005", "t001", "t004", "t007", "t006", "t008"]
    assert "then the best trial of each baseline architecture" in html
    assert "family" not in top_trials(make_trials(val_ppl=[60, 70]), {})


# --- the report of a real search ------------------------------------------------------------


def section_titles(html: str) -> list[str]:
    return [part.split("</h2>")[0] for part in html.split("<h2>")[1:]]


@pytest.mark.slow
def test_report_of_a_real_search(tiny_search, tmp_path, capsys):
    before = sorted(p.name for p in tiny_search.directory.iterdir())
    assert analyze.main([str(tiny_search.directory), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("3 trials finished") and f"Report: {tmp_path / 'report.html'}" in out
    assert sorted(p.name for p in tiny_search.directory.iterdir()) == before  # --out: nothing written there
    html = (tmp_path / "report.html").read_text()
    assert html.count(get_plotlyjs()[:200]) == 1 and "<script src=" not in html  # embedded once: opens offline
    assert section_titles(html) == ["Optimisation history", "Parameter importance",
                                    "Val perplexity against each parameter", "Perplexity against size", "Gate map",
                                    "Phase 1 (CVFP)", "Phase 2", "Time per phase", "Top trials"]
    assert "needs at least 4 passed trials, has 3" in html  # importance explains why it is missing
    trials, _ = load(tiny_search.directory)
    assert all(t in html for t in trials.trial_id)
    # from Python, into the experiment directory by default (a copy: the fixture is shared)
    copy = shutil.copytree(tiny_search.directory, tmp_path / "copy")
    assert analyze.write_report(copy) == copy / "report.html" and (copy / "report.html").stat().st_size > 1e6


@pytest.mark.slow
def test_report_of_a_running_search_and_of_one_trial(tiny_search, tmp_path, capsys):
    trials, iterations = load(tiny_search.directory)
    running = write_experiment(tmp_path / "running", trials.iloc[:0], iterations)
    assert analyze.main([str(running)]) == 0
    out = capsys.readouterr().out
    assert "No trial has finished yet." in out and "3 more trials have reported rows" in out
    html = (running / "report.html").read_text()
    assert section_titles(html) == ["Trials", "Phase 1 (CVFP)", "Phase 2"]
    assert '"name":"running"' in html  # the curves of unfinished trials are drawn as running

    one = write_experiment(tmp_path / "one", trials.iloc[:1], iterations[iterations.trial_id == trials.trial_id[0]])
    assert analyze.main([str(one)]) == 0
    html = (one / "report.html").read_text()
    assert "No searched parameter varies across the trials" in html
    assert "Optimisation history" in html and "Top trials" in html


def test_report_when_no_trial_passed(tmp_path, capsys):
    trials = make_trials(status=["gate_failed", "diverged", "gate_failed", "error"], dist_reg_weight=[.1, .2, .3, .4])
    directory = write_experiment(tmp_path / "failed", trials, pd.DataFrame())
    assert analyze.main([str(directory)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["4 trials finished: 2 gate_failed, 1 diverged, 1 error",
                       "No trial passed: no best configuration.",
                       "The gate skipped Phase 2 for 2 trials (no passed trial to estimate the time saved)."]
    html = (directory / "report.html").read_text()
    assert section_titles(html) == ["Optimisation history", "Parameter importance", "Gate map", "Phase 1 (CVFP)",
                                    "Phase 2", "Time per phase", "Top trials"]
    assert "no trial passed, so nothing separates passing from failing" in html


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "trials.parquet").mkdir()  # an experiment before its first write
    cases = {tmp_path / "nothing": "is not a directory", tmp_path: "not a newllm experiment directory"}
    for directory, message in cases.items():
        assert analyze.main([str(directory)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    (tmp_path / "trials.parquet" / "part-000001.parquet").write_text("not parquet")
    assert analyze.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    part = tmp_path / "trials.parquet" / "part-000001.parquet"
    assert err.startswith(f"error: {part} is not a readable Parquet file") and err.count("\n") == 1, err
    (tmp_path / "empty").mkdir()
    with pytest.raises(analyze.ExperimentError, match="not a newllm experiment directory"):
        analyze.write_report(tmp_path / "empty")


@pytest.mark.slow
def test_cli_in_a_subprocess(tmp_path):
    run = subprocess.run([sys.executable, "-m", "newllm.analyze", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


# --- a real browser ---------------------------------------------------------------------------

MARKS = "path.point, .scatterlayer .trace path.js-line, .barlayer .point"
# per plot div: how many data marks its SVG holds
COUNT_MARKS = ("return Array.from(document.querySelectorAll('div.plotly-graph-div'))"
               f".map(d => [d.id, d.querySelectorAll('{MARKS}').length]);")


def chromium():
    """A headless Chromium driven by selenium, logging the page's console (skip if not installed)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingOptions", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.mark.slow
def test_a_browser_draws_every_figure(tiny_search, tmp_path):
    path = analyze.write_report(tiny_search.directory, tmp_path)
    driver = chromium()
    try:
        driver.get(path.as_uri())
        deadline = time.monotonic() + 30
        while True:
            marks = driver.execute_script(COUNT_MARKS)
            if (marks and all(n > 0 for _, n in marks)) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        figures_in_file = path.read_text().count('class="plotly-graph-div"')
        assert len(marks) == figures_in_file >= 7 and all(n > 0 for _, n in marks), marks  # every figure, drawn
        page = "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"
        driver.set_window_size(1300, driver.execute_script(page))  # the whole page in one screenshot
        assert driver.save_screenshot(str(tmp_path / "report.png"))  # results/report.png is one of these
    finally:
        driver.quit()
