"""Bad input files: the command lines exit with code 2 and one ``error:`` line naming the file
and the problem (no traceback) and write nothing; checkpoints load only tensors and plain values."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from newllm.checkpoint import MODEL_FILE, load_model, save_model
from newllm.config import TrainConfig
from newllm.data import DataConfig, builtin_documents, load_documents, prepare_data
from newllm.model import ModelConfig, NewLLM
from newllm.run import build_model, train_run
from newllm.space import SpaceError, load_space

TINY = ["--context-dim", "8", "--embed-dim", "8", "--hidden-dim", "16", "--num-layers", "1",
        "--num-samples", "6", "--vocab-size", "300"]
NOT_UTF8 = bytes(range(128, 256))


def run_cli(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``tmp_path``, with the tokenizer cache under it."""
    env = {**os.environ, "NEWLLM_CACHE": str(tmp_path / "cache"), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def assert_refused(r: subprocess.CompletedProcess, path: Path, problem: str) -> None:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(path) in lines[0] and problem in lines[0], lines[0]


@pytest.mark.parametrize("flag, name, content, problem", [
    ("--data", "lines.jsonl", b'{"text": "a"}\n{not json\n', "line 2 is not valid JSON"),
    ("--data", "binary.jsonl", NOT_UTF8, "is not UTF-8 text"),
    ("--data", "object.json", b'{"text": "a"}', "holds a JSON object, not an array of records"),
    ("--data", "numbers.json", b"[1, 2, 3]", "item 0 of the array is a JSON number, not a record"),
    ("--data", "broken.json", b'[{"text": "a"},', "is not valid JSON"),
    ("--data", "text.parquet", b"not a parquet file", "is not a readable Parquet file"),
    ("--tokenizer", "other.json", b'{"a": 1}', "is not a tokenizer.json"),
    ("--tokenizer", "broken.json", b"{nope", "is not valid JSON"),
    ("--tokenizer", "binary.json", NOT_UTF8, "is not UTF-8 text"),
])
def test_train_refuses_a_bad_data_or_tokenizer_file(tmp_path, flag, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    r = run_cli(tmp_path, "newllm.train", flag, str(path), *TINY, "--out", str(tmp_path / "out"))
    assert_refused(r, path, problem)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name, content, problem", [
    ("binary.yaml", NOT_UTF8, "not a YAML text file: not UTF-8"),
    # PyYAML's own message spans several lines
    ("broken.yaml", b"params: {context_dim: [8, 16\n", "not valid YAML: while parsing a flow sequence, expected"),
])
def test_search_refuses_a_bad_space_file(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    r = run_cli(tmp_path, "newllm.search", "--local", "--space", str(path), "--name", "x",
                "--storage-path", str(tmp_path / "res"))
    assert_refused(r, path, problem)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("content, problem", [
    (b"1: 2\nzz: 3\nparams: {context_dim: {type: int, low: 8, high: 16}}\n", "unknown top-level keys [1, 'zz']"),
    (b"params: {context_dim: {type: [int]}}\n", "params.context_dim must be a mapping with type: int"),
    (b"params: {context_dim: {type: int, low: 8, high: 16, 1: 2, zz: 3}}\n", "has unknown keys [1, 'zz']"),
    (b"params: {context_dim: {type: int, low: 8, high: 16}}\nobjectives: [[val_ppl]]\n",
     "objectives must be a list drawn from"),
    (b"params: {context_dim: {type: int, low: 8, high: 16}}\ndata: {source: 5}\n",
     "data.source must be of type str, got 5"),
    (b"params: {context_dim: {type: int, low: 8, high: 16}}\ndata: {tokenizer: [a]}\n",
     "data.tokenizer must be of type str or None, got ['a']"),
    (b"params: {context_dim: {type: int, low: 8, high: 16}}\ndata: {num_samples: true}\n",
     "data.num_samples must be of type int, got True"),
])
def test_space_errors_name_the_file_on_one_line(tmp_path, content, problem):
    path = tmp_path / "space.yaml"
    path.write_bytes(content)
    with pytest.raises(SpaceError) as e:
        load_space(path)
    assert str(e.value).startswith(f"{path}: ") and problem in str(e.value) and "\n" not in str(e.value)


def test_search_refuses_a_bad_data_file(tmp_path, tiny_space):
    path = tmp_path / "lines.jsonl"
    path.write_text('{"text": "a"}\n[1]\n')
    r = run_cli(tmp_path, "newllm.search", "--local", "--space", tiny_space(), "--name", "x",
                "--storage-path", str(tmp_path / "res"), "--data", str(path))
    assert_refused(r, path, "line 2 is a JSON array, not a record")
    assert not (tmp_path / "res").exists() and not (tmp_path / "cache").exists()


def test_a_json_array_and_json_lines_in_a_json_file_are_read(tmp_path):
    docs = [f"document {i}" for i in range(3)]
    (tmp_path / "array.json").write_text(json.dumps([{"text": d, "id": i} for i, d in enumerate(docs)]))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n")
    for name in ("array.json", "lines.json"):
        assert load_documents(DataConfig(source=str(tmp_path / name), num_samples=0)) == docs


def test_a_directory_reads_its_txt_files_not_a_subdirectory_named_like_one(tmp_path):
    (tmp_path / "corpus" / "notes.txt").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("the only document")
    assert load_documents(DataConfig(source=str(tmp_path / "corpus"))) == ["the only document"]


def test_hf_sources_that_cannot_load_name_the_data_set(monkeypatch):
    import datasets

    with pytest.raises(ValueError, match="hf: needs a data set name"):
        load_documents(DataConfig(source="hf:"))

    def unreachable(name, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ValueError, match=r"^cannot load hf data set 'someone/corpus': Couldn't reach .* Hub \("):
        load_documents(DataConfig(source="hf:someone/corpus"))


# --- checkpoints -----------------------------------------------------------------------------


class MakeDir:
    """Unpickling this creates the directory ``path``: a stand-in for the code a hostile
    checkpoint would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_checkpoints_with_the_runs_records_load(tmp_path, monkeypatch):
    """What the single run and the search's trials save (configs, Phase 1 history, a summary
    with None and NaN) is all plain values: it loads with weights_only."""
    monkeypatch.setenv("NEWLLM_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(context_dim=8, embed_dim=8, hidden_dim=16, num_layers=1, phase1_max_iter=3, phase1_streams=4,
                      gate_train_er=0.0, gate_val_er=0.0, skip_phase2=True)
    corpus = tmp_path / "corpus.txt"  # the start of six builtin documents: a run of about a second
    corpus.write_text("\n\n".join(d[:1500] for d in builtin_documents()[:6]))
    data = prepare_data(DataConfig(source=str(corpus), num_samples=0, vocab_size=300))
    model = build_model(cfg, data.vocab_size)
    result = train_run(cfg, data, model)
    p1 = result.phase1
    phase1 = {"history": [r.to_dict() for r in p1.history], "stop_reason": p1.stop_reason, "seconds": p1.seconds}
    summary = {**result.summary(), "missing": None, "undefined": math.nan}
    save_model(tmp_path / "ckpt", model, data.tokenizer_json, train_config=cfg.to_dict(), phase1=phase1,
               summary=summary)
    loaded, record = load_model(tmp_path / "ckpt")
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert record["train_config"] == cfg.to_dict() and record["phase1"] == phase1
    assert json.dumps(record["summary"]) == json.dumps(summary)  # NaN != NaN; their JSON is equal


def test_load_model_refuses_other_objects_without_running_their_code(tmp_path):
    model = NewLLM(ModelConfig(vocab_size=300, context_dim=8, embed_dim=8, hidden_dim=16, num_layers=1))
    marker = tmp_path / "code-ran"
    (tmp_path / "ckpt").mkdir()
    torch.save({"model_config": model.cfg.to_dict(), "state_dict": model.state_dict(), "evil": MakeDir(marker)},
               tmp_path / "ckpt" / MODEL_FILE)
    problem = "holds objects other than tensors and plain values"
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'ckpt' / MODEL_FILE))}.*{problem}"):
        load_model(tmp_path / "ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("content, problem", [
    (b"\x80\x04garbage" * 20, "not a torch.save archive"),
    ([1, 2], "it lacks the model_config and state_dict"),
    ({"model_config": {"vocab_size": 300}, "state_dict": {}}, "its model_config or state_dict is invalid"),
])
def test_load_model_refuses_a_file_that_is_not_a_checkpoint(tmp_path, content, problem):
    path = tmp_path / MODEL_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}' is not a newllm checkpoint: {problem}"):
        load_model(tmp_path)
