"""Phase 1: the fast passes against the seed's per-token pass, the corrected targets, stop rules."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from newllm import phase1
from newllm.config import TrainConfig
from newllm.model import ModelConfig, NewLLM
from newllm.phase1 import PassRecord
from newllm.reference import reference_pass

SMALL = dict(context_dim=8, embed_dim=8, num_layers=2)


def small_model(arch: str, seed: int = 0) -> NewLLM:
    torch.manual_seed(seed)
    hidden = 16 if arch == "residual" else 12
    return NewLLM(ModelConfig(vocab_size=40, hidden_dim=hidden, architecture=arch, **SMALL))


def one_pass_state(model: NewLLM, num_streams: int, tokens: int = 96):
    """Streams' embeddings and the contexts of a first pass: what a Phase 1 pass starts from."""
    torch.manual_seed(1)
    ids = torch.randint(40, (tokens,))
    with torch.no_grad():
        e = phase1.as_streams(model.embed(ids), num_streams)
    _, previous = phase1.sequential_pass(model, e, model.initial_context((num_streams,)))
    return e, previous


def grads(model: NewLLM) -> list[torch.Tensor]:
    """Gradients of the context parameters (zeros where none flows, e.g. the residual model's
    last token LayerNorm, whose output the context never reads)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.context_parameters()]


@pytest.mark.parametrize("arch", ["residual", "gated"])
@pytest.mark.parametrize("num_streams", [1, 4])
def test_fast_pass_gradient_equals_per_token_reference(arch, num_streams):
    model = small_model(arch)
    e, previous = one_pass_state(model, num_streams)
    ref = copy.deepcopy(model)
    ref_out, ref_loss, ref_cvfp, ref_dist = reference_pass(ref, e, phase1.hand_over(previous), previous, w=0.3)

    cfg = TrainConfig(**SMALL, hidden_dim=model.cfg.hidden_dim, architecture=arch, phase1_chunk_tokens=1000)
    inputs, outputs = phase1.next_pass(model, e, previous, cfg)
    loss, cvfp, dist, grad = phase1.loss_and_output_grad(outputs, previous, 0.3)
    phase1.accumulate_gradient(model, e, inputs, grad, cfg.phase1_chunk_tokens)

    torch.testing.assert_close(outputs, ref_out, rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-5) and cvfp == pytest.approx(ref_cvfp, rel=1e-5)
    assert dist == pytest.approx(ref_dist, rel=1e-5)
    fast, slow = grads(model), grads(ref)
    assert sum(g.abs().sum() for g in slow) > 0
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["residual", "gated"])
def test_chunked_backward_equals_unchunked(arch):
    """The dist term couples all tokens through global means and variances: chunking must not change it."""
    model = small_model(arch)
    e, previous = one_pass_state(model, num_streams=4)
    cfg = TrainConfig(**SMALL, hidden_dim=model.cfg.hidden_dim, architecture=arch)
    inputs, outputs = phase1.next_pass(model, e, previous, cfg)
    *_, grad = phase1.loss_and_output_grad(outputs, previous, 0.5)
    result = []
    for chunk in (7, 10_000):
        model.zero_grad(set_to_none=True)
        phase1.accumulate_gradient(model, e, inputs, grad, chunk)
        result.append(grads(model))
    for a, b in zip(*result):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_pass_2_cvfp_loss_is_not_zero_and_targets_are_previous_pass():
    """The seed compared a pass with itself (loss 0, "100% converged" at pass 2). Here pass i's
    target is pass i-1's contexts, saved before pass i runs."""
    model = small_model("residual")
    initial = copy.deepcopy(model)
    ids = torch.randint(40, (400,), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(**SMALL, hidden_dim=16, phase1_max_iter=2, phase1_streams=1, collapse_patience=5)
    result = phase1.train_phase1(model, ids, cfg)
    assert [r.pass_index for r in result.history] == [1, 2] and result.stop_reason == "max_iter"

    with torch.no_grad():
        e = phase1.as_streams(initial.embed(ids), 1)
        c0 = phase1.first_pass(initial, e, cfg)
        _, c1 = phase1.next_pass(initial, e, c0, cfg)      # pass 1: untrained weights
        _, c2 = phase1.next_pass(model, e, c1, cfg)        # pass 2: weights after one step (no step on the last)
    assert result.history[0].cvfp_loss == pytest.approx(phase1.cvfp_loss(c1, c0).item(), rel=1e-5)
    assert result.history[1].cvfp_loss == pytest.approx(phase1.cvfp_loss(c2, c1).item(), rel=1e-5)
    assert result.history[1].cvfp_loss > 1e-4
    assert result.history[1].converged_ratio < 1.0


def test_context_is_carried_across_positions_and_streams_hand_over():
    model = small_model("gated")
    e, _ = one_pass_state(model, num_streams=3)
    cfg = TrainConfig(**SMALL, hidden_dim=12, architecture="gated")
    outputs0 = phase1.first_pass(model, e, cfg)
    inputs1, outputs1 = phase1.next_pass(model, e, outputs0, cfg)
    # stream b starts from stream b - 1's last context of the previous pass, stream 0 from the last stream's
    torch.testing.assert_close(inputs1[:, 0], outputs0[[2, 0, 1], -1])
    torch.testing.assert_close(inputs1[:, 1:], outputs1[:, :-1])        # each position reads its predecessor
    assert not torch.allclose(outputs1[:, 0], outputs0[:, 0])


def converge(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig, streams: int) -> tuple[torch.Tensor, int]:
    """Frozen-weight passes over ``streams`` streams until no context moves by 5e-6 (float rounding differs between batch sizes): (contexts
    in stream order, passes after pass 0)."""
    with torch.no_grad():
        e = phase1.as_streams(model.embed(ids), streams)
        previous = phase1.first_pass(model, e, cfg)
        for passes in range(1, 1000):
            _, outputs = phase1.next_pass(model, e, previous, cfg)
            if (outputs - previous).abs().max() < 5e-6:
                break
            previous = outputs
    return outputs.flatten(0, 1), passes


@pytest.mark.parametrize("mode", ["exact", "jacobi"])
def test_streams_that_hand_over_reach_the_single_stream_fixed_point(mode, monkeypatch):
    """B = 8 streams and the seed's single stream converge to the same contexts; with each
    stream carrying its own last context (B cyclic texts) they do not."""
    model = small_model("gated")
    cfg = TrainConfig(**SMALL, hidden_dim=12, architecture="gated", phase1_mode=mode)
    ids = torch.randint(40, (256,), generator=torch.Generator().manual_seed(4))
    single, single_passes = converge(model, ids, cfg, 1)
    streams, stream_passes = converge(model, ids, cfg, 8)
    torch.testing.assert_close(streams, single, rtol=0, atol=1e-5)
    assert single_passes < 999 and stream_passes < 999
    print(f"{mode}: B = 1 took {single_passes} passes, B = 8 took {stream_passes}")
    monkeypatch.setattr(phase1, "hand_over", lambda previous: previous[:, -1])  # each stream its own cyclic text
    cyclic, _ = converge(model, ids, cfg, 8)
    assert (cyclic - single).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["exact", "jacobi"])
