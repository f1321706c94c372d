"""Failing well: every command checks every flag and every file it reads before it writes or
trains anything, and answers a bad one with exit code 2 and one ``error:`` line that names it
(no traceback); what it writes, it writes under a temporary name renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from newllm import analyze, export, train
from newllm.checkpoint import MODEL_FILE, TOKENIZER_FILE, save_model
from newllm.config import TrainConfig
from newllm.data import DataConfig, builtin_documents, train_tokenizer
from newllm.floors import FLOORS_FILE
from newllm.model import ModelConfig, NewLLM
from newllm.space import DISTRIBUTIONS_FILE, SPACE_FILE, SpaceError, load_space, recorded_space

TINY = ["--context-dim", "8", "--embed-dim", "8", "--hidden-dim", "16", "--num-layers", "1",
        "--num-samples", "6", "--vocab-size", "300"]
PARAMS = "params:\n  context_dim: {type: int, low: 8, high: 16}\n"


def assert_one_error(err: str, *names: str) -> str:
    """``err`` is one ``error:`` line naming each of ``names``, without a traceback; returns it."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(name in lines[0] for name in names), lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (or ``root`` itself) by relative path, with its bytes."""
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The tokenizer cache, under tmp_path (nothing is there until a tokenizer is trained)."""
    monkeypatch.setenv("NEWLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- search-space files ------------------------------------------------------------------------


@pytest.mark.parametrize("content, key, lines", [
    ("params:\n  context_dim: {type: int, low: 8, high: 16}\n  context_dim: {type: int, low: 8, high: 32}\n",
     "'context_dim'", "lines 2 and 3"),
    (PARAMS + "fixed:\n  embed_dim: 8\n  phase2_lr: 0.001\n  embed_dim: 16\n", "'embed_dim'", "lines 4 and 6"),
    (PARAMS + "data:\n  num_samples: 6\n  num_samples: 7\n", "'num_samples'", "lines 4 and 5"),
    (PARAMS + "baselines:\n  fixed: {dropout: 0.1}\n  fixed: {dropout: 0.2}\n", "'fixed'", "lines 4 and 5"),
    ("params: {context_dim: {type: int, low: 8, high: 16, low: 4}}\n", "'low'", "line 1"),
    (PARAMS + "num_trials: 4\nnum_trials: 8\n", "'num_trials'", "lines 3 and 4"),
])
def test_space_refuses_a_key_given_twice(tmp_path, content, key, lines):
    path = tmp_path / "space.yaml"
    path.write_text(content)
    with pytest.raises(SpaceError) as e:
        load_space(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and f"the key {key} is given twice" in message and lines in message
    assert "\n" not in message


def test_space_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  context_dim: &ints {type: int, low: 8, high: 16}\n"
                    "  num_layers: {<<: *ints, low: 1, high: 2}\n")
    assert (load_space(path).params["num_layers"].low, load_space(path).params["num_layers"].high) == (1, 2)


@pytest.mark.parametrize("content, problem", [
    ("params:\n  dist_reg_weight: {type: float, low: 0.1, high: .inf}\n",
     "params.dist_reg_weight.high must be a finite number, got inf"),
    ("params:\n  dist_reg_weight: {type: float, low: .nan, high: 0.5}\n",
     "params.dist_reg_weight.low must be a finite number, got nan"),
    ("params:\n  phase2_lr: {type: float, low: 1.0e-4, high: .inf, log: true}\n",
     "params.phase2_lr.high must be a finite number, got inf"),
    ("params:\n  dist_reg_weight: {type: float, low: 0.1, high: 0.5, step: .nan}\n",
     "params.dist_reg_weight.step must be a finite number, got nan"),
    ("params:\n  dist_reg_weight: {type: categorical, choices: [0.1, -.inf]}\n",
     "params.dist_reg_weight.choices[1] must be a finite number, got -inf"),
    ("params:\n  num_layers: {type: int, low: 1, high: 100000000000000000000000000}\n",
     "params.num_layers.high must be at most 2147483647 (2**31 - 1) in size, got 100000000000000000000000000"),
    (PARAMS + "fixed: {phase2_lr: .inf}\n", "fixed.phase2_lr must be a finite number, got inf"),
    (PARAMS + "fixed: {seed: -1}\n", "fixed.seed must be in [0, 4294967295]"),
    (PARAMS + "baselines:\n  fixed: {dropout: .nan}\n", "baselines.fixed.dropout must be a finite number, got nan"),
    (PARAMS + "num_trials: 10000000000\n", "num_trials must be an integer in [1, 2147483647]"),
    (PARAMS + "data: {train_val_split: .nan}\n", "data: train_val_split must be a finite number, got nan"),
    (PARAMS + "data: {vocab_size: 100000000}\n", "data: vocab_size must be in [260, 16777216]"),
])
def test_space_refuses_a_number_no_run_can_use(tmp_path, content, problem):
    path = tmp_path / "space.yaml"
    path.write_text(content)
    with pytest.raises(SpaceError) as e:
        load_space(path)
    assert str(e.value) == f"{path}: {problem}" or str(e.value).startswith(f"{path}: {problem}"), str(e.value)


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, problem", [
    ({"phase2_lr": float("inf")}, "phase2_lr must be a finite number, got inf"),
    ({"phase1_lr_warmup": float("inf")}, "phase1_lr_warmup must be a finite number, got inf"),
    ({"dist_reg_weight": float("nan")}, "dist_reg_weight must be a finite number, got nan"),
    ({"dropout": float("nan")}, "dropout must be a finite number, got nan"),  # New-LLM ignores it, yet not nan
    ({"phase1_keep_gib": -1.0}, "phase1_keep_gib must be >= 0"),
    ({"seed": -1}, "seed must be in [0, 4294967295] (2**32 - 1), got -1"),
    ({"seed": 2**32}, "seed must be in [0, 4294967295] (2**32 - 1), got 4294967296"),
    ({"phase1_max_iter": 2**40}, "phase1_max_iter must be at most 2147483647 (2**31 - 1) in size"),
    ({"num_heads": 0}, "num_heads must be >= 1, got 0"),  # a baseline's setting, refused for New-LLM too
])
def test_train_config_refuses_numbers_no_run_can_use(settings, problem):
    with pytest.raises(ValueError) as e:
        TrainConfig(**settings)
    assert str(e.value).startswith(problem), str(e.value)
    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize("settings, problem", [
    ({"source": ""}, "the data source must not be empty"),
    ({"text_column": " "}, "text_column must not be empty"),
    ({"hf_split": ""}, "hf_split must not be empty"),
    ({"tokenizer": ""}, "tokenizer must not be empty"),
    ({"train_val_split": float("nan")}, "train_val_split must be a finite number, got nan"),
    ({"num_samples": 2**40}, "num_samples must be at most 2147483647"),
    ({"vocab_size": 2**25}, "vocab_size must be in [260, 16777216]"),  # tokenizers aborts the process on 1e11
])
def test_data_config_refuses_values_no_run_can_use(settings, problem):
    with pytest.raises(ValueError) as e:
        DataConfig(**settings)
    assert str(e.value).startswith(problem), str(e.value)


# --- python -m newllm.train ----------------------------------------------------------------------


@pytest.mark.parametrize("args, names", [
    (["--threads", "-1"], ["--threads", "-1", "0 = all cores"]),
    (["--phase2-lr", "inf"], ["phase2_lr", "finite", "inf"]),
    (["--phase1-lr-warmup", "inf"], ["phase1_lr_warmup", "finite"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--device", "gpu"], ["--device 'gpu'", "cpu, cuda or cuda:N"]),
    (["--device", "cuda:99"], ["--device cuda:99"]),
    (["--vocab-size", "100000000000"], ["vocab_size", "100000000000"]),
    (["--data", ""], ["data source must not be empty"]),
    (["--tokenizer", ""], ["tokenizer must not be empty"]),
    (["--out", ""], ["--out must not be empty"]),
])
def test_train_refuses_a_bad_flag_before_anything(tmp_path, cache, capsys, args, names):
    out = tmp_path / "out"
    assert train.main([*TINY, "--out", str(out), *args]) == 2
    assert_one_error(capsys.readouterr().err, *names)
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize("where, problem", [
    ("file", "is a file, not a directory"),
    ("file/sub", "cannot be created: '{tmp}/file' is a file, not a directory"),
    ("full", "is a directory that is not empty: give --force"),
    ("locked/new", "cannot be created: no permission to write in '{tmp}/locked'"),
])
def test_train_refuses_an_out_it_cannot_or_should_not_write(tmp_path, cache, capsys, monkeypatch, where, problem):
    (tmp_path / "file").write_text("a file of the user's")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "summary.json").write_text("an earlier run's")
    (tmp_path / "locked").mkdir()
    real_access = os.access  # root may write anywhere: the check asks os.access, which this stands in for
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != "locked" and real_access(p, mode))
    before = snapshot(tmp_path)
    assert train.main([*TINY, "--out", str(tmp_path / where)]) == 2
    assert_one_error(capsys.readouterr().err, f"--out '{tmp_path / where}'", problem.format(tmp=tmp_path))
    assert snapshot(tmp_path) == before and not cache.exists()


def test_train_with_force_writes_into_a_non_empty_out(tmp_path, cache, capsys):
    corpus = tmp_path / "corpus.txt"  # the start of six builtin documents: a run of about a second
    corpus.write_text("\n\n".join(d[:1500] for d in builtin_documents()[:6]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    (out / "summary.json").write_text("an earlier run's")
    args = [*TINY, "--data", str(corpus), "--num-samples", "0", "--phase1-max-iter", "2", "--phase1-streams", "4",
            "--gate-train-er", "0", "--gate-val-er", "0", "--skip-phase2", "--threads", "1", "--out", str(out)]
    assert train.main(args) == 2
    assert train.main([*args, "--force"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 42
    assert (out / "notes.txt").read_text() == "kept"
    # written under temporary names renamed into place: none is left
    assert sorted(p.name for p in out.iterdir()) == [MODEL_FILE, "notes.txt", "summary.json", TOKENIZER_FILE]


def test_train_in_a_process_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "NEWLLM_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "newllm.train", *TINY, "--threads", "-1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert_one_error(r.stderr, "--threads must be >= 0")
    assert sorted(tmp_path.iterdir()) == []


def test_save_model_never_leaves_a_file_cut_off(tmp_path, monkeypatch):
    model = NewLLM(ModelConfig(vocab_size=300, context_dim=8, embed_dim=8, hidden_dim=16, num_layers=1))
    save_model(tmp_path, model, '{"old": true}')
    before = snapshot(tmp_path)

    def cut_off(self, text, encoding=None):
        with open(self, "w", encoding=encoding) as f:
            f.write(text[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_off)
    with pytest.raises(OSError, match="No space left"):
        save_model(tmp_path, model, '{"new": true, "longer": "than five characters"}')
    assert (tmp_path / TOKENIZER_FILE).read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE, TOKENIZER_FILE]  # no temporary file left
    assert snapshot(tmp_path).keys() == before.keys()


# --- python -m newllm.analyze -------------------------------------------------------------------


@pytest.fixture
def experiment(tmp_path) -> Path:
    """An experiment directory with one passed trial and valid recorded distributions and floors."""
    d = tmp_path / "exp"
    (d / "trials.parquet").mkdir(parents=True)
    pd.DataFrame({"trial_id": ["t0"], "status": ["passed"], "objective": [50.0], "val_ppl": [50.0],
                  "val_acc": [0.1], "num_params": [1000], "gate_passed": [True], "train_effective_rank_fraction": [0.3],
                  "val_effective_rank_fraction": [0.2], "phase1_passes": [3], "phase1_seconds": [2.0],
                  "analysis_seconds": [0.5], "phase2_seconds": [4.0], "gate_train_er": [0.2], "gate_val_er": [0.08],
                  "context_dim": [8]}).to_parquet(d / "trials.parquet" / "part-000001.parquet", index=False)
    (d / DISTRIBUTIONS_FILE).write_text(json.dumps(
        {"context_dim": {"name": "IntDistribution", "attributes": {"low": 8, "high": 16, "log": False, "step": 1}}}))
    (d / FLOORS_FILE).write_text(json.dumps({"unigram_ppl": 400.0, "bigram_ppl": 200.0, "unigram_k": 1.0,
                                             "bigram_k": 0.1}))
    return d


@pytest.mark.parametrize("name, content, problem", [
    (DISTRIBUTIONS_FILE, b'{"context_dim": {"name": "IntDistr', "is not valid JSON: Unterminated string"),
    (DISTRIBUTIONS_FILE, bytes(range(128, 256)), "is not UTF-8 text"),
    (DISTRIBUTIONS_FILE, b"[1, 2]", "is not a mapping of parameters to Optuna distributions"),
    (DISTRIBUTIONS_FILE, b'{"context_dim": 5}', "is not an Optuna distribution for 'context_dim'"),
    (DISTRIBUTIONS_FILE, b'{"x": {"name": "FloatDistribution", "attributes": {"low": 0, "high": Infinity}}}',
     "is unusable for 'x': its high must be a finite number, got inf"),
    (FLOORS_FILE, b'{"unigram_ppl": 4', "is not valid JSON"),
    (FLOORS_FILE, b'{"unigram_ppl": "many", "bigram_ppl": 2, "bigram_k": 0.1}',
     "is unusable: its unigram_ppl must be a positive finite number, got 'many'"),
    (FLOORS_FILE, b'{"unigram_ppl": NaN, "bigram_ppl": 2, "bigram_k": 0.1}',
     "is unusable: its unigram_ppl must be a positive"),
])
def test_analyze_refuses_a_damaged_recorded_file(experiment, capsys, name, content, problem):
    (experiment / name).write_bytes(content)
    before = snapshot(experiment)
    assert analyze.main([str(experiment)]) == 2
    line = assert_one_error(capsys.readouterr().err, f"{experiment / name} {problem}")
    assert "restore it from a copy, or delete it" in line
    assert snapshot(experiment) == before  # no report.html


def test_analyze_refuses_an_out_that_is_a_file(experiment, tmp_path, capsys):
    (tmp_path / "file").write_text("a file of the user's")
    for out, problem in ((tmp_path / "file", "is a file, not a directory"),
                         (tmp_path / "file" / "sub", f"cannot be created: '{tmp_path / 'file'}' is a file")):
        assert analyze.main([str(experiment), "--out", str(out)]) == 2
        assert_one_error(capsys.readouterr().err, f"--out '{out}' {problem}")
    assert (tmp_path / "file").read_text() == "a file of the user's"
    assert analyze.main([str(experiment), "--out", ""]) == 2
    assert_one_error(capsys.readouterr().err, "--out must not be empty")
    assert not (experiment / analyze.REPORT_FILE).exists()


def test_analyze_writes_the_report_atomically(experiment, capsys):
    (experiment / analyze.REPORT_FILE).write_text("an earlier report")
    assert analyze.main([str(experiment)]) == 0
    assert (experiment / analyze.REPORT_FILE).read_text().startswith("<!DOCTYPE html>")
    assert not [p for p in experiment.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("content, problem", [
    (bytes(range(128, 256)), "is not UTF-8 text"),
    (PARAMS.encode() + b"fixed: {phase2_lr: .inf}\n", "fixed.phase2_lr must be a finite number"),
    (PARAMS.encode() * 2, "the key 'params' is given twice"),
])
def test_a_damaged_recorded_space_names_its_file(experiment, content, problem):
    (experiment / SPACE_FILE).write_bytes(content)
    with pytest.raises(SpaceError, match=f"^{experiment / SPACE_FILE}:? .*{problem}"):
        recorded_space(str(experiment))


# --- python -m newllm.export --------------------------------------------------------------------

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return train_tokenizer(builtin_documents()[:8], VOCAB).to_str()


@pytest.fixture
def trials_dir(tmp_path, tokenizer_json) -> Path:
    """An experiment with trial a's checkpoint under it, stored relative to it as the search does."""
    pytest.importorskip("transformers")
    d = tmp_path / "exp"
    model = NewLLM(ModelConfig(vocab_size=VOCAB, context_dim=8, embed_dim=8, hidden_dim=16, num_layers=1))
    save_model(d / "trial_a" / "checkpoint_000002", model, tokenizer_json)
    write_trials(d, "trial_a/checkpoint_000002")
    return d


