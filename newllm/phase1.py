"""Phase 1: CVFP (context-vector fixed-point) learning.

For a token stream e_0..e_{N-1} and the context update f:

    pass 0:      c0[t] = f(e[t], c0[t-1]),  c0[-1] = 0                  (forward only)
    pass i >= 1: ci[t] = f(e[t], stopgrad(ci[t-1])),  ci[-1] = c{i-1}[N-1]
                 loss  = (1 - w) * MSE(ci, stopgrad(c{i-1})) + w * dist(ci)

The targets c{i-1} are the previous pass's contexts, saved before the pass. (The seed's
prototype overwrote them with the current pass's own contexts before taking the loss, so its
CVFP loss was always 0 and every run "converged" at pass 2; this is the corrected algorithm.)

Because every step's input context is stop-gradient, a pass's gradient does not need the
sequential graph: the inputs ci[t-1] come from a cheap no-grad sequential pass, and the
gradient is the vector-Jacobian product of one batched ``f(e, inputs)``, run in chunks of
tokens so memory grows with the stored contexts (N x C), not with activations. The sequential
pass keeps its matmul outputs while they fit ``phase1_keep_gib`` (``MatmulTape``), so that the
backward need not compute them again; beyond that budget it recomputes them.

**Streams that hand over.** The stream is split into B contiguous chunks processed side by
side. On each pass stream b starts from the last context of stream b - 1 on the previous
pass, and stream 0 from the last stream's, as the seed's single stream starts from the end of
the corpus. With frozen weights the passes converge to the fixed point of the single-stream
recurrence: an error at a stream boundary moves one stream on per pass and fades as f
contracts (as in multiple shooting, or parareal), so B streams are a faster way to compute
the seed's contexts, not B separate cyclic texts. B = 1 is the seed.

**Jacobi passes** (``phase1_mode="jacobi"``): ci[t] = f(e[t], stopgrad(c{i-1}[t-1])) for all t
at once, with the same hand-over at stream starts; the fixed point is the same recurrence.

**One pass loop**, ``run_passes``, serves both Phase 1 training (an optimiser step per pass)
and the fixed-context passes with frozen weights that the analysis and Phase 2 read, so
passes are counted alike everywhere: pass 0 is the forward-only start, and passes 1, 2, ...
are the ones compared with their predecessor and recorded. A pass that meets a stop rule ends
the loop before its optimiser step, so the final contexts belong to the final parameters.
Pass 1 of training compares contexts of the same, untrained weights as pass 0 (only the
carried-over start differs), so a "converged" stop counts only from pass ``phase1_min_iter``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from newllm.config import TrainConfig
from newllm.metrics import effective_rank, singular_values
from newllm.model import NewLLM

StopReason = Literal["converged", "convergence_falling", "collapsed", "max_iter", "diverged"]

# The seed's LR schedule: phase1_lr_warmup up to this pass, phase1_lr_medium up to the next
# bound, then phase1_lr_finetune.
WARMUP_PASSES = 3
MEDIUM_PASSES = 8
# The seed's "convergence falling" rule: the converged ratio dropped by more than this twice in
# a row, so the passes are moving away from a fixed point rather than towards one.
CONVERGENCE_DROP = 0.01
MIN_STREAM_TOKENS = 128

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
    """The seed's schedule: warmup LR for the first passes, then medium, then finetune."""
    if pass_index <= WARMUP_PASSES:
        return cfg.phase1_lr_warmup
    if pass_index <= MEDIUM_PASSES:
        return cfg.phase1_lr_medium
    return cfg.phase1_lr_finetune


# --- streams and passes -------------------------------------------------------------------


def num_streams(num_tokens: int, cfg: TrainConfig) -> int:
    """B for a stream of ``num_tokens``: ``cfg.phase1_streams``, fewer if streams would be shorter
    than MIN_STREAM_TOKENS (a very short stream mostly reads its handed-over start)."""
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


