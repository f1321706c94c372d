"""Real searches on a local Ray: Parquet rows, the gate, bad inputs, resume."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray

from newllm import experiment
from newllm.config import family_fields
from newllm.search import callbacks, cli, packing, storage

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("NEWLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield
    if ray.is_initialized():
        ray.shutdown()


def run_search(tmp_path: Path, space: str, name: str, *extra: str) -> pd.DataFrame:
    assert cli.main(["--local", "--space", space, "--name", name, "--storage-path", str(tmp_path / "res"), *extra]) == 0
    ray.shutdown()
    trials, iterations = experiment.load(tmp_path / "res" / name)
    return trials, iterations


@pytest.mark.slow
def test_small_search_writes_one_typed_row_per_trial(tiny_search):
    trials, iterations = experiment.load(tiny_search.directory)
    assert len(trials) == 3 and trials.trial_id.is_unique
    # every column has its declared dtype: a summary key without one cannot slip through
    declared = callbacks.TrialRow.dtypes()
    assert set(trials.columns) == set(declared) | set(callbacks.versions())
    assert {c: str(trials[c].dtype) for c in declared} == declared
    # a setting that means nothing to New-LLM (a baseline's dropout) is null in its rows; its own are set
    baseline_only = sorted(set(family_fields("baseline")) - set(family_fields("newllm")))
    assert baseline_only and trials[baseline_only].isna().all().all()
    assert trials[["context_dim", "dist_reg_weight", "architecture"]].notna().all().all()
    assert set(trials.status) <= {"passed", "gate_failed", "diverged"}
    passed = trials.status == "passed"
    assert passed.any()
    assert trials.loc[passed, ["val_loss", "val_ppl", "val_acc"]].notna().all().all()
    assert trials.loc[~passed, "val_ppl"].isna().all()
    assert (trials.loc[passed, "objective"] == trials.loc[passed, "val_ppl"]).all()
    assert (trials.loc[~passed, "objective"] >= 1e6).all()
    assert {"torch_version", "ray_version", "optuna_version", "newllm_version", "phase1_seconds"} <= set(trials)
    # relative to the experiment directory, so that a moved experiment keeps its checkpoints
    assert not trials.checkpoint_path.str.startswith("/").any()
    assert trials.checkpoint_path.map(lambda p: (tiny_search.directory / p / "model.pt").is_file()).all()
    assert (tiny_search.directory / "report.html").is_file()  # the search ends with its report
    # every reported row, with its phase; Phase 2 rows exactly for passed trials
    assert set(iterations.trial_id) == set(trials.trial_id)
    assert {"phase1", "analysis", "final"} <= set(iterations.phase)
    p2 = set(iterations.loc[iterations.phase == "phase2", "trial_id"])
    assert p2 == set(trials.loc[passed, "trial_id"])
    assert iterations.objective.notna().all()


def test_a_finished_trial_leaves_no_folder_in_tunes_staging_area(tiny_search):
    # Tune copies its whole staging area to the experiment at each save of its state: a folder
    # per finished trial made that copy grow with the search
    staged = list(tiny_search.staging.iterdir())
    assert any(p.name.startswith("experiment_state-") for p in staged)
    assert [p.name for p in staged if p.is_dir()] == []


@pytest.mark.slow
def test_gate_failure_skips_phase2(tmp_path, tiny_space):
    trials, iterations = run_search(tmp_path, tiny_space("gate_train_er: 1.0"), "gate", "--num-trials", "2")
    assert list(trials.status) == ["gate_failed", "gate_failed"]
    assert trials.gate_passed.eq(False).all() and trials.val_ppl.isna().all() and trials.phase2_epochs_run.isna().all()
    expected = 1e6 * (2 - trials.train_effective_rank_fraction)
    assert (trials.objective - expected).abs().max() < 1e-6
    assert "phase2" not in set(iterations.phase)


BAD_SPACES = {
    "unknown key": "params:\n  context_dims: {type: int, low: 8, high: 16}\n",
    "unknown top key": "params:\n  num_layers: {type: int, low: 1, high: 2}\nfixd: {}\n",
    "inverted range": "params:\n  num_layers: {type: int, low: 4, high: 2}\n",
    "empty choices": "params:\n  context_dim: {type: categorical, choices: []}\n",
    "wrong type": "params:\n  num_layers: {type: float, low: 1.0, high: 2.0}\n",
    "bad log": "params:\n  phase2_lr: {type: float, low: 0.0, high: 0.1, log: true}\n",
    "bad fixed type": "params:\n  num_layers: {type: int, low: 1, high: 2}\nfixed:\n  context_dim: sixteen\n",
    "dims rejected": "params:\n  context_dim: {type: categorical, choices: [8, 16]}\nfixed:\n  hidden_dim: 24\n  embed_dim: 16\n",
    "not yaml": "params: [unclosed\n",
    "no params": "fixed:\n  num_layers: 2\n",
    "bad objective": "objectives: [accuracy]\nparams:\n  num_layers: {type: int, low: 1, high: 2}\n",
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_space_exits_2_before_anything(tmp_path, capsys, case):
    space = tmp_path / "bad.yaml"
    space.write_text(BAD_SPACES[case])
    code = cli.main(["--space", str(space), "--name", "x", "--storage-path", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and str(space) in err
    assert not (tmp_path / "res").exists() and not ray.is_initialized()


@pytest.mark.parametrize("args, message", [
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be >= 1"),
    (["--resume"], "--resume needs --name"),
    (["--data", "/no/such/corpus"], "does not exist"),
    (["--space", "/no/such.yaml"], "does not exist"),
])
def test_bad_options_exit_2(tmp_path, capsys, args, message):
    code = cli.main(["--storage-path", str(tmp_path / "res"), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


def test_local_storage_on_a_multi_node_cluster_is_warned_not_refused(tmp_path):
    assert storage.storage_warning(str(tmp_path), num_nodes=1) is None
    assert storage.storage_warning("s3://bucket/newllm", num_nodes=3) is None
    warning = storage.storage_warning(str(tmp_path), num_nodes=3)
    assert warning.startswith("warning: --storage-path") and str(tmp_path) in warning and "3 nodes" in warning


@pytest.mark.slow(seconds=55)
def test_a_reused_actor_leaks_no_state_between_trials(tmp_path):
    # one configuration, two trials one after the other: the second runs in the first's actor
    space = tmp_path / "same.yaml"
    space.write_text(TINY_SAME_CONFIG)
    trials, iterations = run_search(tmp_path, str(space), "same", "--concurrency", "1")
    first, second = (iterations[iterations.trial_id == t] for t in trials.trial_id)
    assert first.pid.iloc[0] == second.pid.iloc[0], "the second trial did not reuse the first's actor"
    assert (trials.attempts == 1).all()
    # same seed, same configuration: the same numbers, whether or not the actor was fresh
    numbers = [c for c in first if c.endswith(("loss", "ppl", "acc", "ratio", "fraction", "rank"))]
    assert len(first) == len(second) and numbers
    for column in numbers:
        assert first[column].tolist() == second[column].tolist() or (
            first[column].isna().tolist() == second[column].isna().tolist()
            and first[column].dropna().tolist() == second[column].dropna().tolist()), column
    same = [c for c in trials if c.endswith(("loss", "ppl", "acc", "ratio", "fraction", "rank", "passes"))]
    assert trials[same].iloc[0].equals(trials[same].iloc[1])


TINY_SAME_CONFIG = """
num_trials: 2
params:
  context_dim: {type: categorical, choices: [16]}
