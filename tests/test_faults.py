"""Failing well. Every command checks every flag and every file it reads before it writes or
trains anything, and answers a bad one with exit code 2 and one ``error:`` line that names it (no
traceback); what it writes, it writes under a temporary name renamed into place. A running search
holds its experiment alone, survives a cut Optuna journal, a move, a full disk and Ctrl+C, and ends
each in one line that says how to resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from conftest import free_port, write_table
from test_search import assert_study_matches_table as assert_study_joins_table

from newllm import analyze, export, train
from newllm import experiment as exp
from newllm.search import callbacks, cli, lock, storage
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
    ("locked/new", "cannot be created in '{tmp}/locked': no permission to write in it"),
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
                  "checkpoint_path": [checkpoint_path]}).pipe(write_table, experiment / "trials.parquet")


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
    (b"not parquet", "{exp}/trials.parquet/part-000001.parquet is not a readable Parquet file"),
    (pd.DataFrame({"trial_id": ["a"], "status": ["passed"]}),
     "the trials table in '{exp}' lacks the columns ['objective', 'val_ppl', 'checkpoint_path']"),
])
def test_export_refuses_a_damaged_trials_table(trials_dir, tmp_path, capsys, table, problem):
    shutil.rmtree(trials_dir / "trials.parquet")
    if isinstance(table, bytes):
        (trials_dir / "trials.parquet").mkdir()
        (trials_dir / "trials.parquet" / "part-000001.parquet").write_bytes(table)
    else:
        write_table(table, trials_dir / "trials.parquet")
    assert export.main([str(trials_dir), "--best", "--out", str(tmp_path / "hf")]) == 2
    assert_one_error(capsys.readouterr().err, problem.format(exp=trials_dir))
    assert not (tmp_path / "hf").exists()


def test_export_refuses_empty_paths(trials_dir, tmp_path, capsys):
    assert export.main([str(trials_dir), "--best", "--out", ""]) == 2
    assert_one_error(capsys.readouterr().err, "--out must not be empty")
    assert export.main(["", "--best", "--out", str(tmp_path / "hf")]) == 2
    assert_one_error(capsys.readouterr().err, "the experiment directory must not be empty")
    part = trials_dir / "trials.parquet" / "part-000001.parquet"
    assert export.main([str(part), "--best", "--out", str(tmp_path / "hf")]) == 2
    assert_one_error(capsys.readouterr().err, "part-000001.parquet' is a file: give the directory of a search")
    assert not (tmp_path / "hf").exists()


# --- a running search and the experiment it holds ---------------------------------------------------
# A second driver, a killed driver's claim, a cut Optuna journal, a moved experiment, a full disk,
# Ctrl+C, resources that can never be had and bad search options: each ends in one line that names
# the problem (exit 2 for what the user gave, 1 for a fault, 130 for an interruption), and nothing
# that had landed is lost.

GATE_OPEN = "gate_train_er: 0.0\n  gate_val_er: 0.0"


# --- helpers -----------------------------------------------------------------------------------


def error_lines(stderr: str) -> list[str]:
    """stderr without Ray's and Optuna's own log lines (timestamped, or Optuna's "[I ...]")."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(("[I ", "[W ", "20")) and "authentication" not in line]


def assert_one_line(stderr: str, *words: str) -> str:
    """A driver's stderr holds one line of its own, naming each of ``words``, and no traceback."""
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
        optuna.storages.journal.JournalFileBackend(str(experiment / exp.OPTUNA_JOURNAL))))


def assert_study_matches_table(experiment: Path, name: str) -> None:
    """Every landed trial kept its rows, and the study's values, states and user attributes match the
    trials table (``test_search.assert_study_matches_table``)."""
    trials, iterations = exp.load(experiment)
    assert trials.trial_id.is_unique and (trials.status == "passed").all()
    assert set(iterations.trial_id) == set(trials.trial_id)  # every landed trial kept its rows
    assert_study_joins_table(experiment, name)


# --- one driver per experiment -------------------------------------------------------------------


@pytest.mark.slow(seconds=70)
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
    journal = experiment / exp.OPTUNA_JOURNAL
    cut = journal.read_bytes()[:-9]
    journal.write_bytes(cut)
    done = driver.run("--resume", "--name", "two", "--storage-path", str(tmp_path / "res"), "--local")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    aside = list(experiment.glob(f"{exp.OPTUNA_JOURNAL}.partial-*"))
    assert len(aside) == 1 and f"kept in {aside[0]}" in done.stdout
    assert cut.endswith(aside[0].read_bytes())  # the cut record is set aside, not lost
    assert len(exp.load(experiment)[0]) == 3
    assert_study_matches_table(experiment, "two")


