"""Phase 2: next-token prediction, trained and measured through the model's real recurrence.

**Val perplexity has one definition** (``stream_metrics``): the model reads the val token
stream as one sequence from zero context, with its current weights, and predicts every next
token: position t + 1 from the context after position t, for every val token after the
first (N - 1 predictions for N tokens). That is what ``NewLLM.contexts``, the Hugging Face
``forward`` and ``generate`` compute, and every val loss, perplexity and accuracy that newllm
reports or optimises is this one.

The head ``Linear(C -> vocab)`` always trains; embeddings stay frozen, as in Phase 1. Two
modes for the context-update layers:

- default: they train too, through the recurrence itself: truncated backpropagation over
  windows of ``phase2_bptt`` tokens on ``phase2_batch_size // phase2_bptt`` contiguous streams
  side by side, each stream's context carried from window to window (detached at the window
  boundary). Stream b starts epoch 1 from Phase 1's fixed context at its first position and
  later epochs from the last context of stream b - 1 (stream 0 from the last stream's): the
  hand-over of Phase 1's streams. A step's batch is streams x window tokens.
- ``freeze_context``: only the head trains, on random batches of ``phase2_batch_size``
  positions of Phase 1's fixed train contexts. These stay exact because the context layers do
  not move; the val contexts are read once.

Scoring one-step contexts computed from stale fixed inputs is what neither mode does: once
the weights move, the recurrence no longer produces those inputs.

Adam, gradient clip 1.0, early stopping with patience, and the best epoch's weights restored.
After each epoch that improves on every earlier one, ``on_epoch`` also gets a ``Phase2State``:
with the model's weights (then the best) it resumes Phase 2 exactly where that epoch ended,
which is what the search's checkpoints hold.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from newllm.config import TrainConfig
from newllm.model import NewLLM
from newllm.phase1 import FixedContexts, as_streams

StopReason = Literal["early_stopping", "max_epochs", "diverged", "scheduler"]

EVAL_BATCH = 8192
# exp() overflows float64 just above 709: a loss beyond this reports an infinite perplexity
MAX_EXP_LOSS = 700.0
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_ppl: float
    val_acc: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Phase2Result:
    history: list[EpochRecord]
    best_epoch: int
    stop_reason: StopReason
    seconds: float
    streams: int      # side-by-side training streams (0 with freeze_context: shuffled positions)
    window: int       # tokens per stream and step (1 with freeze_context)

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch - 1]


@dataclass
class Phase2State:
    """Phase 2 after its best epoch so far (the last of ``history``), to resume from: with that
    epoch's weights, the optimiser's state and where the data order stands."""

    history: list[EpochRecord]
    optimizer: dict
    carry: torch.Tensor | None      # default mode: each stream's start context for the next epoch
    generator: torch.Tensor | None  # freeze_context: the state of the batch-shuffling generator
    seconds: float

    def to_dict(self) -> dict:
        """Plain values and tensors only (a checkpoint is loaded with weights_only=True)."""
        return {"history": [r.to_dict() for r in self.history], "optimizer": self.optimizer,
                "carry": self.carry, "generator": self.generator, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> Phase2State:
        return cls([EpochRecord(**r) for r in d["history"]], d["optimizer"], d["carry"], d["generator"],
                   d["seconds"])


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < MAX_EXP_LOSS else math.inf


# --- the one val definition -------------------------------------------------------------------


def predicted_positions(num_tokens: int) -> int:
    """How many next tokens a stream of ``num_tokens`` has: every token after the first."""
    return max(num_tokens - 1, 0)


@torch.inference_mode()
def read_contexts(model: NewLLM, ids: torch.Tensor) -> torch.Tensor:
    """Contexts [N - 1, C] after each of ``ids``[:-1], read as one sequence from zero context."""
    return model.contexts(ids[:-1])


@torch.inference_mode()
def head_metrics(model: NewLLM, contexts: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the head predicting ``targets`` from ``contexts``."""
    total_loss, correct = 0.0, 0
    for c, y in zip(contexts.split(EVAL_BATCH), targets.split(EVAL_BATCH)):
        logits = model.head(c)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    return total_loss / len(targets), correct / len(targets)