fixed:
  embed_dim: 8
  num_layers: 2
  phase1_max_iter: 4
  phase1_streams: 4
  phase2_epochs: 2
  phase2_lr: 0.001
  phase2_batch_size: 64
  gate_train_er: 0.0
  gate_val_er: 0.0
data:
  num_samples: 6
  vocab_size: 300
"""


@pytest.mark.slow
def test_the_experiment_keeps_its_space_and_resume_needs_no_space_file(tmp_path, tiny_space, capsys):
    from newllm.space import load_space, recorded_distributions, recorded_space

    space_file = Path(tiny_space())
    trials, _ = run_search(tmp_path, str(space_file), "kept", "--num-trials", "1", "--seed", "3")
    exp = str(tmp_path / "res" / "kept")
    kept, original = recorded_space(exp), load_space(space_file)
    assert kept.params == original.params == recorded_distributions(exp)
    assert kept.fixed == {**original.fixed, "seed": 3} and kept.num_trials == 1 != original.num_trials
    assert kept.data["num_samples"] == original.data["num_samples"] and kept.data["source"] == "builtin"
    assert (tmp_path / "res" / "kept" / "report.html").is_file()
    space_file.unlink()  # the checkout's copy is gone or changed: the experiment does not need it
    args = ["--local", "--name", "kept", "--storage-path", str(tmp_path / "res"), "--resume"]
    assert cli.main(args + ["--space", "laptop"]) == 2
    err = capsys.readouterr().err
    assert "--space give another" in err and "params.architecture" in err and "fixed.seed" in err
    assert cli.main(args + ["--num-trials", "2"]) == 2  # the resume runs as many trials as the search began with
    assert "--num-trials give another (num_trials differ)" in capsys.readouterr().err
    assert cli.main(args) == 0
    assert "'kept': 1 trials of" in capsys.readouterr().out
    ray.shutdown()
    assert len(experiment.load(exp)[0]) == 1


def test_a_study_name_already_in_the_optuna_storage_is_refused(tmp_path, capsys):
    import optuna

    journal = str(tmp_path / "shared.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    optuna.create_study(study_name="taken", storage=storage)
    code = cli.main(["--name", "taken", "--optuna-storage", journal, "--storage-path", str(tmp_path / "res")])
    assert code == 2 and "already holds a study named 'taken'" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


def test_an_experiment_on_object_storage_keeps_its_study_beside_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    on_s3 = experiment.experiment_dir(storage.storage_root("s3://bucket/newllm"), "n")
    assert storage.optuna_storage(None, "n", on_s3) == str(tmp_path / "n.optuna.journal")
    local = experiment.experiment_dir(storage.storage_root(str(tmp_path)), "n")
    assert storage.optuna_storage(None, "n", local) == f"{tmp_path}/n/{experiment.OPTUNA_JOURNAL}"


@pytest.mark.slow(seconds=55)
def test_replicates_run_each_configuration_with_k_seeds_and_optuna_gets_their_mean(tmp_path, tiny_space, capsys):
    import math

    import optuna

    from newllm import analyze
    from newllm.checkpoint import load_model
    from newllm.data import DataConfig, prepare_data
    from newllm.phase2 import stream_metrics
    from newllm.space import load_space

    space = tiny_space("gate_train_er: 0.0\n  gate_val_er: 0.0")
    args = ["--local", "--space", space, "--name", "reps", "--storage-path", str(tmp_path / "res")]
    assert cli.main(args + ["--repeats", "2", "--scheduler", "asha"]) == 2  # ASHA compares single runs
    assert "use --scheduler none" in capsys.readouterr().err
    trials, iterations = run_search(tmp_path, space, "reps", "--num-trials", "2", "--repeats", "2")
    assert (trials.replicates == 2).all() and (trials.status == "passed").all()
    data = prepare_data(DataConfig(**load_space(space).data))
    for row in trials.itertuples():
        rows = iterations[iterations.trial_id == row.trial_id]
        assert set(rows.replicate) == {0, 1}
        # two seeds: two different runs, each with its own Phase 1 and Phase 2
        first, second = (rows[(rows.replicate == r) & (rows.phase == "phase1")].loss.tolist() for r in (0, 1))
        assert first and second and first != second
        best = [rows[(rows.replicate == r) & (rows.phase == "phase2")].val_ppl.min() for r in (0, 1)]
        assert row.val_ppl == pytest.approx(best[0], rel=1e-9)  # replicate 0's: the saved model's
        assert row.objective == pytest.approx(sum(best) / 2) == row.val_ppl_mean
        assert row.val_ppl_std == pytest.approx(abs(best[0] - best[1]) / math.sqrt(2))
        model, _ = load_model(experiment.checkpoint_dir(tmp_path / "res" / "reps", row.checkpoint_path))
        assert math.exp(stream_metrics(model, data.val_ids)[0]) == pytest.approx(row.val_ppl, rel=1e-6)
        assert len(rows[rows.phase == "final"]) == 1
    journal = tmp_path / "res" / "reps" / experiment.OPTUNA_JOURNAL
    study = optuna.load_study(study_name="reps", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(trials.objective))
    assert "val_ppl mean ± std" in (tmp_path / "res" / "reps" / analyze.REPORT_FILE).read_text()


@pytest.mark.slow(seconds=120)
def test_the_laptop_search_shows_the_gate_and_its_optuna_study_is_live_during_it(tmp_path):
    """The README's main command (the laptop space, seed 0): some trials collapse in Phase 1 and
    fail the gate, most pass. Its Optuna study is readable while the driver runs, as by
    optuna-dashboard, and complete after (one search checks both: it is the suite's longest)."""
    import optuna

    journal = tmp_path / "res" / "laptop" / experiment.OPTUNA_JOURNAL
    args = [sys.executable, "-m", "newllm.search", "--local", "--space", "laptop", "--name", "laptop",
            "--storage-path", str(tmp_path / "res")]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen_running = None
    for line in driver.stdout:  # as optuna-dashboard would, while the driver runs
        if "1/8 finished" in line and seen_running is None:
            studies = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
            seen_running = [t.state for t in optuna.load_study(study_name="laptop", storage=studies).trials]
            assert driver.poll() is None
    assert driver.wait(timeout=600) == 0
    assert any(state.is_finished() for state in seen_running)
    assert_study_matches_table(tmp_path / "res" / "laptop", "laptop")
    trials, _ = experiment.load(tmp_path / "res" / "laptop")
    counts = trials.status.value_counts()
    assert len(trials) == 8 and counts.get("gate_failed", 0) >= 1 and counts.get("passed", 0) >= 4, counts
    failed = trials[trials.status == "gate_failed"]
    assert ((failed.train_effective_rank_fraction < failed.gate_train_er)
            | (failed.val_effective_rank_fraction < failed.gate_val_er)).all()


def test_a_resume_fails_the_optuna_trials_a_killed_driver_left_running():
    studies = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="s", storage=studies)
    study.ask()  # left running
    finished = study.ask()
    study.tell(finished, 1.0)
    storage.fail_left_running(studies, "s")
    storage.fail_left_running(studies, "no such study")  # a driver killed before it made the study
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]


