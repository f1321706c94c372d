"""Faults of a running search and of the experiment it holds: a second driver, a killed driver's
claim, a cut Optuna journal, a moved experiment, a full disk, Ctrl+C, resources that can never be
had, and bad search options. Each ends in one line that names the problem (exit 2 for what the
user gave, 1 for a fault, 130 for an interruption), and nothing that had landed is lost."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from newllm import lock, results, search, storage

GATE_OPEN = "gate_train_er: 0.0\n  gate_val_er: 0.0"


# --- helpers -----------------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` and the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    """stderr without Ray's and Optuna's own log lines (timestamped, or Optuna's "[I ...]")."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(("[I ", "[W ", "20")) and "authentication" not in line]


def assert_one_line(stderr: str, *words: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


class Driver:
    """``python -m newllm.search`` in its own process group, with Ray's files in a short temp dir."""

    def __init__(self, tmp_path: Path):
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="nf", dir="/tmp"))  # Ray's socket paths must be short
        self.env = {**os.environ, "NEWLLM_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": str(self.ray_tmp),
                    "PYTHONUNBUFFERED": "1"}

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "newllm.search", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "newllm.search", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    @staticmethod
    def until_first_trial_lands(driver: subprocess.Popen) -> None:
        """Read the driver's output up to its first finished trial (the progress line says so)."""
        for line in driver.stdout:
            if " 1/" in line and "finished" in line:
                return
        raise AssertionError(f"the driver ended before a trial finished: {driver.wait()}, {driver.stderr.read()}")

    def close(self) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def first_to_exit(*processes: subprocess.Popen, within: float = 120) -> subprocess.Popen:
    """The first of ``processes`` to exit, waiting on each in turn (bounded)."""
    for _ in range(int(within)):
        for p in processes:
            try:
                p.wait(timeout=1 / len(processes))
                return p
            except subprocess.TimeoutExpired:
                pass
    raise AssertionError(f"none of the drivers exited within {within} s")


@pytest.fixture
def driver(tmp_path):
    d = Driver(tmp_path)
    yield d
    d.close()


def study_of(experiment: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment / storage.OPTUNA_JOURNAL))))


def assert_study_matches_table(experiment: Path, name: str) -> None:
    trials, iterations = results.load(experiment)
    assert trials.trial_id.is_unique and (trials.status == "passed").all()
    assert set(iterations.trial_id) == set(trials.trial_id)  # every landed trial kept its rows
    complete = [t.value for t in study_of(experiment, name).trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(complete) == pytest.approx(sorted(trials.objective))


# --- one driver per experiment -------------------------------------------------------------------


@pytest.mark.slow
def test_two_drivers_at_once_one_runs_and_a_killed_holders_cut_journal_resumes(tmp_path, tiny_space, driver):
    args = ["--local", "--space", tiny_space(GATE_OPEN), "--name", "two", "--storage-path", str(tmp_path / "res")]
    first, second = driver.start(*args), driver.start(*args)
    try:
        loser = first_to_exit(first, second)
        assert loser.returncode == 2  # exactly one was refused, at once; the other runs
        holder = second if loser is first else first
        line = assert_one_line(loser.stderr.read(), "is held by another driver", f"pid {holder.pid}", "host ")
        assert str(tmp_path / "res" / "two") in line
        driver.until_first_trial_lands(holder)
    finally:
        for d in (first, second):
            if d.poll() is None:
                os.killpg(d.pid, signal.SIGKILL)  # the holder dies with no chance to clean up
            d.wait()
    experiment = tmp_path / "res" / "two"
    # a driver killed mid-write leaves the journal's last record cut off
    journal = experiment / storage.OPTUNA_JOURNAL
    cut = journal.read_bytes()[:-9]
    journal.write_bytes(cut)
    done = driver.run("--resume", "--name", "two", "--storage-path", str(tmp_path / "res"), "--local")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    aside = list(experiment.glob(f"{storage.OPTUNA_JOURNAL}.partial-*"))
    assert len(aside) == 1 and f"kept in {aside[0]}" in done.stdout
    assert cut.endswith(aside[0].read_bytes())  # the cut record is set aside, not lost
    assert len(results.load(experiment)[0]) == 3
    assert_study_matches_table(experiment, "two")


def test_the_claim_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from newllm.lock import ExperimentLock; ExperimentLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); sys.stdin.read()"), str(tmp_path / "exp")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        claim = lock.ExperimentLock(str(tmp_path / "exp"))
        with pytest.raises(lock.ExperimentHeld, match=f"pid {holder.pid}"):
            claim.check_free()
        with pytest.raises(lock.ExperimentHeld, match=f"pid {holder.pid}"):
            claim.acquire()
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    with lock.ExperimentLock(str(tmp_path / "exp")):  # taken over without a manual step
        with pytest.raises(lock.ExperimentHeld, match=f"pid {os.getpid()}"):
            lock.ExperimentLock(str(tmp_path / "exp")).check_free()
    assert lock.ExperimentLock(str(tmp_path / "exp")).holder() is None