def write_trials(experiment: Path, checkpoint_path: str) -> None:
    pd.DataFrame({"trial_id": ["a"], "status": ["passed"], "objective": [10.0], "val_ppl": [10.0],
                  "checkpoint_path": [checkpoint_path]}).to_parquet(experiment / "trials.parquet")


@pytest.mark.parametrize("where, problem", [
    ("file", "is an existing file: give --force to replace it"),
    ("full", "is a directory that is not empty: give --force to replace it"),
    ("file/sub", "its directory '{tmp}/file' is a file, not a directory"),
])
def test_export_refuses_an_out_that_exists(trials_dir, tmp_path, capsys, where, problem):
    (tmp_path / "file").write_text("a file of the user's")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("an earlier export's")
    before = snapshot(tmp_path)
    assert export.main([str(trials_dir), "--best", "--out", str(tmp_path / where)]) == 2
    assert_one_error(capsys.readouterr().err, f"--out '{tmp_path / where}'", problem.format(tmp=tmp_path))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["file", "full"])
def test_export_with_force_replaces_out(trials_dir, tmp_path, capsys, where):
    (tmp_path / "file").write_text("a file of the user's")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "stale.txt").write_text("an earlier export's")
    out = tmp_path / where
    assert export.main([str(trials_dir), "--best", "--out", str(out), "--force"]) == 0
    assert "Exported trial a" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "model.safetensors" in names and "stale.txt" not in names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the hidden sibling was renamed