def test_the_claim_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from newllm.search.lock import ExperimentLock; ExperimentLock(sys.argv[1]).acquire(); "
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


@pytest.mark.slow(seconds=65)
def test_ctrl_c_stops_cleanly_and_the_copied_experiment_resumes_and_exports_from_its_new_place(
        tmp_path, tiny_space, driver):
    old, new = tmp_path / "old", tmp_path / "new"
    running = driver.start("--local", "--space", tiny_space(GATE_OPEN), "--name", "m", "--storage-path", str(old))
    driver.until_first_trial_lands(running)
    os.killpg(running.pid, signal.SIGINT)  # Ctrl+C reaches the terminal's whole process group
    assert running.wait(timeout=120) == 130
    assert_one_line(running.stderr.read(), "interrupted:", "--resume --name m")
    before, _ = exp.load(old / "m")
    assert not (old / "m" / "report.html").exists() and len(before) >= 1
    # the interrupted experiment, copied elsewhere, the original deleted
    shutil.copytree(old / "m", new / "m")
    shutil.rmtree(old)
    done = driver.run("--resume", "--name", "m", "--storage-path", str(new), "--local")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not old.exists()  # nothing went to the original's place
    trials, iterations = exp.load(new / "m")
    assert len(trials) == 3 and not trials.checkpoint_path.str.startswith("/").any()
    # nothing landed before the interrupt was lost or landed again
    assert set(before.trial_id) <= set(trials.trial_id) and not iterations.duplicated(exp.ITERATION_KEY).any()
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
        trials, iterations = exp.load(disk / "f")  # what had landed loads
        assert trials.empty or set(trials.trial_id) <= set(iterations.trial_id)
        assert not list(disk.rglob("report.html"))  # never half-written
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- the writer never loses a finished trial's row ---------------------------------------------------


def fake_trial(trial_id: str, status: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={}, checkpoint=None, status=status,
                           last_result={"phase": "final", "status": "passed", "objective": 1.0})


def row(trial, result: dict, node_ids: list[str]) -> dict:
    return {"trial_id": trial.trial_id, "status": result.get("status"), "objective": result.get("objective")}


def test_a_rows_write_error_stops_the_search_and_the_resume_lands_the_row(tmp_path, monkeypatch):
    dtypes = {"trial_id": "string", "status": "string", "objective": "float64"}
    writer = callbacks.ParquetResults(str(tmp_path), row, dtypes)
    writer.setup()
    trial = fake_trial("t1", "TERMINATED")
    full = OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(exp, "write_file", lambda *a: (_ for _ in ()).throw(full))
        writer.on_trial_complete(0, [trial], trial)  # Tune would swallow an error raised here
    with pytest.raises(OSError, match="No space"):
        writer.on_step_begin(0, [trial])
    # the resumed search's writer lands the row of the trial that Tune has as finished
    resumed = callbacks.ParquetResults(str(tmp_path), row, dtypes)
    resumed.setup()
    resumed.on_step_begin(0, [trial, fake_trial("t2", "RUNNING")])
    assert list(exp.load(tmp_path)[0].trial_id) == ["t1"]