def test_a_lease_is_held_while_renewed_and_taken_over_when_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "LEASE_SETTLE_SECONDS", 0.0)
    first = lock.ExperimentLock(str(tmp_path / "exp"), lease=True)
    first.acquire()
    try:
        with pytest.raises(lock.ExperimentHeld, match=f"pid {os.getpid()}"):
            lock.ExperimentLock(str(tmp_path / "exp"), lease=True).acquire()
        # a holder that stopped renewing (killed) past the TTL: its lease is taken over
        monkeypatch.setattr(lock.time, "time", lambda: first._me.renewed + lock.LEASE_TTL_SECONDS + 1)
        second = lock.ExperimentLock(str(tmp_path / "exp"), lease=True)
        second.acquire()
        second.release()
    finally:
        first.release()


# --- the Optuna journal ----------------------------------------------------------------------------


def test_a_cut_journal_is_repaired_and_a_whole_last_record_kept(tmp_path):
    path = tmp_path / "optuna.journal"
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="s", storage=journal)
    for x in (1.0, 2.0, 3.0):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions={
            "x": optuna.distributions.FloatDistribution(0, 5)}, value=x))
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])  # a whole record without its newline: completed, nothing set aside
    assert storage.repair_journal(str(path)) is None and path.read_bytes() == whole
    path.write_bytes(whole[:-20])  # cut mid-record
    aside = storage.repair_journal(str(path))
    assert aside is not None and aside.read_bytes() == whole[whole.rfind(b"\n", 0, len(whole) - 1) + 1:-20]
    assert path.read_bytes().endswith(b"\n")
    reloaded = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path))))
    assert [t.value for t in reloaded.trials] == [1.0, 2.0]  # the cut record was the last trial's
    reloaded.add_trial(optuna.trial.create_trial(params={"x": 4.0}, distributions={
        "x": optuna.distributions.FloatDistribution(0, 5)}, value=4.0))  # appends on a line of its own
    assert storage.repair_journal(str(path)) is None


