"""The search's algorithms in Tune's and Optuna's terms: one Optuna study per kind of trial
(New-LLM, each baseline architecture) behind ``KindSearch``, Tune's trial generator that keeps
new trials where the experiment is now (``ExperimentSearch``), one ASHA per kind
(``KindScheduler``), and ``run_search``, which wires them into a Tuner with the trainable and
the callbacks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass

import optuna
import optuna.distributions as od
import pyarrow.fs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from newllm.config import BASELINE_ARCHITECTURES, NEWLLM
from newllm.data import TokenData
from newllm.experiment import experiment_dir, filesystem, trials_table
from newllm.search.callbacks import ParquetResults, Progress, TrialRow, versions
from newllm.search.storage import fail_left_running, open_storage, prune_checkpoints
from newllm.search.trainable import run_trial
from newllm.space import MATCHED, SearchSpace

# ASHA's rungs, in Phase 2 epochs: the first after 1 epoch, then every ASHA_REDUCTION times more;
# at each rung a trial continues only if its best val perplexity is in the best 1/ASHA_REDUCTION
# of the trials that reached it
ASHA_GRACE_EPOCHS = 1
ASHA_REDUCTION = 3


class StudySearch(OptunaSearch):
    """OptunaSearch whose study lives in a storage that outlives the driver. At a resume the study
    may be ahead of the searcher's saved state: a trial that ``fail_left_running`` marked FAIL
    gets no more intermediate values, and its result, when it finishes, is added as a new
    finished trial with the same parameters; one that Optuna already has finished is not told
    twice."""

    def _finished_in_study(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return False
        try:
            return self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()
        except KeyError:  # lost with a cut journal's last record: nothing to tell it
            return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._finished_in_study(trial_id):
            super().on_trial_result(trial_id, result)

    def bind(self, storage) -> None:
        """Use ``storage``, the study's storage where the experiment is now, for the study and
        for the Optuna trials of the running Tune trials (a restored searcher still points at
        the storage of the experiment's first place)."""
        self._storage = storage
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=storage, sampler=self._sampler)
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, t._trial_id) for tid, t in self._ot_trials.items()}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        if not self._finished_in_study(trial_id):
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        try:
            failed = self._ot_study._storage.get_trial(ot_trial._trial_id).state == optuna.trial.TrialState.FAIL
        except KeyError:
            failed = False
        if failed and result and not error:
            values = [result.get(m) for m in self.metric] if isinstance(self.metric, list) \
                else [result.get(self.metric)]
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=ot_trial.params, distributions=ot_trial.distributions, values=values))
        self._completed_trials.add(trial_id)


def kind(config: dict) -> str:
    """``newllm``, or a baseline trial's architecture: the study that proposes a trial and the
    ASHA that compares it."""
    architecture = config.get("architecture")
    return architecture if architecture in BASELINE_ARCHITECTURES else NEWLLM


def kinds(space: SearchSpace) -> list[str]:
    """The kinds of trial a search of ``space`` runs: New-LLM, then each baseline architecture."""
    return [NEWLLM, *(space.baselines.architectures if space.baselines else ())]


def study_names(name: str, space: SearchSpace) -> dict[str, str]:
    """Each kind's Optuna study: the experiment's name for New-LLM, ``<name>-<architecture>`` for a baseline."""
    return {k: name if k == NEWLLM else f"{name}-{k}" for k in kinds(space)}


