"""The search's algorithms in Tune's and Optuna's terms: one Optuna study per kind of proposed
trial (New-LLM, each baseline architecture) behind ``KindSearch``, which also makes the ablation
siblings of each New-LLM trial (no study: measurements, not proposals), Tune's trial generator that keeps
new trials where the experiment is now (``ExperimentSearch``), one ASHA per kind
(``KindScheduler``), and ``run_search``, which wires them into a Tuner with the trainable and
the callbacks.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import gc
import heapq
import io
import logging
import operator
import os
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import optuna.distributions as od
import pyarrow.fs
import ray
from optuna.samplers._tpe.sampler import _get_infeasible_trial_score, _get_pruned_trial_score
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from ray import tune
from ray.train._internal.checkpoint_manager import _CheckpointManager
from ray.train._internal.session import _TrainingResult
from ray.tune.experiment import Trial
from ray.tune.result import TIME_TOTAL_S, TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from newllm.config import BASELINE_ARCHITECTURES, NEWLLM
from newllm.data import TokenData
from newllm.experiment import ITERATIONS_FILE, PartsTable, experiment_dir, filesystem, trials_table
from newllm.search.callbacks import (ParquetResults, Progress, StagingFolders, TrialRow, attempts_on_disk, outcome,
                                     versions)
from newllm.search.storage import fail_left_running, open_storage, prune_checkpoints
from newllm.search.packing import reported_row
from newllm.search.trainable import run_trial
from newllm.space import ABLATION, MATCHED, OBJECTIVES, SearchSpace

# ASHA's rungs, in Phase 2 epochs: the first after 1 epoch, then every ASHA_REDUCTION times more;
# at each rung a trial continues only if its best val perplexity is in the best 1/ASHA_REDUCTION
# of the trials that reached it
ASHA_GRACE_EPOCHS = 1
ASHA_REDUCTION = 3


# the constraints a study records for each trial (> 0: violated): the gate's two margins (New-LLM
# only) and the fraction of the trial's runs that failed (the gate, or diverged)
GATE_CONSTRAINTS = ("gate_train_er", "gate_val_er")
FAILED_RUNS = "failed_runs"


def study_value(summary: dict, learned_nothing: float) -> float:
    """The val perplexity a study is told for a trial that ended with ``summary``
    (``newllm.run.replicates_summary``): the mean over its replicates of each passed run's val
    perplexity and ``learned_nothing`` for each run that failed the gate or diverged. With one
    replicate: its val perplexity, or ``learned_nothing``. Unlike the trials table's
    ``objective``, it is a perplexity whatever happened, so every Optuna plot keeps its scale."""
    runs, passed = summary["replicates"], summary["replicates_passed"]
    return ((summary["val_ppl_mean"] or 0.0) * passed + learned_nothing * (runs - passed)) / runs


def study_constraints(summary: dict, gate: tuple[float, float] | None) -> dict[str, float]:
    """The constraints a study records for a trial that ended with ``summary`` (> 0: violated):
    with a ``gate`` (the New-LLM trial's train and val thresholds) each threshold minus the
    effective-rank fraction it measures (replicate 0's; contexts that never reached the analysis
    count as rank 0), and for every trial the fraction of its runs that did not pass."""
    constraints = {}
    if gate is not None:
        for name, threshold, measured in zip(GATE_CONSTRAINTS, gate, (summary["train_effective_rank_fraction"],
                                                                     summary["val_effective_rank_fraction"])):
            constraints[name] = threshold - (measured or 0.0)
    constraints[FAILED_RUNS] = 1.0 - summary["replicates_passed"] / summary["replicates"]
    return constraints


def recorded_constraints(trial: optuna.trial.FrozenTrial) -> tuple[float, ...]:
    """The ``constraints_func`` of the studies' TPE samplers: the constraints that ``StudySearch``
    recorded in the trial's user attribute ``constraints`` (none for a trial it did not tell)."""
    return tuple(trial.user_attrs.get("constraints", {}).values())


# TPE's below group (the trials its good density is made of) is at most TPE_BEST trials (its
# default gamma: a tenth of the trials, at most 25); the above group is every other trial, older
# ones weighted down linearly. A study's sampler reads its best trials and its latest TPE_WINDOW
# only, so that a suggestion costs the same at trial 10,000 as at trial 1,000 (each trial read is
# Python work: plain TPE takes about 0.1 s a suggestion at 10,000 trials).
TPE_BEST = 25
TPE_WINDOW = 300
TPE_READS = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # the finished trials TPE reads


def tpe_order(trial: optuna.trial.FrozenTrial, study: optuna.Study) -> tuple:
    """Where TPE ranks a finished trial, with TPE's own scores: feasible completed trials by
    value, then feasible pruned ones by their last step (later first) and its value, then
    infeasible ones by how much they violate their constraints."""
    if (violation := _get_infeasible_trial_score(trial)) > 0:
        return 2, violation
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return 0, trial.value if study.direction == optuna.study.StudyDirection.MINIMIZE else -trial.value
    return 1, *_get_pruned_trial_score(trial, study)


class WindowedTPESampler(optuna.samplers.TPESampler):
    """TPE that reads, of a single-objective study, its running trials, its latest ``window_size``
    (``TPE_WINDOW``) finished ones and the ``TPE_BEST`` best of the others (``tpe_order``). Its
    good density is plain TPE's: made of the best ``TPE_BEST`` trials at most, which are all read.
    Its bad density is made of the latest trials instead of all, as plain TPE's weighs them most.
    Each older trial is ranked once, when it leaves the window. In a multi-objective study, whose
    good density grows with the trials, or with ``window_size=None``, it is plain TPE."""

    window_size: int | None = TPE_WINDOW  # (the class's too: a sampler saved before it existed reads it)

    def __init__(self, window_size: int | None = TPE_WINDOW, **tpe):
        super().__init__(**tpe)
        self.window_size = window_size
        self._ranked_below = 0                        # the trial numbers already ranked are below this
        self._best_old: list[tuple[tuple, int]] = []  # (tpe_order, number) of the best ranked ones
        self._running_old: set[int] = set()           # ranked ones not finished yet: again next time

    # TPE reads a study's trials in these two (through ``Study._get_trials``, which ``StudyWindow``
    # answers); the rest of the sampler sees the study itself

    def sample_relative(self, study: optuna.Study, trial, search_space: dict) -> dict:
        return super().sample_relative(self._windowed(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial, param_name: str, param_distribution):
        return super().sample_independent(self._windowed(study), trial, param_name, param_distribution)

    def _windowed(self, study: optuna.Study) -> optuna.Study:
        if len(study.directions) == 1 and self.window_size is not None:
            return StudyWindow(study, self)
        return study

    def window(self, trials: list[optuna.trial.FrozenTrial], study: optuna.Study,
               states=None) -> list[optuna.trial.FrozenTrial]:
        """Of a study's ``trials`` (by number; of any states), those of ``states`` (None: all)
        this sampler reads. It looks at the latest trials, and at older ones it kept, only: the
        older ones are found by bisection, not by a pass over them all, so a suggestion at trial
        10,000 reads what one at trial 1,000 does."""
        read = self._read(trials, study)
        return read if states is None else [t for t in read if t.state in states]

    def _read(self, trials: list[optuna.trial.FrozenTrial], study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        finished, start = 0, len(trials)
        while start > 0 and finished < self.window_size:
            start -= 1
            finished += trials[start].state in TPE_READS
        if start == 0:
            return trials
        by_number = operator.attrgetter("number")

        def old(number: int) -> optuna.trial.FrozenTrial | None:
            i = bisect.bisect_left(trials, number, hi=start, key=by_number)
            return trials[i] if i < start and trials[i].number == number else None

        first_new = bisect.bisect_left(trials, self._ranked_below, hi=start, key=by_number)
        candidates = [*map(old, self._running_old), *trials[first_new:start]]
        self._running_old = set()
        for t in filter(None, candidates):
            if not t.state.is_finished():
                self._running_old.add(t.number)
            elif t.state in TPE_READS:  # (a failed trial TPE never reads)
                self._best_old.append((tpe_order(t, study), t.number))
        self._best_old = heapq.nsmallest(TPE_BEST, self._best_old)
        self._ranked_below = max(self._ranked_below, trials[start - 1].number + 1)
        kept = filter(None, map(old, [*(n for _, n in self._best_old), *self._running_old]))
        return sorted(kept, key=by_number) + trials[start:]


class StudyWindow:
    """A single-objective study as ``WindowedTPESampler`` reads it: ``_get_trials`` gives the
    trials of its window; all else is the study's."""

    def __init__(self, study: optuna.Study, sampler: WindowedTPESampler):
        self._study, self._sampler = study, sampler

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[optuna.trial.FrozenTrial]:
        # the trials as the study's ask read them when it made this trial (its cache of every
        # trial, renewed at every ask; TPE's constant liar rereads the storage for trials started
        # since, but in one driver none are), unfiltered: a pass over every trial to filter them
        # by state costs as much as TPE's whole work on its window at 10,000 trials
        trials = self._sampler.window(self._study._get_trials(deepcopy=False, use_cache=True), self._study, states)
        return copy.deepcopy(trials) if deepcopy else trials


def study_sampler(seed: int, window_size: int | None = TPE_WINDOW) -> optuna.samplers.TPESampler:
    """A study's sampler: seeded multivariate TPE on its best and latest ``window_size`` trials
    (``WindowedTPESampler``; None: on all), with the constraints each trial records. Optuna
    5.0 deprecates ``constraints_func`` for ``Trial.set_constraint``, whose records optuna-dashboard
    (0.21) does not read yet: the constraints_func's records it shows as infeasible trials."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
        return WindowedTPESampler(window_size, seed=seed, multivariate=True, constant_liar=True,
                                  constraints_func=recorded_constraints)


# the user attributes a study's trial gets when it is asked (the rest when it is told)
ASKED_ATTRS = ("trial_id", "kind")


class StudySearch(OptunaSearch):
    """OptunaSearch for one kind of trial (New-LLM, or one baseline architecture), which tells its
    study what Optuna's tools understand without knowing newllm:

    - the value is a val perplexity (``study_value``): a run that failed the gate or diverged
      counts as one that ``learned_nothing`` (the uniform prediction's perplexity, the vocabulary
      size), and the trial is infeasible: its constraints (``study_constraints``, in the user
      attribute ``constraints``, which ``study_sampler``'s TPE reads) are violated. Constrained
      TPE ranks it below every feasible trial; ``study.best_trial`` is never one;
    - the intermediate values are the Phase 2 epochs, at step ``phase2_epoch`` the value the
      trial would be told if stopped there (Phase 1 passes and the analysis are no step);
    - a trial whose Phase 2 the scheduler stopped is PRUNED (its value: its best epoch's, the last
      intermediate value), except in a multi-objective study, where Optuna keeps no values for a
      pruned trial: there it is COMPLETE;
    - user attributes say what the trial was: the Tune ``trial_id`` (set when it is asked, so the
      study joins the trials table), ``family``, ``kind``, ``status``, ``node_id``, ``attempts``,
      ``checkpoint_path`` (relative to the experiment), ``replicates`` and ``constraints``.

    The study lives in a storage that outlives the driver. At a resume the study may be ahead of
    the searcher's saved state: a trial that ``fail_left_running`` marked FAIL gets no more
    intermediate values, and its result, when it finishes, is added as a new finished trial with
    the same parameters and what it would have been told, once (a driver killed after adding it
    leaves it running in the searcher Tune saved); one that Optuna already has finished is not
    told twice."""

    def __init__(self, *, kind: str, learned_nothing: float, gate_space: SearchSpace | None = None, **optuna_search):
        super().__init__(**optuna_search)
        self.kind, self.learned_nothing, self.gate_space = kind, learned_nothing, gate_space
        if self._ot_study is None:  # OptunaSearch makes the study of a non-empty space only
            self._setup_study(self._mode)

    def _finished_in_study(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return False
        try:
            return self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()
        except KeyError:  # lost with a cut journal's last record: nothing to tell it
            return True

    def suggest(self, trial_id: str):
        asked = trial_id in self._ot_trials
        if self._space:
            config = super().suggest(trial_id)
        else:  # a kind that searches nothing (a baselines section with no params): its study records it
            if not asked:
                self._ot_trials[trial_id] = self._ot_study.ask()
            config = {}
        if not asked:
            for key, value in zip(ASKED_ATTRS, (trial_id, self.kind)):
                self._ot_trials[trial_id].set_user_attr(key, value)
        return config

    # both hooks read the row a result packs (``packing.reported_row``), nested as the trainable
    # reported it (a Phase 2 row's summary under ``if_stopped``)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._finished_in_study(trial_id):
            self._report_epoch(trial_id, reported_row(result))

    def _report_epoch(self, trial_id: str, result: dict) -> None:
        """Report a Phase 2 row of replicate 0 as the intermediate value at its epoch, unless that
        epoch has one (a retried trial runs epochs again after its checkpoint)."""
        if (result.get("phase") != "phase2" or result.get("replicate") or isinstance(self.metric, list)
                or trial_id in self._completed_trials):
            return  # (Optuna takes no intermediate values in a multi-objective study)
        ot_trial, step = self._ot_trials[trial_id], result["phase2_epoch"]
        if step not in self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(study_value(result["if_stopped"], self.learned_nothing), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        result = result and reported_row(result)
        ended = None if error or not result else outcome(result)
        if not self._finished_in_study(trial_id):
            if ended is None:  # an error, or a trial Tune removed before it reported: Ray's own telling
                super().on_trial_complete(trial_id, result, error)
            else:
                self._tell(trial_id, result, ended)
        elif (ended is not None and self._state(trial_id) == optuna.trial.TrialState.FAIL
              and not self._added(trial_id)):
            ot_trial = self._ot_trials[trial_id]
            state, values, attrs = self._told(trial_id, result, ended)
            earlier = self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values
            # (a trial added whole is no sampler's to see: its constraints go where constraints_func's go)
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=state, values=values, params=ot_trial.params, distributions=ot_trial.distributions,
                intermediate_values=earlier, user_attrs=attrs,
                system_attrs={_CONSTRAINTS_KEY: list(attrs["constraints"].values())}))
        self._completed_trials.add(trial_id)
        # its Optuna trial is the study's now: the searcher, which Tune saves every few seconds,
        # keeps only the running ones
        self._ot_trials.pop(trial_id, None)

    def _state(self, trial_id: str) -> optuna.trial.TrialState | None:
        try:
            return self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id).state
        except KeyError:
            return None

    def _added(self, trial_id: str) -> bool:
        """Whether the study has a finished trial for ``trial_id`` already: one that a resumed
        driver added, then was killed before Tune saved its searcher (which so still has the
        trial running). A scan of the study, made only for trials a killed driver left running."""
        told = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return any(t.user_attrs.get("trial_id") == trial_id
                   for t in self._ot_study.get_trials(deepcopy=False, states=told))

    def _tell(self, trial_id: str, result: dict, ended: dict) -> None:
        ot_trial = self._ot_trials[trial_id]
        state, values, attrs = self._told(trial_id, result, ended)
        for key, value in attrs.items():  # before the tell, when the sampler reads the constraints
            if key not in ASKED_ATTRS:  # (a record each in the journal)
                ot_trial.set_user_attr(key, value)
        if state == optuna.trial.TrialState.PRUNED:
            # Tune gives a searcher no result its scheduler stopped a trial on: that epoch is reported
            # here, and the pruned trial's value is this last intermediate value (Optuna's rule)
            self._report_epoch(trial_id, result)
            self._ot_study.tell(ot_trial, state=state)
        else:
            self._ot_study.tell(ot_trial, values)

    def _told(self, trial_id: str, result: dict, ended: dict) -> tuple[optuna.trial.TrialState, list[float], dict]:
        """What the study is told of a trial that ended with ``ended`` (``callbacks.outcome`` of its
        last ``result``): its state, values and user attributes (its constraints among them)."""
        value = study_value(ended, self.learned_nothing)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [value if m == OBJECTIVES["val_ppl"] else ended[m] for m in metrics]
        stopped = ended.get("phase2_stop_reason") == "scheduler" and len(metrics) == 1
        state = optuna.trial.TrialState.PRUNED if stopped else optuna.trial.TrialState.COMPLETE
        gate = None
        if self.gate_space is not None:
            cfg = self.gate_space.trial_config(self._ot_trials[trial_id].params)
            gate = (cfg.gate_train_er, cfg.gate_val_er)
        attrs = {"trial_id": trial_id, "family": ended["family"], "kind": self.kind, "status": ended["status"],
                 "node_id": result.get("node_id"), "attempts": result.get("attempts"),
                 "checkpoint_path": result.get("checkpoint_path"), "replicates": ended["replicates"],
                 "constraints": study_constraints(ended, gate)}
        return state, values, attrs

    def bind(self, storage) -> None:
        """Use ``storage``, the study's storage where the experiment is now, for the study and
        for the Optuna trials of the running Tune trials (a restored searcher of a stored study
        has neither: ``__getstate__``)."""
        self._storage = storage
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=storage, sampler=self._sampler)
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, t if isinstance(t, int) else t._trial_id)
                           for tid, t in self._ot_trials.items()}

    def __getstate__(self) -> dict:
        """What Tune saves of this searcher every few seconds. Of a study in a storage (a journal,
        an RDB), which ``bind`` opens again at a resume: not the study and its storage (Optuna's
        journal pickles an offset per record it has read), and of each running trial only its
        Optuna trial's id, so that the state stays the same size as trials finish. An in-memory
        study is kept whole: nothing else holds it."""
        state = self.__dict__.copy()
        if self._storage is not None and not isinstance(self._storage, optuna.storages.InMemoryStorage):
            state.update(_storage=None, _ot_study=None,
                         _ot_trials={tid: t._trial_id for tid, t in self._ot_trials.items()})
        return state


def sibling_kind(ablation: str) -> str:
    """The kind of the ``ablation`` siblings of New-LLM trials (``newllm-no_phase1``, ...)."""
    return f"{NEWLLM}-{ablation}"


def kind(config: dict) -> str:
    """``newllm``, a sibling's ``sibling_kind``, or a baseline trial's architecture: the study
    that proposes a trial (none for a sibling) and the ASHA that compares it."""
    if config.get(ABLATION) is not None:
        return sibling_kind(config[ABLATION])
    architecture = config.get("architecture")
    return architecture if architecture in BASELINE_ARCHITECTURES else NEWLLM


def kinds(space: SearchSpace) -> list[str]:
    """The kinds of trial a search of ``space`` runs, in the order of their turns: New-LLM, each
    ablation's siblings, then each baseline architecture."""
    return [NEWLLM, *map(sibling_kind, space.ablations), *(space.baselines.architectures if space.baselines else ())]


def study_names(name: str, space: SearchSpace) -> dict[str, str]:
    """Each proposed kind's Optuna study: the experiment's name for New-LLM, ``<name>-<architecture>``
    for a baseline (siblings have none)."""
    return {NEWLLM: name, **{k: f"{name}-{k}" for k in (space.baselines.architectures if space.baselines else ())}}


# What a restored search needs of the objects Tune saved for it (KindSearch, the StudySearch of
# each kind, their samplers): one more whenever that changes. 2: the studies' values are
# perplexities with the gate as a constraint, and stopped trials are pruned.
STATE_FORMAT = 2


class KindSearch(Searcher):
    """The search's trials in turns (``kinds``): a New-LLM trial from the New-LLM study, then, with
    ablations, its sibling per ablation (``space.sibling_trial``: the same configuration and seed
    with one part removed, from no study, and told to none), then, with baselines, one trial of
    each baseline architecture, sized to that New-LLM trial (``space.baseline_trial``) with what
    its own study proposes (its learning rate). Every kind gets the same number of trials, and
    each study learns from its own trials only."""

    def __init__(self, searchers: dict[str, Searcher], space: SearchSpace, vocab_size: int, metric, mode):
        super().__init__(metric=metric, mode=mode)
        self.searchers, self.space, self.vocab_size = searchers, space, vocab_size
        self.turn = 0                              # trials proposed so far
        self.owner: dict[str, str] = {}            # trial id -> kind
        self.matched: tuple[str, dict] | None = None  # the latest New-LLM trial: id, sampled values
        self.storage = None  # the studies' Optuna storage (None: in memory)
        self.landed: dict[str, dict] = {}  # at a resume: the results of the trials whose rows landed
        self.where: dict[str, dict] = {}  # trial id -> its attempts and checkpoint path (``TrialPlaces``)
        self.state_format = STATE_FORMAT  # missing_code refuses to resume another

    def suggest(self, trial_id: str):
        turns = kinds(self.space)
        kind_ = turns[self.turn % len(turns)]
        searcher = self.searchers.get(kind_)  # None: a sibling, which no study proposes
        config = searcher.suggest(trial_id) if searcher is not None else {}
        if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
            return config
        self.turn += 1
        self.owner[trial_id] = kind_
        if kind_ == NEWLLM:
            self.matched = (trial_id, config)
            return config
        matched_id, matched = self.matched
        if searcher is None:
            return self.space.sibling_trial(kind_.removeprefix(f"{NEWLLM}-"), matched_id, matched)
        return {**self.space.baseline_trial(kind_, matched, config, self.vocab_size), MATCHED: matched_id}

    def study_of(self, trial_id: str) -> Searcher | None:
        """The study's searcher that proposed ``trial_id`` (None for a sibling: nothing to tell)."""
        return self.searchers.get(self.owner.get(trial_id))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if (searcher := self.study_of(trial_id)) is not None:
            searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        where = self.where.pop(trial_id, {})
        if (searcher := self.study_of(trial_id)) is not None:
            searcher.on_trial_complete(trial_id, result and {**result, **where}, error)

    def note(self, trial_id: str, **where) -> None:
        """Keep what only Tune's trial and the disk know of a running trial (``attempts``,
        ``checkpoint_path``), for its study's user attributes when it completes."""
        self.where.setdefault(trial_id, {}).update(where)

    def bind(self, storage) -> None:
        """Use ``storage`` for every study, now and after ``restore``."""
        self.storage = storage
        for searcher in self.searchers.values():
            searcher.bind(storage)

    def save(self, checkpoint_path: str) -> None:
        # (not the storage: ``restore`` keeps the one this searcher is bound to)
        with open(checkpoint_path, "wb") as f:
            pickle.dump({**self.__dict__, "storage": None}, f)

    def restore(self, checkpoint_path: str) -> None:
        """The state saved by ``save``, with the storage this searcher was bound to kept."""
        storage, landed = self.storage, self.landed
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        if storage is not None:
            self.bind(storage)
        self.tell_landed(landed)

    def tell_landed(self, landed: dict[str, dict]) -> None:
        """Tell each study the results of its landed trials that it has not been told: a driver
        killed between a trial's row and Optuna's record, or a journal whose cut last record was
        set aside, leaves the study behind the trials table."""
        for trial_id, result in landed.items():
            if (searcher := self.study_of(trial_id)) is not None:
                searcher.on_trial_complete(trial_id, result)


class LatestCheckpoint(_CheckpointManager):
    """A trial's checkpoints as Tune's experiment state records them: its latest only, the one a
    retried or resumed trial starts from and the trials table's ``checkpoint_path``, with the two
    numbers of its report that Tune's restore reads (its iteration and time so far). It deletes
    no checkpoint: they all stay while the search runs (``prune_checkpoints`` thins them at the
    end). Tune's own manager records every checkpoint with its whole report: its state grows with
    every epoch that improves. Its state is that checkpoint's path, file system and numbers; its
    checkpoint config is Tune's default, the search's (``run_search``)."""

    def __init__(self) -> None:
        super().__init__(tune.CheckpointConfig())

    def register_checkpoint(self, checkpoint_result: _TrainingResult) -> None:
        metrics = checkpoint_result.metrics
        latest = _TrainingResult(checkpoint_result.checkpoint,
                                 {k: metrics[k] for k in (TRAINING_ITERATION, TIME_TOTAL_S) if k in metrics})
        self._latest_checkpoint_result, self._checkpoint_results = latest, [latest]

    def __reduce__(self):
        # Tune's state keeps this pickled, in hex: the fewest bytes that remake it (a local disk's
        # file system is the one its path means)
        latest = self._latest_checkpoint_result
        if latest is None:
            return LatestCheckpoint, ()
        filesystem = latest.checkpoint.filesystem
        local = isinstance(filesystem, pyarrow.fs.LocalFileSystem)
        return latest_checkpoint, (latest.checkpoint.path, None if local else filesystem,
                                   *(latest.metrics.get(k) for k in (TRAINING_ITERATION, TIME_TOTAL_S)))

    def __setstate__(self, state: dict) -> None:
        # (the state of a search that began before __reduce__)
        self.__init__()
        if state["latest"] is not None:
            path, filesystem, metrics = state["latest"]
            self.register_checkpoint(_TrainingResult(tune.Checkpoint(path, filesystem), metrics))


def latest_checkpoint(path: str, filesystem, iteration: int | None, seconds: float | None) -> LatestCheckpoint:
    """A ``LatestCheckpoint`` as its pickle (``LatestCheckpoint.__reduce__``) remakes it."""
    manager = LatestCheckpoint()
    metrics = {k: v for k, v in ((TRAINING_ITERATION, iteration), (TIME_TOTAL_S, seconds)) if v is not None}
    manager.register_checkpoint(_TrainingResult(tune.Checkpoint(path, filesystem), metrics))
    return manager


def lean_state(trial: Trial) -> Trial:
    """``trial`` with a small state in Tune's experiment state, which Tune rewrites whole every
    few seconds: ``LatestCheckpoint`` for its checkpoints; of each number it reports only Tune's
    min, max, mean and last, not also the means of its last 5 and 10 values, whose windows Tune
    keeps pickled; its configuration not in its directory name (``run_trial_<trial id>``), its
    tag (``<number>``) or a copy as its evaluated parameters (Tune keeps the name in four places,
    the tag in two and the copy for its own progress table: nothing in a search reads them; the
    configuration is in the trials table)."""
    trial.run_metadata._n_steps = ()
    trial.run_metadata.checkpoint_manager = LatestCheckpoint()
    trial.custom_dirname = str(trial)
    trial.experiment_tag = trial.experiment_tag.split("_", 1)[0]
    trial.evaluated_params = {}
    return trial


class ExperimentSearch(SearchGenerator):
    """Tune's trial generator around the search's searcher, which makes every new trial under
    the experiment directory where the experiment is now, with a ``lean_state``. (Tune's own
    generator, restored, makes them where the experiment began: a moved experiment would write
    to its old place.)"""

    def __init__(self, searcher: KindSearch, concurrency: int, exp_dir: str):
        super().__init__(ConcurrencyLimiter(searcher, max_concurrent=concurrency))
        self.exp_dir = exp_dir

    @property
    def kind_search(self) -> KindSearch:
        return self.searcher.searcher

    def relocate(self, exp_dir: str, storage, landed: dict[str, dict]) -> None:
        """Make new trials under ``exp_dir``, keep the studies in ``storage`` and, once restored,
        tell them the ``landed`` results they lack (``KindSearch.restore``)."""
        self.exp_dir = exp_dir
        self.kind_search.landed = landed
        if storage is not None:
            self.kind_search.bind(storage)

    def create_trial_if_possible(self, experiment_spec: dict) -> Trial | None:
        trial = super().create_trial_if_possible({**experiment_spec, "storage": self._here(experiment_spec["storage"])})
        return trial and lean_state(trial)

    def _here(self, storage):
        """``storage`` (a Tune StorageContext) pointed at ``exp_dir``, as Tune points restored trials."""
        parent, name = self.exp_dir.rstrip("/").rsplit("/", 1)
        fs, fs_path = filesystem(parent)
        if storage.storage_fs_path == fs_path and storage.experiment_dir_name == name:
            return storage
        moved = copy.copy(storage)
        moved.storage_filesystem, moved.storage_fs_path, moved.experiment_dir_name = fs, fs_path, name
        return moved


class TrialPlaces(tune.Callback):
    """Notes in the searcher (``KindSearch.note``) what only Tune's trial and the disk know of each
    running trial: its attempts, counted as the trials table counts them (``ParquetResults``: a run
    of the trial's function starts at ``iterations_since_restore`` 1, and a resumed search goes on
    from the attempts on disk), and its latest checkpoint, relative to the experiment. Tune tells
    the searcher that a trial ended before it tells the callbacks, so its study's user attributes
    come from here."""

    def __init__(self, search: KindSearch, exp_dir: str, relative: Callable[[str], str]):
        self.search, self.exp_dir, self.relative = search, exp_dir, relative
        self.attempts: dict[str, int] = {}

    def setup(self, **info) -> None:
        rows = PartsTable(f"{self.exp_dir}/{ITERATIONS_FILE}").read(["trial_id", "attempt", "node_id"])
        self.attempts = {trial_id: len(nodes) for trial_id, nodes in attempts_on_disk(rows, set()).items()}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        attempts = self.attempts.get(trial.trial_id, 0)
        if result.get("iterations_since_restore") == 1 or not attempts:
            attempts = self.attempts[trial.trial_id] = attempts + 1
        checkpoint = trial.checkpoint  # (this result's own, if any, comes next: on_checkpoint)
        self.search.note(trial.trial_id, attempts=attempts,
                         checkpoint_path=None if checkpoint is None else self.relative(checkpoint.path))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self.search.note(trial.trial_id, checkpoint_path=self.relative(checkpoint.path))


class KindScheduler(FIFOScheduler):
    """One scheduler per kind (New-LLM, each baseline architecture): a trial is compared only with
    trials of its own kind."""

    def __init__(self, schedulers: dict[str, FIFOScheduler]):
        super().__init__()
        self.schedulers = schedulers
        self.order: dict[str, int] = {}  # each trial id's place in the order Tune made (or restored) them

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Tune's FIFO choice, the first pending trial, else the first paused one, in the order
        made, among the live trials only: Tune's own scans every trial ever made, at every step of
        its loop, which grows as N² over a search (an eighth of the driver's time at 5,000 trials)."""
        for status in (Trial.PENDING, Trial.PAUSED):
            waiting = [t for t in tune_controller.get_live_trials() if t.status == status]
            if waiting:
                return min(waiting, key=lambda t: self.order.get(t.trial_id, len(self.order)))
        return None

    def of(self, trial) -> FIFOScheduler:
        return self.schedulers[kind(trial.config)]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return all([s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()])

    def on_trial_add(self, tune_controller, trial) -> None:
        self.order.setdefault(trial.trial_id, len(self.order))
        self.of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = self.of(trial).on_trial_result(tune_controller, trial, result)
        # a trial's last epoch is recorded at its rung like any other, but never cut: the trial
        # ends there anyway, with its own final row (ASHA's stop_last_trials=False spares only
        # the epochs at max_t, and a trial's own epoch cap or early stop may come sooner)
        return self.CONTINUE if result.get("phase2_last_epoch") else action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.order.pop(trial.trial_id, None)
        self.of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.order.pop(trial.trial_id, None)
        self.of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{k}: {s.debug_string()}" for k, s in self.schedulers.items())


def max_phase2_epochs(space: SearchSpace) -> int:
    """The most Phase 2 epochs a trial of ``space`` can run (a baseline's own setting included)."""
    def most(d) -> int:
        return max(d.choices) if isinstance(d, od.CategoricalDistribution) else int(d.high)

    d = space.params.get("phase2_epochs")
    epochs = [most(d) if d is not None else space.trial_config({}).phase2_epochs]
    if space.baselines is not None:
        own = space.baselines.params.get("phase2_epochs")
        epochs.append(most(own) if own is not None else space.baselines.fixed.get("phase2_epochs", 0))
    return max(epochs)


def scheduler(name: str | None, space: SearchSpace):
    """The trial scheduler of ``--scheduler`` (None: asha, or none when a trial runs replicates):
    an ASHA over Phase 2 epochs per kind (New-LLM, each baseline architecture), or FIFO. ASHA's time
    is ``phase2_epoch``, which only Phase 2 rows carry, so Phase 1 passes and the analysis are
    never rungs and a gate-failed trial is never stopped by it. Its metric ``objective`` is a
    trial's best val perplexity so far. A trial's last epoch is never cut (``KindScheduler``): it
    ends with its own final row. Both are a ``KindScheduler``, for its choice of the next trial."""
    if (name or ("asha" if space.repeats == 1 else "none")) == "none":
        return KindScheduler({k: FIFOScheduler() for k in kinds(space)})
    max_t = max(max_phase2_epochs(space), ASHA_GRACE_EPOCHS)
    return KindScheduler({k: ASHAScheduler(time_attr="phase2_epoch", metric="objective", mode="min", max_t=max_t,
                                             grace_period=ASHA_GRACE_EPOCHS, reduction_factor=ASHA_REDUCTION,
                                             stop_last_trials=False) for k in kinds(space)})


@dataclass(frozen=True)
class SearchRun:
    """What ``run_search`` runs: the command line's settings, checked (``cli.plan_search``), or a
    test's or benchmark's own.

    Args:
        name: the experiment's name: its directory under ``storage_root``, and its Optuna study's.
        storage_root: where experiments live (``storage.storage_root`` of ``--storage-path``).
        space: the search space.
        data: the tokenised data, shared with the trials through Ray's object store.
        num_trials: New-LLM trials to run, and as many of each ablation's siblings and of each
            baseline architecture.
        concurrency: trials at once; None: the cluster's CPUs / ``cpus_per_trial``.
        cpus_per_trial: CPUs (= torch threads) per trial.
        gpus_per_trial: GPUs per trial, fractions allowed.
        seed: the seed of the Optuna samplers.
        scheduler: "asha", "none", or None (asha; none when a trial runs replicates).
        resume: continue the experiment from Tune's saved state (a new search when there is none).
        optuna_storage: the studies' storage (``storage.optuna_storage``); None keeps them in memory.
        points: New-LLM configurations to try first, in order, after the space's own
            (benchmarks give the same ones to every side).
        trainable: the function Tune runs for each trial, given its config; None: ``run_trial``
            with the space and data (a benchmark's stand-in replays a recorded trial).
    """

    name: str
    storage_root: str
    space: SearchSpace
    data: TokenData
    num_trials: int
    concurrency: int | None = None
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    seed: int = 0
    scheduler: str | None = None
    resume: bool = False
    optuna_storage: str | None = None
    points: tuple[dict, ...] = ()
    trainable: Callable[[dict], None] | None = None

    @property
    def exp_dir(self) -> str:
        return experiment_dir(self.storage_root, self.name)

    def trials_at_once(self) -> int:
        """``concurrency``, or as many trials as the cluster's CPUs fit (Ray must be up)."""
        return self.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.cpus_per_trial)


class _Anything:
    """Stands in for every object of a saved state that ``missing_code`` reads: nothing is built."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs) -> _Anything:
        return _Anything()

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _NewllmNames(pickle.Unpickler):
    """Reads a pickle only to check that each newllm class or function it names still exists, and
    keeps the state of each newllm object in it (``states``: (module.name, state))."""

    def __init__(self, file) -> None:
        super().__init__(file)
        self.states: list[tuple[str, object]] = []

    def find_class(self, module: str, name: str):
        if not (module == "newllm" or module.startswith("newllm.")):
            return _Anything
        super().find_class(module, name)  # ImportError or AttributeError when this newllm lacks it
        states = self.states

        class Recorded(_Anything):
            def __setstate__(self, state) -> None:
                states.append((f"{module}.{name}", state))

        return Recorded

    def persistent_load(self, pid) -> _Anything:
        return _Anything()


def missing_code(exp_dir: str) -> str | None:
    """Why Tune cannot restore the experiment at ``exp_dir`` with this newllm, or None: its saved
    state (``tuner.pkl``, ``searcher-state-*.pkl``) names newllm classes by their module, and a
    state saved by an earlier newllm may name ones that have since moved, or hold a KindSearch
    of another ``STATE_FORMAT``. Checked without building anything, so before Ray starts."""
    fs, path = filesystem(exp_dir)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True)
    saved = sorted(i.path for i in fs.get_file_info(selector)
                   if i.base_name == "tuner.pkl" or re.fullmatch(r"searcher-state-.*\.pkl", i.base_name))
    for file in saved:
        with fs.open_input_file(file) as f:
            names = _NewllmNames(io.BytesIO(f.read()))
            try:
                names.load()
            except (ImportError, AttributeError) as e:
                return f"{os.path.basename(file)}: {e}"
            except Exception:  # damage, not a question of versions: Tune's restore reports it
                continue
        for name, state in names.states:
            if name == f"{KindSearch.__module__}.{KindSearch.__name__}" and isinstance(state, dict) \
                    and state.get("state_format", 1) != STATE_FORMAT:
                return (f"{os.path.basename(file)}: its search state has format {state.get('state_format', 1)}, "
                        f"this newllm reads format {STATE_FORMAT}")
    return None


def run_search(run: SearchRun) -> bool:
    """Run the search's trials and land them in ``run.exp_dir``: ``run.num_trials`` New-LLM
    trials, and as many siblings per ablation and trials of each baseline architecture when the
    space has them. Returns
    whether every trial finished: False when the search was interrupted (Ctrl+C), its state
    saved for a resume."""
    space, exp_dir = run.space, run.exp_dir
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    function = run.trainable or tune.with_parameters(run_trial, space=space, data=run.data)
    trainable = tune.with_resources(function, {"cpu": run.cpus_per_trial, "gpu": run.gpus_per_trial})
    studies = None if run.optuna_storage is None else open_storage(run.optuna_storage)
    total = run.num_trials * len(kinds(space))
    row = TrialRow(space, versions(), exp_dir)

    def callbacks(search: KindSearch) -> list[tune.Callback]:
        return [ParquetResults(exp_dir, row, TrialRow.dtypes()), TrialPlaces(search, exp_dir, row.relative),
                Progress(total), StagingFolders()]

    if run.resume and studies is not None:
        for study in study_names(run.name, space).values():
            fail_left_running(studies, study)
    # (a driver killed before Tune saved any state leaves nothing to restore: the search starts anew)
    if run.resume and tune.Tuner.can_restore(exp_dir):
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
        # Tune restores the searcher and callbacks pickled when the search began, with the paths
        # they had then: a moved or copied experiment must use its own. Tuner has no public way to
        # give them; tests/test_faults.py's relocation test fails if this stops working.
        restored = tuner._local_tuner
        search_alg = restored._tune_config.search_alg
        restored._run_config.callbacks = callbacks(search_alg.kind_search)
        search_alg.relocate(exp_dir, studies, landed_results(exp_dir))
    else:
        metrics = space.metrics
        metric, mode = (metrics, ["min"] * len(metrics)) if len(metrics) > 1 else (metrics[0], "min")
        searchers = {
            k: StudySearch(space=space.params if k == NEWLLM else space.baselines.params, metric=metric, mode=mode,
                           sampler=study_sampler(run.seed),
                           study_name=study, storage=studies, kind=k, learned_nothing=float(run.data.vocab_size),
                           gate_space=space if k == NEWLLM else None)
            for k, study in study_names(run.name, space).items()}
        for point in [*space.points, *run.points]:
            # enqueued in the study, the sampler proposes what a point leaves out
            searchers[NEWLLM]._ot_study.enqueue_trial(point)
        searcher = KindSearch(searchers, space, run.data.vocab_size, metric, mode)
        searcher.storage = studies
        search_alg = ExperimentSearch(searcher, run.trials_at_once(), exp_dir)
        tuner = tune.Tuner(
            trainable,
            # a finished trial's actor (its process, torch imported) runs the next trial; run_trial
            # sets everything per trial (threads, seeds), so nothing carries over
            tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler(run.scheduler, space),
                                        num_samples=total, reuse_actors=True),
            run_config=tune.RunConfig(name=run.name, storage_path=run.storage_root,
                                      callbacks=callbacks(searcher), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      # every checkpoint stays while the search runs: a driver killed
                                      # and resumed goes back to its last snapshot of Tune's state, which
                                      # may name any of them (prune_checkpoints thins them at the end);
                                      # each trial's state records its latest (LatestCheckpoint)
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
        )
    with quiet_tune(), frozen_heap():
        results = tuner.fit()
    # every trial made and landed (not the result grid's counts: Tune counts the trials it stops
    # on an interruption as terminated)
    finished = search_alg.is_finished() and landed_trials(exp_dir) >= len(results)
    if finished:
        prune_checkpoints(exp_dir)
    return finished


class DropLines(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def frozen_heap():
    """Leaves the objects the driver holds when Tune starts (the imports of torch, Ray, pandas and
    Optuna: about 300,000) out of Python's collections while Tune runs. A full collection walks
    every object it tracks: with them, one took 0.27 s of the driver's CPU at 1,000 trials, a
    pause the trials waiting on the driver felt. Without them it walks what the search made."""
    gc.collect()  # (the garbage there is now would stay for the search)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# what run_search sets in the environment while Tune runs: Tune's older console output (which is
# silent at verbose=0), and none of Tune's own per-trial loggers (result.json, progress.csv,
# TensorBoard events): they repeat the iterations table, and cost the driver more per trial the
# more trials there are
TUNE_ENVIRONMENT = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


@contextlib.contextmanager
def quiet_tune():
    """Tune's console lines that newllm says better: its interruption lines name its Python API
    (main prints the command that resumes), a failed trial's traceback is one line (Progress
    prints it, naming the trial's error.txt, where the traceback is kept), and its configuration
    table and TensorBoard hint (which Tune's newer console output prints whatever ``verbose``
    says) repeat what the search printed. Sets ``TUNE_ENVIRONMENT`` meanwhile, so its result
    grid finds no trial's result.json: that line goes too."""
    quieted = {logging.getLogger("ray.tune.execution.tune_controller"): DropLines("Trial task failed"),
               logging.getLogger("ray.tune.analysis.experiment_analysis"): DropLines("Failed to fetch metrics"),
               # a traceback per failed upload of Tune's state: Tune tries again at its next save, and
               # a lasting failure (a full disk) ends the search at newllm's next write, in one line
               logging.getLogger("ray.train._internal.syncer"): DropLines("Last sync command failed")}
    tune_log = logging.getLogger("ray.tune.tune")
    level = tune_log.level
    saved = {name: os.environ.get(name) for name in TUNE_ENVIRONMENT}
    os.environ.update(TUNE_ENVIRONMENT)
    tune_log.setLevel(logging.CRITICAL)
    for log, drop in quieted.items():
        log.addFilter(drop)
    try:
        yield
    finally:
        tune_log.setLevel(level)
        for log, drop in quieted.items():
            log.removeFilter(drop)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def landed_results(exp_dir: str) -> dict[str, dict]:
    """Trial id -> the row of each trial whose row landed, as the final result it came from
    (errored trials, which the resumed search runs again, left out)."""
    table = trials_table(exp_dir).read()
    if table is None:
        return {}
    return {row["trial_id"]: {**row, "phase": "final"} for row in table.to_pylist() if row["status"] != "error"}


def landed_trials(exp_dir: str) -> int:
    """How many trials have their row in the experiment's trials table."""
    table = trials_table(exp_dir).read(["trial_id"])
    return 0 if table is None else table.num_rows