# --- the Optuna study, as Optuna's own tools read it -------------------------------------------------

USER_ATTRS = ("family", "status", "node_id", "attempts", "checkpoint_path", "replicates")


def study_of(directory: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(Path(directory) / experiment.OPTUNA_JOURNAL))))


def assert_study_matches_table(directory: Path, name: str) -> pd.DataFrame:
    """Every trials-table row is one finished trial of the study, joined on the Tune trial id its user
    attributes hold, with the row's user attributes, a state that says whether ASHA stopped it, and as
    its value the row's val perplexity, or, for a trial that did not pass, a lower-is-better value no
    passed trial reaches: a violated constraint, not a penalty. Returns the join."""
    trials, _ = experiment.load(directory)
    study = study_of(directory, name)
    frame = study.trials_dataframe()
    # (a trial that a killed driver left running is FAIL; its result, added when it came, is another trial)
    told = frame[frame.state != "FAIL"]
    joined = told.merge(trials, left_on="user_attrs_trial_id", right_on="trial_id", validate="one_to_one")
    assert len(joined) == len(told) == len(trials)
    assert ((joined.state == "PRUNED") == (joined.phase2_stop_reason == "scheduler")).all()
    assert set(joined.state) <= {"COMPLETE", "PRUNED"}
    passed = joined.status == "passed"
    assert joined.value[passed].tolist() == pytest.approx(joined.val_ppl[passed].tolist(), rel=1e-9)
    assert (joined.value < 1e6).all()  # no penalty: a perplexity's scale
    for attr in USER_ATTRS:
        assert joined[f"user_attrs_{attr}"].tolist() == joined[attr].tolist(), attr
    assert (joined.user_attrs_kind == "newllm").all()
    # the constraints as TPE and optuna-dashboard read them, and as the user attributes name them
    recorded = {t.user_attrs["trial_id"]: list(t.system_attrs["constraints"]) for t in study.trials
                if t.state != optuna.trial.TrialState.FAIL}
    assert [recorded[t] for t in joined.trial_id] == [list(c.values()) for c in joined.user_attrs_constraints]
    assert [all(v <= 0 for v in recorded[t]) for t in joined.trial_id] == passed.tolist()
    return joined