class KindSearch(Searcher):
    """The search's trials in turns: a New-LLM trial from the New-LLM study, then, with baselines,
    one trial of each baseline architecture, sized to that New-LLM trial (``space.baseline_trial``)
    with what its own study proposes (its learning rate). Every kind gets the same number of
    trials, and each study learns from its own trials only."""

    def __init__(self, searchers: dict[str, Searcher], space: SearchSpace, vocab_size: int, metric, mode):
        super().__init__(metric=metric, mode=mode)
        self.searchers, self.space, self.vocab_size = searchers, space, vocab_size
        self.turn = 0                              # trials proposed so far
        self.owner: dict[str, str] = {}            # trial id -> kind
        self.matched: tuple[str, dict] | None = None  # the latest New-LLM trial: id, sampled values
        self.storage = None  # the studies' Optuna storage (None: in memory)
        self.landed: dict[str, dict] = {}  # at a resume: the results of the trials whose rows landed

    def suggest(self, trial_id: str):
        kind_ = list(self.searchers)[self.turn % len(self.searchers)]
        config = self.searchers[kind_].suggest(trial_id)
        if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
            return config
        self.turn += 1
        self.owner[trial_id] = kind_
        if kind_ == NEWLLM:
            self.matched = (trial_id, config)
            return config
        matched_id, matched = self.matched
        return {**self.space.baseline_trial(kind_, matched, config, self.vocab_size), MATCHED: matched_id}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result, error)

    def bind(self, storage) -> None:
        """Use ``storage`` for every study, now and after ``restore``."""
        self.storage = storage
        for searcher in self.searchers.values():
            searcher.bind(storage)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

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
            if trial_id in self.owner:
                self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result)


class ExperimentSearch(SearchGenerator):
    """Tune's trial generator around the search's searcher, which makes every new trial under
    the experiment directory where the experiment is now. (Tune's own generator, restored,
    makes them where the experiment began: a moved experiment would write to its old place.)"""

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

    def create_trial_if_possible(self, experiment_spec: dict):
        return super().create_trial_if_possible({**experiment_spec, "storage": self._here(experiment_spec["storage"])})

    def _here(self, storage):
        """``storage`` (a Tune StorageContext) pointed at ``exp_dir``, as Tune points restored trials."""
        parent, name = self.exp_dir.rstrip("/").rsplit("/", 1)
        fs, fs_path = filesystem(parent)
        if storage.storage_fs_path == fs_path and storage.experiment_dir_name == name:
            return storage
        moved = copy.copy(storage)
        moved.storage_filesystem, moved.storage_fs_path, moved.experiment_dir_name = fs, fs_path, name
        return moved


