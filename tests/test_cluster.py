"""The search on a real multi-node Ray cluster on this machine (``ray_cluster``: a head with no
CPUs, two 1-CPU worker nodes): job submission, a lost node, and a SIGKILLed driver."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from newllm import experiment
from test_search import assert_study_matches_table

GATE_OPEN = "gate_train_er: 0.0\n  gate_val_er: 0.0"  # every trial that does not diverge runs Phase 2


def search_args(space: str, storage: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "newllm.search", "--space", space, "--name", name,
            "--storage-path", str(storage), *extra]


def assert_raw_rows_unique(trials: pd.DataFrame, iterations: pd.DataFrame, num_trials: int) -> None:
    """Every trial landed exactly once and no reported row was written twice (raw rows)."""
    assert len(trials) == num_trials and trials.trial_id.is_unique
    assert not iterations.duplicated(experiment.ITERATION_KEY).any()
    assert set(iterations.trial_id) <= set(trials.trial_id)


@pytest.mark.slow(seconds=60)
@pytest.mark.xdist_group("cluster")  # one ray_cluster for both tests that use it
def test_job_submit_runs_trials_on_both_worker_nodes(ray_cluster, tiny_space, tmp_path):
    storage = tmp_path / "res"
    # newllm as installed on every node (no --working-dir: the nodes of this one-machine cluster share
    # one session directory, and a worker node's clean-up of an uploaded package deletes the driver's)
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard,
              "--", *search_args(tiny_space(GATE_OPEN), storage, "job", "--num-trials", "4")]
    env = {**os.environ, "NEWLLM_CACHE": str(tmp_path / "cache")}
    deadline = time.monotonic() + 180  # (a loaded machine may take over a minute)
    while True:  # the head accepts jobs once its dashboard agent has registered
        job = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=300)
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            break
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
    assert "warning: --storage-path" in job.stdout  # a local path on a 3-node cluster: warned, not refused
    trials, iterations = experiment.load(storage / "job")
    assert_raw_rows_unique(trials, iterations, 4)
    assert set(trials.status) <= {"passed", "diverged"}
    workers = {node.node_id for node in ray_cluster.workers}
    assert set(trials.node_id) == workers, "trials ran on both worker nodes, none on the head"
    assert trials.hostname.notna().all() and (trials.attempts == 1).all() and not trials.phase1_restored.any()
    assert (trials.node_ids == trials.node_id).all()
    # one final row per trial, except those whose Phase 2 ASHA stopped (they never sent one)
    finals = iterations[iterations.phase == "final"]
    ended = trials[trials.phase2_stop_reason.ne("scheduler").fillna(True).astype(bool)]
    assert sorted(finals.trial_id) == sorted(ended.trial_id)
    print("\n" + trials[["trial_id", "node_id", "hostname", "status", "phase2_stop_reason",
                         "val_ppl"]].to_string(index=False))


def phase2_trial(directory: Path, driver: subprocess.Popen, timeout: float) -> pd.Series:
    """The analysis row of a trial that saved its Phase 1 checkpoint, passed the gate and has not
    finished: it is in Phase 2 now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        try:
            _, rows = experiment.load(directory)
        except FileNotFoundError:  # nothing written yet
            rows = pd.DataFrame()
        if "gate_passed" in rows:  # an analysis row has landed
            finished = set(rows.loc[rows.phase == "final", "trial_id"])
            running = rows[(rows.phase == "analysis") & rows.gate_passed.eq(True) & ~rows.trial_id.isin(finished)]
            if len(running):
                return running.iloc[0]
        time.sleep(0.2)
    raise AssertionError(f"no trial reached Phase 2 in {timeout:.0f}s:\n{driver.stdout.read()[-3000:]}")


