"""Baselines: standard language models trained end to end, to compare New-LLM against at a
matched parameter count. No Phase 1, no gate; their token embeddings train, as in any LM.

- ``lstm`` / ``gru``: token embedding -> ``torch.nn.LSTM`` / ``torch.nn.GRU`` (batch_first)
  -> ``Linear(hidden_dim -> vocab)``. The recurrent state carries the stream, as New-LLM's
  context does.
- ``transformer``: token embedding -> bias-free ``Linear(embed_dim -> d_model)`` (always
  there, so the parameter count grows with d_model) + learned position embedding (up to
  ``context_window`` positions) -> causal pre-norm ``torch.nn.TransformerEncoder`` (feed-forward
  width 4 d_model, GELU, a final LayerNorm) -> ``Linear(d_model -> vocab)``. d_model is
  ``hidden_dim``. It sees at most ``context_window`` tokens.

Sizes are compared as ``num_params(non_embedding=True)`` (nanoGPT's convention); ``size_for``
picks the width that matches a target count; the config (``BaselineConfig``) lives in
``newllm.config``. Training (``train_baseline``) runs through New-LLM's Phase 2 loop,
``newllm.phase2.fit``: the same streams x window batches (``num_phase2_streams``), the same
optimiser step and early stopping; and the val definition (``baseline_stream_metrics``) has
the same N - 1 predicted val positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from newllm.config import BaselineArchitecture, BaselineConfig, non_embedding_params
from newllm.phase1 import as_streams
from newllm.phase2 import EpochEnd, Phase2Result, fit, num_phase2_streams, optimizer_step

FFN_MULT = 4            # transformer feed-forward width, in multiples of d_model (as non_embedding_params counts)
SIZE_TOLERANCE = 0.1    # size_for: non-embedding count within +-10% of the target
EVAL_TOKENS = 8192      # tokens per forward call when measuring a val stream

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None  # GRU: h; LSTM: (h, c); None: zeros


# --- models -------------------------------------------------------------------------------------


class BaselineLM(nn.Module):
    """A baseline language model: embeddings, a standard sequence core, a head tied to nothing."""
    cfg: BaselineConfig

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters; with ``non_embedding`` every parameter except the ``nn.Embedding``
        tables: the token embedding and, for the transformer, the position embedding. The output
        head (weight and bias, not tied), the recurrent or attention layers, the transformer's
        input projection and LayerNorms all count."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return total


class RecurrentLM(BaselineLM):
    """Embedding -> LSTM or GRU -> head. ``forward`` continues from ``state`` and returns the
    state after the last token, so a stream can be read in pieces (dropout, when set, on the
    embeddings, between layers and before the head)."""

    def __init__(self, cfg: BaselineConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        rnn = nn.LSTM if cfg.architecture == "lstm" else nn.GRU
        between = cfg.dropout if cfg.num_layers > 1 else 0.0  # torch warns on dropout after a lone layer
        self.rnn = rnn(cfg.embed_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True, dropout=between)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_dim, vocab_size)

    def forward(self, ids: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        """Next-token logits [B, T, vocab] for ids [B, T] read from ``state`` (zeros if None),
        and the state after the last token."""
        out, state = self.rnn(self.drop(self.token_embedding(ids)), state)
        return self.head(self.drop(out)), state


class TransformerLM(BaselineLM):
    """A small causal transformer (pre-norm encoder layers under a causal mask) over at most
    ``context_window`` tokens, positions numbered from the first token of each call."""

    def __init__(self, cfg: BaselineConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.token_embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        self.embed_proj = nn.Linear(cfg.embed_dim, d, bias=False)
        self.position_embedding = nn.Embedding(cfg.context_window, d)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(d, cfg.num_heads, FFN_MULT * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.num_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, vocab] for ids [B, T], T <= context_window: position t sees
        tokens 0..t of the call and nothing before it."""
        length = ids.shape[-1]
        if length > self.cfg.context_window:
            raise ValueError(f"{length} tokens exceed the context window of {self.cfg.context_window}")
        positions = torch.arange(length, device=ids.device)
        x = self.drop(self.embed_proj(self.token_embedding(ids)) + self.position_embedding(positions))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=x.dtype)
        return self.head(self.blocks(x, mask=mask, is_causal=True))


