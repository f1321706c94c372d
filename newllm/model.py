"""The New-LLM model: a fixed-size context vector updated token by token, no attention.

Two context-update architectures, chosen by ``ModelConfig.architecture``:

- ``residual`` (seed 002, "residual standard"): per layer ``y = ReLU(W [c, x])`` with
  ``H == C + E``, then ``c = LN(c + y[:C])`` and ``x = LN(x + y[C:])``.
- ``gated`` (seed 000): per layer forget and input gates and a tanh candidate from a ReLU
  hidden layer, ``c = LN(f * c + i * tanh(W_c h))``.

``update(e, c)`` is the context update f of the CVFP algorithm; it works on any leading batch
shape, which is what lets Phase 1 recompute a whole pass as one batched call. ``scan`` is the
recurrence, written once: ``contexts``, ``read``, Phase 1's sequential pass, Phase 2's
truncated backpropagation and the Hugging Face ``forward`` all read tokens through it. Nothing
depends on a maximum sequence length: ``read`` streams any number of tokens in constant
memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("residual", "gated")
# how the context update computes its matmuls: (input, weight, bias) -> output. F.linear, or
# Phase 1's tape, which keeps their outputs so that the backward need not compute them again
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a New-LLM: vocabulary, context, embedding and hidden sizes, layers."""
    vocab_size: int
    context_dim: int = 256
    embed_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 4
    architecture: str = "residual"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_dim", "embed_dim", "hidden_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture == "residual" and self.hidden_dim != self.context_dim + self.embed_dim:
            raise ValueError(
                f"the residual architecture needs hidden_dim == context_dim + embed_dim "
                f"({self.context_dim} + {self.embed_dim} = {self.context_dim + self.embed_dim}), "
                f"got hidden_dim={self.hidden_dim}; set --hidden-dim "
                f"{self.context_dim + self.embed_dim} or use --architecture gated"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualBlock(nn.Module):
    """One residual layer; the ``last`` one skips its token half, which nothing reads (the same
    context, 1 / (2L) fewer FLOPs at H = 2C; the weights keep their full shape)."""

    def __init__(self, cfg: ModelConfig, last: bool = False):
        super().__init__()
        self.context_dim, self.last = cfg.context_dim, last
        self.fnn = nn.Linear(cfg.context_dim + cfg.embed_dim, cfg.hidden_dim)
        self.context_norm = nn.LayerNorm(cfg.context_dim)
        self.token_norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor, linear: Linear = F.linear) -> tuple[torch.Tensor, torch.Tensor]:
        cx = torch.cat([c, x], dim=-1)
        if self.last:
            y = F.relu(linear(cx, self.fnn.weight[: self.context_dim], self.fnn.bias[: self.context_dim]))
            return self.context_norm(c + y), x
        y = F.relu(linear(cx, self.fnn.weight, self.fnn.bias))
        c = self.context_norm(c + y[..., : self.context_dim])
        x = self.token_norm(x + y[..., self.context_dim :])
        return c, x


