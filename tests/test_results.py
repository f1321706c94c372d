"""The results writer (newllm.search.callbacks) and reader (newllm.experiment), driven directly with fake trials: no Ray cluster."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest

import newllm.experiment
from newllm.search import callbacks, packing
from newllm.trials import best_newllm_trial

DTYPES = {"trial_id": "string", "status": "string", "objective": "float64", "attempts": "Int64",
          "node_ids": "string", "gate_passed": "boolean", "lr": "float64"}


def trial_row(trial, result: dict, node_ids: list[str]) -> dict:
    trial.node_ids = node_ids  # what the writer passed, for the tests to check
    return {"trial_id": trial.trial_id, "status": result.get("status"), "objective": result.get("objective"),
            "attempts": len(node_ids) or None, "node_ids": ",".join(node_ids), "gate_passed": result.get("gate"),
            **trial.config}


def make_trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"lr": 0.01}, checkpoint=None, last_result={})


def writer(directory: Path, flush_seconds: float = 3600.0, merge_every: int = 1000) -> callbacks.ParquetResults:
    cb = callbacks.ParquetResults(str(directory), trial_row, DTYPES, flush_seconds=flush_seconds,
                                merge_every=merge_every)
    cb.setup()
    return cb


def report(cb, trial, phase: str, step: int, since_restore: int, node: str = "node-a",
           should_checkpoint: bool = False, **row) -> None:
    """A row as the trainable packs it, with the keys Tune adds."""
    result = {**packing.packed({"phase": phase, "step": step, "replicate": 0, "node_id": node, **row}, ["objective"]),
              "iterations_since_restore": since_restore, "trial_id": trial.trial_id, "config": trial.config,
              **({"should_checkpoint": True} if should_checkpoint else {})}
    trial.last_result = result
    cb.on_trial_result(0, [], trial, result)


def run_trial(cb, trial_id: str, node: str = "node-a", status: str = "passed") -> None:
    """A trial's rows (Phase 1 and final keys differ; val_ppl only null in Phase 1), then its finish."""
    trial = make_trial(trial_id)
    report(cb, trial, "phase1", 0, 1, node, loss=2.0, val_ppl=None)
    report(cb, trial, "phase1", 1, 2, node, loss=1.5, val_ppl=None)
    report(cb, trial, "final", 0, 3, node, status=status, objective=9.5, val_ppl=9.5, gate=True,
           should_checkpoint=True)
    cb.on_trial_complete(0, [], trial)


def part_names(table_dir: Path) -> list[str]:
    return sorted(p.name for p in table_dir.iterdir())


def test_a_flush_writes_only_the_rows_since_the_last(tmp_path):
    cb = writer(tmp_path)
    trial = make_trial("a")
    for step in range(3):
        report(cb, trial, "phase1", step, step + 1)
    assert not (tmp_path / newllm.experiment.ITERATIONS_FILE).exists()  # nothing due yet
    cb.flush()
    for step in range(3, 5):
        report(cb, trial, "phase1", step, step + 1)
    cb.flush()
    cb.flush()  # nothing new: no file
    parts = tmp_path / newllm.experiment.ITERATIONS_FILE
    assert part_names(parts) == ["part-000001.parquet", "part-000002.parquet"]
    assert pq.read_table(parts / "part-000001.parquet").column("step").to_pylist() == [0, 1, 2]
    assert pq.read_table(parts / "part-000002.parquet").column("step").to_pylist() == [3, 4]


def test_rows_land_on_the_timer_with_a_checkpoint_and_before_their_trial_row(tmp_path):
    cb = writer(tmp_path)
    trial = make_trial("a")
    report(cb, trial, "phase1", 0, 1)
    assert not (tmp_path / newllm.experiment.ITERATIONS_FILE).exists()
    report(cb, trial, "analysis", 0, 2, should_checkpoint=True)  # a checkpoint: its rows land at once
    assert pq.read_table(tmp_path / newllm.experiment.ITERATIONS_FILE / "part-000001.parquet").num_rows == 2
    report(cb, trial, "phase2", 0, 3)
    cb.on_trial_complete(0, [], trial)  # pending rows first, then the trial row
    trials, iterations = newllm.experiment.load(tmp_path)
    assert list(trials.trial_id) == ["a"] and len(iterations) == 3

    timed = writer(tmp_path / "timed", flush_seconds=0.0)
    report(timed, make_trial("b"), "phase1", 0, 1)
    assert part_names(tmp_path / "timed" / newllm.experiment.ITERATIONS_FILE) == ["part-000001.parquet"]