def build_baseline(cfg: BaselineConfig, vocab_size: int) -> BaselineLM:
    """The model ``cfg`` describes, initialised from ``cfg.seed`` (the global RNG is left as it was)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.architecture == "transformer":
            return TransformerLM(cfg, vocab_size)
        return RecurrentLM(cfg, vocab_size)


# --- matching a parameter count -----------------------------------------------------------------


def size_for(architecture: BaselineArchitecture, target_non_embedding: int, vocab_size: int, embed_dim: int,
             num_layers: int, *, context_window: int = BaselineConfig.context_window,
             num_heads: int = BaselineConfig.num_heads, dropout: float = BaselineConfig.dropout,
             seed: int = BaselineConfig.seed, tolerance: float = SIZE_TOLERANCE) -> BaselineConfig:
    """The config whose ``num_params(non_embedding=True)`` is nearest ``target_non_embedding``,
    varying only ``hidden_dim`` (the transformer's d_model, over multiples of ``num_heads``).
    The count grows with the width, so a doubling then a bisection finds the two widths around
    the target. Raises ValueError when the nearest is more than ``tolerance`` (10%) away."""
    if target_non_embedding < 1:
        raise ValueError(f"target_non_embedding must be >= 1, got {target_non_embedding}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    step = num_heads if architecture == "transformer" else 1

    def config(k: int) -> BaselineConfig:
        return BaselineConfig(architecture, embed_dim, k * step, num_layers, context_window, num_heads, dropout, seed)

    def count(k: int) -> int:
        return non_embedding_params(config(k), vocab_size)

    high = 1
    while count(high) < target_non_embedding:
        high *= 2
    low = high // 2  # count(low) < target (or low == 0)
    while high - low > 1:
        mid = (low + high) // 2
        if count(mid) < target_non_embedding:
            low = mid
        else:
            high = mid
    best = min((k for k in (low, high) if k >= 1), key=lambda k: abs(count(k) - target_non_embedding))
    if abs(count(best) - target_non_embedding) > tolerance * target_non_embedding:
        near = ", ".join(f"hidden_dim={k * step}: {count(k)}" for k in (low, high) if k >= 1)
        raise ValueError(f"no {architecture} width gives {target_non_embedding} non-embedding parameters "
                         f"within {tolerance:.0%} (vocab_size={vocab_size}, embed_dim={embed_dim}, "
                         f"num_layers={num_layers}); nearest: {near}" +
                         (f" (the width steps by num_heads={num_heads}: fewer heads give finer steps)"
                          if architecture == "transformer" and num_heads > 1 else ""))
    return config(best)


# --- the val definition -------------------------------------------------------------------------


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside, the previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def default_stride(cfg: BaselineConfig) -> int:
    """Half the context window: past the first window every scored position sees more than
    context_window / 2 tokens, at twice the forward cost of reading the stream once."""
    return max(1, cfg.context_window // 2)


@torch.inference_mode()
def stream_logits(model: BaselineLM, ids: torch.Tensor, *, stride: int | None = None,
                  chunk: int = EVAL_TOKENS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [n, vocab], targets [n]) pieces, in stream order, that predict every token of
    ``ids`` after the first exactly once: the concatenated targets are ``ids[1:]``.

    LSTM/GRU: the stream is read as one sequence from zero state, ``chunk`` tokens per call
    with the state carried, so position t is predicted from all of ids[0..t].

    Transformer: sliding windows of ``context_window`` tokens. The first window scores all its
    positions; each next window ends ``stride`` tokens later (the last one at the end of the
    stream) and scores only the positions after the previous window's end. A position is then
    predicted from between context_window - stride + 1 and context_window tokens (fewer only
    inside the first window); stride 1 gives every position the full context_window tokens.
    ``stride`` defaults to ``default_stride``.
    """
    device = next(model.parameters()).device
    inputs, targets = ids[:-1].to(device), ids[1:].to(device)
    with evaluating(model):
        if isinstance(model, RecurrentLM):
            state: State = None
            for s in range(0, len(inputs), chunk):
                logits, state = model(inputs[None, s:s + chunk], state)
                yield logits[0], targets[s:s + chunk]
            return
        window = model.cfg.context_window
        stride = default_stride(model.cfg) if stride is None else stride
        if not 1 <= stride <= window:
            raise ValueError(f"stride must be in [1, context_window={window}], got {stride}")
        if len(inputs) <= window:
            yield model(inputs[None])[0], targets
            return
        ends = list(range(window, len(inputs), stride)) + [len(inputs)]
        scored_from = [0] + ends[:-1]  # stream position of each window's first scored token
        per_call = max(1, chunk // window)
        for b in range(0, len(ends), per_call):
            batch_ends, batch_from = ends[b:b + per_call], scored_from[b:b + per_call]
            logits = model(torch.stack([inputs[e - window:e] for e in batch_ends]))
            offsets = torch.tensor([f - (e - window) for e, f in zip(batch_ends, batch_from)], device=device)
            scored = torch.arange(window, device=device) >= offsets[:, None]
            yield logits[scored], targets[batch_from[0]:batch_ends[-1]]


def baseline_stream_metrics(model: BaselineLM, ids: torch.Tensor, *, stride: int | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over every token of ``ids`` after the first, predicted
    as ``stream_logits`` describes: N - 1 predictions, like ``newllm.phase2.stream_metrics``."""
    if len(ids) < 2:
        raise ValueError(f"a stream of {len(ids)} tokens has no next token to predict")
    total_loss, correct, count = 0.0, 0, 0
    for logits, targets in stream_logits(model, ids, stride=stride):
        total_loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += len(targets)
    return total_loss / count, correct / count


# --- training -----------------------------------------------------------------------------------


def detach_state(state: State) -> State:
    """The recurrent state cut from the graph: truncated backprop through time between windows."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def hand_over(state: State) -> State:
    """Start states of the next epoch: stream b continues from stream b - 1's last state,
    stream 0 from the last stream's (the batch is dim 1 of torch's RNN states)."""
    return tuple(s.roll(1, dims=1) for s in state) if isinstance(state, tuple) else state.roll(1, dims=1)


def recurrent_epoch(model: RecurrentLM, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                    inputs: torch.Tensor, targets: torch.Tensor, state: State, window: int) -> tuple[float, State]:
    """One epoch of truncated backpropagation over streams ``inputs`` [B, L] with next-token
    ``targets`` [B, L] from ``state``: one step per window, the state carried to the next
    window detached. Returns the mean train loss and each stream's last state."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)  # summed on the device: no sync per step
    for s in range(0, inputs.shape[1], window):
        logits, state = model(inputs[:, s:s + window], state)
        y = targets[:, s:s + window]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer_step(optimizer, params, loss)
        loss_sum += loss.detach() * y.numel()
        state = detach_state(state)  # the truncation: the next window's gradient stops here
    return float(loss_sum) / targets.numel(), state


def transformer_epoch(model: TransformerLM, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                      inputs: torch.Tensor, targets: torch.Tensor, window: int) -> float:
    """One epoch over streams ``inputs`` [B, L]: one step per window of ``window`` tokens, each
    read after up to context_window - window preceding tokens of its own stream (its analogue
    of a carried state) and scored on its own tokens only. Returns the mean train loss."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
    for s in range(0, inputs.shape[1], window):
        y = targets[:, s:s + window]
        prefix = min(model.cfg.context_window - y.shape[1], s)
        logits = model(inputs[:, s - prefix:s + y.shape[1]])[:, prefix:]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer_step(optimizer, params, loss)
        loss_sum += loss.detach() * y.numel()
    return float(loss_sum) / targets.numel()


def train_baseline(model: BaselineLM, train_ids: torch.Tensor, val_ids: torch.Tensor, *, lr: float, epochs: int,
                   patience: int, batch_size: int, bptt: int, seed: int, stride: int | None = None,
                   on_epoch: Callable[[EpochEnd], None] | None = None) -> Phase2Result:
    """Train ``model`` end to end on ``train_ids`` through Phase 2's loop (``newllm.phase2.fit``),
    as New-LLM's Phase 2 is trained; ``model`` ends with its best epoch's weights.

    Batches: ``batch_size`` tokens per step = ``num_phase2_streams`` contiguous streams of the
    train stream side by side x a window of ``bptt`` tokens. LSTM/GRU: truncated
    backpropagation, each stream's state carried from window to window (detached) and handed
    over between epochs (stream b continues from stream b - 1's end, stream 0 from the last
    stream's); epoch 1 starts from zero state (there is no Phase 1). Transformer:
    ``transformer_epoch`` (each window after up to context_window - bptt tokens of its stream).

    Args:
        model: The baseline trained, in train mode for each training epoch.
        train_ids: The train token stream (>= 3 tokens).
        val_ids: The val token stream (>= 2 tokens), measured after each epoch by
            ``baseline_stream_metrics``.
        lr: Adam's learning rate.
        epochs: The most epochs.
        patience: Early stopping after this many epochs without a val improvement.
        batch_size: Tokens per optimiser step.
        bptt: Tokens per stream and step (<= ``batch_size``; <= the transformer's context_window).
        seed: Fixes the dropout masks (the global RNG is left as it was).
        stride: The transformer's val stride (``stream_logits``).
        on_epoch: ``fit``'s ``on_epoch``; its ``EpochEnd.state`` is None: a baseline restarts
            instead of resuming.
    """
    for name, value in (("batch_size", batch_size), ("bptt", bptt)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if bptt > batch_size:
        raise ValueError(f"bptt ({bptt}) must be <= batch_size ({batch_size}): "
                         f"a step's batch is streams x window tokens")
    if isinstance(model, TransformerLM) and bptt > model.cfg.context_window:
        raise ValueError(f"bptt ({bptt}) must be <= the transformer's context_window ({model.cfg.context_window})")
    if len(train_ids) < 3 or len(val_ids) < 2:
        raise ValueError(f"need >= 3 train and >= 2 val tokens, got {len(train_ids)} and {len(val_ids)}")

    device = next(model.parameters()).device
    streams = num_phase2_streams(len(train_ids), batch_size, bptt)
    inputs = as_streams(train_ids[:-1].to(device), streams)
    targets = as_streams(train_ids[1:].to(device), streams)
    carry: State = None

    def train_epoch(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> float:
        nonlocal carry
        model.train()
        if isinstance(model, TransformerLM):
            return transformer_epoch(model, optimizer, params, inputs, targets, bptt)
        train_loss, last = recurrent_epoch(model, optimizer, params, inputs, targets, carry, bptt)
        carry = hand_over(last)
        return train_loss

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return fit(model, list(model.parameters()), lr=lr, epochs=epochs, patience=patience,
                   train_epoch=train_epoch, measure=lambda: baseline_stream_metrics(model, val_ids, stride=stride),
                   layout=(streams, bptt), on_epoch=on_epoch)
