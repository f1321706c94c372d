"""Phase 1: CVFP (context-vector fixed-point) learning, as DESIGN.md specifies it.

For a token stream e_0..e_{N-1} and the context update f:

    pass 0:      c0[t] = f(e[t], c0[t-1]),  c0[-1] = 0                  (forward only)
    pass i >= 1: ci[t] = f(e[t], stopgrad(ci[t-1])),  ci[-1] = c{i-1}[N-1]
                 loss  = (1 - w) * MSE(ci, stopgrad(c{i-1})) + w * dist(ci)

The targets c{i-1} are the previous pass's contexts, saved before the pass. Because every
step's input context is stop-gradient, a pass's gradient does not need the sequential
graph: the inputs ci[t-1] come from a cheap no-grad sequential pass, and the gradient is
the vector-Jacobian product of one batched recomputation ``f(e, inputs)``, run in chunks
of tokens so memory grows with the stored contexts (N x C), not with activations.

The stream is split into B contiguous chunks ("streams") processed side by side, each
carrying its own context from pass to pass; B = 1 is the seed's single stream.

``phase1_mode="parallel"`` replaces the sequential part by a Jacobi pass,
ci[t] = f(e[t], stopgrad(c{i-1}[t-1])) for all t at once; its fixed point is the same
recurrence.

A pass that meets a stop rule ends Phase 1 before its optimiser step, so the fixed
contexts belong to the final parameters. Pass 1 compares contexts of the same, untrained
weights as pass 0 (only the carried-over start differs), so a "converged" stop counts only
from pass ``phase1_min_iter`` on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from newllm.config import TrainConfig
from newllm.metrics import effective_rank, singular_values
from newllm.model import NewLLM

# --- losses: pure functions -------------------------------------------------------------


def cvfp_loss(contexts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of MSE(ci[t], c{i-1}[t])."""
    return (contexts - targets).pow(2).mean()


def dist_loss(contexts: torch.Tensor) -> torch.Tensor:
    """Keep each context dimension near N(0, 1) across tokens: mean_d(mean^2) + mean_d((var - 1)^2)."""
    return contexts.mean(dim=0).pow(2).mean() + (contexts.var(dim=0) - 1.0).pow(2).mean()


def phase1_loss(contexts: torch.Tensor, targets: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cvfp, dist) with loss = (1 - w) * cvfp + w * dist, on contexts [N, C]."""
    cvfp = cvfp_loss(contexts, targets)
    dist = dist_loss(contexts)
    return (1 - w) * cvfp + w * dist, cvfp, dist


def converged_ratio(contexts: torch.Tensor, previous: torch.Tensor, threshold: float) -> float:
    """Fraction of tokens whose context moved by MSE < ``threshold`` since the previous pass."""
    return float(((contexts - previous).pow(2).mean(dim=-1) < threshold).float().mean())


def learning_rate(pass_index: int, cfg: TrainConfig) -> float:
    """The seed's schedule: warmup LR for passes <= 3, medium <= 8, then finetune."""
    if pass_index <= 3:
        return cfg.phase1_lr_warmup
    if pass_index <= 8:
        return cfg.phase1_lr_medium
    return cfg.phase1_lr_finetune


# --- passes -----------------------------------------------------------------------------

MIN_STREAM_TOKENS = 128