def test_the_end_of_search_clean_up_keeps_every_landed_trials_rows(tmp_path):
    dtypes = {"trial_id": "string", "status": "string", "objective": "float64"}
    writer = callbacks.ParquetResults(str(tmp_path), row, dtypes)
    writer.setup()
    landed = fake_trial("landed", "TERMINATED")
    writer.on_trial_result(0, [], landed, {"phase": "phase1", "step": 1, "iterations_since_restore": 1})
    writer.on_trial_complete(0, [landed], landed)
    writer.on_experiment_end([])  # a Tune that does not know the trial (another driver's, say)
    trials, iterations = exp.load(tmp_path)
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
    before = snapshot(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    name = [] if "--name" in args else ["--name", "x"]
    code = cli.main(["--local", "--space", space, "--storage-path", str(tmp_path / "res"), *name, *args]
                       if "--storage-path" not in args else ["--local", "--space", space, *name, *args])
    assert code == 2
    assert_one_error(capsys.readouterr().err, *words)
    assert snapshot(tmp_path) == before and not (tmp_path / "res").exists()


def test_a_storage_path_that_is_a_file_or_read_only_is_refused(tmp_path, tiny_space, capsys):
    space = tiny_space()
    (tmp_path / "file").write_text("x")
    assert cli.main(["--space", space, "--name", "x", "--storage-path", str(tmp_path / "file")]) == 2
    assert_one_error(capsys.readouterr().err, f"--storage-path {tmp_path / 'file'} is a file, not a directory")
    assert cli.main(["--space", space, "--name", "x", "--storage-path", str(tmp_path / "file" / "sub")]) == 2
    assert_one_error(capsys.readouterr().err, f"cannot be created: {str(tmp_path / 'file')!r} is a file")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert cli.main(["--space", space, "--name", "x", "--storage-path", str(ro / "res")]) == 2
        assert_one_error(capsys.readouterr().err, "it is on a read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("resources", [["--cpus-per-trial", "64"], ["--gpus-per-trial", "1"]])
def test_resources_no_node_can_give_are_refused_not_waited_for(tmp_path, tiny_space, capsys, resources):
    code = cli.main(["--local", "--space", tiny_space(), "--name", "r", "--storage-path", str(tmp_path / "res"),
                        *resources])
    assert code == 2
    assert_one_error(capsys.readouterr().err, "no node of the Ray cluster fits one trial", "lower --cpus-per-trial")
    assert not (tmp_path / "res").exists()


def test_a_damaged_part_file_on_resume_is_named_and_nothing_changes(tiny_search, tmp_path, capsys):
    experiment = tmp_path / "res" / "tiny"
    shutil.copytree(tiny_search.directory, experiment)
    part = next((experiment / exp.TRIALS_FILE).glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:100])  # cut off
    before = snapshot(experiment)
    assert cli.main(["--resume", "--name", "tiny", "--storage-path", str(tmp_path / "res"), "--local"]) == 2
    assert_one_error(capsys.readouterr().err, f"{part} is not a readable Parquet file")
    assert snapshot(experiment) == before


# as saved by an earlier newllm (each replacement of the same length: the pickle's frames hold)
@pytest.mark.parametrize("now, then, problem", [
    (b"newllm.search.callbacks", b"newllm.results.callback", "No module named 'newllm.results'"),  # moved since
    (b"state_format", b"state_formax", "its search state has format 1, this newllm reads format 2"),  # before formats
])
def test_a_resume_of_an_experiment_an_earlier_newllm_started_is_one_line(tiny_search, tmp_path, capsys, now, then,
                                                                         problem):
    experiment = tmp_path / "res" / "tiny"
    shutil.copytree(tiny_search.directory, experiment)
    tuner = experiment / "tuner.pkl"
    assert now in tuner.read_bytes()
    tuner.write_bytes(tuner.read_bytes().replace(now, then))
    before = snapshot(experiment)
    assert cli.main(["--resume", "--name", "tiny", "--storage-path", str(tmp_path / "res"), "--local"]) == 2
    assert_one_error(capsys.readouterr().err, "was started by an earlier newllm", problem, "start a new --name")
    assert snapshot(experiment) == before


def test_an_address_where_no_ray_listens_is_refused_not_waited_for(tmp_path, tiny_space, capsys):
    port = free_port()  # nothing listens there
    code = cli.main(["--space", tiny_space(), "--name", "x", "--storage-path", str(tmp_path / "res"),
                        "--address", f"127.0.0.1:{port}"])
    assert code == 2
    assert_one_error(capsys.readouterr().err, f"no Ray cluster answers at 127.0.0.1:{port}")
    assert not (tmp_path / "res").exists()


def test_an_optuna_storage_that_is_no_journal_is_named(tmp_path, tiny_space, capsys):
    garbage = tmp_path / "notes.txt"
    garbage.write_text("these are my notes\n")
    space = tiny_space()
    before = snapshot(tmp_path)
    code = cli.main(["--local", "--space", space, "--name", "x", "--storage-path", str(tmp_path / "res"),
                        "--optuna-storage", str(garbage)])
    assert code == 2
    assert_one_error(capsys.readouterr().err, f"{garbage} is not an Optuna journal")
    assert snapshot(tmp_path) == before