@pytest.mark.slow
def test_the_study_says_what_each_trial_was_and_joins_the_trials_table(tiny_search):
    joined = assert_study_matches_table(tiny_search.directory, "tiny")
    study = study_of(tiny_search.directory, "tiny")
    for t in study.trials:
        row = joined[joined.trial_id == t.user_attrs["trial_id"]].iloc[0]
        if row.status == "passed":  # the learning curve: the best val perplexity so far, per Phase 2 epoch
            assert sorted(t.intermediate_values) == list(range(1, row.phase2_epochs_run + 1))
            assert min(t.intermediate_values.values()) == pytest.approx(row.val_ppl, rel=1e-9)
        if t.state == optuna.trial.TrialState.PRUNED:  # Optuna's value of a pruned trial: its last intermediate
            assert t.value == t.intermediate_values[max(t.intermediate_values)]
    complete = joined[(joined.state == "COMPLETE") & (joined.status == "passed")]
    assert study.best_trial.user_attrs["trial_id"] == complete.loc[complete.val_ppl.idxmin(), "trial_id"]


def tiny_study_search(learned_nothing: float) -> tuple:
    """A New-LLM StudySearch on the laptop space (gate at 20% / 8% of C) over an in-memory study."""
    from newllm.search.algorithms import StudySearch, study_sampler
    from newllm.space import load_space

    space = load_space(REPO / "search_spaces" / "laptop.yaml")
    studies = optuna.storages.InMemoryStorage()
    searcher = StudySearch(space=space.params, metric="objective", mode="min", study_name="s", storage=studies,
                           sampler=study_sampler(0), kind="newllm",
                           learned_nothing=learned_nothing, gate_space=space)
    return searcher, studies