# --- a moved experiment ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_copied_experiment_resumes_and_exports_from_its_new_place(tmp_path, tiny_space, driver):
    from newllm import export

    old, new = tmp_path / "old", tmp_path / "new"
    running = driver.start("--local", "--space", tiny_space(GATE_OPEN), "--name", "m", "--storage-path", str(old))
    try:
        driver.until_first_trial_lands(running)
    finally:
        os.killpg(running.pid, signal.SIGKILL)
        running.wait()
    shutil.copytree(old / "m", new / "m")
    shutil.rmtree(old)
    done = driver.run("--resume", "--name", "m", "--storage-path", str(new), "--local")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not old.exists()  # nothing went to the original's place
    trials, _ = results.load(new / "m")
    assert len(trials) == 3 and not trials.checkpoint_path.str.startswith("/").any()
    assert_study_matches_table(new / "m", "m")
    shutil.copytree(new / "m", tmp_path / "again")  # and once more, finished, for the export
    shutil.rmtree(new)
    assert export.main([str(tmp_path / "again"), "--best", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


# --- faults at run time -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_that_says_how_to_resume(tmp_path, tiny_space, driver):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        r = driver.run("--local", "--space", tiny_space(GATE_OPEN), "--name", "f", "--storage-path", str(disk))
        assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
        line = assert_one_line(r.stderr, "No space left on device", "--resume --name f")
        assert line.startswith("error: ")
        trials, iterations = results.load(disk / "f")  # what had landed loads
        assert set(trials.trial_id) <= set(iterations.trial_id)
        assert not list(disk.rglob("report.html"))  # never half-written
        shutil.copytree(disk / "f", tmp_path / "big" / "f")
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    done = driver.run("--resume", "--name", "f", "--storage-path", str(tmp_path / "big"), "--local")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(results.load(tmp_path / "big" / "f")[0]) == 3


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_the_resume_command(tmp_path, tiny_space, driver):
    running = driver.start("--local", "--space", tiny_space(GATE_OPEN), "--name", "c", "--storage-path",
                           str(tmp_path / "res"))
    driver.until_first_trial_lands(running)
    os.killpg(running.pid, signal.SIGINT)  # Ctrl+C reaches the terminal's whole process group
    assert running.wait(timeout=120) == 130
    assert_one_line(running.stderr.read(), "interrupted:", "--resume --name c")
    assert not (tmp_path / "res" / "c" / "report.html").exists()
    assert len(results.load(tmp_path / "res" / "c")[0]) >= 1


# --- the writer never loses a finished trial's row ---------------------------------------------------


def fake_trial(trial_id: str, status: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={}, checkpoint=None, status=status,
                           last_result={"phase": "final", "status": "passed", "objective": 1.0})


def row(trial, result: dict, node_ids: list[str]) -> dict:
    return {"trial_id": trial.trial_id, "status": result.get("status"), "objective": result.get("objective")}


def test_a_rows_write_error_stops_the_search_and_the_resume_lands_the_row(tmp_path, monkeypatch):
    dtypes = {"trial_id": "string", "status": "string", "objective": "float64"}
    writer = results.ParquetResults(str(tmp_path), row, dtypes)
    writer.setup()
    trial = fake_trial("t1", "TERMINATED")
    full = OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(results, "write_file", lambda *a: (_ for _ in ()).throw(full))
        writer.on_trial_complete(0, [trial], trial)  # Tune would swallow an error raised here
    with pytest.raises(OSError, match="No space"):
        writer.on_step_begin(0, [trial])
    # the resumed search's writer lands the row of the trial that Tune has as finished
    resumed = results.ParquetResults(str(tmp_path), row, dtypes)
    resumed.setup()
    resumed.on_step_begin(0, [trial, fake_trial("t2", "RUNNING")])
    assert list(results.load(tmp_path)[0].trial_id) == ["t1"]


def test_the_end_of_search_clean_up_keeps_every_landed_trials_rows(tmp_path):
    dtypes = {"trial_id": "string", "status": "string", "objective": "float64"}
    writer = results.ParquetResults(str(tmp_path), row, dtypes)
    writer.setup()
    landed = fake_trial("landed", "TERMINATED")
    writer.on_trial_result(0, [], landed, {"phase": "phase1", "step": 1, "iterations_since_restore": 1})
    writer.on_trial_complete(0, [landed], landed)
    writer.on_experiment_end([])  # a Tune that does not know the trial (another driver's, say)
    trials, iterations = results.load(tmp_path)
    assert list(trials.trial_id) == ["landed"] and list(iterations.trial_id) == ["landed"]


# --- bad options: refused before anything is written --------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--seed", "-1"], ["--seed must be in [0, "]),
    (["--name", "x" * 300], ["is not an experiment name", "at most 100"]),
    (["--name", "a\nb"], ["is not an experiment name"]),
    (["--name", "../escape"], ["is not an experiment name"]),
    (["--name", ""], ["is not an experiment name"]),
    (["--resource-wait", "-1"], ["--resource-wait must be a finite number >= 0"]),
    (["--gpus-per-trial", "nan"], ["--gpus-per-trial must be a finite number >= 0"]),
    (["--storage-path", "bogus://x/y"], ["unknown scheme bogus://"]),
    (["--optuna-storage", "bogus://x/y"], ["--optuna-storage bogus://x/y is not an RDB URL"]),
    (["--optuna-storage", "sqlite:///{tmp}/missing/dir/o.db"], ["the directory", "does not exist"]),
    (["--optuna-storage", "{tmp}"], ["is a directory"]),
])
def test_bad_search_options_exit_2_and_write_nothing(tmp_path, tiny_space, capsys, args, words):
    space = tiny_space()
    before = tree_digest(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    name = [] if "--name" in args else ["--name", "x"]
    code = search.main(["--local", "--space", space, "--storage-path", str(tmp_path / "res"), *name, *args]
                       if "--storage-path" not in args else ["--local", "--space", space, *name, *args])
    assert code == 2
    assert_one_line(capsys.readouterr().err, *words)
    assert tree_digest(tmp_path) == before and not (tmp_path / "res").exists()


def test_a_storage_path_that_is_a_file_or_read_only_is_refused(tmp_path, tiny_space, capsys):
    space = tiny_space()
    (tmp_path / "file").write_text("x")
    assert search.main(["--space", space, "--name", "x", "--storage-path", str(tmp_path / "file")]) == 2
    assert_one_line(capsys.readouterr().err, f"--storage-path {tmp_path / 'file'} is a file")
    assert search.main(["--space", space, "--name", "x", "--storage-path", str(tmp_path / "file" / "sub")]) == 2
    assert_one_line(capsys.readouterr().err, f"is below the file {tmp_path / 'file'}")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert search.main(["--space", space, "--name", "x", "--storage-path", str(ro / "res")]) == 2
        assert_one_line(capsys.readouterr().err, "is on a read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("resources", [["--cpus-per-trial", "64"], ["--gpus-per-trial", "1"]])
def test_resources_no_node_can_give_are_refused_not_waited_for(tmp_path, tiny_space, driver, resources):
    r = driver.run("--local", "--space", tiny_space(), "--name", "r", "--storage-path", str(tmp_path / "res"),
                   *resources, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert_one_line(r.stderr, "no node of the Ray cluster fits one trial", "lower --cpus-per-trial")
    assert not (tmp_path / "res").exists()


def test_a_damaged_part_file_on_resume_is_named_and_nothing_changes(tiny_search, tmp_path, capsys):
    experiment = tmp_path / "res" / "tiny"
    shutil.copytree(tiny_search.directory, experiment)
    part = next((experiment / results.TRIALS_FILE).glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:100])  # cut off
    before = tree_digest(experiment)
    assert search.main(["--resume", "--name", "tiny", "--storage-path", str(tmp_path / "res"), "--local"]) == 2
    assert_one_line(capsys.readouterr().err, f"{part} is not a readable Parquet file")
    assert tree_digest(experiment) == before
