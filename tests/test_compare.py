"""Baselines and ablations in the search: the same trainable and trials table, sizes matched to
the New-LLM trials, siblings that differ from their parent in one setting, one study per proposed
kind and one ASHA per kind, floors, and export refusing a baseline."""

from __future__ import annotations

import dataclasses
import math
import os
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import TINY_SPACE

from newllm import experiment
from newllm.baselines import baseline_stream_metrics
from newllm.checkpoint import load_model, save_model
from newllm.config import TrainConfig
from newllm.data import DataConfig, prepare_data
from newllm.phase2 import sequential_stream_metrics
from newllm.run import SUMMARY_DTYPES, build_model, train_run
from newllm.space import ABLATION, ABLATIONS, MATCHED, Baselines, SpaceError, load_space, parse_space, resolve_space

# one worker runs this module under pytest -n: its module fixture runs one search, once
pytestmark = pytest.mark.xdist_group("compare")

# the tiny space of the search tests, its gate open, with a point, ablations and baselines
COMPARE_SPACE = TINY_SPACE % "gate_train_er: 0.0\n  gate_val_er: 0.0" + """
points:
  - {context_dim: 16}
ablations: [no_phase1, no_dist_reg]
baselines:
  params:
    phase2_lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  fixed: {context_window: 16, num_heads: 1}  # one head: the transformer's width in steps of 1
"""

