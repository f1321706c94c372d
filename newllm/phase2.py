"""Phase 2: next-token prediction from the fixed contexts of Phase 1.

The head ``Linear(C -> vocab)`` predicts token t+1 from the context at t. With
``freeze_context`` only the head trains, on the fixed contexts themselves; otherwise the
context-update layers train too, each position recomputed as f(e[t], fixed input[t]) (one
step from its fixed input, so no sequential graph). Embeddings stay frozen. Cross-entropy,
Adam, gradient clip 1.0, early stopping with patience, and the best epoch's weights restored.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from newllm.config import TrainConfig
from newllm.model import NewLLM
from newllm.phase1 import FixedContexts

EVAL_BATCH = 8192


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
    stop_reason: str  # early_stopping | max_epochs | diverged
    seconds: float

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch - 1]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class _Features:
    """Context features and next-token targets of one stream, as Phase 2 sees them."""

    def __init__(self, model: NewLLM, fixed: FixedContexts, freeze_context: bool):
        self.model, self.freeze = model, freeze_context
        self.targets = fixed.ids[1:]
        self.contexts = fixed.contexts[:-1]
        self.inputs = fixed.inputs[:-1]
        with torch.no_grad():
            self.embedded = None if freeze_context else model.embed(fixed.ids[:-1])

    def __len__(self) -> int:
        return len(self.targets)

    def contexts_at(self, idx: torch.Tensor | slice) -> torch.Tensor:
        if self.freeze:
            return self.contexts[idx]
        return self.model.update(self.embedded[idx], self.inputs[idx])


@torch.no_grad()
def evaluate(model: NewLLM, features: _Features) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over every position."""
    total_loss, correct = 0.0, 0
    for start in range(0, len(features), EVAL_BATCH):
        idx = slice(start, start + EVAL_BATCH)
        logits = model.head(features.contexts_at(idx))
        targets = features.targets[idx]
        total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
    return total_loss / len(features), correct / len(features)


def train_phase2(model: NewLLM, train: FixedContexts, val: FixedContexts, cfg: TrainConfig,
                 on_epoch: Callable[[EpochRecord], None] | None = None) -> Phase2Result:
    start_time = time.perf_counter()
    train_f = _Features(model, train, cfg.freeze_context)
    val_f = _Features(model, val, cfg.freeze_context)
    params = list(model.head.parameters())
    if not cfg.freeze_context:
        params += model.context_parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.phase2_lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[EpochRecord] = []
    best_loss, best_epoch, best_state = math.inf, 0, None
    reason = "max_epochs"
    for epoch in range(1, cfg.phase2_epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(train_f), generator=generator).to(train_f.targets.device)
        loss_sum = 0.0
        for idx in order.split(cfg.phase2_batch_size):
            loss = F.cross_entropy(model.head(train_f.contexts_at(idx)), train_f.targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            loss_sum += loss.item() * len(idx)
        val_loss, val_acc = evaluate(model, val_f)
        record = EpochRecord(epoch, loss_sum / len(train_f), val_loss, perplexity(val_loss), val_acc,
                             time.perf_counter() - t0)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if not math.isfinite(val_loss) or not math.isfinite(record.train_loss):
            reason = "diverged"
            break
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.phase2_patience:
            reason = "early_stopping"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return Phase2Result(history, max(best_epoch, 1), reason, time.perf_counter() - start_time)