def ended(status: str, val_ppl: float | None = None, train_er: float | None = 0.5, **more) -> dict:
    """A one-replicate run summary as the trainable reports it (``replicates_summary``)."""
    return {"family": "newllm", "status": status, "num_params": 1000, "replicates": 1,
            "replicates_passed": int(status == "passed"), "val_ppl_mean": val_ppl,
            "train_effective_rank_fraction": train_er, "val_effective_rank_fraction": train_er,
            "phase2_stop_reason": None, **more}


def epoch_row(epoch: int, best: float, **summary) -> dict:
    """A Phase 2 row as Tune gives it to the searcher: packed by the trainable."""
    return packing.packed({"phase": "phase2", "replicate": 0, "phase2_epoch": epoch, "objective": best, "node_id": "n",
                             "if_stopped": ended("passed", best, phase2_stop_reason="scheduler", **summary)},
                            ["objective"])


def test_the_gate_is_a_constraint_and_a_stopped_trial_is_pruned_with_its_epochs():
    # learned_nothing below the passed trial's perplexity: only the constraint keeps the gate-failed
    # trial from being the best
    searcher, _ = tiny_study_search(learned_nothing=30.0)
    for trial_id in "abcd":
        searcher.suggest(trial_id)
    searcher.on_trial_result("a", {"phase": "phase1", "step": 1, "objective": 1.5e6})  # no step of the curve
    for epoch, best in ((1, 52.0), (2, 48.0)):
        searcher.on_trial_result("a", epoch_row(epoch, best))
    searcher.on_trial_complete("a", {"phase": "final", "node_id": "n", "attempts": 1, "checkpoint_path": "a/c",
                                     **ended("passed", 48.0, phase2_stop_reason="max_epochs")})
    searcher.on_trial_complete("b", {"phase": "final", "node_id": "n", **ended("gate_failed", train_er=0.05)})
    searcher.on_trial_result("c", epoch_row(1, 70.0))
    searcher.on_trial_complete("c", epoch_row(2, 61.0))  # ASHA stopped it here: Tune gives no on_trial_result
    searcher.on_trial_complete("d", {"phase": "final", **ended("diverged", train_er=None)})
    a, b, c, d = searcher._ot_study.trials
    assert (a.state, a.value, a.intermediate_values) == (optuna.trial.TrialState.COMPLETE, 48.0, {1: 52.0, 2: 48.0})
    constraints = a.user_attrs.pop("constraints")
    assert a.user_attrs == {"trial_id": "a", "family": "newllm", "kind": "newllm", "status": "passed", "node_id": "n",
                            "attempts": 1, "checkpoint_path": "a/c", "replicates": 1}
    assert list(constraints) == ["gate_train_er", "gate_val_er", "failed_runs"] and max(constraints.values()) <= 0
    # recorded where TPE's constraints_func records them (and optuna-dashboard reads them)
    assert list(a.system_attrs["constraints"]) == list(constraints.values())
    assert (b.state, b.value, b.user_attrs["status"]) == (optuna.trial.TrialState.COMPLETE, 30.0, "gate_failed")
    assert b.system_attrs["constraints"] == pytest.approx([0.15, 0.03, 1.0])
    assert (c.state, c.value, c.intermediate_values) == (optuna.trial.TrialState.PRUNED, 61.0, {1: 70.0, 2: 61.0})
    # a run that never reached the analysis counts as rank 0
    assert d.value == 30.0 and d.system_attrs["constraints"] == pytest.approx([0.2, 0.08, 1.0])
    assert searcher._ot_study.best_trial.number == a.number