def num_streams(num_tokens: int, cfg: TrainConfig) -> int:
    """B for a stream of ``num_tokens``: ``cfg.phase1_streams``, fewer if streams would be shorter
    than MIN_STREAM_TOKENS (a very short stream mostly reads its carried-over start)."""
    return max(1, min(cfg.phase1_streams, num_tokens // MIN_STREAM_TOKENS))


def as_streams(x: torch.Tensor, num_streams: int) -> torch.Tensor:
    """[N, ...] -> [B, N // B, ...]: B contiguous chunks, the N mod B trailing tokens dropped."""
    length = x.shape[0] // num_streams
    if length < 2:
        raise ValueError(
            f"{x.shape[0]} tokens cannot be split into {num_streams} streams of >= 2 tokens; "
            f"lower --phase1-streams or use more data"
        )
    return x[: num_streams * length].reshape(num_streams, length, *x.shape[1:])


def sequential_pass(model: NewLLM, e: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over streams e [B, L, E] from contexts ``start`` [B, C]: (inputs, outputs)."""
    outputs = torch.empty(*e.shape[:2], start.shape[-1], device=e.device, dtype=start.dtype)
    with torch.inference_mode():  # the per-step dispatch overhead is what this loop is made of
        model.scan(e, start, out=outputs)
    return shift_in(outputs, start), outputs


def shift_in(outputs: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Inputs of each position: the context before it, ``start`` for the first of each stream."""
    return torch.cat([start[:, None], outputs[:, :-1]], dim=1)


@torch.no_grad()
def batched_update(model: NewLLM, e: torch.Tensor, inputs: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """f(e, inputs) for every position at once (no grad), ``chunk_tokens`` rows at a time."""
    flat_e, flat_in = e.flatten(0, 1), inputs.flatten(0, 1)
    out = torch.cat([model.update(a, b) for a, b in zip(flat_e.split(chunk_tokens), flat_in.split(chunk_tokens))])
    return out.view_as(inputs)


def accumulate_gradient(model: NewLLM, e: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                        chunk_tokens: int) -> None:
    """Add d(loss)/d(params) to .grad: recompute f(e, inputs) in chunks, backprop ``grad_outputs``."""
    parts = zip(e.flatten(0, 1).split(chunk_tokens), inputs.flatten(0, 1).split(chunk_tokens),
                grad_outputs.flatten(0, 1).split(chunk_tokens))
    for e_chunk, in_chunk, g_chunk in parts:
        model.update(e_chunk, in_chunk).backward(g_chunk)


def loss_and_output_grad(outputs: torch.Tensor, targets: torch.Tensor, w: float):
    """Phase 1 loss terms and d(loss)/d(outputs), from the no-grad outputs of a pass."""
    c = outputs.flatten(0, 1).detach().requires_grad_(True)
    loss, cvfp, dist = phase1_loss(c, targets.flatten(0, 1), w)
    (grad,) = torch.autograd.grad(loss, c)
    return loss.item(), cvfp.item(), dist.item(), grad.view_as(outputs)


# --- the Phase 1 loop -------------------------------------------------------------------


@dataclass(frozen=True)
class PassRecord:
    pass_index: int
    loss: float
    cvfp_loss: float
    dist_loss: float
    converged_ratio: float
    effective_rank: float
    effective_rank_fraction: float
    lr: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Phase1Result:
    history: list[PassRecord]
    stop_reason: str  # converged | convergence_falling | collapsed | max_iter | diverged
    seconds: float

    @property
    def passes(self) -> int:
        return len(self.history)

    @property
    def converged_ratio(self) -> float:
        return self.history[-1].converged_ratio if self.history else 0.0


def stop_reason(history: list[PassRecord], cfg: TrainConfig) -> str | None:
    """The seed's stop rules plus collapse, judged on the passes so far; None to go on."""
    last = history[-1]
    if not all(math.isfinite(v) for v in (last.loss, last.effective_rank)):
        return "diverged"
    if last.converged_ratio >= cfg.min_converged_ratio and last.pass_index >= cfg.phase1_min_iter:
        return "converged"
    ratios = [r.converged_ratio for r in history]
    if len(ratios) >= 3 and ratios[-3] - ratios[-2] > 0.01 and ratios[-2] - ratios[-1] > 0.01:
        return "convergence_falling"
    recent = history[-cfg.collapse_patience:]
    if len(recent) == cfg.collapse_patience and all(r.effective_rank_fraction < cfg.gate_train_er for r in recent):
        return "collapsed"
    if last.pass_index >= cfg.phase1_max_iter:
        return "max_iter"
    return None


def first_pass(model: NewLLM, e: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 0 from zero contexts: the recurrence (exact) or f(e, 0) everywhere (parallel)."""
    zeros = model.initial_context((e.shape[0],))
    if cfg.phase1_mode == "exact":
        return sequential_pass(model, e, zeros)
    inputs = torch.zeros(*e.shape[:2], zeros.shape[-1], device=e.device, dtype=zeros.dtype)
    return inputs, batched_update(model, e, inputs, cfg.phase1_chunk_tokens)


def next_pass(model: NewLLM, e: torch.Tensor, previous: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass given the previous pass's contexts, carrying each stream's last context over."""
    carry = previous[:, -1]
    if cfg.phase1_mode == "exact":
        return sequential_pass(model, e, carry)
    inputs = shift_in(previous, carry)
    return inputs, batched_update(model, e, inputs, cfg.phase1_chunk_tokens)


def train_pass(model: NewLLM, optimizer: torch.optim.Optimizer, e: torch.Tensor, previous: torch.Tensor,
               cfg: TrainConfig, history: list[PassRecord]) -> tuple[PassRecord, torch.Tensor, str | None]:
    """Pass ``len(history) + 1`` over streams ``e`` from the previous pass's contexts: its record,
    contexts and stop reason; one optimiser step unless a stop rule ends Phase 1 at this pass."""
    t0 = time.perf_counter()
    i = len(history) + 1
    lr = learning_rate(i, cfg)
    inputs, outputs = next_pass(model, e, previous, cfg)
    loss, cvfp, dist, grad = loss_and_output_grad(outputs, previous, cfg.effective_dist_reg_weight)
    er = effective_rank(singular_values(outputs.flatten(0, 1)))
    record = PassRecord(i, loss, cvfp, dist, converged_ratio(outputs, previous, cfg.convergence_threshold),
                        er, er / cfg.context_dim, lr, 0.0)
    reason = stop_reason(history + [record], cfg)
    if reason is None:
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradient(model, e, inputs, grad, cfg.phase1_chunk_tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    return replace(record, seconds=time.perf_counter() - t0), outputs, reason


def train_phase1(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig,
                 on_pass: Callable[[PassRecord], None] | None = None) -> Phase1Result:
    """Train the context-update layers to fixed points on token ids [N]; embeddings stay frozen."""
    start_time = time.perf_counter()
    optimizer = torch.optim.Adam(model.context_parameters(), lr=cfg.phase1_lr_warmup)
    with torch.no_grad():
        e = as_streams(model.embed(ids), num_streams(len(ids), cfg))
    _, previous = first_pass(model, e, cfg)
    history: list[PassRecord] = []
    while True:
        record, previous, reason = train_pass(model, optimizer, e, previous, cfg, history)
        history.append(record)
        if on_pass is not None:
            on_pass(record)
        if reason is not None:
            return Phase1Result(history, reason, time.perf_counter() - start_time)


# --- fixed contexts with frozen parameters ------------------------------------------------


@dataclass
class FixedContexts:
    """Fixed contexts of a token stream, flattened to stream order, for analysis and Phase 2."""

    ids: torch.Tensor       # [M] tokens covered (M = B * (N // B))
    inputs: torch.Tensor    # [M, C] the context each position read
    contexts: torch.Tensor  # [M, C] the context after each position
    passes: int
    converged_ratio: float


@torch.no_grad()
def fixed_contexts(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig) -> FixedContexts:
    """Phase 1's passes with parameters fixed (no optimiser), until converged or max_iter."""
    e = as_streams(model.embed(ids), num_streams(len(ids), cfg))
    inputs, previous = first_pass(model, e, cfg)
    ratio, passes = 0.0, 1
    while passes <= cfg.phase1_max_iter:
        inputs, outputs = next_pass(model, e, previous, cfg)
        ratio = converged_ratio(outputs, previous, cfg.convergence_threshold)
        previous, passes = outputs, passes + 1
        if ratio >= cfg.min_converged_ratio:
            break
    m = e.shape[0] * e.shape[1]
    return FixedContexts(ids[:m], inputs.flatten(0, 1), previous.flatten(0, 1), passes, ratio)
