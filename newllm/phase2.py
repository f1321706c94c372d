"""Phase 2: next-token prediction, trained and measured through the model's real recurrence.

**Val perplexity has one definition** (``stream_metrics``): the model reads the val token
stream as one sequence from zero context, with its current weights, and predicts every next
token: position t + 1 from the context after position t, for every val token after the
first (N - 1 predictions for N tokens). That is what ``NewLLM.contexts``, the Hugging Face
``forward`` and ``generate`` compute, and every val loss, perplexity and accuracy that newllm
reports or optimises is this one. It is computed in parallel (``read_contexts``): the stream
split into contiguous streams read side by side that hand over, as Phase 1's do, pass after
pass until every stream starts where the one before it ends (within ``VAL_TOLERANCE``): the
sequential read's contexts in a few batched passes. Where the hand-over does not settle
within ``VAL_MAX_PASSES`` the read falls back to the sequential one (``sequential_contexts``,
also the test oracle), and the epoch's record says so.

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

**One fit loop** (``fit``) trains New-LLM's Phase 2 and every baseline (``newllm.baselines``),
so that the comparison's fairness rests on shared code: Adam, the optimiser step with gradient
clip 1.0 (``optimizer_step``), early stopping with patience on the val loss, the best epoch's
weights restored, the ``on_epoch`` callback and the resume state. A caller supplies only what
differs: how a training epoch runs over its batches and how val is measured. After each epoch
that improves on every earlier one, ``on_epoch`` also gets a ``Phase2State`` (New-LLM's): with
the model's weights (then the best) it resumes Phase 2 exactly where that epoch ended, which is
what the search's checkpoints hold.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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
    """One Phase 2 epoch: train and val losses, val perplexity and accuracy."""
    epoch: int
    train_loss: float
    val_loss: float
    val_ppl: float
    val_acc: float
    seconds: float
    val_passes: int | None = None     # New-LLM's val read: its hand-over passes (None: a baseline)
    val_fallback: bool | None = None  # and whether it fell back to the sequential read

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Phase2Result:
    """What ``fit`` ends with (New-LLM's Phase 2 or a baseline's training): every epoch's record
    and the best one, why it stopped, and the batch layout it trained with."""

    history: list[EpochRecord]
    best_epoch: int   # 0 only in ``EpochEnd.so_far`` while no epoch has been finite
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
    """exp(loss), or inf where it would overflow (a diverged run)."""
    return math.exp(loss) if loss < MAX_EXP_LOSS else math.inf


# --- the one val definition -------------------------------------------------------------------

# Val streams are at least this long, so that a boundary error fades within one stream and the
# hand-over settles in a few passes (the ops a read dispatches shrink with the stream length)
VAL_STREAM_TOKENS = 128
# A hand-over pass settles when no handed-over context moved by more than this since the pass
# before. Contexts are LayerNorm outputs, O(1); float32 rounding alone moves some hand-overs by
# up to ~3e-5 from pass to pass on weakly contracting weights (a 1-ulp change at a stream's
# start, amplified along it), so a tighter bound may never settle. A context off by 1e-4 at a
# few stream starts, fading along the stream, moves val perplexity by far less than 1e-5
VAL_TOLERANCE = 1e-4
# Hand-over passes before a read falls back to the sequential read (B streams need at most B)
VAL_MAX_PASSES = 16


class ValMetrics(NamedTuple):
    """A val measurement: (mean cross-entropy, accuracy), and for New-LLM's parallel read the
    hand-over passes it made and whether it fell back to the sequential read (None for a
    baseline, whose measure returns the first two only)."""

    loss: float
    acc: float
    passes: int | None = None
    fallback: bool | None = None


@dataclass(frozen=True)
class StreamRead:
    """The contexts [N - 1, C] after each val token but the last, and how they were read."""

    contexts: torch.Tensor
    passes: int       # hand-over passes made (the bound, when they did not settle)
    fallback: bool    # the passes did not settle: the contexts are the sequential read's


def val_streams(num_tokens: int) -> int:
    """Side-by-side val streams of a read of ``num_tokens``: each at least VAL_STREAM_TOKENS long."""
    return max(1, num_tokens // VAL_STREAM_TOKENS)


@torch.inference_mode()
def handover_contexts(model: NewLLM, tokens: torch.Tensor, streams: int, *, tolerance: float = VAL_TOLERANCE,
                      max_passes: int = VAL_MAX_PASSES) -> tuple[torch.Tensor | None, int]:
    """Contexts [T, C] after each of ``tokens`` [T], read as one sequence from zero context, in
    passes over ``streams`` contiguous streams read side by side (one batched update per
    position instead of one per token).

    Every pass starts stream 0 from zero context and stream b from stream b - 1's last context
    of the pass before (the hand-over; zeros on the first pass). Pass k makes streams 0..k-1
    exact, and for a contraction the later ones converge sooner: the read stops at the first
    pass whose handed-over contexts all moved by at most ``tolerance`` since the pass before
    (each stream then started where the stream before it ended), or at pass B, exact by
    construction. Returns (contexts, passes made); contexts None if the hand-over did not
    settle within ``min(streams, max_passes)`` passes."""
    streams = max(1, min(streams, len(tokens)))
    length = -(-len(tokens) // streams)
    streams = -(-len(tokens) // length)  # every stream holds a token; only the last may be shorter
    e = model.embed(tokens)
    # the last stream's padding is read after its tokens: its contexts are dropped, never handed over
    e = F.pad(e, (0, 0, 0, streams * length - len(tokens))).view(streams, length, -1)
    out = torch.empty(streams, length, model.cfg.context_dim, device=e.device, dtype=e.dtype)
    zero = model.initial_context((1,))
    start, handed = model.initial_context((streams,)), None
    for k in range(1, min(streams, max_passes) + 1):
        _, last = model.scan(e, start, out=out)
        ends = last[:-1]  # what streams 0..B-2 hand over
        if k == streams or (handed is not None and float((ends - handed).abs().max()) <= tolerance):
            return out.flatten(0, 1)[: len(tokens)], k
        handed, start = ends.clone(), torch.cat([zero, ends])
    return None, min(streams, max_passes)


@torch.inference_mode()
def sequential_contexts(model: NewLLM, ids: torch.Tensor) -> torch.Tensor:
    """Contexts [N - 1, C] after each of ``ids``[:-1], read one token at a time as one sequence
    from zero context: the definition itself, the test oracle of ``read_contexts``."""
    return model.contexts(ids[:-1])


def check_val_stream(ids: torch.Tensor) -> None:
    """A val stream needs a token after the first to predict."""
    if len(ids) < 2:
        raise ValueError(f"a stream of {len(ids)} tokens has no next token to predict")


def read_contexts(model: NewLLM, ids: torch.Tensor, *, streams: int | None = None, tolerance: float = VAL_TOLERANCE,
                  max_passes: int = VAL_MAX_PASSES) -> StreamRead:
    """The contexts after each of ``ids``[:-1] read as one sequence from zero context, by the
    hand-over passes over ``streams`` streams (``val_streams``' if None), or, if those did
    not settle, by the sequential read: never from unsettled hand-overs."""
    check_val_stream(ids)
    tokens = ids[:-1]
    contexts, passes = handover_contexts(model, tokens, val_streams(len(tokens)) if streams is None else streams,
                                         tolerance=tolerance, max_passes=max_passes)
    if contexts is None:
        return StreamRead(sequential_contexts(model, ids), passes, True)
    return StreamRead(contexts, passes, False)


@torch.inference_mode()
def head_metrics(model: NewLLM, contexts: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the head predicting ``targets`` from ``contexts``."""
    total_loss, correct = 0.0, 0
    for c, y in zip(contexts.split(EVAL_BATCH), targets.split(EVAL_BATCH)):
        logits = model.head(c)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    return total_loss / len(targets), correct / len(targets)


def stream_metrics(model: NewLLM, ids: torch.Tensor, *, streams: int | None = None,
                   tolerance: float = VAL_TOLERANCE, max_passes: int = VAL_MAX_PASSES) -> ValMetrics:
    """(mean cross-entropy, accuracy, passes, fallback) of the model reading ``ids`` from zero
    context and predicting every token after the first: the definition of val loss and
    perplexity, read by ``read_contexts`` (its keyword arguments)."""
    r = read_contexts(model, ids, streams=streams, tolerance=tolerance, max_passes=max_passes)
    return ValMetrics(*head_metrics(model, r.contexts, ids[1:]), r.passes, r.fallback)


def sequential_stream_metrics(model: NewLLM, ids: torch.Tensor) -> tuple[float, float]:
    """``stream_metrics`` by the sequential read, one token at a time: its test oracle."""
    check_val_stream(ids)
    return head_metrics(model, sequential_contexts(model, ids), ids[1:])


# --- the one fit loop -------------------------------------------------------------------------

TrainEpoch = Callable[[torch.optim.Optimizer, list[nn.Parameter]], float]
# the val (loss, accuracy), or New-LLM's ValMetrics, which says how its read went
Measure = Callable[[], tuple[float, float] | ValMetrics]


@dataclass(frozen=True)
class EpochEnd:
    """An epoch as ``fit`` hands it to ``on_epoch``."""

    record: EpochRecord
    best: bool                  # the best epoch so far: the model holds its weights
    state: Phase2State | None   # when best, the state that resumes after it (None: the caller cannot resume)
    so_far: Phase2Result        # the fit as it ends if stopped here from outside (stop reason "scheduler")
    last: bool                  # the fit ends after this epoch (the epoch cap, early stopping or divergence)


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor) -> None:
    """The one optimiser step of every model newllm trains: backward, gradient norm over
    ``params`` clipped to GRAD_CLIP, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()


def fit(model: nn.Module, params: list[nn.Parameter], *, lr: float, epochs: int, patience: int,
        train_epoch: TrainEpoch, measure: Measure, layout: tuple[int, int],
        order: Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
        on_epoch: Callable[[EpochEnd], None] | None = None, resume: Phase2State | None = None) -> Phase2Result:
    """Train ``model`` epoch by epoch: the one loop of New-LLM's Phase 2 and of every baseline,
    so that both are trained and stopped alike. Adam at ``lr`` over ``params``; after each
    epoch the val loss, early stopping after ``patience`` epochs without improvement (or at
    the first epoch whose train or val loss is not finite); ``model`` ends with the best
    epoch's weights.

    Args:
        model: The model trained; its weights are saved at each best epoch and restored at the end.
        params: What Adam trains, and what ``optimizer_step`` clips the gradient norm of.
        lr: Adam's learning rate.
        epochs: The most epochs, counting those of ``resume``.
        patience: Stop after this many epochs without a val improvement.
        train_epoch: Runs one training epoch over its batches, one ``optimizer_step(optimizer,
            params, loss)`` per batch, given (optimizer, params); returns the mean train loss.
        measure: The val (loss, accuracy) of the model's current weights, or New-LLM's
            ``ValMetrics`` (its passes and fallback land in the epoch's record).
        layout: (side-by-side streams, tokens per stream and step) that the result reports.
        order: Where the data order stands after an epoch, ``(carry, generator)`` as in
            ``Phase2State``; with it each best epoch's ``EpochEnd`` holds a ``Phase2State``.
            None: no state (the caller starts again instead of resuming).
        on_epoch: Called after every epoch with its ``EpochEnd``.
        resume: Continue after that state's epoch: ``model`` holds its weights, and the
            caller has put its data order back (``carry``, ``generator``).
    """
    for name, value in (("epochs", epochs), ("patience", patience)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    start_time = time.perf_counter() - (resume.seconds if resume else 0.0)
    optimizer = torch.optim.Adam(params, lr=lr)
    history: list[EpochRecord] = []
    best_loss, best_epoch, best_state = math.inf, 0, None
    if resume is not None:
        history = list(resume.history)
        best_loss, best_epoch = history[-1].val_loss, len(history)
        best_state = copy.deepcopy(model.state_dict())
        optimizer.load_state_dict(resume.optimizer)
    reason: StopReason = "max_epochs"
    for epoch in range(len(history) + 1, epochs + 1):
        t0 = time.perf_counter()
        train_loss = train_epoch(optimizer, params)
        val = ValMetrics(*measure())
        val_loss = val.loss
        record = EpochRecord(epoch, train_loss, val_loss, perplexity(val_loss), val.acc, time.perf_counter() - t0,
                             val.passes, val.fallback)
        history.append(record)
        finite = math.isfinite(val_loss) and math.isfinite(train_loss)
        best, state = finite and val_loss < best_loss, None
        if best:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
            if order is not None:
                state = Phase2State(list(history), copy.deepcopy(optimizer.state_dict()), *order(),
                                    time.perf_counter() - start_time)
        reason = "diverged" if not finite else "early_stopping" if epoch - best_epoch >= patience else reason
        if on_epoch is not None:
            so_far = Phase2Result(list(history), best_epoch, "scheduler", time.perf_counter() - start_time, *layout)
            on_epoch(EpochEnd(record, best, state, so_far, last=reason != "max_epochs" or epoch == epochs))
        if reason != "max_epochs":
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return Phase2Result(history, max(best_epoch, 1), reason, time.perf_counter() - start_time, *layout)


def num_phase2_streams(num_tokens: int, batch_size: int, bptt: int) -> int:
    """Side-by-side training streams of a stream of ``num_tokens``, the one rule of New-LLM's
    Phase 2 and of the baselines: ``batch_size // bptt``, fewer if a stream would be shorter
    than one ``bptt`` window or than the 2 tokens ``as_streams`` needs."""
    return max(1, min(batch_size // bptt, (num_tokens - 1) // max(bptt, 2)))


# --- New-LLM's Phase 2 --------------------------------------------------------------------------


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
        optimizer_step(optimizer, params, loss)
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
        optimizer_step(optimizer, params, loss)
        loss_sum += loss.detach() * len(idx)
    return float(loss_sum) / len(targets)


def phase2_layout(num_tokens: int, cfg: TrainConfig) -> tuple[int, int]:
    """(side-by-side streams, tokens per stream and step) of Phase 2 on ``num_tokens`` train
    tokens; (0, 1) with freeze_context, which trains on shuffled positions."""
    if cfg.freeze_context:
        return 0, 1
    return num_phase2_streams(num_tokens, cfg.phase2_batch_size, cfg.phase2_bptt), cfg.phase2_bptt


def train_phase2(model: NewLLM, train: FixedContexts, val_ids: torch.Tensor, cfg: TrainConfig,
                 on_epoch: Callable[[EpochEnd], None] | None = None,
                 resume: Phase2State | None = None) -> Phase2Result:
    """New-LLM's Phase 2 through ``fit``, in the mode ``cfg.freeze_context`` says (the module
    docstring); ``model`` ends with its best weights.

    Args:
        model: The model after Phase 1 (or holding ``resume``'s weights).
        train: The train stream: its ids and Phase 1's fixed contexts.
        val_ids: The val stream, measured each epoch by ``stream_metrics`` (``head_metrics`` on
            its contexts, read once, with freeze_context).
        cfg: The Phase 2 settings (lr, epochs, patience, batch size, bptt window, seed, mode).
        on_epoch: ``fit``'s: every epoch's ``EpochEnd``, with a ``Phase2State`` when it is the
            best so far.
        resume: Continue after that state's epoch (``model`` holding its weights).
    """
    params = list(model.head.parameters())
    if not cfg.freeze_context:
        params += model.context_parameters()
    ids = train.ids
    layout = phase2_layout(len(ids), cfg)
    if cfg.freeze_context:
        generator = torch.Generator().manual_seed(cfg.seed)
        if resume is not None:
            generator.set_state(resume.generator)
        val_read = read_contexts(model, val_ids)  # exact for every epoch: the context layers do not move

        def train_epoch(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> float:
            return head_epoch(model, optimizer, params, train.contexts[:-1], ids[1:], cfg.phase2_batch_size,
                              generator)

        def measure() -> ValMetrics:
            return ValMetrics(*head_metrics(model, val_read.contexts, val_ids[1:]), val_read.passes,
                              val_read.fallback)

        def order() -> tuple[None, torch.Tensor]:
            return None, generator.get_state()
    else:
        streams, window = layout
        with torch.no_grad():
            e = as_streams(model.embed(ids[:-1]), streams)
        targets = as_streams(ids[1:], streams)
        if resume is not None:
            carry = resume.carry.to(train.inputs.device)
        else:  # epoch 1 starts each stream from Phase 1's fixed context before its first token
            firsts = (torch.arange(streams) * e.shape[1]).clamp_max(len(train.inputs) - 1)
            carry = train.inputs[firsts.to(train.inputs.device)]

        def train_epoch(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> float:
            nonlocal carry
            train_loss, last = tbptt_epoch(model, optimizer, params, e, targets, carry, window)
            carry = last.roll(1, dims=0)  # hand-over: stream b continues from stream b - 1's end
            return train_loss

        def measure() -> ValMetrics:
            return stream_metrics(model, val_ids)

        def order() -> tuple[torch.Tensor, None]:
            return carry.clone(), None
    return fit(model, params, lr=cfg.phase2_lr, epochs=cfg.phase2_epochs, patience=cfg.phase2_patience,
               train_epoch=train_epoch, measure=measure, layout=layout, order=order, on_epoch=on_epoch,
               resume=resume)