def experiment(directory: Path, trials: int = 4, merge_every: int = 1000) -> None:
    cb = writer(directory, merge_every=merge_every)
    for i in range(trials):
        run_trial(cb, f"t{i}", status="passed" if i % 2 else "gate_failed")
    report(cb, make_trial("running"), "phase1", 0, 1)  # a trial still running: its row is pending
    cb.flush()


def test_load_is_the_same_before_during_and_after_compaction(tmp_path):
    exp = tmp_path / "exp"
    experiment(exp)
    trials, iterations = newllm.experiment.load(exp)
    assert list(trials.trial_id) == ["t0", "t1", "t2", "t3"]
    assert len(iterations) == 13 and not iterations.duplicated(newllm.experiment.ITERATION_KEY).any()
    assert list(iterations.columns[:2]) == ["trial_id", "attempt"]
    # the trials table keeps its declared dtypes; iteration columns get one type across parts
    assert {c: str(trials[c].dtype) for c in ("attempts", "gate_passed", "objective", "trial_id")} == \
        {"attempts": "Int64", "gate_passed": "boolean", "objective": "float64", "trial_id": "string"}
    assert str(iterations.val_ppl.dtype) == "float64" and str(iterations.attempt.dtype) == "int64"

    # a reader listing mid-compaction: the compacted file is there, its parts not yet deleted
    mid = tmp_path / "mid"
    shutil.copytree(exp, mid)
    for name in (newllm.experiment.TRIALS_FILE, newllm.experiment.ITERATIONS_FILE):
        table = newllm.experiment.PartsTable(str(mid / name))
        parts = table.parts()
        table.write(f"part-{min(p.first for p in parts):06d}-{max(p.last for p in parts):06d}.parquet", table.read())
    during = newllm.experiment.load(mid)

    newllm.experiment.compact(exp)
    after = newllm.experiment.load(exp)
    for got in (during, after):
        pd.testing.assert_frame_equal(got[0], trials)
        pd.testing.assert_frame_equal(got[1], iterations)
    assert part_names(exp / newllm.experiment.TRIALS_FILE) == ["part-000001-000004.parquet"]
    assert len(part_names(exp / newllm.experiment.ITERATIONS_FILE)) == 1
    # one file per table: any Parquet reader reads the directory
    assert list(pd.read_parquet(exp / newllm.experiment.TRIALS_FILE).trial_id) == ["t0", "t1", "t2", "t3"]
    assert len(pd.read_parquet(exp / newllm.experiment.ITERATIONS_FILE)) == 13


def test_a_search_resumed_after_compaction_compacts_again_into_one_file(tmp_path):
    experiment(tmp_path, trials=2)
    newllm.experiment.compact(tmp_path)
    cb = writer(tmp_path)
    run_trial(cb, "late")
    trials, iterations = newllm.experiment.load(tmp_path)
    assert list(trials.trial_id) == ["t0", "t1", "late"]
    cb.on_experiment_end([make_trial(t) for t in ("t0", "t1", "running", "late")])
    assert part_names(tmp_path / newllm.experiment.TRIALS_FILE) == ["part-000001-000003.parquet"]
    assert len(part_names(tmp_path / newllm.experiment.ITERATIONS_FILE)) == 1
    pd.testing.assert_frame_equal(newllm.experiment.load(tmp_path)[0], trials)
    pd.testing.assert_frame_equal(newllm.experiment.load(tmp_path)[1], iterations)