@pytest.mark.parametrize("stored, problem", [
    ("{tmp}/exp/trial_a/checkpoint_000002", "is an absolute path"),
    ("../outside/checkpoint_000002", "leads outside the experiment directory"),
    ("trial_b/checkpoint_000001", "holds no model.pt under the experiment directory"),
])
def test_export_reads_checkpoints_only_inside_the_experiment(trials_dir, tmp_path, capsys, stored, problem):
    stored = stored.format(tmp=tmp_path)  # the first two name checkpoints that exist
    shutil.copytree(trials_dir / "trial_a" / "checkpoint_000002", tmp_path / "outside" / "checkpoint_000002")
    write_trials(trials_dir, stored)
    assert export.main([str(trials_dir), "--trial", "a", "--out", str(tmp_path / "hf")]) == 2
    assert_one_error(capsys.readouterr().err, f"the checkpoint of trial a, '{stored}'", problem)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name, content, problem", [
    (TOKENIZER_FILE, b'{"model": ', "is not valid JSON"),
    (TOKENIZER_FILE, bytes(range(128, 256)), "is not UTF-8 text"),
    (MODEL_FILE, b"PK\x03\x04 cut off", "is not a newllm checkpoint"),
])
def test_export_of_a_damaged_checkpoint_writes_nothing(trials_dir, tmp_path, capsys, name, content, problem):
    path = trials_dir / "trial_a" / "checkpoint_000002" / name
    path.write_bytes(content)
    out = tmp_path / "new" / "hf"
    assert export.main([str(trials_dir), "--best", "--out", str(out)]) == 2
    assert_one_error(capsys.readouterr().err, str(path), problem)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("table, problem", [
    (b"not parquet", "cannot read the trials table in '{exp}': "),
    (pd.DataFrame({"trial_id": ["a"], "status": ["passed"]}),
     "the trials table in '{exp}' lacks the columns ['objective', 'val_ppl', 'checkpoint_path']"),
])
def test_export_refuses_a_damaged_trials_table(trials_dir, tmp_path, capsys, table, problem):
    (trials_dir / "trials.parquet").unlink()
    if isinstance(table, bytes):
        (trials_dir / "trials.parquet").write_bytes(table)
    else:
        table.to_parquet(trials_dir / "trials.parquet")
    assert export.main([str(trials_dir), "--best", "--out", str(tmp_path / "hf")]) == 2
    assert_one_error(capsys.readouterr().err, problem.format(exp=trials_dir))
    assert not (tmp_path / "hf").exists()


def test_export_refuses_empty_paths(trials_dir, tmp_path, capsys):
    assert export.main([str(trials_dir), "--best", "--out", ""]) == 2
    assert_one_error(capsys.readouterr().err, "--out must not be empty")
    assert export.main(["", "--best", "--out", str(tmp_path / "hf")]) == 2
    assert_one_error(capsys.readouterr().err, "the experiment directory must not be empty")
    assert export.main([str(trials_dir / "trials.parquet"), "--best", "--out", str(tmp_path / "hf")]) == 2
    assert_one_error(capsys.readouterr().err, "trials.parquet' is a file: give the directory of a search")
    assert not (tmp_path / "hf").exists()
