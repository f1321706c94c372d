"""Phase 2: the one val definition (the parallel read against its sequential oracle),
truncated BPTT through the recurrence, the frozen mode, early stopping with the best weights
restored."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from newllm import phase2
from newllm.config import TrainConfig
from newllm.model import ModelConfig, NewLLM
from newllm.phase1 import fixed_contexts

VOCAB = 12


def small_model(arch: str = "residual", seed: int = 0) -> NewLLM:
    torch.manual_seed(seed)
    hidden = 16 if arch == "residual" else 12
    return NewLLM(ModelConfig(vocab_size=VOCAB, context_dim=8, embed_dim=8, hidden_dim=hidden, num_layers=2,
                              architecture=arch))


def config(**overrides) -> TrainConfig:
    values = dict(context_dim=8, embed_dim=8, hidden_dim=16, num_layers=2, phase1_streams=2, phase1_max_iter=3,
                  phase2_epochs=3, phase2_batch_size=16, phase2_bptt=4, phase2_lr=0.01, seed=0)
    return TrainConfig(**{**values, **overrides})


class GradientRecorder(torch.optim.Optimizer):
    """An optimiser that keeps each step's gradients and leaves the weights alone."""

    def __init__(self, params):
        super().__init__(params, {})
        self.steps: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.steps.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                           for group in self.param_groups for p in group["params"]])