def test_the_writer_merges_its_parts_as_it_goes_without_changing_what_loads(tmp_path):
    experiment(tmp_path / "parts", trials=7)
    experiment(tmp_path / "merged", trials=7, merge_every=3)
    assert part_names(tmp_path / "merged" / newllm.experiment.TRIALS_FILE) == [
        "part-000001-000003.parquet", "part-000004-000006.parquet", "part-000007.parquet"]
    assert len(part_names(tmp_path / "merged" / newllm.experiment.ITERATIONS_FILE)) < \
        len(part_names(tmp_path / "parts" / newllm.experiment.ITERATIONS_FILE))
    for got, expected in zip(newllm.experiment.load(tmp_path / "merged"), newllm.experiment.load(tmp_path / "parts")):
        pd.testing.assert_frame_equal(got, expected)


def test_a_part_compacted_between_listing_and_reading_is_read_from_the_compacted_file(tmp_path, monkeypatch):
    experiment(tmp_path)
    expected = newllm.experiment.load(tmp_path)
    read_file = newllm.experiment.PartsTable.read_file
    compacted = []

    def compaction_finishes_first(self, path, columns=None):
        if not compacted:  # the reader has listed the parts; a compaction now replaces them
            compacted.append(True)
            self.compact()
        return read_file(self, path, columns)

    monkeypatch.setattr(newllm.experiment.PartsTable, "read_file", compaction_finishes_first)
    got = newllm.experiment.load(tmp_path)
    assert compacted
    pd.testing.assert_frame_equal(got[0], expected[0])
    pd.testing.assert_frame_equal(got[1], expected[1])


def test_half_written_temporary_files_are_ignored(tmp_path):
    experiment(tmp_path)
    expected = newllm.experiment.load(tmp_path)
    for name in (newllm.experiment.TRIALS_FILE, newllm.experiment.ITERATIONS_FILE):
        (tmp_path / name / ".part-000009.parquet.0123abcd.tmp").write_bytes(b"PAR1\x00half")
    got = newllm.experiment.load(tmp_path)
    pd.testing.assert_frame_equal(got[0], expected[0])
    pd.testing.assert_frame_equal(got[1], expected[1])
    cb = writer(tmp_path)  # a resumed writer numbers on from the real parts
    run_trial(cb, "next")
    assert "part-000005.parquet" in part_names(tmp_path / newllm.experiment.TRIALS_FILE)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_files_and_directories_get_the_mode_the_umask_allows(tmp_path, umask, file_mode, dir_mode):
    exp = tmp_path / "exp"
    tables = [exp / newllm.experiment.TRIALS_FILE, exp / newllm.experiment.ITERATIONS_FILE]

    def modes() -> set[int]:
        return {stat.S_IMODE(p.stat().st_mode) for table in tables for p in table.iterdir()}

    old = os.umask(umask)
    try:
        experiment(exp)
        parts = modes()
        newllm.experiment.compact(exp)
        compacted = modes()
    finally:
        os.umask(old)
    assert parts == compacted == {file_mode}
    assert {stat.S_IMODE(d.stat().st_mode) for d in [exp, *tables]} == {dir_mode}


def test_a_rerun_trial_gets_the_next_attempt_and_its_row_the_node_of_each(tmp_path):
    cb = writer(tmp_path)
    trial = make_trial("a")
    report(cb, trial, "phase1", 0, 1, "node-a")
    report(cb, trial, "phase1", 1, 2, "node-a")
    report(cb, trial, "phase1", 1, 1, "node-b")  # a retry on another node, from a checkpoint
    report(cb, trial, "final", 0, 2, "node-b", status="passed")
    cb.on_trial_complete(0, [], trial)
    assert trial.node_ids == ["node-a", "node-b"]
    trials, iterations = newllm.experiment.load(tmp_path)
    assert list(iterations.attempt) == [1, 1, 2, 2]
    assert list(iterations.node_id) == ["node-a", "node-a", "node-b", "node-b"]
    assert not iterations.duplicated(newllm.experiment.ITERATION_KEY).any()
    assert trials.attempts.tolist() == [2] and trials.node_ids.tolist() == ["node-a,node-b"]


