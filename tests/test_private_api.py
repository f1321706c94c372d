"""The private attributes of Ray Tune and Optuna that newllm relies on, pinned: no public API
gives them (``newllm.search.algorithms``, ``newllm.search.storage``), so this fails on the
version that renames one, before a resumed or relocated search would break in a user's hands."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from newllm.search.algorithms import StudySearch


def test_optuna_search_keeps_its_study_trials_and_storage_where_study_search_reads_them(tmp_path):
    storage, sampler = optuna.storages.InMemoryStorage(), optuna.samplers.TPESampler(seed=0)
    searcher = StudySearch(space={"x": FloatDistribution(0.0, 1.0)}, metric="objective", mode="min",
                           sampler=sampler, study_name="pinned", storage=storage, kind="newllm", learned_nothing=1.0)
    assert isinstance(searcher, OptunaSearch)
    searcher.suggest("t1")
    ot_trial = searcher._ot_trials["t1"]
    assert isinstance(ot_trial, optuna.trial.Trial) and isinstance(ot_trial._trial_id, int)
    assert isinstance(searcher._ot_study, optuna.Study) and searcher._ot_study._storage is storage
    assert (searcher._study_name, searcher._storage, searcher._sampler) == ("pinned", storage, sampler)
    assert searcher._completed_trials == set()
    searcher.on_trial_complete("t1", {"objective": 1.0})
    assert searcher._completed_trials == {"t1"}
    assert storage.get_trial(ot_trial._trial_id).state == optuna.trial.TrialState.COMPLETE


def test_a_tuner_keeps_its_run_and_tune_configs_where_run_search_replaces_them(tmp_path):
    callbacks = [tune.Callback()]
    tuner = tune.Tuner(lambda config: None, tune_config=tune.TuneConfig(num_samples=1),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=callbacks))
    assert tuner._local_tuner._run_config.callbacks == callbacks
    assert tuner._local_tuner._tune_config.num_samples == 1 and hasattr(tuner._local_tuner._tune_config, "search_alg")


def test_tpe_records_a_constraints_func_where_study_search_adds_a_trials_constraints():
    # StudySearch adds a resumed trial whole (no sampler sees it) with its constraints under this key
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    from newllm.search.algorithms import study_sampler

    study = optuna.create_study(sampler=study_sampler(0))
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    trial.set_user_attr("constraints", {"gate_train_er": 0.1, "failed_runs": 1.0})
    study.tell(trial, 1.0)
    assert _CONSTRAINTS_KEY == "constraints"
    assert list(study.trials[0].system_attrs[_CONSTRAINTS_KEY]) == [0.1, 1.0]


def test_a_trial_keeps_its_metric_windows_and_checkpoints_where_lean_state_replaces_them():
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.tune.experiment import Trial

    from newllm.search.algorithms import LatestCheckpoint, lean_state

    trial = Trial("run_trial", stub=True, experiment_tag="7_x=1", evaluated_params={"x": 1})
    assert trial.run_metadata._n_steps == (5, 10)
    assert trial.custom_dirname is None and trial._generate_dirname().startswith("run_trial_")
    assert "7_x=1" in trial._generate_dirname()  # Tune's name: the tag, with the configuration
    manager = trial.run_metadata.checkpoint_manager
    assert isinstance(manager, _CheckpointManager) and manager.checkpoint_config == tune.CheckpointConfig()
    assert manager._latest_checkpoint_result is None and manager._checkpoint_results == []
    lean_state(trial)
    assert isinstance(trial.run_metadata.checkpoint_manager, LatestCheckpoint)
    assert trial._generate_dirname() == f"run_trial_{trial.trial_id}" and trial.experiment_tag == "7"
    assert trial.evaluated_params == {}
    trial.update_last_result({"objective": 1.0, "training_iteration": 1})
    assert set(trial.metric_analysis["objective"]) == {"max", "min", "avg", "last"}  # no last-5 and last-10 means


def test_a_scheduler_may_ask_tunes_controller_for_its_live_trials():
    # KindScheduler.choose_trial_to_run looks for the next trial among them (not every trial made)
    import inspect

    from ray.tune.execution.tune_controller import TuneController

    assert '"get_live_trials"' in inspect.getsource(TuneController._wrapped)  # allowed to schedulers
    assert "Set of non-terminated trials" in inspect.getsource(TuneController.__init__)


def test_tpe_reads_its_trials_with_get_trials_in_sample_relative_and_sample_independent_only():
    # WindowedTPESampler hands those two a study whose _get_trials gives the window: on a version
    # where TPE reads its trials otherwise, the window would be ignored. Nothing else in an ask
    # filters the study's every trial by state: the window is read from the unfiltered cache
    from newllm.search.algorithms import TPE_BEST, TPE_WINDOW, WindowedTPESampler, study_sampler

    study, x = optuna.create_study(sampler=study_sampler(0)), FloatDistribution(0.0, 1.0)
    study.add_trials([optuna.trial.create_trial(value=float(i), params={"x": i / 1000}, distributions={"x": x})
                      for i in range(TPE_WINDOW + TPE_BEST + 10)])
    read, calls = [], []
    window, get_trials = WindowedTPESampler.window, study._get_trials
    study.sampler.window = lambda trials, s, states: read.append(window(study.sampler, trials, s, states)) or read[-1]
    study._get_trials = lambda **kwargs: calls.append(kwargs) or get_trials(**kwargs)
    study.ask({"x": x})
    assert read and all(sum(t.state != optuna.trial.TrialState.RUNNING for t in r) == TPE_WINDOW + TPE_BEST
                        for r in read)
    assert calls and all(c.get("states") is None and c["use_cache"] for c in calls)
    assert get_trials(deepcopy=False, use_cache=True) is get_trials(deepcopy=False, use_cache=True)  # not copied


def test_a_study_renews_its_cache_of_trials_at_every_ask():
    # the windowed TPE reads the trials from the study's cache (``StudyWindow._get_trials``): on a
    # version that kept the cache across asks, it would miss the trials told and started since
    study = optuna.create_study()
    first = study.ask()
    assert [t.number for t in study._get_trials(deepcopy=False, use_cache=True)] == [0]
    study.tell(first, 1.0)
    study.ask()
    cached = study._get_trials(deepcopy=False, use_cache=True)
    assert [(t.number, t.state) for t in cached] == [(0, optuna.trial.TrialState.COMPLETE),
                                                      (1, optuna.trial.TrialState.RUNNING)]


def test_the_journal_keeps_its_trials_where_listed_journal_storage_reads_them_and_never_updates_a_finished_one(tmp_path):
    # ListedJournalStorage.get_all_trials reads the journal's replay as Optuna's own does, and
    # renews only unfinished trials: on a version where a finished trial could change, its lists
    # would keep the old one
    import threading

    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from newllm.search.storage import ListedJournalStorage

    assert issubclass(ListedJournalStorage, JournalStorage)
    journal = ListedJournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(storage=journal)
    trial = study.ask()
    replay = journal._replay_result
    assert isinstance(journal._thread_lock, type(threading.Lock()))
    assert study._study_id in replay._studies and replay._study_id_to_trial_ids[study._study_id] == [trial._trial_id]
    assert replay._trials[trial._trial_id].number == 0
    before = replay._trials[trial._trial_id]  # lists hand out this object, deep-copied outside the lock
    journal.set_trial_user_attr(trial._trial_id, "seen", 1)
    assert replay._trials[trial._trial_id] is not before and "seen" not in before.user_attrs
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        journal.set_trial_user_attr(trial._trial_id, "late", 1)
    assert "_replay_result" not in JournalStorage.__getstate__(journal)  # (remade when unpickled)
