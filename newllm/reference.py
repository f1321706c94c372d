"""The seed's per-token Phase 1 pass, with the corrected targets: a yardstick, not a trainer.

The seed ran Phase 1 as a Python loop over tokens, building the autograd graph one context
update at a time. This module keeps that algorithm (with the targets saved before the pass,
and the carried-over start context, as ``newllm.phase1`` specifies) so that tests can check the fast
pass of ``newllm.phase1`` against it gradient for gradient, and ``benchmarks/`` can measure
the speed-up. Training never uses it.
"""

from __future__ import annotations

import torch

from newllm.model import NewLLM
from newllm.phase1 import phase1_loss


def reference_pass(model: NewLLM, e: torch.Tensor, start: torch.Tensor, targets: torch.Tensor,
                   w: float) -> tuple[torch.Tensor, float, float, float]:
    """One Phase 1 pass token by token, backpropagated into ``.grad``.

    ``e`` [B, L, E] are the streams' embeddings, ``start`` [B, C] the carried-over contexts,
    ``targets`` [B, L, C] the previous pass's contexts. Each step reads the previous context
    through a stop-gradient: c[t] = f(e[t], stopgrad(c[t-1])). Returns the detached contexts
    [B, L, C] and the loss, CVFP and dist terms.
    """
    c = start
    outputs = []
    for t in range(e.shape[1]):
        c = model.update(e[:, t], c.detach())
        outputs.append(c)
    contexts = torch.stack(outputs, dim=1)
    loss, cvfp, dist = phase1_loss(contexts.flatten(0, 1), targets.flatten(0, 1), w)
    loss.backward()
    return contexts.detach(), loss.item(), cvfp.item(), dist.item()