PHASE1_COLUMNS = ["phase1_passes", "converged_ratio", "train_effective_rank_fraction", "val_effective_rank_fraction",
                  "gate_passed", "phase1_seconds"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    space = parse_space(COMPARE_SPACE, "compare.yaml")
    return prepare_data(DataConfig(**space.data, cache_dir=str(tmp_path_factory.mktemp("cache"))))


# --- configuration --------------------------------------------------------------------------------


def test_a_baseline_config_says_which_settings_it_ignores():
    cfg = TrainConfig(architecture="gru", embed_dim=8, hidden_dim=20, context_dim=99, phase1_lr_warmup=0.01)
    assert cfg.family == "baseline" and cfg.ignored() == ["context_dim", "phase1_lr_warmup"]
    newllm = TrainConfig(context_dim=16, embed_dim=16, hidden_dim=32, dropout=0.1)
    assert newllm.family == "newllm" and newllm.ignored() == ["dropout"]
    with pytest.raises(ValueError, match="context_window"):
        TrainConfig(architecture="transformer", hidden_dim=16, context_window=4, phase2_bptt=8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TrainConfig(architecture="transformer", hidden_dim=15, num_heads=2)


@pytest.mark.parametrize("arch", ["residual", "lstm", "transformer"])
def test_the_non_embedding_count_of_a_config_is_its_models(arch):
    cfg = TrainConfig(architecture=arch, context_dim=16, embed_dim=8, hidden_dim=24, num_layers=2)
    model = build_model(cfg, 300)
    tables = 300 * 8 + (cfg.context_window * 24 if arch == "transformer" else 0)  # tokens (and positions)
    assert cfg.non_embedding_params(300) == model.num_params(non_embedding=True) == model.num_params() - tables


def test_baselines_belong_in_their_own_section():
    with pytest.raises(SpaceError, match="baselines section"):
        parse_space("params:\n  architecture: {type: categorical, choices: [residual, lstm]}\n", "s.yaml")
    with pytest.raises(SpaceError, match="hidden_dim is matched"):
        parse_space(COMPARE_SPACE.replace("fixed: {context_window: 16,", "fixed: {hidden_dim: 16,"), "s.yaml")
    with pytest.raises(SpaceError, match="architectures"):
        parse_space(COMPARE_SPACE.replace("  params:\n    phase2_lr", "  architectures: [rnn]\n  params:\n    phase2_lr"),
                    "s.yaml")
    space = parse_space(COMPARE_SPACE, "s.yaml")
    assert parse_space(space.to_yaml(), "again.yaml").baselines == space.baselines
    assert parse_space(COMPARE_SPACE.split("baselines:")[0] + "baselines: {}\n", "s.yaml").baselines == Baselines()


@pytest.mark.parametrize("arch", ["lstm", "gru", "transformer"])
def test_baselines_match_the_new_llm_trials_within_ten_percent_at_every_laptop_size(arch):
    space = dataclasses.replace(load_space(resolve_space("laptop")), baselines=Baselines())
    targets = set()
    for c in (16, 32, 64):
        for e in (16, 32):
            for layers in (1, 3):
                matched = {"architecture": "gated", "context_dim": c, "embed_dim": e, "num_layers": layers}
                target = space.trial_config(matched).non_embedding_params(500)
                cfg = space.trial_config(space.baseline_trial(arch, matched, {"phase2_lr": 3e-3}, 500))
                assert cfg.architecture == arch and (cfg.embed_dim, cfg.num_layers) == (e, layers)
                assert abs(build_model(cfg, 500).num_params(non_embedding=True) - target) <= 0.1 * target
                targets.add(target)
    assert len(targets) >= 3


def test_a_size_no_baseline_can_match_fails_before_the_search():
    space = parse_space(COMPARE_SPACE.replace("num_heads: 1}", "num_heads: 16}"),
                        "s.yaml")
    with pytest.raises(SpaceError, match="transformer baseline .* within 10%"):
        space.check_baselines(300)


# --- one run ---------------------------------------------------------------------------------------


def test_a_baseline_run_has_the_summary_columns_with_phase1_null_and_measures_its_model(tiny_data, tmp_path):
    cfg = TrainConfig(architecture="lstm", embed_dim=8, hidden_dim=16, num_layers=1, phase2_lr=3e-3,
                      phase2_epochs=2, phase2_batch_size=64)
    model = build_model(cfg, tiny_data.vocab_size)
    epochs = []
    result = train_run(cfg, tiny_data, model, on_pass=pytest.fail, on_gate=pytest.fail, on_epoch=epochs.append)
    summary = result.summary()
    assert summary.keys() == SUMMARY_DTYPES.keys()
    assert summary["family"] == "baseline" and summary["status"] == "passed"
    assert all(summary[k] is None for k in PHASE1_COLUMNS)
    assert [e.record.epoch for e in epochs] == [1, 2] and all(e.state is None for e in epochs)
    assert summary["num_params_non_embedding"] == summary["num_params"] - tiny_data.vocab_size * 8
    # the saved model measures what the summary says
    save_model(tmp_path, model, tiny_data.tokenizer_json, train_config=cfg.to_dict())
    loaded, _ = load_model(tmp_path)
    assert math.exp(baseline_stream_metrics(loaded, tiny_data.val_ids)[0]) == pytest.approx(summary["val_ppl"],
                                                                                               rel=1e-6)


# --- the scheduler: one ASHA per kind --------------------------------------------------------------


def test_asha_compares_a_trial_only_with_trials_of_its_own_kind():
    from ray.tune.schedulers import TrialScheduler

    from newllm.search.algorithms import scheduler

    space = parse_space(COMPARE_SPACE, "s.yaml")
    asha = scheduler("asha", space)
    trials = {name: SimpleNamespace(trial_id=name, config=config) for name, config in
              [("good", {"context_dim": 16}), ("bad", {"context_dim": 32}), ("lstm", {"architecture": "lstm"})]}
    for t in trials.values():
        asha.on_trial_add(None, t)

    def at_first_rung(name: str, ppl: float) -> str:
        return asha.on_trial_result(None, trials[name], {"phase2_epoch": 1, "objective": ppl})

    assert at_first_rung("good", 10.0) == TrialScheduler.CONTINUE
    assert at_first_rung("bad", 50.0) == TrialScheduler.STOP
    # far worse than both New-LLM trials, but the first LSTM at this rung: it goes on
    assert at_first_rung("lstm", 500.0) == TrialScheduler.CONTINUE


def test_points_must_name_searched_parameters_inside_their_ranges():
    with pytest.raises(SpaceError, match=r"points\[0\]\.embed_dim is not a searched parameter"):
        parse_space(COMPARE_SPACE.replace("{context_dim: 16}", "{embed_dim: 32}"), "s.yaml")
    with pytest.raises(SpaceError, match=r"points\[0\]\.context_dim = 24 is outside"):
        parse_space(COMPARE_SPACE.replace("{context_dim: 16}", "{context_dim: 24}"), "s.yaml")
    with pytest.raises(SpaceError, match=r"points\[0\]\.dist_reg_weight = 0.9 is outside"):
        parse_space(COMPARE_SPACE.replace("{context_dim: 16}", "{dist_reg_weight: 0.9}"), "s.yaml")


def test_the_search_takes_turns_and_picks_up_where_it_was_saved(tmp_path):
    import optuna

    from newllm.search.algorithms import NEWLLM, KindSearch, StudySearch, study_names

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = parse_space(COMPARE_SPACE, "s.yaml")

    def family_search() -> KindSearch:
        searchers = {k: StudySearch(space=space.params if k == NEWLLM else space.baselines.params,
                                    metric="objective", mode="min", study_name=name,
                                    sampler=optuna.samplers.RandomSampler(seed=0), kind=k, learned_nothing=300.0)
                     for k, name in study_names("s", space).items()}
        return KindSearch(searchers, space, 300, "objective", "min")

    searcher = family_search()
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    assert [c.get("architecture", "residual") for c in configs] == ["residual"] * 3 + ["lstm", "gru", "transformer"]
    assert [c.get(ABLATION) for c in configs[:3]] == [None, "no_phase1", "no_dist_reg"]
    assert all(c[MATCHED] == "t0" for c in configs[1:])
    # a sibling is its parent's sampled values, naming its ablation and parent
    assert all({k: v for k, v in c.items() if k not in (ABLATION, MATCHED)} == configs[0] for c in configs[1:3])
    for i, c in enumerate(configs):
        searcher.on_trial_complete(f"t{i}", {"objective": 50.0 + i, **c})
    searcher.save(str(tmp_path / "state.pkl"))

    restored = family_search()
    restored.restore(str(tmp_path / "state.pkl"))
    new = restored.suggest("t6")
    assert "architecture" not in new and restored.suggest("t7") == {**new, ABLATION: "no_phase1", MATCHED: "t6"}
    assert restored.suggest("t8")[ABLATION] == "no_dist_reg" and restored.suggest("t9")[MATCHED] == "t6"
    assert len(restored.searchers["lstm"]._ot_study.trials) == 2  # its finished trial, and t9's
    assert len(restored.searchers[NEWLLM]._ot_study.trials) == 2  # t0 and t6: no sibling


# --- the search: the same trainable, the same table -------------------------------------------------


@pytest.fixture(scope="module")
def compare_search(tmp_path_factory):
    import ray

    from newllm.search import cli

    root = tmp_path_factory.mktemp("compare")
    space = root / "compare.yaml"
    space.write_text(COMPARE_SPACE)
    saved = os.environ.get("NEWLLM_CACHE")
    os.environ["NEWLLM_CACHE"] = str(root / "cache")
    try:
        assert cli.main(["--local", "--space", str(space), "--name", "cmp", "--storage-path",
                            str(root / "res"), "--scheduler", "none", "--num-trials", "1"]) == 0
        data = prepare_data(DataConfig(**load_space(space).data))
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("NEWLLM_CACHE")
        else:
            os.environ["NEWLLM_CACHE"] = saved
    return SimpleNamespace(directory=root / "res" / "cmp", data=data)


@pytest.mark.slow
def test_a_comparison_search_has_a_trial_of_every_family_in_one_table(compare_search):
    from newllm.experiment import load

    trials, iterations = load(compare_search.directory)
    assert sorted(trials.architecture) == ["gru", "lstm", "residual", "residual", "residual", "transformer"]
    newllm = trials[(trials.family == "newllm") & trials[ABLATION].isna()].iloc[0]
    assert newllm.context_dim == 16 and 0.1 <= newllm.dist_reg_weight <= 0.8  # the space's point, the rest sampled
    baselines = trials[trials.family == "baseline"]
    assert len(baselines) == 3 and (baselines[MATCHED] == newllm.trial_id).all()
    assert pd.isna(newllm[MATCHED]) and baselines[ABLATION].isna().all()
    assert baselines[PHASE1_COLUMNS].isna().all().all() and baselines.context_dim.isna().all()
    assert (baselines.status == "passed").all() and baselines.val_ppl.notna().all()
    target = newllm.num_params_non_embedding
    assert ((baselines.num_params_non_embedding - target).abs() <= 0.1 * target).all()
    # the baselines inherit the New-LLM trial's shared settings, except their own learning rates
    assert (baselines.embed_dim == 8).all() and (baselines.phase2_epochs == 2).all()
    assert baselines.phase2_lr.between(1e-3, 1e-2).all() and newllm.phase2_lr == 0.001
    # a baseline's rows are Phase 2 epochs and its final row: no Phase 1, no analysis
    rows = iterations[iterations.trial_id.isin(baselines.trial_id)]
    assert set(rows.phase) == {"phase2", "final"}
    # each baseline's checkpoint is the model its row measures
    for row in baselines.itertuples():
        model, _ = load_model(experiment.checkpoint_dir(compare_search.directory, row.checkpoint_path))
        val = baseline_stream_metrics(model, compare_search.data.val_ids)[0]
        assert math.exp(val) == pytest.approx(row.val_ppl, rel=1e-6)


@pytest.mark.slow
def test_each_kind_has_its_own_optuna_study(compare_search):
    import optuna

    from newllm.experiment import load
    from newllm.search.storage import open_storage

    trials, _ = load(compare_search.directory)
    storage = open_storage(str(compare_search.directory / "optuna.journal"))
    studies = {s.study_name: s for s in optuna.study.get_all_study_summaries(storage)}
    assert sorted(studies) == ["cmp", "cmp-gru", "cmp-lstm", "cmp-transformer"]
    # the New-LLM study holds its one trial, not its siblings: they are measurements, not proposals
    (newllm,) = optuna.load_study(study_name="cmp", storage=storage).trials
    parent = trials[(trials.family == "newllm") & trials[ABLATION].isna()].iloc[0]
    assert newllm.user_attrs["trial_id"] == parent.trial_id
    for arch in ("lstm", "gru", "transformer"):
        (trial,) = optuna.load_study(study_name=f"cmp-{arch}", storage=storage).trials
        row = trials[trials.architecture == arch].iloc[0]
        assert set(trial.params) == {"phase2_lr"} and trial.params["phase2_lr"] == row.phase2_lr
        assert trial.value == row.objective


@pytest.mark.slow
def test_a_sibling_differs_from_its_parent_only_in_its_ablated_setting(compare_search):
    from newllm.config import field_types
    from newllm.experiment import load

    trials, iterations = load(compare_search.directory)
    siblings = trials[trials[ABLATION].notna()]
    assert sorted(siblings[ABLATION]) == sorted(ABLATIONS) and (siblings.family == "newllm").all()
    for sibling in siblings.itertuples():
        parent = trials[trials.trial_id == getattr(sibling, MATCHED)].iloc[0]
        changed = {k for k in field_types() if not (pd.isna(parent[k]) and pd.isna(getattr(sibling, k)))
                   and parent[k] != getattr(sibling, k)}
        assert changed == set(ABLATIONS[getattr(sibling, ABLATION)]), changed
        assert all(getattr(sibling, k) == v for k, v in ABLATIONS[getattr(sibling, ABLATION)].items())
        assert sibling.status == "passed" and sibling.val_ppl < compare_search.data.vocab_size
        # its checkpoint is the model its row measures, read by the sequential oracle
        model, _ = load_model(experiment.checkpoint_dir(compare_search.directory, sibling.checkpoint_path))
        val = sequential_stream_metrics(model, compare_search.data.val_ids)[0]
        assert math.exp(val) == pytest.approx(sibling.val_ppl, rel=1e-2)
    no_phase1 = siblings[siblings[ABLATION] == "no_phase1"].iloc[0]
    assert no_phase1[PHASE1_COLUMNS].isna().all()  # null where Phase 1 did not run: no passes, analysis or gate
    assert set(iterations[iterations.trial_id == no_phase1.trial_id].phase) == {"phase2", "final"}
    no_dist_reg = siblings[siblings[ABLATION] == "no_dist_reg"].iloc[0]
    assert set(iterations[iterations.trial_id == no_dist_reg.trial_id].phase) == {"phase1", "analysis", "phase2",
                                                                                  "final"}


@pytest.mark.slow
def test_export_refuses_a_baseline_trial(compare_search, tmp_path, capsys):
    from newllm import export
    from newllm.experiment import load

    trials, _ = load(compare_search.directory)
    lstm = trials[trials.architecture == "lstm"].iloc[0]
    assert export.main([str(compare_search.directory), "--trial", lstm.trial_id, "--out", str(tmp_path)]) == 2
    assert "lstm baseline, not a New-LLM model" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_search_records_the_floors_of_its_data(compare_search):
    from newllm.floors import bigram_ppl, recorded_floors, unigram_ppl

    d = compare_search.data
    values = recorded_floors(str(compare_search.directory))
    assert values["unigram_ppl"] == pytest.approx(unigram_ppl(d.train_ids, d.val_ids, d.vocab_size))
    assert values["bigram_ppl"] == pytest.approx(bigram_ppl(d.train_ids, d.val_ids, d.vocab_size))
    assert values["bigram_ppl"] < values["unigram_ppl"]