class GatedBlock(nn.Module):
    """Seed 000's context update: an LSTM-like gated cell over [context, token embedding]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.context_dim, self.hidden_dim = cfg.context_dim, cfg.hidden_dim
        # hidden layer, forget gate and input gate all read [c, x]: one matmul for the three
        self.inputs = nn.Linear(cfg.context_dim + cfg.embed_dim, cfg.hidden_dim + 2 * cfg.context_dim)
        self.candidate = nn.Linear(cfg.hidden_dim, cfg.context_dim)
        self.context_norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor, linear: Linear = F.linear) -> tuple[torch.Tensor, torch.Tensor]:
        z = linear(torch.cat([c, x], dim=-1), self.inputs.weight, self.inputs.bias)
        h, f, i = z.split([self.hidden_dim, self.context_dim, self.context_dim], dim=-1)
        candidate = torch.tanh(linear(F.relu(h), self.candidate.weight, self.candidate.bias))
        c = self.context_norm(torch.sigmoid(f) * c + torch.sigmoid(i) * candidate)
        return c, x


class NewLLM(nn.Module):
    """Token embedding (+ LayerNorm), context-update layers, next-token head on the context."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.embed_norm = nn.LayerNorm(cfg.embed_dim)
        if cfg.architecture == "residual":
            blocks = [ResidualBlock(cfg, last=i == cfg.num_layers - 1) for i in range(cfg.num_layers)]
        else:
            blocks = [GatedBlock(cfg) for _ in range(cfg.num_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(cfg.context_dim, cfg.vocab_size)

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters; with ``non_embedding`` all but the token embedding table (the
        context-update layers, the embedding LayerNorm and the head count), the count a
        baseline's size is matched on."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.token_embedding.weight.numel() if non_embedding else total

    def context_parameters(self) -> list[nn.Parameter]:
        """The parameters Phase 1 trains: the context-update layers (embeddings stay frozen)."""
        return list(self.blocks.parameters())

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(self.token_embedding(ids))

    def update(self, e: torch.Tensor, c: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        """One context update f(e, c) -> c' for embedded tokens e, any leading shape."""
        x = e
        for block in self.blocks:
            c, x = block(c, x, linear)
        return c

    def matmul_widths(self) -> list[int]:
        """The output width of each matmul of one context update, in the order it runs them."""
        cfg = self.cfg
        if cfg.architecture == "residual":
            return [cfg.hidden_dim] * (cfg.num_layers - 1) + [cfg.context_dim]
        return [cfg.hidden_dim + 2 * cfg.context_dim, cfg.context_dim] * cfg.num_layers

    def initial_context(self, batch_shape: tuple[int, ...] = ()) -> torch.Tensor:
        p = self.head.weight
        return torch.zeros(*batch_shape, self.cfg.context_dim, device=p.device, dtype=p.dtype)

    def scan(self, tokens: torch.Tensor, context: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
             keep_last: int | None = None, out: torch.Tensor | None = None,
             linear: Linear = F.linear) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrence, the one place it is written: read ``tokens`` from ``context`` (zeros if
        None), carrying the context from each position to the next.

        ``tokens`` are ids [..., T], embedded one step at a time (memory constant in T), or
        embeddings [..., T, E] that the caller computed once (Phase 1 reads the same stream
        every pass). Where ``mask`` [..., T] is False the context is left unchanged (left
        padding). Returns (contexts after each position [..., T, C], or only the last
        ``keep_last`` of them; the context after the last position). With ``out`` [..., T, C]
        the contexts are written there instead (no autograd: the inference fast path). ``linear``
        computes the update's matmuls (Phase 1's tape keeps their outputs).
        """
        embedded = tokens.is_floating_point()
        length = tokens.shape[-2] if embedded else tokens.shape[-1]
        c = self.initial_context(tokens.shape[:-2] if embedded else tokens.shape[:-1]) if context is None else context
        first_kept = 0 if keep_last is None else length - keep_last
        kept = []
        for t in range(length):
            e = tokens[..., t, :] if embedded else self.embed(tokens[..., t])
            updated = self.update(e, c, linear)
            c = updated if mask is None else torch.where(mask[..., t, None], updated, c)
            if out is not None:
                out[..., t, :] = c
            elif t >= first_kept:
                kept.append(c)
        if out is not None:
            return out, c
        if not kept:
            return c.new_empty(*c.shape[:-1], 0, c.shape[-1]), c
        return torch.stack(kept, dim=-2), c

    def contexts(self, ids: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Contexts after each token of ``ids`` [..., T], carrying the context across positions."""
        return self.scan(ids, context)[0]

    def forward(self, ids: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits at every position of ``ids`` [..., T], and the last context."""
        contexts, last = self.scan(ids, context)
        return self.head(contexts), last

    @torch.no_grad()
    def read(self, ids: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Stream ``ids`` [..., T] of any length and return only the last context: O(1) memory."""
        return self.scan(ids, context, keep_last=0)[1]