def stream_metrics(model: NewLLM, ids: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model reading ``ids`` from zero context and
    predicting every token after the first: the definition of val loss and perplexity."""
    if len(ids) < 2:
        raise ValueError(f"a stream of {len(ids)} tokens has no next token to predict")
    return head_metrics(model, read_contexts(model, ids), ids[1:])


# --- training -----------------------------------------------------------------------------------


def window_loss(model: NewLLM, e: torch.Tensor, targets: torch.Tensor,
                context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy of reading embedded tokens ``e`` [B, W, E] through the
    recurrence from ``context`` [B, C], and the last context (both attached to the graph)."""
    contexts, last = model.scan(e, context)
    return F.cross_entropy(model.head(contexts).flatten(0, 1), targets.flatten()), last


def tbptt_epoch(model: NewLLM, optimizer: torch.optim.Optimizer, params: list, e: torch.Tensor,
                targets: torch.Tensor, start: torch.Tensor, window: int) -> tuple[float, torch.Tensor]:
    """One epoch of truncated backpropagation through the recurrence over streams ``e``
    [B, L, E] with next-token ``targets`` [B, L], from contexts ``start`` [B, C]: one optimiser
    step per window. Returns the mean train loss and each stream's last context."""
    c = start
    loss_sum = torch.zeros((), dtype=torch.float64, device=e.device)  # summed on the device: no sync per step
    for s in range(0, e.shape[1], window):
        y = targets[:, s:s + window]
        loss, c = window_loss(model, e[:, s:s + window], y, c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        loss_sum += loss.detach() * y.numel()
        c = c.detach()  # the truncation: the next window's gradient stops here
    return float(loss_sum) / targets.numel(), c


def head_epoch(model: NewLLM, optimizer: torch.optim.Optimizer, params: list, contexts: torch.Tensor,
               targets: torch.Tensor, batch_size: int, generator: torch.Generator) -> float:
    """One epoch of the head alone on fixed ``contexts`` [M, C], shuffled batches of positions."""
    order = torch.randperm(len(targets), generator=generator).to(targets.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=contexts.device)
    for idx in order.split(batch_size):
        loss = F.cross_entropy(model.head(contexts[idx]), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
    return float(loss_sum) / len(targets)


def num_phase2_streams(num_tokens: int, cfg: TrainConfig) -> int:
    """Side-by-side streams of the default mode: ``phase2_batch_size // phase2_bptt`` tokens'
    worth, fewer if a stream would be shorter than one window."""
    return max(1, min(cfg.phase2_batch_size // cfg.phase2_bptt, (num_tokens - 1) // cfg.phase2_bptt))


def phase2_layout(num_tokens: int, cfg: TrainConfig) -> tuple[int, int]:
    """(side-by-side streams, tokens per stream and step) of Phase 2 on ``num_tokens`` train
    tokens; (0, 1) with freeze_context, which trains on shuffled positions."""
    return (0, 1) if cfg.freeze_context else (num_phase2_streams(num_tokens, cfg), cfg.phase2_bptt)


def train_phase2(model: NewLLM, train: FixedContexts, val_ids: torch.Tensor, cfg: TrainConfig,
                 on_epoch: Callable[[EpochRecord, Phase2State | None], None] | None = None,
                 resume: Phase2State | None = None) -> Phase2Result:
    """Train on the train stream of ``train`` (its ids and Phase 1's fixed contexts), measure
    on ``val_ids`` each epoch with ``stream_metrics``; ``model`` ends with its best weights.
    ``on_epoch(record, state)`` follows every epoch, with ``state`` when the epoch is the best
    so far. ``resume``: continue after that state's epoch (``model`` holding its weights)."""
    start_time = time.perf_counter() - (resume.seconds if resume else 0.0)
    params = list(model.head.parameters())
    if not cfg.freeze_context:
        params += model.context_parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.phase2_lr)
    ids = train.ids
    streams, window = phase2_layout(len(ids), cfg)
    if cfg.freeze_context:
        generator = torch.Generator().manual_seed(cfg.seed)
        val_contexts = read_contexts(model, val_ids)  # exact for every epoch: the context layers do not move
    else:
        with torch.no_grad():
            e = as_streams(model.embed(ids[:-1]), streams)
        targets = as_streams(ids[1:], streams)
        # epoch 1 starts each stream from Phase 1's fixed context before its first token
        firsts = (torch.arange(streams) * e.shape[1]).clamp_max(len(train.inputs) - 1)
        carry = train.inputs[firsts.to(train.inputs.device)]

    history: list[EpochRecord] = []
    best_loss, best_epoch, best_state = math.inf, 0, None
    if resume is not None:
        history = list(resume.history)
        best_loss, best_epoch = history[-1].val_loss, len(history)
        best_state = copy.deepcopy(model.state_dict())
        optimizer.load_state_dict(resume.optimizer)
        if cfg.freeze_context:
            generator.set_state(resume.generator)
        else:
            carry = resume.carry.to(carry.device)
    reason: StopReason = "max_epochs"
    for epoch in range(len(history) + 1, cfg.phase2_epochs + 1):
        t0 = time.perf_counter()
        if cfg.freeze_context:
            train_loss = head_epoch(model, optimizer, params, train.contexts[:-1], ids[1:],
                                    cfg.phase2_batch_size, generator)
            val_loss, val_acc = head_metrics(model, val_contexts, val_ids[1:])
        else:
            train_loss, last = tbptt_epoch(model, optimizer, params, e, targets, carry, window)
            carry = last.roll(1, dims=0)  # hand-over: stream b continues from stream b - 1's end
            val_loss, val_acc = stream_metrics(model, val_ids)
        record = EpochRecord(epoch, train_loss, val_loss, perplexity(val_loss), val_acc, time.perf_counter() - t0)
        history.append(record)
        finite = math.isfinite(val_loss) and math.isfinite(train_loss)
        state = None
        if finite and val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
            state = Phase2State(list(history), copy.deepcopy(optimizer.state_dict()),
                                None if cfg.freeze_context else carry.clone(),
                                generator.get_state() if cfg.freeze_context else None,
                                time.perf_counter() - start_time)
        if on_epoch is not None:
            on_epoch(record, state)
        if not finite:
            reason = "diverged"
            break
        if epoch - best_epoch >= cfg.phase2_patience:
            reason = "early_stopping"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return Phase2Result(history, max(best_epoch, 1), reason, time.perf_counter() - start_time, streams, window)