def test_a_resumed_trial_that_was_left_running_is_told_again_with_its_state_and_attributes():
    searcher, studies = tiny_study_search(learned_nothing=300.0)
    searcher.suggest("a")
    searcher.on_trial_result("a", epoch_row(1, 70.0))
    storage.fail_left_running(studies, "s")  # the driver was killed; the resumed one finishes the trial
    searcher.on_trial_result("a", epoch_row(2, 64.0))  # the FAIL trial gets no more
    searcher.on_trial_complete("a", {**epoch_row(3, 61.0), "attempts": 2, "checkpoint_path": "a/c3"})
    failed, again = searcher._ot_study.trials
    assert failed.state == optuna.trial.TrialState.FAIL and failed.intermediate_values == {1: 70.0}
    assert (again.state, again.value, again.params) == (optuna.trial.TrialState.PRUNED, 61.0, failed.params)
    assert again.user_attrs["trial_id"] == "a" and again.user_attrs["attempts"] == 2
    assert again.user_attrs["checkpoint_path"] == "a/c3" and max(again.system_attrs["constraints"]) <= 0
    assert list(again.system_attrs["constraints"]) == list(again.user_attrs["constraints"].values())


def journal_kind_search(journal: str):
    """The search's searcher as a driver makes it: New-LLM's study on the laptop space, in ``journal``."""
    from newllm.search.algorithms import NEWLLM, KindSearch, StudySearch, study_sampler
    from newllm.space import load_space

    space = load_space(REPO / "search_spaces" / "laptop.yaml")
    studies = storage.open_storage(journal)
    study = StudySearch(space=space.params, metric="objective", mode="min", study_name="s", storage=studies,
                        sampler=study_sampler(0), kind=NEWLLM, learned_nothing=300.0, gate_space=space)
    search = KindSearch({NEWLLM: study}, space, 300, "objective", "min")
    search.bind(studies)
    return search


def final_row(n: int) -> dict:
    """A passed trial's last row, its val perplexity 50 + ``n``, as Tune gives it to the searcher."""
    return packing.packed({"phase": "final", "node_id": "n", **ended("passed", 50.0 + n)}, ["objective"])


def test_the_saved_searcher_keeps_its_running_trials_only_and_a_restored_one_goes_on(tmp_path):
    """Tune saves the searcher every few seconds: of a study in a journal, it keeps no study, no
    storage and no finished trial, so its size does not grow with the trials; restored and bound
    to the journal, it tells the study the result of the trial that was running."""
    journal, saved = str(tmp_path / "optuna.journal"), str(tmp_path / "searcher.pkl")
    search, sizes = journal_kind_search(journal), {}
    for n in range(80):
        search.suggest(f"t{n}")
        if n:
            search.on_trial_complete(f"t{n - 1}", final_row(n - 1))  # one trial running at a time
        if n in (19, 79):
            search.save(saved)
            sizes[n] = os.path.getsize(saved)
    # (the trial ids it proposed and those it told stay: a few bytes each)
    assert sizes[79] - sizes[19] < 60 * 60, sizes

    restored = journal_kind_search(journal)
    restored.restore(saved)
    restored.on_trial_complete("t79", final_row(79))
    restored.suggest("t80")
    trials = optuna.load_study(study_name="s", storage=storage.open_storage(journal)).trials
    assert [t.user_attrs["trial_id"] for t in trials] == [f"t{n}" for n in range(81)]
    assert trials[79].value == 129.0 and trials[80].state == optuna.trial.TrialState.RUNNING


def test_a_trial_left_running_by_two_killed_drivers_is_told_once(tmp_path):
    """Driver 1 is killed while trial a runs; driver 2 finishes it (its result added to the study
    as a new trial, the left-running one being FAIL) and is killed before Tune saves its searcher;
    driver 3 restores the searcher driver 1 saved, which still has a running, and is told a's
    result again (the row landed, or a ran again): the study keeps one result of a."""
    journal, saved = str(tmp_path / "optuna.journal"), str(tmp_path / "searcher.pkl")
    first = journal_kind_search(journal)
    first.suggest("a")
    first.save(saved)
    for n in (10, 11):  # drivers 2 and 3 each finish a: val perplexity 60, then 61
        storage.fail_left_running(storage.open_storage(journal), "s")
        resumed = journal_kind_search(journal)
        resumed.restore(saved)
        resumed.on_trial_complete("a", final_row(n))
    trials = optuna.load_study(study_name="s", storage=storage.open_storage(journal)).trials
    assert [(t.user_attrs["trial_id"], t.state, t.value) for t in trials] == [
        ("a", optuna.trial.TrialState.FAIL, None), ("a", optuna.trial.TrialState.COMPLETE, 60.0)]


