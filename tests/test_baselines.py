"""Baselines (LSTM, GRU, causal transformer) and the perplexity floors: the same val positions
as New-LLM, parameter matching, state carried across windows, causality, hand-computed floors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from newllm import baselines
from newllm.baselines import BaselineConfig, build_baseline, size_for
from newllm.floors import bigram_ppl, unigram_ppl
from newllm.model import ModelConfig, NewLLM

VOCAB = 23
ARCHS = ["lstm", "gru", "transformer"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(arch: str, **overrides) -> baselines.BaselineLM:
    values = dict(architecture=arch, embed_dim=8, hidden_dim=12, num_layers=2, context_window=10, num_heads=2, seed=0)
    return build_baseline(BaselineConfig(**{**values, **overrides}), VOCAB)


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def concatenated(model, ids, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    pieces = list(baselines.stream_logits(model, ids, **kwargs))
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(architecture="rnn"), "architecture must be one of"),
    (dict(hidden_dim=0), "hidden_dim must be >= 1"),
    (dict(context_window=0), "context_window must be >= 1"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(architecture="transformer", hidden_dim=10, num_heads=4), "divisible by num_heads"),
])
def test_config_rejects_bad_values_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        BaselineConfig(**overrides)


# --- the val definition ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("length", [2, 9, 10, 11, 12, 37, 100])
def test_val_predicts_every_token_after_the_first_exactly_once(arch, length):
    # context_window 10, stride 3, chunk 7: lengths below, at and past the window, none a multiple
    model, ids = tiny(arch), random_ids(length, seed=length)
    logits, targets = concatenated(model, ids, stride=3, chunk=7)
    assert torch.equal(targets, ids[1:])
    assert len(logits) == length - 1  # every token after the first
    loss, acc = baselines.baseline_stream_metrics(model, ids, stride=3)
    assert loss == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(-1) == targets).double().mean()))


def test_val_rejects_a_stream_without_a_next_token():
    with pytest.raises(ValueError, match="no next token"):
        baselines.baseline_stream_metrics(tiny("lstm"), random_ids(1))


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_recurrent_val_is_one_sequence_from_zero_state_carried_across_chunks(arch):
    model, ids = tiny(arch), random_ids(40, seed=1)
    logits, _ = concatenated(model, ids, chunk=5)
    with torch.no_grad():
        whole, _ = model(ids[None, :-1])
        reset = torch.cat([model(ids[None, s:min(s + 5, 39)])[0][0] for s in range(0, 39, 5)])
    torch.testing.assert_close(logits, whole[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, reset, atol=1e-3)  # a state reset at each chunk would show


def brute_force_logits(model: baselines.TransformerLM, ids: torch.Tensor, stride: int) -> torch.Tensor:
    """Position i predicted by its own forward call over the tokens its window gives it."""
    window, inputs, rows = model.cfg.context_window, ids[:-1], []
    for i in range(len(inputs)):
        if i < window or len(inputs) <= window:
            start = 0  # the first window
        else:
            end = min(window + math.ceil((i + 1 - window) / stride) * stride, len(inputs))
            start = end - window
        with torch.no_grad():
            rows.append(model(inputs[None, start:i + 1])[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("stride", [1, 3, 10])
def test_transformer_sliding_window_equals_a_forward_call_per_position(stride):
    model, ids = tiny("transformer"), random_ids(34, seed=2)
    logits, _ = concatenated(model, ids, stride=stride, chunk=25)
    torch.testing.assert_close(logits, brute_force_logits(model, ids, stride), rtol=1e-4, atol=1e-5)
    if stride == 1:  # each position from exactly its preceding context_window tokens
        with torch.no_grad():
            last = model(ids[None, 33 - 10:33])[0, -1]
        torch.testing.assert_close(logits[-1], last, rtol=1e-4, atol=1e-5)


def test_transformer_is_causal():
    model, ids = tiny("transformer"), random_ids(10, seed=3)
    changed = ids.clone()
    changed[6] = (ids[6] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids[None])[0], model(changed[None])[0]
    torch.testing.assert_close(before[:6], after[:6], rtol=0, atol=1e-6)
    assert not torch.allclose(before[6:], after[6:])


def test_transformer_rejects_more_tokens_than_its_window():
    with pytest.raises(ValueError, match="exceed the context window"):
        tiny("transformer")(random_ids(11)[None])


# --- parameter counts -----------------------------------------------------------------------------

# New-LLM configs of the laptop search space (vocab 500); NewLLM.num_params has no non_embedding
# option, so the target is its total minus its token embedding (the embedding LayerNorm counts)
NEWLLM_CONFIGS = [
    ModelConfig(vocab_size=500, context_dim=16, embed_dim=16, hidden_dim=32, num_layers=1),
    ModelConfig(vocab_size=500, context_dim=32, embed_dim=16, hidden_dim=48, num_layers=2),
    ModelConfig(vocab_size=500, context_dim=64, embed_dim=32, hidden_dim=96, num_layers=3),
    ModelConfig(vocab_size=500, context_dim=64, embed_dim=32, hidden_dim=128, num_layers=3, architecture="gated"),
]


def newllm_non_embedding(cfg: ModelConfig) -> int:
    model = NewLLM(cfg)
    return model.num_params() - model.token_embedding.weight.numel()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("newllm", NEWLLM_CONFIGS, ids=lambda c: f"{c.architecture}-C{c.context_dim}-L{c.num_layers}")
def test_size_for_matches_newllm_non_embedding_count_within_ten_percent(arch, newllm):
    target = newllm_non_embedding(newllm)
    cfg = size_for(arch, target, newllm.vocab_size, newllm.embed_dim, newllm.num_layers, num_heads=2, context_window=32)
    model = build_baseline(cfg, newllm.vocab_size)
    assert abs(model.num_params(non_embedding=True) - target) <= 0.1 * target
    if arch == "transformer":
        assert cfg.hidden_dim % cfg.num_heads == 0
    assert (cfg.architecture, cfg.embed_dim, cfg.num_layers) == (arch, newllm.embed_dim, newllm.num_layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_non_embedding_count_leaves_out_exactly_the_embedding_tables(arch):
    model = tiny(arch)
    tables = model.token_embedding.weight.numel()
    if arch == "transformer":
        tables += model.position_embedding.weight.numel()
    assert model.num_params(non_embedding=True) == model.num_params() - tables
    assert baselines.non_embedding_params(model.cfg, VOCAB) == model.num_params(non_embedding=True)


def test_size_for_names_the_nearest_widths_when_none_fits():
    # a 1-wide LSTM already has far more than 10 parameters: the head alone is 2 x 500
    with pytest.raises(ValueError, match="no lstm width gives 10 non-embedding parameters within 10%"):
        size_for("lstm", 10, 500, 16, 1)


# --- training -------------------------------------------------------------------------------------


def record_calls(model, monkeypatch) -> list[tuple]:
    """(ids, state in, state out) of every forward call of ``model``."""
    calls, forward = [], model.forward

    def spy(ids, state=None):
        logits, out = forward(ids, state)
        calls.append((ids, state, out))
        return logits, out

    monkeypatch.setattr(model, "forward", spy)
    return calls


def states_equal(a, b) -> bool:
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_recurrent_training_carries_state_window_to_window_and_hands_it_over(arch, monkeypatch):
    model = tiny(arch)
    calls = record_calls(model, monkeypatch)
    baselines.train_baseline(model, random_ids(90), random_ids(20, seed=1), lr=1e-2, epochs=2, patience=5,
                             batch_size=16, bptt=4, seed=0)
    train = [c for c in calls if c[0].shape[0] == 4]  # 4 streams of 22 tokens: windows of 4, 4, 4, 4, 4, 2
    assert len(train) == 12 and [c[0].shape[1] for c in train[:6]] == [4, 4, 4, 4, 4, 2]
    assert train[0][1] is None  # epoch 1 starts from zero state
    for k in range(1, 12):
        expected = train[k - 1][2]
        if k == 6:  # epoch 2: stream b continues from stream b - 1's end, stream 0 from the last stream's
            expected = baselines.hand_over(expected)
        assert states_equal(train[k][1], expected), k


def test_transformer_training_reads_each_window_after_its_streams_preceding_tokens(monkeypatch):
    model = tiny("transformer")  # context window 10
    calls, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda ids: calls.append(ids) or forward(ids))
    train_ids = random_ids(90)
    baselines.train_baseline(model, train_ids, random_ids(20, seed=1), lr=1e-2, epochs=1, patience=1,
                             batch_size=16, bptt=4, seed=0)
    streams = train_ids[:88].reshape(4, 22)
    train = [ids for ids in calls if ids.shape[0] == 4]
    for k, ids in enumerate(train):
        end = min(4 * k + 4, 22)
        assert torch.equal(ids, streams[:, max(0, end - 10):end]), k


@pytest.mark.parametrize("arch", ARCHS)
def test_training_restores_the_best_epoch_and_is_reproducible(arch):
    runs = []
    for _ in range(2):
        model = tiny(arch, dropout=0.1)
        result = baselines.train_baseline(model, random_ids(200), random_ids(40, seed=1), lr=3e-2, epochs=4,
                                          patience=1, batch_size=16, bptt=4, seed=0)
        runs.append([r.val_loss for r in result.history])
        assert baselines.baseline_stream_metrics(model, random_ids(40, seed=1))[0] == pytest.approx(
            result.best.val_loss, rel=1e-6)
        assert result.best.val_loss == min(runs[-1])
        assert result.stop_reason in ("early_stopping", "max_epochs") and result.streams == 4
        assert model.training  # the val measurement restored train mode
    assert runs[0] == runs[1]


def test_training_rejects_a_window_longer_than_the_transformers_context():
    with pytest.raises(ValueError, match="context_window"):
        baselines.train_baseline(tiny("transformer"), random_ids(90), random_ids(20), lr=1e-2, epochs=1,
                                 patience=1, batch_size=32, bptt=16, seed=0)


@pytest.fixture(scope="module")
def laptop_data(tmp_path_factory):
    from newllm.data import DataConfig, prepare_data

    cache = tmp_path_factory.mktemp("cache")
    return prepare_data(DataConfig(num_samples=40, vocab_size=500, cache_dir=str(cache)))


@pytest.mark.parametrize("arch, lr", [("lstm", 1e-2), ("gru", 1e-2), ("transformer", 3e-3)])
def test_one_epoch_on_laptop_data_beats_the_unigram_floor(laptop_data, arch, lr):
    d = laptop_data
    cfg = BaselineConfig(arch, embed_dim=16, hidden_dim=32, num_layers=1, context_window=32, num_heads=2, seed=0)
    model = build_baseline(cfg, d.vocab_size)
    result = baselines.train_baseline(model, d.train_ids, d.val_ids, lr=lr, epochs=1, patience=1,
                                      batch_size=256, bptt=8, seed=0)
    assert result.best.val_ppl < unigram_ppl(d.train_ids, d.val_ids, d.vocab_size)


# --- floors ---------------------------------------------------------------------------------------

TRAIN, VAL = [0, 1, 0, 1, 2], [0, 1, 2]  # vocab 3


def test_unigram_floor_by_hand():
    # add-one: counts 2, 2, 1 of 5 tokens -> p = 3/8, 3/8, 2/8; val predicts 1 and 2
    assert unigram_ppl(TRAIN, VAL, 3) == pytest.approx((3 / 8 * 2 / 8) ** -0.5)
    assert unigram_ppl(torch.tensor(TRAIN), torch.tensor(VAL), 3, k=0.5) == pytest.approx(
        (2.5 / 6.5 * 1.5 / 6.5) ** -0.5)


def test_bigram_floor_by_hand():
    # train pairs (0,1) x2, (1,0), (1,2): c(0,1) = 2, c(0) = 2; c(1,2) = 1, c(1) = 2
    # p(b|a) = (c(a,b) + k V u(b)) / (c(a) + k V), u the add-one unigram (3/8, 3/8, 2/8)
    k = 1.0
    p_1_after_0 = (2 + 3 * k * 3 / 8) / (2 + 3 * k)  # 5/8
    p_2_after_1 = (1 + 3 * k * 2 / 8) / (2 + 3 * k)  # 7/20
    assert bigram_ppl(TRAIN, VAL, 3, k=k) == pytest.approx((p_1_after_0 * p_2_after_1) ** -0.5)
    # an unseen pair and an unseen first token fall back on the prior
    assert bigram_ppl(TRAIN, [2, 2], 3, k=k) == pytest.approx(1 / (2 / 8))  # p(2 | 2) = u(2)


def test_bigram_floor_tends_to_the_unigram_as_the_prior_dominates():
    train, val = random_ids(300), random_ids(50, seed=1)
    assert bigram_ppl(train, val, VOCAB, k=1e9) == pytest.approx(unigram_ppl(train, val, VOCAB), rel=1e-6)


@pytest.mark.parametrize("floor", [unigram_ppl, bigram_ppl])
def test_floors_reject_bad_inputs(floor):
    with pytest.raises(ValueError, match="no next token"):
        floor(TRAIN, [1], 3)
    with pytest.raises(ValueError, match="outside"):
        floor(TRAIN, [0, 3], 3)
    with pytest.raises(ValueError, match="k must be > 0"):
        floor(TRAIN, VAL, 3, k=0)