# --- the val definition ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["residual", "gated"])
def test_stream_metrics_are_the_model_reading_the_stream_from_zero_context(arch):
    model = small_model(arch)
    ids = torch.randint(VOCAB, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # by hand: one sequence, context carried, every token after the first predicted
        c, logits = model.initial_context(), []
        for t in range(len(ids) - 1):
            c = model.update(model.embed(ids[t]), c)
            logits.append(model.head(c))
        logits = torch.stack(logits)
    assert len(logits) == len(ids) - 1 == 39  # every token after the first
    for loss, acc in (phase2.sequential_stream_metrics(model, ids), phase2.stream_metrics(model, ids, streams=5)[:2]):
        assert loss == pytest.approx(float(F.cross_entropy(logits, ids[1:])), rel=1e-6)
        assert acc == pytest.approx(float((logits.argmax(-1) == ids[1:]).float().mean()))
    for metrics in (phase2.stream_metrics, phase2.sequential_stream_metrics):
        with pytest.raises(ValueError, match="no next token"):
            metrics(model, ids[:1])


def val_stream(n: int, seed: int = 7) -> torch.Tensor:
    return torch.randint(VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@functools.cache
def trained_model(arch: str) -> NewLLM:
    """A small model after Phase 1 and two Phase 2 epochs: weights that learned to contract."""
    model, cfg = small_model(arch), config(architecture=arch, hidden_dim=16 if arch == "residual" else 12,
                                           phase2_epochs=2)
    ids = val_stream(400, seed=1)
    phase2.train_phase2(model, phase2_data(model, cfg, ids), ids[:60], cfg)
    return model


@functools.cache
def oracle(arch: str, weights: str) -> tuple[NewLLM, torch.Tensor, torch.Tensor]:
    """(model, val ids, their contexts by the sequential read)."""
    model = small_model(arch) if weights == "random" else trained_model(arch)
    ids = val_stream(646)  # 645 predictions: 5 or 6 tokens per stream at B = 128, the last stream shorter
    return model, ids, phase2.sequential_contexts(model, ids)


@pytest.mark.parametrize("arch", ["residual", "gated"])
@pytest.mark.parametrize("weights", ["random", "trained"])
@pytest.mark.parametrize("streams", [1, 7, 128])
def test_parallel_val_equals_the_sequential_read(arch, weights, streams):
    """The hand-over passes give the sequential read's perplexity (within 1e-5 relative), and
    never by falling back: B passes are exact by construction, so max_passes = B always settles."""
    model, ids, contexts = oracle(arch, weights)
    read = phase2.read_contexts(model, ids, streams=streams, max_passes=streams)
    assert not read.fallback and 1 <= read.passes <= streams
    torch.testing.assert_close(read.contexts, contexts, rtol=0, atol=1e-4)
    got_loss, got_acc = phase2.head_metrics(model, read.contexts, ids[1:])
    want_loss, want_acc = phase2.head_metrics(model, contexts, ids[1:])
    assert math.exp(got_loss) == pytest.approx(math.exp(want_loss), rel=1e-5)
    assert got_acc == pytest.approx(want_acc, abs=1 / len(ids))  # at most one argmax tie may flip


def test_trained_weights_settle_in_fewer_passes_than_streams():
    """The point of the hand-over: a model that contracts settles long before pass B."""
    model, ids, _ = oracle("residual", "trained")
    got = phase2.read_contexts(model, ids, streams=20, max_passes=20)
    assert not got.fallback and got.passes < 20


def test_unsettled_hand_over_falls_back_to_the_sequential_read():
    """One pass cannot show that B > 1 streams settled (nothing to compare it with): the read
    falls back and says so, and its number is the sequential read's, never the unsettled one's."""
    model, ids = small_model(), val_stream(400)
    assert phase2.handover_contexts(model, ids[:-1], 7, max_passes=1) == (None, 1)
    got = phase2.stream_metrics(model, ids, streams=7, max_passes=1)
    assert (got.passes, got.fallback) == (1, True)
    assert got[:2] == phase2.sequential_stream_metrics(model, ids)
    settled = phase2.stream_metrics(model, ids, streams=7, max_passes=7)
    assert not settled.fallback and settled.passes > 1


def test_phase2_epochs_count_val_fallbacks(monkeypatch):
    """Each epoch's record says how its val read went; a run's summary counts the fallbacks."""
    from newllm.run import SUMMARY_DTYPES, TrainResult

    monkeypatch.setattr(phase2, "stream_metrics", functools.partial(phase2.stream_metrics, streams=4, max_passes=1))
    model, cfg = small_model(), config(phase2_epochs=2)
    ids = val_stream(200, seed=1)
    result = phase2.train_phase2(model, phase2_data(model, cfg, ids), ids[:60], cfg)
    assert [(r.val_passes, r.val_fallback) for r in result.history] == [(1, True), (1, True)]
    run = TrainResult(cfg, "passed", 1, 1, None)
    run.phase2_done(result, phase2.stream_metrics(model, ids[:60]))
    summary = run.summary()
    assert summary.keys() == SUMMARY_DTYPES.keys()
    assert (summary["val_passes"], summary["val_fallbacks"]) == (1, 2)
    assert summary["val_loss"] == result.best.val_loss


# --- truncated backpropagation through the recurrence ---------------------------------------


def hand_detached_gradients(model: NewLLM, e, targets, start, window: int, params) -> list[list[torch.Tensor]]:
    """Per-window gradients (clipped as training clips them) of the mean cross-entropy, the
    context detached by hand at every window boundary: the definition of truncated BPTT."""
    steps, c = [], start
    for s in range(0, e.shape[1], window):
        c, logits = c.detach(), []
        for t in range(s, min(s + window, e.shape[1])):
            c = model.update(e[:, t], c)
            logits.append(model.head(c))
        loss = F.cross_entropy(torch.stack(logits, 1).flatten(0, 1), targets[:, s:s + window].flatten())
        model.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, phase2.GRAD_CLIP)
        steps.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
    return steps


@pytest.mark.parametrize("arch", ["residual", "gated"])
def test_truncated_bptt_gradients_equal_a_hand_detached_reference(arch):
    model = small_model(arch)
    ids = torch.randint(VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        e = model.embed(ids[:, :-1])
    targets, start = ids[:, 1:], torch.randn(2, 8, generator=torch.Generator().manual_seed(6))
    params = list(model.head.parameters()) + model.context_parameters()
    for window in (4, 12):  # 12: one window over the whole stream, i.e. full backpropagation
        recorder = GradientRecorder(params)
        _, last = phase2.tbptt_epoch(model, recorder, params, e, targets, start, window)
        expected = hand_detached_gradients(model, e, targets, start, window, params)
        assert len(recorder.steps) == len(expected) == -(-12 // window)
        for got, want in zip(recorder.steps, expected):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(last, model.scan(e, start)[1].detach())
    # the truncation matters: the first window's gradient differs from full backpropagation's
    truncated = hand_detached_gradients(model, e, targets, start, 4, params)[0]
    full = hand_detached_gradients(model, e, targets, start, 12, params)[0]
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(truncated, full))


# --- train_phase2 ---------------------------------------------------------------------------


def phase2_data(model: NewLLM, cfg: TrainConfig, train_ids: torch.Tensor):
    return fixed_contexts(model, train_ids, cfg)


def test_freeze_context_trains_only_the_head():
    model, cfg = small_model(), config(freeze_context=True)
    ids = torch.randint(VOCAB, (200,), generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(model.state_dict())
    result = phase2.train_phase2(model, phase2_data(model, cfg, ids), ids[:60], cfg)
    after = model.state_dict()
    assert result.streams == 0 and len(result.history) >= 1
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == name.startswith("head."), name


def test_default_mode_trains_the_recurrence_and_reports_the_model_it_keeps():
    model, cfg = small_model(), config()
    ids = torch.randint(VOCAB, (200,), generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(model.state_dict())
    result = phase2.train_phase2(model, phase2_data(model, cfg, ids), ids[:60], cfg)
    assert (result.streams, result.window) == (4, 4)  # 16 tokens a step: 4 streams x 4-token windows
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.startswith("blocks."))
    assert not any(not torch.equal(before[k], v) for k, v in model.state_dict().items()
                   if k.startswith("token_embedding."))
    # what the kept weights do on the val stream is the best epoch's reported figure
    assert phase2.stream_metrics(model, ids[:60])[:2] == (result.best.val_loss, result.best.val_acc)


@pytest.mark.parametrize("freeze", [False, True])
def test_early_stopping_restores_the_best_epoch(freeze):
    """Train on one cycle of tokens and validate on the reverse cycle: the better the model
    learns the training text, the worse it predicts the val text, so val loss rises."""
    model, cfg = small_model(), config(freeze_context=freeze, phase2_lr=0.05, phase2_patience=2, phase2_epochs=12)
    train_ids = torch.arange(300) % VOCAB
    val_ids = torch.arange(60).flip(0) % VOCAB
    ends = []
    result = phase2.train_phase2(model, phase2_data(model, cfg, train_ids), val_ids, cfg, on_epoch=ends.append)
    losses = [r.val_loss for r in result.history]
    assert result.stop_reason == "early_stopping"
    assert len(losses) == result.best_epoch + cfg.phase2_patience
    assert [end.last for end in ends] == [False] * (len(losses) - 1) + [True]  # the early stop's epoch is the last
    assert losses[result.best_epoch - 1] == min(losses) < losses[-1]
    assert phase2.stream_metrics(model, val_ids)[0] == losses[result.best_epoch - 1]


def test_bptt_window_cannot_exceed_the_batch():
    with pytest.raises(ValueError, match="phase2_bptt .* must be <= phase2_batch_size"):
        config(phase2_bptt=32, phase2_batch_size=16)


def test_streams_keep_two_tokens_with_a_one_token_window():
    """One rule for New-LLM and the baselines: ``batch // bptt`` streams, fewer on a short stream,
    each of >= 2 tokens even with bptt 1 (New-LLM's rule once gave 1-token streams there, which
    ``as_streams`` refuses)."""
    assert phase2.num_phase2_streams(1000, 32, 4) == 8
    assert phase2.num_phase2_streams(50, 32, 4) == 8 and phase2.num_phase2_streams(30, 32, 4) == 7
    assert phase2.num_phase2_streams(50, 32, 1) == 24
    model, cfg = small_model(), config(phase2_bptt=1, phase2_batch_size=32, phase2_epochs=1)
    ids = torch.randint(VOCAB, (50,), generator=torch.Generator().manual_seed(1))
    result = phase2.train_phase2(model, phase2_data(model, cfg, ids), ids[:20], cfg)
    assert (result.streams, result.window) == (24, 1)