def test_a_kind_that_searches_nothing_gets_its_fixed_settings_and_a_study_trial():
    # a baselines section with `params: {}` (its learning rate fixed): Ray's OptunaSearch refuses
    # an empty space
    from newllm.search.algorithms import StudySearch, study_sampler

    studies = optuna.storages.InMemoryStorage()
    searcher = StudySearch(space={}, metric="objective", mode="min", study_name="s-lstm", storage=studies,
                           sampler=study_sampler(0), kind="lstm", learned_nothing=500.0)
    assert searcher.suggest("a") == {} and searcher.suggest("a") == {} and searcher.suggest("b") == {}
    searcher.on_trial_complete("a", packing.packed({"phase": "final", **ended("passed", 80.0, family="baseline",
                                                                                 objective=80.0)}, ["objective"]))
    (told, running) = optuna.load_study(study_name="s-lstm", storage=studies).trials
    assert told.user_attrs["trial_id"] == "a" and told.value == 80.0 and told.params == {}
    assert running.user_attrs["trial_id"] == "b" and running.state == optuna.trial.TrialState.RUNNING


def test_the_journal_lists_a_studys_trials_as_optunas_own_journal_does(tmp_path):
    """``ListedJournalStorage`` keeps each study's list of trials and renews its unfinished ones
    only: its lists are those of Optuna's journal read afresh, whatever the states asked for, with
    trials queued, started and finished by another writer of the same journal, in two studies,
    and after being pickled (as Tune saves a searcher)."""
    import pickle
    import random

    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    journal = str(tmp_path / "optuna.journal")
    ours = storage.open_storage(journal)
    assert isinstance(ours, storage.ListedJournalStorage)
    other = optuna.storages.JournalStorage(JournalFileBackend(journal))  # another driver on the journal
    studies = [optuna.create_study(study_name=name, storage=ours) for name in "ab"]
    theirs = [optuna.load_study(study_name=name, storage=other) for name in "ab"]
    asked = {"all": None, "waiting": (TrialState.WAITING,), "running": [TrialState.RUNNING],
             "unfinished": (TrialState.WAITING, TrialState.RUNNING), "complete": (TrialState.COMPLETE,),
             "read by TPE": (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING), "failed": {TrialState.FAIL}}

    def listed(s: optuna.storages.BaseStorage, study_id: int, states) -> list[tuple]:
        return [(t.number, t.state, t.values, t.params, t.user_attrs, t.intermediate_values)
                for t in s.get_all_trials(study_id, deepcopy=False, states=states)]

    rng, running, seen = random.Random(0), [], set()
    for step in range(300):
        k = rng.randrange(2)
        study = rng.choice((studies[k], theirs[k]))
        roll = rng.random()
        if roll < 0.1:
            theirs[k].enqueue_trial({"x": rng.random()})
        elif roll < 0.4:
            trial = study.ask()
            trial.suggest_float("x", 0.0, 1.0)
            running.append((study, trial))
        elif running:
            study, trial = running.pop(rng.randrange(len(running)))
            trial.set_user_attr("step", step)
            if roll < 0.7:
                trial.report(rng.random(), 1)
                study.tell(trial, rng.random())
            else:
                study.tell(trial, state=rng.choice((TrialState.PRUNED, TrialState.FAIL)))
        if step % 7 == 0:
            fresh = optuna.storages.JournalStorage(JournalFileBackend(journal))
            for s in studies:
                for states in asked.values():
                    assert listed(ours, s._study_id, states) == listed(fresh, s._study_id, states), (step, states)
                seen |= {t.state for t in s.trials}
    assert seen == set(TrialState), seen  # (every state was listed)
    revived = pickle.loads(pickle.dumps(ours))
    assert not {"_listed", "_unfinished", "_listed_from"} & set(vars(revived))
    assert listed(revived, studies[1]._study_id, None) == listed(ours, studies[1]._study_id, None)
    with pytest.raises(KeyError):
        ours.get_all_trials(99)