def hand_over(previous: torch.Tensor) -> torch.Tensor:
    """Start contexts [B, C] of the next pass: stream b's from stream b - 1's last context on
    the previous pass ``previous`` [B, L, C], stream 0's from the last stream's."""
    return previous[:, -1].roll(1, dims=0)


class MatmulTape:
    """The outputs of the context update's matmuls at every position of a sequential pass, in
    the order the update runs them, recorded as the pass computes them (references: no copy).
    The backward then takes them as they are (``kept_linear``) instead of computing the forward
    again: the same numbers, one forward's matmuls less per training pass."""

    def __init__(self, model: NewLLM):
        self.per_update = len(model.matmul_widths())
        self.steps: list[list[torch.Tensor]] = []  # per position, its matmuls' outputs [B, width]

    @staticmethod
    def nbytes(model: NewLLM, e: torch.Tensor) -> int:
        return e.shape[0] * e.shape[1] * sum(model.matmul_widths()) * e.element_size()

    def record(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """F.linear, keeping its output."""
        z = F.linear(x, weight, bias)
        if not self.steps or len(self.steps[-1]) == self.per_update:
            self.steps.append([])
        self.steps[-1].append(z)
        return z

    def outputs(self, steps: range) -> list[torch.Tensor]:
        """Per matmul, its outputs at positions ``steps`` of every stream, step-major [len * B, width]."""
        return [torch.cat([self.steps[t][i] for t in steps]) for i in range(self.per_update)]


class _KeptLinear(torch.autograd.Function):
    """A matmul whose output was kept: forward returns it, backward is the matmul's own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g, xs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        return grad @ weight, g.T @ xs, g.sum(0), None


def kept_linear(outputs: list[torch.Tensor]):
    """A ``Linear`` for one context update that returns the kept ``outputs``, call by call."""
    calls = iter(outputs)
    return lambda x, weight, bias: _KeptLinear.apply(x, weight, bias, next(calls))


def sequential_pass(model: NewLLM, e: torch.Tensor, start: torch.Tensor,
                    tape: MatmulTape | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over streams e [B, L, E] from contexts ``start`` [B, C]: (inputs, outputs);
    with a ``tape``, its matmul outputs are kept there."""
    outputs = torch.empty(*e.shape[:2], start.shape[-1], device=e.device, dtype=start.dtype)
    with torch.inference_mode():  # the per-step dispatch overhead is what this loop is made of
        model.scan(e, start, out=outputs, linear=tape.record if tape is not None else F.linear)
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


def first_pass(model: NewLLM, e: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Pass 0's contexts from zero contexts: the recurrence (exact) or f(e, 0) everywhere (jacobi)."""
    zeros = model.initial_context((e.shape[0],))
    if cfg.phase1_mode == "exact":
        return sequential_pass(model, e, zeros)[1]
    inputs = torch.zeros(*e.shape[:2], zeros.shape[-1], device=e.device, dtype=zeros.dtype)
    return batched_update(model, e, inputs, cfg.phase1_chunk_tokens)


def next_pass(model: NewLLM, e: torch.Tensor, previous: torch.Tensor, cfg: TrainConfig,
              tape: MatmulTape | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass given the previous pass's contexts, the streams handing over: (inputs, outputs);
    an exact pass keeps its matmul outputs in ``tape`` if given."""
    start = hand_over(previous)
    if cfg.phase1_mode == "exact":
        return sequential_pass(model, e, start, tape)
    inputs = shift_in(previous, start)
    return inputs, batched_update(model, e, inputs, cfg.phase1_chunk_tokens)


def accumulate_gradient(model: NewLLM, e: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                        chunk_tokens: int, tape: MatmulTape | None = None) -> None:
    """Add d(loss)/d(params) to .grad: f(e, inputs) in chunks of about ``chunk_tokens``
    positions, backprop ``grad_outputs``. The matmuls of f are computed again, or, with the
    ``tape`` of the pass, taken from it (chunks of whole steps then: the order the tape has)."""
    if tape is None:
        parts = zip(e.flatten(0, 1).split(chunk_tokens), inputs.flatten(0, 1).split(chunk_tokens),
                    grad_outputs.flatten(0, 1).split(chunk_tokens))
        for e_chunk, in_chunk, g_chunk in parts:
            model.update(e_chunk, in_chunk).backward(g_chunk)
        return
    length, steps = e.shape[1], max(1, chunk_tokens // e.shape[0])
    for s in range(0, length, steps):
        window = range(s, min(s + steps, length))

        def step_major(x: torch.Tensor) -> torch.Tensor:
            return x[:, s:s + steps].transpose(0, 1).reshape(-1, x.shape[-1])

        linear = kept_linear(tape.outputs(window))
        model.update(step_major(e), step_major(inputs), linear).backward(step_major(grad_outputs))


def loss_and_output_grad(outputs: torch.Tensor, targets: torch.Tensor, w: float, with_grad: bool = True):
    """Phase 1 loss terms and d(loss)/d(outputs) (None unless ``with_grad``), from the no-grad
    outputs of a pass."""
    c = outputs.flatten(0, 1).detach().requires_grad_(with_grad)
    with torch.enable_grad() if with_grad else torch.no_grad():
        loss, cvfp, dist = phase1_loss(c, targets.flatten(0, 1), w)
    grad = torch.autograd.grad(loss, c)[0].view_as(outputs) if with_grad else None
    return loss.item(), cvfp.item(), dist.item(), grad


# --- the pass loop ------------------------------------------------------------------------


@dataclass(frozen=True)
class PassRecord:
    """One Phase 1 pass: its losses, converged ratio and effective rank."""
    pass_index: int
    loss: float
    cvfp_loss: float
    dist_loss: float
    converged_ratio: float
    effective_rank: float
    effective_rank_fraction: float
    lr: float  # 0 for fixed-context passes (no optimiser)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Passes:
    """What a run of passes left: its records, why it stopped, and the last pass's inputs and
    contexts [B, L, C] (the fixed contexts, once converged)."""

    history: list[PassRecord]
    stop_reason: StopReason
    inputs: torch.Tensor
    contexts: torch.Tensor


def stop_reason(history: list[PassRecord], cfg: TrainConfig, training: bool = True) -> StopReason | None:
    """The seed's stop rules plus collapse, judged on the passes so far; None to go on. With
    frozen weights (``training=False``) only divergence, convergence and max_iter apply."""
    last = history[-1]
    if not all(math.isfinite(v) for v in (last.loss, last.effective_rank)):
        return "diverged"
    if last.converged_ratio >= cfg.min_converged_ratio and (not training or last.pass_index >= cfg.phase1_min_iter):
        return "converged"
    if training:
        ratios = [r.converged_ratio for r in history]
        if len(ratios) >= 3 and ratios[-3] - ratios[-2] > CONVERGENCE_DROP and ratios[-2] - ratios[-1] > CONVERGENCE_DROP:
            return "convergence_falling"
        recent = history[-cfg.collapse_patience:]
        if len(recent) == cfg.collapse_patience and all(r.effective_rank_fraction < cfg.gate_train_er for r in recent):
            return "collapsed"
    if last.pass_index >= cfg.phase1_max_iter:
        return "max_iter"
    return None


def run_pass(model: NewLLM, e: torch.Tensor, previous: torch.Tensor, cfg: TrainConfig, history: list[PassRecord],
             optimizer: torch.optim.Optimizer | None = None) -> tuple[PassRecord, torch.Tensor, torch.Tensor, StopReason | None]:
    """Pass ``len(history) + 1`` over streams ``e`` after the contexts ``previous``: its record,
    inputs, contexts and stop reason. With an ``optimizer``, one step unless the pass stops."""
    t0 = time.perf_counter()
    training = optimizer is not None
    i = len(history) + 1
    lr = learning_rate(i, cfg) if training else 0.0
    keep = training and cfg.phase1_mode == "exact" and MatmulTape.nbytes(model, e) <= cfg.phase1_keep_gib * 2**30
    tape = MatmulTape(model) if keep else None
    inputs, outputs = next_pass(model, e, previous, cfg, tape)
    loss, cvfp, dist, grad = loss_and_output_grad(outputs, previous, cfg.effective_dist_reg_weight, training)
    er = effective_rank(singular_values(outputs.flatten(0, 1)))
    record = PassRecord(i, loss, cvfp, dist, converged_ratio(outputs, previous, cfg.convergence_threshold),
                        er, er / outputs.shape[-1], lr, 0.0)
    reason = stop_reason(history + [record], cfg, training)
    if training and reason is None:
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradient(model, e, inputs, grad, cfg.phase1_chunk_tokens, tape)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    return replace(record, seconds=time.perf_counter() - t0), inputs, outputs, reason


def run_passes(model: NewLLM, e: torch.Tensor, previous: torch.Tensor, cfg: TrainConfig,
               optimizer: torch.optim.Optimizer | None = None,
               on_pass: Callable[[PassRecord], None] | None = None) -> Passes:
    """Passes over streams ``e`` from the contexts ``previous`` until a stop rule: Phase 1
    training with an ``optimizer``, fixed-context passes with frozen weights without one."""
    history: list[PassRecord] = []
    while True:
        record, inputs, previous, reason = run_pass(model, e, previous, cfg, history, optimizer)
        history.append(record)
        if on_pass is not None:
            on_pass(record)
        if reason is not None:
            return Passes(history, reason, inputs, previous)


# --- Phase 1 and the fixed contexts -------------------------------------------------------


@dataclass
class Phase1Result:
    """Phase 1's passes, why it stopped and how long it took."""
    history: list[PassRecord]
    stop_reason: StopReason
    seconds: float
    contexts: torch.Tensor | None = None  # the last pass's [B, L, C] (None when restored from a checkpoint)

    @property
    def passes(self) -> int:
        return len(self.history)

    @property
    def converged_ratio(self) -> float:
        return self.history[-1].converged_ratio if self.history else 0.0


def embedded_streams(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The token embeddings of ``ids`` as the [B, L, E] streams Phase 1 reads (no gradient)."""
    with torch.no_grad():
        return as_streams(model.embed(ids), num_streams(len(ids), cfg))


def train_phase1(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig,
                 on_pass: Callable[[PassRecord], None] | None = None) -> Phase1Result:
    """Train the context-update layers to fixed points on token ids [N]; embeddings stay frozen."""
    start_time = time.perf_counter()
    optimizer = torch.optim.Adam(model.context_parameters(), lr=cfg.phase1_lr_warmup)
    e = embedded_streams(model, ids, cfg)
    passes = run_passes(model, e, first_pass(model, e, cfg), cfg, optimizer, on_pass)
    return Phase1Result(passes.history, passes.stop_reason, time.perf_counter() - start_time, passes.contexts)


@dataclass
class FixedContexts:
    """Fixed contexts of a token stream, flattened to stream order, for analysis and Phase 2."""

    ids: torch.Tensor       # [M] tokens covered (M = B * (N // B))
    inputs: torch.Tensor    # [M, C] the context each position read
    contexts: torch.Tensor  # [M, C] the context after each position
    history: list[PassRecord]

    @property
    def passes(self) -> int:
        return len(self.history)

    @property
    def converged_ratio(self) -> float:
        return self.history[-1].converged_ratio


@torch.no_grad()
def fixed_contexts(model: NewLLM, ids: torch.Tensor, cfg: TrainConfig,
                   start: torch.Tensor | None = None) -> FixedContexts:
    """Phase 1's passes with frozen weights until converged or max_iter, from the contexts
    ``start`` [B, L, C] of the same streams (e.g. Phase 1's last pass), else from pass 0."""
    e = embedded_streams(model, ids, cfg)
    if start is None or start.shape[:2] != e.shape[:2]:
        start = first_pass(model, e, cfg)
    passes = run_passes(model, e, start, cfg)
    m = e.shape[0] * e.shape[1]
    return FixedContexts(ids[:m], passes.inputs.flatten(0, 1), passes.contexts.flatten(0, 1), passes.history)
