"""Model, data, analysis, gate and the single-run CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from newllm import train
from newllm.config import TrainConfig
from newllm.data import DataConfig, load_documents, prepare_data
from newllm.metrics import fixed_point_analysis, effective_rank, gate, singular_values
from newllm.model import ModelConfig, NewLLM

TINY = ["--context-dim", "8", "--embed-dim", "8", "--hidden-dim", "16", "--num-layers", "1",
        "--num-samples", "6", "--vocab-size", "300", "--phase1-max-iter", "4", "--phase2-epochs", "2",
        "--phase1-streams", "4"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEWLLM_CACHE", str(tmp_path / "cache"))


# --- model ----------------------------------------------------------------------------------


def test_residual_dims_error_says_what_to_set():
    with pytest.raises(ValueError, match="hidden_dim == context_dim \\+ embed_dim.*--hidden-dim 32"):
        ModelConfig(vocab_size=10, context_dim=16, embed_dim=16, hidden_dim=64)
    ModelConfig(vocab_size=10, context_dim=16, embed_dim=16, hidden_dim=64, architecture="gated")


@pytest.mark.parametrize("arch", ["residual", "gated"])
def test_context_is_carried_across_positions(arch):
    torch.manual_seed(0)
    model = NewLLM(ModelConfig(vocab_size=50, context_dim=8, embed_dim=8, hidden_dim=16, num_layers=2, architecture=arch))
    ids = torch.randint(50, (12,))
    with torch.no_grad():
        contexts = model.contexts(ids)
        e = model.embed(ids)
        c = model.initial_context()
        for t in range(12):
            c = model.update(e[t], c)
            assert torch.allclose(contexts[t], c, atol=1e-6)
        reset = torch.stack([model.update(e[t], model.initial_context()) for t in range(12)])
        assert not torch.allclose(contexts[1:], reset[1:], atol=1e-3)  # the seed's per-token reset differs
        assert torch.allclose(model.read(ids), contexts[-1], atol=1e-6)
        logits, last = model(ids)
        assert logits.shape == (12, 50) and torch.allclose(last, contexts[-1])


@pytest.mark.parametrize("arch", ["residual", "gated"])
def test_streaming_10k_tokens_has_flat_memory(arch):
    """Peak RSS after streaming 10,000 tokens is the peak after 1,000 (C = 512: a stored context
    per token would add 20 MB, a kept graph far more)."""
    code = textwrap.dedent(f"""
        import resource, torch
        from newllm.model import ModelConfig, NewLLM
        torch.manual_seed(0); torch.set_num_threads(1)
        h = 1024 if "{arch}" == "residual" else 64
        m = NewLLM(ModelConfig(vocab_size=100, context_dim=512, embed_dim=512, hidden_dim=h, num_layers=1, architecture="{arch}"))
        ids = torch.randint(100, (10_000,))
        c = m.read(ids[:1000])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        c = m.read(ids, c)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
    """)
    grown_mb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown_mb < 4.0, f"peak memory grew by {grown_mb:.1f} MB while streaming"


# --- analysis and gate ------------------------------------------------------------------------


def test_effective_rank_of_known_matrices():
    assert effective_rank(singular_values(torch.eye(16))) == pytest.approx(16.0)
    rank1 = torch.outer(torch.randn(100), torch.randn(16))
    assert effective_rank(singular_values(rank1)) == pytest.approx(1.0, abs=1e-4)
    s = torch.tensor([3.0, 1.0])  # p = (0.75, 0.25): ER = 1 / (0.5625 + 0.0625) = 1.6
    x = torch.diag(s)
    assert effective_rank(singular_values(x)) == pytest.approx(1.6)
    assert effective_rank(singular_values(torch.zeros(5, 4))) == 0.0


def test_analysis_flags_global_attractor_and_zero_solution():
    same = torch.ones(200, 8) * 0.01
    a = fixed_point_analysis(same)
    assert a.global_attractor and a.zero_solution and a.effective_rank == pytest.approx(1.0)
    diverse = fixed_point_analysis(torch.randn(500, 8))
    assert not diverse.global_attractor and not diverse.zero_solution
    assert diverse.effective_rank_fraction > 0.8


def test_gate_passes_and_fails_on_constructed_contexts():
    diverse, collapsed = fixed_point_analysis(torch.randn(400, 16)), fixed_point_analysis(torch.ones(400, 16))
    assert gate(diverse, diverse, 0.2, 0.08).passed
    failed = gate(collapsed, diverse, 0.2, 0.08)
    assert not failed.passed and "train ER" in failed.reason and "val ER" not in failed.reason
    assert not gate(diverse, collapsed, 0.2, 0.08).passed
    assert not gate(diverse, diverse, 1.0, 0.08).passed  # ratios are configurable (random ER ~ 99% of C)


# --- data -------------------------------------------------------------------------------------


def test_builtin_corpus_splits_by_document_without_overlap():
    data = prepare_data(DataConfig(num_samples=10, vocab_size=400))
    assert (data.num_train_docs, data.num_val_docs) == (8, 2)
    docs = load_documents(DataConfig(num_samples=10))
    assert len(set(docs)) == 10 and not set(docs[:8]) & set(docs[8:])
    assert data.vocab_size == 400 and int(data.train_ids.max()) < 400 and len(data.val_ids) > 100


def test_tokenizer_is_cached_by_fingerprint_and_vocab(tmp_path):
    cfg = DataConfig(num_samples=6, vocab_size=300, cache_dir=str(tmp_path))
    first = prepare_data(cfg)
    cached = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(cached) == 1 and cached[0].name.startswith(first.fingerprint)
    assert torch.equal(prepare_data(cfg).train_ids, first.train_ids)
    prepare_data(DataConfig(num_samples=6, vocab_size=320, cache_dir=str(tmp_path)))
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 2


def test_local_text_parquet_jsonl_and_ultrachat_messages(tmp_path):
    docs = [f"document number {i} says" + " words and more words" * (5 + i) for i in range(6)]
    (tmp_path / "dir").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "dir" / f"{i:02d}.txt").write_text(d)
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    pd.DataFrame({"body": docs}).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame({"messages": [[{"role": "user", "content": d}, {"role": "assistant", "content": "ok"}]
                               for d in docs]}).to_json(tmp_path / "chat.jsonl", orient="records", lines=True)
    assert load_documents(DataConfig(source=str(tmp_path / "dir"), num_samples=0)) == docs
    assert load_documents(DataConfig(source=str(tmp_path / "corpus.txt"), num_samples=0)) == docs
    assert load_documents(DataConfig(source=str(tmp_path / "c.parquet"), text_column="body", num_samples=4)) == docs[:4]
    chat = load_documents(DataConfig(source=str(tmp_path / "chat.jsonl"), num_samples=0))
    assert chat == [d + "\nok" for d in docs]


def test_bad_data_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_data(DataConfig(source=str(tmp_path / "missing")))
    pd.DataFrame({"body": ["a b c"] * 3}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="text column 'text' not found.*body"):
        prepare_data(DataConfig(source=str(tmp_path / "c.parquet")))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare_data(DataConfig(source=str(tmp_path / "empty.txt")))
    with pytest.raises(ValueError, match="too small for vocab_size=5000"):
        prepare_data(DataConfig(num_samples=4, vocab_size=5000))
    with pytest.raises(ValueError, match="both need >= 1"):
        prepare_data(DataConfig(num_samples=1))


# --- single-run CLI -----------------------------------------------------------------------------


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "newllm.train", *args], capture_output=True, text=True)


def test_cli_bad_data_path_and_bad_dims_exit_2(tmp_path):
    r = run_cli(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli(["--context-dim", "16", "--embed-dim", "16", "--hidden-dim", "64", "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "hidden_dim == context_dim + embed_dim" in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_same_seed_same_numbers(tmp_path):
    summaries = []
    for name in ("a", "b"):  # a gate every run passes, so that Phase 2 is compared too
        assert train.main([*TINY, "--threads", "1", "--gate-train-er", "0", "--gate-val-er", "0",
                               "--out", str(tmp_path / name)]) == 0
        s = json.loads((tmp_path / name / "summary.json").read_text())
        summaries.append(s)
        assert (tmp_path / name / "model.pt").is_file() and (tmp_path / name / "tokenizer.json").is_file()
    a, b = summaries
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows or []]  # noqa: E731
    assert strip(a["phase1_history"]) == strip(b["phase1_history"])
    assert strip(a["phase2_history"]) == strip(b["phase2_history"])
    assert a["status"] == "passed" and len(a["phase2_history"]) == 2
    assert a["objective"] == b["objective"] == a["val_ppl"]
    assert len(a["phase1_history"]) >= 1


def test_train_config_validation():
    with pytest.raises(ValueError, match="dist_reg_weight must be in"):
        TrainConfig(dist_reg_weight=1.5)
    with pytest.raises(ValueError, match="phase1_streams must be >= 1"):
        TrainConfig(phase1_streams=0)
    assert TrainConfig(dist_reg=False).effective_dist_reg_weight == 0.0