def test_the_studies_tpe_reads_the_best_and_the_latest_trials_and_splits_them_as_plain_tpe_does():
    """The windowed sampler's good group is plain TPE's, whatever mix of completed, pruned,
    infeasible, running and failed trials the study has, as the window moves on; it reads at most
    TPE_WINDOW + TPE_BEST finished trials."""
    import random

    from optuna.samplers._tpe.sampler import _split_trials
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    from newllm.search.algorithms import TPE_BEST, TPE_WINDOW, study_sampler

    x = optuna.distributions.FloatDistribution(0.0, 1.0)
    study, rng = optuna.create_study(sampler=study_sampler(0)), random.Random(0)
    running: list[optuna.trial.Trial] = []
    for chunk in range(8):
        for _ in range(120):
            kind = rng.random()
            if kind < 0.04:
                running.append(study.ask({"x": x}))  # left running across chunks, some among the best later
                continue
            violation = rng.uniform(0.01, 1.0) if kind < 0.3 else -1.0
            if kind < 0.5:
                steps = {s: rng.uniform(1.0, 9.0) for s in range(1, rng.randint(1, 4))}
                trial = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"x": rng.random()},
                                                  distributions={"x": x}, intermediate_values=steps,
                                                  system_attrs={_CONSTRAINTS_KEY: [violation]})
            else:
                trial = optuna.trial.create_trial(value=rng.uniform(1.0, 9.0), params={"x": rng.random()},
                                                  distributions={"x": x}, system_attrs={_CONSTRAINTS_KEY: [violation]})
            study.add_trial(trial)
        for t in running[:2]:  # old running trials end: one of the best, one failed
            study._storage.set_trial_system_attr(t._trial_id, _CONSTRAINTS_KEY, [-1.0])
            study.tell(t, 0.5 + chunk * 0.01) if chunk % 2 else study.tell(t, state=optuna.trial.TrialState.FAIL)
        running = running[2:]
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
        every = study._get_trials(deepcopy=False, use_cache=False)  # (as the sampler reads them: failed ones too)
        trials = [t for t in every if t.state in states]
        read = study.sampler.window(every, study, states)
        fresh = study_sampler(0).window(every, study, states)  # one that ranks every older trial now
        assert [t.number for t in read] == [t.number for t in fresh]
        assert {t.state for t in read} <= set(states)
        finished = [t for t in trials if t.state != optuna.trial.TrialState.RUNNING]
        assert {t.number for t in finished[-TPE_WINDOW:]} | {t.number for t in running} <= {t.number for t in read}
        assert sum(t.state != optuna.trial.TrialState.RUNNING for t in read) <= TPE_WINDOW + TPE_BEST
        below, _ = _split_trials(study, trials, TPE_BEST)
        read_below, _ = _split_trials(study, read, TPE_BEST)
        assert [t.number for t in read_below] == [t.number for t in below]
    assert len(finished) > 3 * TPE_WINDOW
    study.ask({"x": x})  # the sampler's own path reads the window (test_private_api pins how)


def test_a_studies_sampler_without_a_window_is_plain_tpe_and_one_with_a_small_window_reads_it_only():
    """``study_sampler(seed, None)`` proposes what Optuna's TPE with the same settings proposes
    (``benchmarks/tpe_window.py`` compares window sizes against it); a smaller ``window_size`` is
    the one read."""
    from newllm.search.algorithms import TPE_BEST, recorded_constraints, study_sampler

    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0), "n": optuna.distributions.IntDistribution(1, 4)}

    def proposals(sampler, read: list | None = None) -> list[dict]:
        study, made = optuna.create_study(sampler=sampler), []
        running = [study.ask(space)]
        for i in range(60):
            running.append(study.ask(space))  # two at once: the constant liar counts the running one
            trial = running.pop(0)
            trial.set_user_attr("constraints", {"gate": 1.0 if i % 7 == 0 else -1.0})
            study.tell(trial, (trial.params["x"] - 0.3) ** 2 + trial.params["n"])
            made.append(trial.params)
        if read is not None:
            read.extend(sampler.window(study._get_trials(deepcopy=False, use_cache=False), study))
        return made

    with warnings.catch_warnings():  # (constraints_func: study_sampler says why it keeps it)
        warnings.simplefilter("ignore", FutureWarning)
        plain = optuna.samplers.TPESampler(seed=3, multivariate=True, constant_liar=True,
                                           constraints_func=recorded_constraints)
    plain_made = proposals(plain)  # (once: a sampler's random state moves on)
    assert proposals(study_sampler(3, None)) == plain_made
    read: list = []
    assert proposals(study_sampler(3, 20), read) != plain_made
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in read) <= 20 + TPE_BEST < 60


def test_the_heap_is_frozen_while_tune_runs_and_thawed_after_even_on_an_error():
    # a full collection while Tune ran walked every object the imports made: a pause per trial
    import gc

    from newllm.search.algorithms import frozen_heap

    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() > 0  # what the search makes and drops is still collected
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyError), frozen_heap():
        raise KeyError("a failed fit")
    assert gc.get_freeze_count() == 0