@pytest.mark.slow(seconds=120)
@pytest.mark.xdist_group("cluster")
def test_lost_node_trial_retries_from_its_phase1_checkpoint(ray_cluster, tiny_space, tmp_path):
    # a long Phase 2, so that the node is lost while the trial runs on it
    space = tiny_space(f"{GATE_OPEN}\n  phase2_epochs: 12\n  phase2_patience: 12")
    storage = tmp_path / "res"
    env = {**os.environ, "NEWLLM_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(search_args(space, storage, "loss", "--address", ray_cluster.address,
                                          "--num-trials", "2", "--scheduler", "none"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lost = None
    try:
        victim = phase2_trial(storage / "loss", driver, timeout=120)
        lost = next(node for node in ray_cluster.workers if node.node_id == victim.node_id)
        ray_cluster.cluster.remove_node(lost, allow_graceful=False)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
        workers = list(ray_cluster.workers)
        if lost is not None:  # the cluster is the module's: two workers again for the next test
            ray_cluster.replace(lost)
    assert driver.returncode == 0, out[-3000:]
    trials, iterations = experiment.load(storage / "loss")
    assert_raw_rows_unique(trials, iterations, 2)
    phase1_attempts = iterations[iterations.phase == "phase1"].groupby("trial_id").attempt.nunique()
    assert (phase1_attempts == 1).all(), "a trial ran Phase 1 in two attempts"
    survivor = next(node.node_id for node in workers if node is not lost)
    retried = trials.set_index("trial_id").loc[victim.trial_id]
    assert retried.status == "passed" and retried.attempts == 2 and retried.phase1_restored
    assert retried.node_ids == f"{lost.node_id},{survivor}" and retried.node_id == survivor
    rows = iterations[iterations.trial_id == victim.trial_id]
    # Phase 1 ran once, on the lost node; the retry went on from its latest checkpoint: Phase
    # 1's (then it redoes the analysis, which gives Phase 2 its starting contexts) or that of
    # the best Phase 2 epoch so far (then Phase 2 goes on after that epoch)
    assert set(rows.loc[rows.phase == "phase1", "attempt"]) == {1}
    first = rows[rows.attempt == 1]
    saved_epochs = first.loc[(first.phase == "phase2") & first.should_checkpoint.eq(True), "step"]
    resumed = rows[rows.attempt == 2]
    expected = {"phase2", "final"} if len(saved_epochs) else {"analysis", "phase2", "final"}
    assert set(resumed.phase) == expected
    assert resumed.loc[resumed.phase == "phase2", "step"].min() == (saved_epochs.max() + 1 if len(saved_epochs) else 1)
    assert set(rows.loc[rows.attempt == 2, "node_id"]) == {survivor}
    assert set(rows.loc[rows.phase == "final", "attempt"]) == {2}
    others = trials[trials.trial_id != victim.trial_id]
    assert (others.attempts == 1).all() and not others.phase1_restored.any()
    print("\n" + trials[["trial_id", "attempts", "node_ids", "node_id", "phase1_restored", "status",
                         "val_ppl"]].to_string(index=False))


def ray_processes(ray_tmp: Path) -> list[int]:
    """Processes of the Ray whose session lives under ``ray_tmp`` (their command lines name it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(ray_tmp) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:  # it exited while we looked
            continue
    return pids


def assert_no_ray_left(ray_tmp: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(ray_tmp), "the killed --local driver left Ray processes behind"


@pytest.mark.slow(seconds=110)
def test_sigkilled_driver_resumes_with_every_trial_once(tiny_space, tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="nk", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {**os.environ, "NEWLLM_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": str(ray_tmp),
           "PYTHONUNBUFFERED": "1"}
    args = search_args(tiny_space(f"{GATE_OPEN}\n  phase2_epochs: 4"), tmp_path / "res", "k",
                       "--local", "--num-trials", "4")
    rng = random.Random(0)
    try:
        for kill in range(2):
            driver = subprocess.Popen(args + (["--resume"] if kill else []), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
            for line in driver.stdout:  # Ray is up and the search is starting
                if line.startswith("Experiment:"):
                    break
            time.sleep(rng.uniform(2.0, 10.0))  # a seeded random moment of the search
            os.killpg(driver.pid, signal.SIGKILL)  # the driver's whole process group, no chance to clean up
            driver.wait()
            assert_no_ray_left(ray_tmp)
        done = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        trials, iterations = experiment.load(tmp_path / "res" / "k")
        assert_raw_rows_unique(trials, iterations, 4)
        assert (trials.status != "error").all()
        # the Optuna study: nothing left RUNNING by the killed drivers; every trial's result once, with
        # its state, value and user attributes as the trials table has them
        journal = tmp_path / "res" / "k" / experiment.OPTUNA_JOURNAL
        study = optuna.load_study(study_name="k", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))))
        states = [t.state for t in study.trials]
        assert optuna.trial.TrialState.RUNNING not in states
        assert_study_matches_table(tmp_path / "res" / "k", "k")
        print("\n" + trials[["trial_id", "attempts", "phase1_restored", "status"]].to_string(index=False))
        print(f"Optuna study: {len(states)} trials, " + ", ".join(f"{states.count(s)} {s.name}" for s in set(states)))
        assert_no_ray_left(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