def test_fixed_passes_from_phase1_contexts_need_fewer_passes(mode):
    model = small_model("residual")
    ids = torch.randint(40, (1024,), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(**SMALL, hidden_dim=16, phase1_max_iter=40, phase1_streams=4, phase1_mode=mode,
                      phase1_min_iter=1)
    result = phase1.train_phase1(model, ids, cfg)
    from_zero = phase1.fixed_contexts(model, ids, cfg)
    from_phase1 = phase1.fixed_contexts(model, ids, cfg, start=result.contexts)
    assert from_phase1.passes <= from_zero.passes
    if mode == "jacobi":  # a Jacobi pass moves information one token on: from zero it takes many
        assert from_phase1.passes < from_zero.passes
    assert phase1.converged_ratio(from_phase1.contexts, from_zero.contexts, cfg.convergence_threshold) >= 0.95
    # passes are counted alike: each record is a pass after pass 0, compared with its predecessor
    assert [r.pass_index for r in from_zero.history] == list(range(1, from_zero.passes + 1))
    assert all(r.lr == 0 for r in from_zero.history)


def record(i: int, ratio: float, er_fraction: float = 0.5, loss: float = 1.0) -> PassRecord:
    return PassRecord(i, loss, loss, 0.0, ratio, er_fraction * 8, er_fraction, 1e-3, 0.1)


def test_stop_rules():
    cfg = TrainConfig(**SMALL, hidden_dim=16, phase1_max_iter=6, phase1_min_iter=3, collapse_patience=2)
    assert phase1.stop_reason([record(1, 0.99)], cfg) is None  # converged too early to count
    assert phase1.stop_reason([record(1, 0.5), record(2, 0.6), record(3, 0.96)], cfg) == "converged"
    assert phase1.stop_reason([record(1, 0.5), record(2, 0.48), record(3, 0.46)], cfg) == "convergence_falling"
    assert phase1.stop_reason([record(1, 0.5), record(2, 0.495), record(3, 0.46)], cfg) is None
    assert phase1.stop_reason([record(1, 0.1, 0.1), record(2, 0.2, 0.15)], cfg) == "collapsed"
    assert phase1.stop_reason([record(1, 0.1, 0.5), record(2, 0.2, 0.15)], cfg) is None
    assert phase1.stop_reason([record(i, 0.1 * i) for i in range(1, 7)], cfg) == "max_iter"
    assert phase1.stop_reason([record(1, 0.1, loss=float("nan"))], cfg) == "diverged"


def test_learning_rate_schedule_follows_the_seed():
    cfg = TrainConfig(**SMALL, hidden_dim=16)
    assert [phase1.learning_rate(i, cfg) for i in (1, 3, 4, 8, 9, 20)] == [0.002, 0.002, 0.0005, 0.0005, 0.0001, 0.0001]


def test_loss_weights_and_no_dist_reg():
    c, t = torch.randn(50, 8), torch.randn(50, 8)
    loss, cvfp, dist = phase1.phase1_loss(c, t, 0.25)
    assert loss.item() == pytest.approx(0.75 * cvfp.item() + 0.25 * dist.item())
    assert phase1.dist_loss(torch.randn(100_000, 4)).item() < 0.01  # N(0, 1) contexts are not penalised
    assert TrainConfig(**SMALL, hidden_dim=16, dist_reg=False).effective_dist_reg_weight == 0.0


def test_number_of_streams_keeps_streams_long_enough():
    cfg = TrainConfig(**SMALL, hidden_dim=16, phase1_streams=64)
    assert phase1.num_streams(100_000, cfg) == 64
    assert phase1.num_streams(1000, cfg) == 1000 // phase1.MIN_STREAM_TOKENS
    assert phase1.num_streams(50, cfg) == 1
    assert phase1.num_streams(100_000, replace(cfg, phase1_streams=1)) == 1


@pytest.mark.parametrize("mode", ["exact", "jacobi"])
def test_phase1_is_deterministic(mode):
    cfg = TrainConfig(**SMALL, hidden_dim=16, phase1_max_iter=4, phase1_mode=mode, phase1_streams=2)
    ids = torch.randint(40, (600,), generator=torch.Generator().manual_seed(3))
    runs = []
    for _ in range(2):
        model = small_model("residual", seed=5)
        runs.append((phase1.train_phase1(model, ids, cfg), model))
    (a, model_a), (b, _) = runs
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert [r.effective_rank for r in a.history] == [r.effective_rank for r in b.history]
    fixed = phase1.fixed_contexts(model_a, ids, cfg)
    assert fixed.contexts.shape == (len(fixed.ids), 8) and 1 <= fixed.passes <= cfg.phase1_max_iter


@pytest.mark.parametrize("arch", ["residual", "gated"])
def test_the_backward_from_kept_matmul_outputs_is_the_recomputed_one(arch):
    """The exact pass keeps its matmul outputs (MatmulTape) and the backward takes them instead of
    computing the forward again: the same gradients, in chunks of whole steps or of positions."""
    model = small_model(arch)
    e, previous = one_pass_state(model, num_streams=4)
    tape = phase1.MatmulTape(model)
    inputs, outputs = phase1.sequential_pass(model, e, phase1.hand_over(previous), tape)
    assert len(tape.steps) == e.shape[1] and all(len(s) == len(model.matmul_widths()) for s in tape.steps)
    assert torch.equal(outputs, phase1.sequential_pass(model, e, phase1.hand_over(previous))[1])
    _, _, _, grad = phase1.loss_and_output_grad(outputs, previous, 0.2)
    for chunk in (7, 1000):
        model.zero_grad()
        phase1.accumulate_gradient(model, e, inputs, grad, chunk)
        recomputed = grads(model)
        model.zero_grad()
        phase1.accumulate_gradient(model, e, inputs, grad, chunk, tape)
        for a, b in zip(recomputed, grads(model)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # a training pass keeps them within the budget and recomputes beyond it: the same step
    cfg = TrainConfig(**SMALL, hidden_dim=model.cfg.hidden_dim, architecture=arch, phase1_streams=4)
    after = []
    for keep_gib in (1.0, 0.0):
        m = copy.deepcopy(model)
        phase1.run_pass(m, e, previous, replace(cfg, phase1_keep_gib=keep_gib), [], torch.optim.Adam(m.context_parameters()))
        after.append(m.state_dict())
    for k in after[0]:
        torch.testing.assert_close(after[0][k], after[1][k], rtol=1e-5, atol=1e-6)
