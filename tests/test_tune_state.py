"""Tune's experiment state, which Tune rewrites whole every few seconds, stays small per trial
however long the search: 1,000 trials as Tune holds them at the end of a search, each with
every result the trainable reported applied as Tune applies it, and every checkpoint
registered, are saved the way Tune saves them. No Ray cluster."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
from collections.abc import Iterator

import optuna.distributions as od
import pytest
from ray.train._internal.session import _TrainingResult
from ray.train._internal.storage import StorageContext
from ray.tune import Checkpoint
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.search.variant_generator import format_vars
from ray.tune.utils.serialization import TuneFunctionEncoder

from newllm.phase1 import PassRecord
from newllm.phase2 import EpochRecord
from newllm.run import REPLICATE_DTYPES, SUMMARY_DTYPES
from newllm.search import algorithms, packing
from newllm.space import SearchSpace, load_space, resolve_space

TRIALS = 1000
MAX_BYTES_PER_TRIAL = 8 * 1024
PASSES, EPOCHS = 10, 30  # every epoch improves: a checkpoint each


def value(rng: random.Random, dtype: str):
    """A random value of a trials-table ``dtype``."""
    return {"float64": rng.random() * 100, "Int64": rng.randrange(10**6),
            "string": rng.choice(["passed", "max_epochs"]), "boolean": rng.random() < 0.5}[dtype]


def record(rng: random.Random, cls) -> dict:
    """A dataclass record (a Phase 1 pass, a Phase 2 epoch) with random numbers."""
    return {f.name: rng.random() for f in dataclasses.fields(cls)}


def rows(rng: random.Random) -> Iterator[tuple[dict, bool]]:
    """A New-LLM trial's rows as the trainable reports them, with random values, and whether each
    comes with a checkpoint: Phase 1 passes, the analysis, Phase 2 epochs, the final row."""
    summary = {k: value(rng, t) for k, t in {**SUMMARY_DTYPES, **REPLICATE_DTYPES}.items()}
    where = {"family": "newllm", "architecture": "residual", "num_params": 123456, "num_params_non_embedding": 23456,
             "node_id": f"{rng.getrandbits(224):056x}", "phase1_restored": False}
    for p in range(PASSES):
        yield {"phase": "phase1", "step": p, "replicate": 0, **where, **record(rng, PassRecord),
               "objective": 1e6}, False
    yield {"phase": "analysis", "step": 0, "replicate": 0, **where, **summary, "objective": 1e6}, True
    for e in range(1, EPOCHS + 1):
        yield {"phase": "phase2", "step": e, "replicate": 0, **where, **record(rng, EpochRecord), "phase2_epoch": e,
               "phase2_last_epoch": e == EPOCHS, "objective": 100.0 - e, "if_stopped": summary}, True
    yield {"phase": "final", "step": 0, "replicate": 0, **where, "threads": 2, "device": "cuda", **summary}, True


def tune_result(report: dict, trial: Trial, iteration: int, checkpoint: bool) -> dict:
    """``report`` with the keys Tune adds to a result (its trainable and its controller)."""
    return {**report, "timestamp": 1796178395 + iteration, "checkpoint_dir_name": None, "done": False,
            "training_iteration": iteration, "trial_id": trial.trial_id, "date": "2026-12-02_02-26-35",
            "time_this_iter_s": 1.23456789, "time_total_s": 12.3456789 * iteration, "pid": 12345,
            "hostname": "gpu-node-17", "node_ip": "10.0.17.3", "config": trial.config,
            "time_since_restore": 12.3456789 * iteration,
            "iterations_since_restore": iteration, **({"should_checkpoint": True} if checkpoint else {})}


def sample(distribution: od.BaseDistribution, rng: random.Random):
    """A random value of a search-space parameter."""
    if isinstance(distribution, od.CategoricalDistribution):
        return rng.choice(distribution.choices)
    if isinstance(distribution, od.IntDistribution):
        return rng.randint(distribution.low, distribution.high)
    return rng.uniform(distribution.low, distribution.high)


def finished_trial(i: int, storage: StorageContext, space: SearchSpace, reports: list[tuple[dict, bool]],
                   rng: random.Random) -> Trial:
    """Trial ``i`` of a search of ``space`` as Tune holds it when it has finished: made as
    ``ExperimentSearch`` makes it, each of the trainable's ``reports`` applied, each checkpoint
    registered."""
    config = {name: sample(d, rng) for name, d in space.params.items()}
    trial = algorithms.lean_state(Trial(
        "run_trial", config=config, stub=True, storage=storage, evaluated_params=config,
        experiment_tag=f"{i + 1}_{format_vars(config)}",
        placement_group_factory=PlacementGroupFactory([{"CPU": 1, "GPU": 0}])))
    trial.relative_logdir = trial.storage.trial_dir_name = trial._generate_dirname()  # as Tune names it at its start
    for iteration, (report, checkpoint) in enumerate(reports, 1):
        result = tune_result(report, trial, iteration, checkpoint)
        # (Tune adds the counts of timesteps and episodes only for a trainable that reports them)
        assert set(AUTO_RESULT_KEYS) - {"timesteps_total", "timesteps_since_restore", "episodes_total"} <= result.keys()
        trial.update_last_result(result)
        if checkpoint:
            trial.on_checkpoint(_TrainingResult(Checkpoint(f"{trial.path}/checkpoint_{iteration:06d}"), result))
    trial.set_status(Trial.TERMINATED)
    return trial


@pytest.mark.slow(seconds=10)
@pytest.mark.parametrize("space_name", ["laptop", "gpu_cluster"])  # the default; the most settings
def test_tunes_state_of_a_thousand_finished_trials_is_small(tmp_path, space_name):
    space = load_space(resolve_space(space_name))
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name=space_name)
    rng = random.Random(0)
    reports = [(packing.packed(row, space.metrics), checkpoint) for row, checkpoint in rows(rng)]
    trials = [finished_trial(i, storage, space, reports, rng) for i in range(TRIALS)]
    # as TuneController.save_to_dir writes experiment_state-*.json
    state = json.dumps({"trial_data": [t.get_json_state() for t in trials]}, cls=TuneFunctionEncoder)
    per_trial = len(state) / TRIALS
    assert per_trial <= MAX_BYTES_PER_TRIAL, f"{per_trial:.0f} bytes per trial"

    last = trials[-1]
    # its directory and tag name no configuration (Tune's would, in four places)
    assert last.storage.trial_dir_name == f"run_trial_{last.trial_id}" and last.experiment_tag == str(TRIALS)
    # what a resumed search needs of a trial: its last row and its latest checkpoint
    assert packing.reported_row(last.last_result)["phase"] == "final"
    assert last.checkpoint.path.endswith(f"checkpoint_{PASSES + EPOCHS + 2:06d}")
    restored = Trial("run_trial", stub=True)  # as a resumed Tune reads the state
    restored.restore_run_metadata(last.get_json_state()[1])
    assert restored.last_result == last.last_result
    assert restored.checkpoint.path == last.checkpoint.path
    assert restored.run_metadata.checkpoint_manager.latest_checkpoint_result.metrics == {
        "training_iteration": PASSES + EPOCHS + 2, "time_total_s": pytest.approx(12.3456789 * (PASSES + EPOCHS + 2))}


def test_a_latest_checkpoint_pickled_before_its_reduce_still_restores(tmp_path):
    # a search begun by newllm before LatestCheckpoint.__reduce__ has its state as a dict
    old = algorithms.LatestCheckpoint.__new__(algorithms.LatestCheckpoint)
    old.__setstate__({"latest": (str(tmp_path / "checkpoint_000003"), None, {"training_iteration": 3})})
    again = pickle.loads(pickle.dumps(old))
    for manager in (old, again):
        assert manager.latest_checkpoint_result.checkpoint.path == str(tmp_path / "checkpoint_000003")
        assert manager.latest_checkpoint_result.metrics == {"training_iteration": 3}
    assert pickle.loads(pickle.dumps(algorithms.LatestCheckpoint())).latest_checkpoint_result is None