def test_a_resumed_writer_continues_attempts_and_never_rewrites_a_landed_trial(tmp_path):
    first = writer(tmp_path)
    running, done = make_trial("running"), make_trial("done")
    report(first, running, "phase1", 0, 1, "node-a")
    report(first, running, "analysis", 0, 2, "node-a", should_checkpoint=True)
    run_trial(first, "done", "node-a")
    # the driver dies; a new one resumes the experiment with a new callback
    second = writer(tmp_path)
    report(second, running, "phase2", 0, 1, "node-b")  # restarted from its checkpoint
    report(second, running, "final", 0, 2, "node-b", status="passed")
    second.on_trial_complete(0, [], running)
    assert running.node_ids == ["node-a", "node-b"]
    # Tune reruns the finished trial its saved state missed: nothing of it is written again
    report(second, done, "final", 0, 1, "node-c", status="passed")
    second.on_trial_complete(0, [], done)
    second.on_experiment_end([running, done])

    trials, iterations = newllm.experiment.load(tmp_path)
    assert sorted(trials.trial_id) == ["done", "running"]
    assert trials.set_index("trial_id").attempts.to_dict() == {"done": 1, "running": 2}
    rows = iterations[iterations.trial_id == "running"]
    assert list(zip(rows.attempt, rows.phase, rows.node_id)) == [
        (1, "phase1", "node-a"), (1, "analysis", "node-a"), (2, "phase2", "node-b"), (2, "final", "node-b")]
    assert "node-c" not in set(iterations.node_id)
    assert not iterations.duplicated(newllm.experiment.ITERATION_KEY).any()


def test_rows_of_a_trial_the_resumed_search_does_not_know_are_dropped_at_the_end(tmp_path, capsys):
    first = writer(tmp_path)
    run_trial(first, "kept")
    ghost = make_trial("ghost")  # started after Tune's last snapshot; the driver dies
    report(first, ghost, "phase1", 0, 1, "node-a", should_checkpoint=True)
    second = writer(tmp_path)  # the resumed search runs a new trial in its place
    run_trial(second, "new")
    second.on_experiment_end([make_trial("kept"), make_trial("new")])
    trials, iterations = newllm.experiment.load(tmp_path)
    assert set(iterations.trial_id) == set(trials.trial_id) == {"kept", "new"}
    assert len(part_names(tmp_path / newllm.experiment.ITERATIONS_FILE)) == 1
    assert "Dropped 1 iteration rows" in capsys.readouterr().out


def test_an_errored_trial_lands_with_status_error(tmp_path):
    cb = writer(tmp_path)
    trial = make_trial("bad")
    report(cb, trial, "phase1", 0, 1)
    cb.on_trial_error(0, [], trial)
    trials, iterations = newllm.experiment.load(tmp_path)
    assert trials.status.tolist() == ["error"] and len(iterations) == 1


def test_a_resumed_search_runs_errored_trials_again_and_each_lands_once(tmp_path):
    cb = writer(tmp_path)
    good, bad = make_trial("good"), make_trial("bad")
    for trial in (good, bad):
        report(cb, trial, "phase1", 0, 1)
    cb.on_trial_complete(0, [], good)
    cb.on_trial_error(0, [], bad)
    newllm.experiment.compact(tmp_path)  # the first driver ended
    cb = writer(tmp_path)  # resumed: Tune runs the errored trial again (resume_errored)
    trials, _ = newllm.experiment.load(tmp_path)
    assert trials.trial_id.tolist() == ["good"]  # the error row is gone, the finished trial kept
    report(cb, bad, "phase1", 0, 1, node="node-b", status="passed")
    bad.last_result["status"] = "passed"
    cb.on_trial_complete(0, [], bad)
    trials, iterations = newllm.experiment.load(tmp_path)
    assert trials.trial_id.tolist() == ["good", "bad"] and trials.status.tolist()[1] == "passed"
    assert trials.node_ids.tolist()[1] == "node-a,node-b"
    assert iterations[iterations.trial_id == "bad"].attempt.tolist() == [1, 2]


def test_a_value_arrow_will_not_convert_gets_its_declared_dtype_through_pandas(tmp_path):
    cb = writer(tmp_path)
    run_trial(cb, "a")
    trial = make_trial("b")
    trial.config = {"lr": 0.02}
    cb.trial_row = lambda trial, result, node_ids: {**trial_row(trial, result, node_ids), "status": 404}
    cb.on_trial_complete(0, [], trial)
    trials, _ = newllm.experiment.load(tmp_path)
    assert trials.status.tolist() == ["passed", "404"] and str(trials.status.dtype) == "string"