class KindScheduler(FIFOScheduler):
    """One scheduler per kind (New-LLM, each baseline architecture): a trial is compared only with
    trials of its own kind."""

    def __init__(self, schedulers: dict[str, FIFOScheduler]):
        super().__init__()
        self.schedulers = schedulers

    def of(self, trial) -> FIFOScheduler:
        return self.schedulers[kind(trial.config)]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return all([s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()])

    def on_trial_add(self, tune_controller, trial) -> None:
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
        self.of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
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
    an ASHA over Phase 2 epochs per kind (New-LLM, each baseline architecture), or None (FIFO). Its time
    is ``phase2_epoch``, which only Phase 2 rows carry, so Phase 1 passes and the analysis are
    never rungs and a gate-failed trial is never stopped by it. Its metric ``objective`` is a
    trial's best val perplexity so far. A trial's last epoch is never cut (``KindScheduler``): it
    ends with its own final row."""
    if (name or ("asha" if space.repeats == 1 else "none")) == "none":
        return None
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
        num_trials: New-LLM trials to run, and as many of each baseline architecture.
        concurrency: trials at once; None: the cluster's CPUs / ``cpus_per_trial``.
        cpus_per_trial: CPUs (= torch threads) per trial.
        gpus_per_trial: GPUs per trial, fractions allowed.
        seed: the seed of the Optuna samplers.
        scheduler: "asha", "none", or None (asha; none when a trial runs replicates).
        resume: continue the experiment from Tune's saved state (a new search when there is none).
        optuna_storage: the studies' storage (``storage.optuna_storage``); None keeps them in memory.
        points: New-LLM configurations to try first, in order, after the space's own
            (benchmarks give the same ones to every side).
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
    """Reads a pickle only to check that each newllm class or function it names still exists."""

    def find_class(self, module: str, name: str):
        if module == "newllm" or module.startswith("newllm."):
            super().find_class(module, name)  # ImportError or AttributeError when this newllm lacks it
        return _Anything

    def persistent_load(self, pid) -> _Anything:
        return _Anything()


def missing_code(exp_dir: str) -> str | None:
    """Why Tune cannot restore the experiment at ``exp_dir`` with this newllm, or None: its saved
    state (``tuner.pkl``, ``searcher-state-*.pkl``) names newllm classes by their module, and a
    state saved by an earlier newllm may name ones that have since moved. Checked without
    building anything, so before Ray starts."""
    fs, path = filesystem(exp_dir)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True)
    saved = sorted(i.path for i in fs.get_file_info(selector)
                   if i.base_name == "tuner.pkl" or re.fullmatch(r"searcher-state-.*\.pkl", i.base_name))
    for file in saved:
        with fs.open_input_file(file) as f:
            try:
                _NewllmNames(io.BytesIO(f.read())).load()
            except (ImportError, AttributeError) as e:
                return f"{os.path.basename(file)}: {e}"
            except Exception:  # damage, not a question of versions: Tune's restore reports it
                continue
    return None


def run_search(run: SearchRun) -> bool:
    """Run the search's trials and land them in ``run.exp_dir``: ``run.num_trials`` New-LLM
    trials, and as many of each baseline architecture when the space has baselines. Returns
    whether every trial finished: False when the search was interrupted (Ctrl+C), its state
    saved for a resume."""
    space, exp_dir = run.space, run.exp_dir
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    trainable = tune.with_resources(tune.with_parameters(run_trial, space=space, data=run.data),
                                    {"cpu": run.cpus_per_trial, "gpu": run.gpus_per_trial})
    studies = None if run.optuna_storage is None else open_storage(run.optuna_storage)
    total = run.num_trials * len(kinds(space))
    callbacks = [ParquetResults(exp_dir, TrialRow(space, versions(), exp_dir), TrialRow.dtypes()), Progress(total)]
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
        restored._run_config.callbacks = callbacks
        search_alg = restored._tune_config.search_alg
        search_alg.relocate(exp_dir, studies, landed_results(exp_dir, space))
    else:
        metrics = space.metrics
        metric, mode = (metrics, ["min"] * len(metrics)) if len(metrics) > 1 else (metrics[0], "min")
        searchers = {
            k: StudySearch(space=space.params if k == NEWLLM else space.baselines.params, metric=metric, mode=mode,
                           sampler=optuna.samplers.TPESampler(seed=run.seed, multivariate=True, constant_liar=True),
                           study_name=study, storage=studies)
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
                                      callbacks=callbacks, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      # every checkpoint stays while the search runs: a driver killed
                                      # and resumed goes back to its last snapshot of Tune's state, which
                                      # may name any of them (prune_checkpoints thins them at the end)
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
        )
    with quiet_tune():
        results = tuner.fit()
    # every trial made and landed (not the result grid's counts: Tune counts the trials it stops
    # on an interruption as terminated)
    finished = search_alg.is_finished() and landed_trials(exp_dir) >= len(results)
    if finished:
        prune_checkpoints(exp_dir)
    return finished


class TrialFailureFilter(logging.Filter):
    """Drops Tune's traceback of each failed trial: Progress prints one line for it, which names
    the trial's error.txt, where the traceback is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trial task failed")


@contextlib.contextmanager
def quiet_tune():
    """Tune's console lines that newllm says better: its interruption lines name its Python API
    (main prints the command that resumes), a failed trial's traceback is one line, and its
    configuration table and TensorBoard hint (which Tune's newer console output prints whatever
    ``verbose`` says; the older one is silent at ``verbose=0``) repeat what the search printed."""
    tune_log, controller_log = logging.getLogger("ray.tune.tune"), logging.getLogger("ray.tune.execution.tune_controller")
    level, failures = tune_log.level, TrialFailureFilter()
    new_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_log.setLevel(logging.CRITICAL)
    controller_log.addFilter(failures)
    try:
        yield
    finally:
        tune_log.setLevel(level)
        controller_log.removeFilter(failures)
        if new_output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = new_output


def landed_results(exp_dir: str, space: SearchSpace) -> dict[str, dict]:
    """Trial id -> the metrics Optuna minimises, of each trial whose row landed (errored trials,
    which the resumed search runs again, left out)."""
    table = trials_table(exp_dir).read(["trial_id", "status", *space.metrics])
    if table is None:
        return {}
    return {row["trial_id"]: {m: row[m] for m in space.metrics} for row in table.to_pylist()
            if row["status"] != "error"}


def landed_trials(exp_dir: str) -> int:
    """How many trials have their row in the experiment's trials table."""
    table = trials_table(exp_dir).read(["trial_id"])
    return 0 if table is None else table.num_rows
