"""ASHA stops a hopeless Phase 2: the stopped trial lands as passed with its best epoch, in both
tables, and its checkpoint is that epoch's model; a run resumed from a Phase 2 checkpoint ends
as the uninterrupted one."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import ray
import torch

from newllm import experiment, export
from newllm.search import algorithms
from newllm.checkpoint import load_model, save_model
from newllm.config import TrainConfig
from newllm.data import DataConfig, builtin_documents, prepare_data
from newllm.phase2 import stream_metrics
from newllm.run import EpochReport, build_model, checkpoint_record, resume_from, train_run
from newllm.space import load_space

# one worker runs this module under pytest -n: its module fixture runs one search, once
pytestmark = pytest.mark.xdist_group("scheduler")

STOP_SPACE = """
num_trials: 3
params:
  phase2_lr: {type: categorical, choices: [0.003, 1.0e-5]}
  gate_train_er: {type: categorical, choices: [0.0, 1.0]}
fixed:
  context_dim: 16
  embed_dim: 8
  num_layers: 1
  phase1_max_iter: 4
  phase1_streams: 4
  phase2_epochs: 3
  phase2_batch_size: 64
  gate_val_er: 0.0
data:
  num_samples: 6
  vocab_size: 300
"""

# one after the other: a trial that learns, one whose LR is too small to (clearly worse at epoch
# 1, where ASHA's first rung compares it with the first), one that fails the gate
POINTS = [{"phase2_lr": 0.003, "gate_train_er": 0.0}, {"phase2_lr": 1e-5, "gate_train_er": 0.0},
          {"phase2_lr": 1e-5, "gate_train_er": 1.0}]


@pytest.fixture(scope="module")
def stopped_search(tmp_path_factory):
    root = tmp_path_factory.mktemp("asha")
    (root / "stop.yaml").write_text(STOP_SPACE)
    space = load_space(str(root / "stop.yaml"))
    data = prepare_data(DataConfig(**space.data, cache_dir=str(root / "cache")))
    run = algorithms.SearchRun(name="stop", storage_root=str(root), space=space, data=data, num_trials=len(POINTS),
                               concurrency=1, points=tuple(POINTS))
    exp_dir = run.exp_dir
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        algorithms.run_search(run)
    finally:
        ray.shutdown()
    searcher = algorithms.KindSearch({}, space, data.vocab_size, "objective", "min")
    searcher.restore_from_dir(exp_dir)
    trials, iterations = experiment.load(exp_dir)
    return exp_dir, data, trials, iterations, searcher.searchers["newllm"]


@pytest.mark.slow
def test_a_stopped_trial_lands_as_passed_with_its_best_epoch_in_both_tables(stopped_search):
    _, _, trials, iterations, searcher = stopped_search
    learns, stopped, gated = (trials[(trials.phase2_lr == p["phase2_lr"]) & (trials.gate_train_er == p["gate_train_er"])]
                              .iloc[0] for p in POINTS)
    assert (learns.status, learns.phase2_stop_reason, learns.phase2_epochs_run) == ("passed", "max_epochs", 3)
    assert (stopped.status, stopped.phase2_stop_reason, stopped.phase2_epochs_run) == ("passed", "scheduler", 1)
    assert stopped.val_ppl > learns.val_ppl
    assert stopped.objective == stopped.val_ppl and stopped.phase2_best_epoch == 1
    assert pd_isna(stopped.final_effective_rank_fraction)  # no final analysis: it never ended by itself
    assert stopped.attempts == 1 and stopped.gate_passed
    # the gate-failed trial ran no Phase 2, so ASHA never saw it
    assert gated.status == "gate_failed" and pd_isna(gated.phase2_stop_reason)

    rows = iterations[iterations.trial_id == stopped.trial_id]
    assert list(rows.phase.drop_duplicates()) == ["phase1", "analysis", "phase2"]  # no final row
    epochs = rows[rows.phase == "phase2"]
    assert list(epochs.phase2_epoch) == [1] and epochs.val_ppl.min() == pytest.approx(stopped.val_ppl, rel=1e-9)
    assert iterations.loc[iterations.phase != "phase2", "phase2_epoch"].isna().all()

    # Optuna was told each trial's val perplexity: the stopped one's best epoch's, as a PRUNED trial, and
    # the gate-failed one's as a model that learned nothing (the vocabulary size), infeasible
    told = {t.user_attrs["trial_id"]: t for t in searcher._ot_study.trials}
    assert (told[learns.trial_id].state.name, told[stopped.trial_id].state.name) == ("COMPLETE", "PRUNED")
    assert told[learns.trial_id].value == pytest.approx(learns.val_ppl)
    assert told[stopped.trial_id].value == pytest.approx(stopped.val_ppl)
    assert told[gated.trial_id].value == searcher.learned_nothing
    assert max(told[gated.trial_id].system_attrs["constraints"]) > 0


@pytest.mark.slow
def test_a_stopped_trials_checkpoint_is_its_best_epochs_model(stopped_search, tmp_path):
    exp_dir, data, trials, _, _ = stopped_search
    stopped = trials[trials.phase2_stop_reason == "scheduler"].iloc[0]
    model, _ = load_model(experiment.checkpoint_dir(exp_dir, stopped.checkpoint_path))
    assert math.exp(stream_metrics(model, data.val_ids)[0]) == pytest.approx(stopped.val_ppl, rel=1e-6)
    out = tmp_path / "hf"
    assert export.main([exp_dir, "--trial", stopped.trial_id, "--out", str(out)]) == 0
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("epochs, last", [(1, 1), (9, 3)])  # ASHA's rungs: epoch 1 of 1; epochs 1, 3 and 9 of 9
def test_asha_never_cuts_a_trial_at_its_last_epoch(tmp_path, epochs, last):
    """A trial whose last epoch falls on a rung, and is worse there than the trial before it: ASHA
    records it, and the search lets it end by itself; the epoch before its last is still cut."""
    (tmp_path / "s.yaml").write_text(f"params: {{num_layers: {{type: int, low: 1, high: 2}}}}\n"
                                     f"fixed: {{phase2_epochs: {epochs}}}\n")
    asha = algorithms.scheduler(None, load_space(str(tmp_path / "s.yaml")))
    asha.set_search_properties("objective", "min")
    good, worse, cut = (SimpleNamespace(trial_id=name, config={}) for name in ("good", "worse", "cut"))
    for trial in (good, worse, cut):
        asha.on_trial_add(None, trial)

    def row(epoch: int, value: float, is_last: bool) -> dict:
        return {"phase2_epoch": epoch, "objective": value, "phase2_last_epoch": is_last}

    assert asha.on_trial_result(None, good, row(last, 10.0, False)) == asha.CONTINUE
    assert asha.on_trial_result(None, worse, row(last, 100.0, True)) == asha.CONTINUE
    assert asha.on_trial_result(None, cut, row(last, 100.0, False)) == asha.STOP


def pd_isna(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value) in ("<NA>", "nan")


@pytest.mark.parametrize("freeze_context", [False, True])
def test_a_run_resumed_from_a_phase2_checkpoint_ends_as_the_uninterrupted_one(tmp_path, freeze_context):
    cfg = TrainConfig(context_dim=8, embed_dim=8, hidden_dim=16, num_layers=1, phase1_max_iter=3, phase1_streams=4,
                      phase2_epochs=4, phase2_patience=4, phase2_lr=3e-3, phase2_batch_size=32, seed=0,
                      gate_train_er=0.0, gate_val_er=0.0, freeze_context=freeze_context)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(d[:1500] for d in builtin_documents()[:6]))
    data = prepare_data(DataConfig(source=str(corpus), num_samples=0, vocab_size=300, cache_dir=str(tmp_path)))
    torch.set_num_threads(1)

    saved = []

    def save_at_epoch_2(epoch: EpochReport) -> None:
        if epoch.record.epoch == 2:
            assert epoch.state is not None, "epoch 2 did not improve: pick a higher LR"
            save_model(tmp_path / "ckpt", model, data.tokenizer_json, train_config=cfg.to_dict(),
                       **checkpoint_record(epoch.if_stopped, epoch.state))
            saved.append(epoch.if_stopped.summary())

    model = build_model(cfg, data.vocab_size)
    whole = train_run(cfg, data, model, on_epoch=save_at_epoch_2)
    # the checkpoint's model is what its "stopped here" summary says
    restored, record = load_model(tmp_path / "ckpt")
    assert math.exp(stream_metrics(restored, data.val_ids)[0]) == pytest.approx(saved[0]["val_ppl"], rel=1e-6)
    assert saved[0]["phase2_stop_reason"] == "scheduler" and saved[0]["phase2_epochs_run"] == 2

    resumed = train_run(cfg, data, restored, resume=resume_from(record))
    assert [r.epoch for r in resumed.phase2.history] == [1, 2, 3, 4]
    assert resumed.train_analysis == whole.train_analysis and resumed.gate == whole.gate
    a, b = whole.summary(), resumed.summary()
    changing = {"phase2_seconds", "final_analysis_seconds"}
    # default mode resumes bit for bit; freeze_context recomputes the fixed train contexts it
    # trains the head on, which match Phase 1's within the convergence tolerance
    tolerance = 1e-2 if freeze_context else 1e-9
    for key in a.keys() - changing:
        if isinstance(a[key], float):
            assert b[key] == pytest.approx(a[key], rel=tolerance), key
        else:
            assert b[key] == a[key], key


class FakeTune:
    """The part of ``ray.tune`` a trainable uses, without Ray: rows (unpacked, as the driver reads
    them) and checkpoints are kept (checkpoint directories copied, as Tune persists them), and
    ``start`` is the checkpoint the trial starts from."""

    Checkpoint = None  # set to ray.tune.Checkpoint in __init__

    def __init__(self, root, start=None):
        from ray import tune

        self.Checkpoint, self.root, self.start = tune.Checkpoint, root, start
        self.reports: list[dict] = []  # as reported
        self.rows: list[dict] = []
        self.checkpoints: list = []  # (row, checkpoint)

    def get_checkpoint(self):
        return self.start

    def report(self, result: dict, checkpoint=None) -> None:
        import shutil

        from newllm.search.packing import reported_row

        row = reported_row(result)
        self.reports.append(result)
        self.rows.append(row)
        if checkpoint is not None:
            kept = self.root / f"checkpoint_{len(self.checkpoints):03d}"
            shutil.copytree(checkpoint.path, kept)
            self.checkpoints.append((row, self.Checkpoint.from_directory(str(kept))))


class FakeContext:
    def get_node_id(self) -> str:
        return "node"

    def get_assigned_resources(self) -> dict:
        return {"CPU": 1}


def run_without_ray(root, monkeypatch, config: dict, space, data, start=None) -> FakeTune:
    """``run_trial`` of ``config`` with ``ray.tune`` replaced by a FakeTune in ``root``, starting
    from the checkpoint ``start``."""
    from types import SimpleNamespace

    from newllm.search import trainable

    monkeypatch.setattr(trainable, "ray", SimpleNamespace(get_runtime_context=FakeContext))
    fake = FakeTune(root, start)
    root.mkdir()
    monkeypatch.setattr(trainable, "tune", fake)
    trainable.run_trial(config, space, data)
    return fake


def test_a_trial_retried_in_its_second_replicate_ends_as_the_uninterrupted_one(tmp_path, monkeypatch):
    import dataclasses

    from newllm.space import parse_space

    space = dataclasses.replace(parse_space(STOP_SPACE, "stop.yaml"), repeats=2)
    data = prepare_data(DataConfig(**space.data, cache_dir=str(tmp_path / "cache")))
    config = {"phase2_lr": 0.003, "gate_train_er": 0.0}

    def run(name: str, start=None) -> FakeTune:
        return run_without_ray(tmp_path / name, monkeypatch, config, space, data, start)

    whole = run("whole")
    assert [r["replicate"] for r in whole.rows if r["phase"] == "analysis"] == [0, 1]
    # the node is lost after replicate 1's Phase 1 checkpoint: Tune retries from it
    start = next(c for row, c in whole.checkpoints if row["phase"] == "analysis" and row["replicate"] == 1)
    retried = run("retried", start)
    # replicate 0 is not run again (the final row, the trial's, describes replicate 0's model)
    assert {r["replicate"] for r in retried.rows if r["phase"] != "final"} == {1}
    a, b = whole.rows[-1], retried.rows[-1]
    assert a["phase"] == b["phase"] == "final" and b["phase1_restored"]
    assert (b["val_ppl"], b["replicates"], b["replicates_passed"]) == (a["val_ppl"], 2, 2)  # replicate 0's, kept
    # replicate 1 redid its analysis from the restored weights: its fixed contexts start from
    # pass 0 instead of Phase 1's last pass, equal within the convergence tolerance, so its val
    # perplexity (in the mean) is within 1%; the std, a difference of two close numbers, is not
    for key in ("objective", "val_ppl_mean"):
        assert b[key] == pytest.approx(a[key], rel=1e-2), key
    # the final checkpoint of both holds replicate 0's model, the one the row's val_ppl describes
    for fake in (whole, retried):
        model, _ = load_model(fake.checkpoints[-1][1].path)
        assert math.exp(stream_metrics(model, data.val_ids)[0]) == pytest.approx(a["val_ppl"], rel=1e-6)


def test_a_retried_baseline_trial_starts_again_and_ends_as_the_uninterrupted_one(tmp_path, monkeypatch):
    import dataclasses

    from newllm.baselines import baseline_stream_metrics
    from newllm.space import Baselines, parse_space

    space = dataclasses.replace(parse_space(STOP_SPACE, "stop.yaml"), baselines=Baselines())
    data = prepare_data(DataConfig(**space.data, cache_dir=str(tmp_path / "cache")))
    config = space.baseline_trial("gru", POINTS[0], {"phase2_lr": 0.01}, data.vocab_size)

    def run(name: str, start=None) -> FakeTune:
        return run_without_ray(tmp_path / name, monkeypatch, config, space, data, start)

    whole = run("whole")
    assert [r["phase"] for r in whole.rows] == ["phase2"] * 3 + ["final"]
    assert all(r["family"] == "baseline" for r in whole.rows)
    # the node is lost after epoch 1's checkpoint: the retry trains again from the seed
    start = next(c for row, c in whole.checkpoints if row["phase"] == "phase2")
    retried = run("retried", start)
    assert [r["step"] for r in retried.rows if r["phase"] == "phase2"] == [1, 2, 3]
    a, b = whole.rows[-1], retried.rows[-1]
    assert not b["phase1_restored"] and b["val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-9)
    model, _ = load_model(retried.checkpoints[-1][1].path)
    assert math.exp(baseline_stream_metrics(model, data.val_ids)[0]) == pytest.approx(a["val_ppl"], rel=1e-6)


def test_a_report_gives_tune_as_numbers_only_what_the_scheduler_and_searcher_read(tmp_path, monkeypatch):
    """Tune tracks each number of a report, key by key, in its experiment state: a trial reports
    as numbers ASHA's time and metric, whether the epoch is its last (``KindScheduler``) and
    the metrics its study minimises, and its whole row packed in one string."""
    from ray.tune.experiment import Trial

    from newllm.search.packing import ROW
    from newllm.space import parse_space

    space = parse_space(STOP_SPACE + "objectives: [val_ppl, num_params]\n", "stop.yaml")
    data = prepare_data(DataConfig(**space.data, cache_dir=str(tmp_path / "cache")))
    fake = run_without_ray(tmp_path / "run", monkeypatch, POINTS[0], space, data)
    asha = algorithms.scheduler(None, space).schedulers["newllm"]
    read = {asha._time_attr, asha._metric, "phase2_last_epoch", *space.metrics}
    assert read == {"phase2_epoch", "objective", "phase2_last_epoch", "num_params"}
    assert [r["phase"] for r in fake.rows][-5:] == ["analysis", "phase2", "phase2", "phase2", "final"]
    assert read <= fake.rows[-2].keys()
    for result, row in zip(fake.reports, fake.rows):
        assert result.keys() == read & row.keys() | {ROW}, row["phase"]  # the rest is in the packed row
        trial = Trial("run_trial", stub=True)
        trial.update_last_result(dict(result))  # as Tune takes a result
        assert set(trial.metric_analysis) == read & row.keys(), row["phase"]


def test_the_next_trial_is_the_first_pending_one_made_looked_for_among_the_live_trials_only():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from newllm.space import parse_space

    space = parse_space(STOP_SPACE, "stop.yaml")
    fifo = algorithms.scheduler("none", space)
    assert isinstance(fifo, algorithms.KindScheduler) and type(fifo.schedulers["newllm"]) is FIFOScheduler
    trials = [Trial("run_trial", stub=True, config={}) for _ in range(6)]
    live = set(trials)

    class Controller:  # what Tune hands a scheduler: it may scan get_trials(), which holds every trial made
        def get_live_trials(self):
            return live

        def get_trials(self):
            raise AssertionError("scanned every trial made")

    controller = Controller()
    for trial in trials:
        fifo.on_trial_add(controller, trial)
    assert fifo.choose_trial_to_run(controller) is trials[0]  # all pending: the first made
    for t, status in zip(trials, ["TERMINATED", "RUNNING", "PAUSED", "RUNNING", "PENDING", "PENDING"]):
        t.set_status(status)
    live.discard(trials[0])
    fifo.on_trial_complete(controller, trials[0], {})
    assert fifo.choose_trial_to_run(controller) is trials[4]
    trials[4].set_status("RUNNING"), trials[5].set_status("RUNNING")
    assert fifo.choose_trial_to_run(controller) is trials[2]  # no pending one: the first paused one
    trials[2].set_status("RUNNING")
    assert fifo.choose_trial_to_run(controller) is None
    assert fifo.on_trial_result(controller, trials[1], {"phase2_epoch": 1, "objective": 5.0}) == TrialScheduler.CONTINUE