def test_load_before_any_trial_finished(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a newllm experiment"):
        newllm.experiment.load(tmp_path)
    cb = writer(tmp_path / "started")  # a search whose first trial has not finished
    with pytest.raises(FileNotFoundError, match="has not reported anything yet"):
        newllm.experiment.load(tmp_path / "started")
    report(cb, make_trial("t1"), "phase1", 1, 1)
    cb.flush()
    trials, iterations = newllm.experiment.load(tmp_path / "started")  # rows while no trial has finished
    assert trials.empty and list(iterations.trial_id) == ["t1"]


def test_the_best_new_llm_trial_is_the_passed_one_with_the_lowest_objective():
    trials = pd.DataFrame({
        "trial_id": ["gate", "lstm", "a", "b", "c"],
        "family": ["newllm", "baseline", "newllm", "newllm", "newllm"],
        "status": ["gate_failed", "passed", "passed", "passed", None],
        "objective": [1.0, 2.0, 5.0, 5.0, 0.5],
    })
    assert best_newllm_trial(trials).trial_id == "a"  # not a baseline, a penalty or a null; first of ties
    assert best_newllm_trial(trials[trials.trial_id != "a"]).trial_id == "b"
    assert best_newllm_trial(trials[trials.status != "passed"]) is None
    # an experiment of New-LLM trials only may lack the family column
    assert best_newllm_trial(trials.drop(columns="family").iloc[2:]).trial_id == "a"


def test_the_progress_line_best_is_a_proposed_trials_never_a_siblings(capsys):
    progress = callbacks.Progress(total=3)
    for trial_id, objective, config in [("p", 50.0, {}), ("s", 40.0, {"ablation": "no_phase1"})]:
        trial = SimpleNamespace(trial_id=trial_id, config=config, last_result=packing.packed(
            {"phase": "final", "status": "passed", "objective": objective, "family": "newllm"}, ["objective"]))
        progress.on_trial_complete(0, [], trial)
    assert capsys.readouterr().out.splitlines()[-1].endswith("2/3 finished (2 passed) | best val_ppl 50.00 (p)")


def test_the_progress_line_counts_each_finished_trial_once_under_its_latest_status(capsys):
    # the counts are kept as trials finish (recounting every finished trial for each line grew as N²)
    progress = callbacks.Progress(total=3)
    for trial_id, status in [("r", "error"), ("q", "passed"), ("r", "passed"), ("g", "gate_failed")]:
        progress.finish(trial_id, status)
    progress.print_line()
    assert "3/3 finished (1 gate_failed, 2 passed) |" in capsys.readouterr().out.splitlines()[-1]


def test_pruning_keeps_each_finished_trials_first_and_latest_checkpoints(tmp_path):
    from newllm.search.storage import prune_checkpoints

    exp = tmp_path / "exp"
    rows = []
    for t in range(40):
        for c in range(1, 2 + t % 4):  # 1 to 4 checkpoints
            (exp / f"run_trial_{t:08x}" / f"checkpoint_{c:06d}").mkdir(parents=True)
        rows.append({"trial_id": f"{t:08x}", "checkpoint_path": f"run_trial_{t:08x}/checkpoint_{1 + t % 4:06d}"})
    (exp / "run_trial_unfinished" / "checkpoint_000001").mkdir(parents=True)
    (exp / "run_trial_unfinished" / "checkpoint_000002").mkdir()
    (exp / newllm.experiment.TRIALS_FILE).mkdir()
    pd.DataFrame(rows).to_parquet(exp / newllm.experiment.TRIALS_FILE / "part-000001.parquet", index=False)
    assert prune_checkpoints(str(exp)) == sum(max(0, t % 4 - 1) for t in range(40))
    for t in range(40):
        kept = sorted(p.name for p in (exp / f"run_trial_{t:08x}").iterdir())
        assert kept == sorted({"checkpoint_000001", f"checkpoint_{1 + t % 4:06d}"})
    assert len(list((exp / "run_trial_unfinished").iterdir())) == 2  # a resume may start from either
