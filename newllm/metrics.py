"""Fixed-point analysis of context vectors and the Phase 2 gate: pure functions returning data.

Definitions follow the seed: effective rank ER = 1 / sum(p^2) with p = s / sum(s) over the
singular values s of the N x C context matrix; a global attractor is mean pairwise L2 < 0.01
and cosine > 0.999 on sampled pairs; a zero solution is mean norm < 0.1; sparsity is the
fraction of entries with |v| < 0.01.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

ATTRACTOR_L2 = 0.01
ATTRACTOR_COSINE = 0.999
ZERO_NORM = 0.1
SPARSE_ABS = 0.01


def singular_values(x: torch.Tensor, rows_per_chunk: int = 65536) -> torch.Tensor:
    """Singular values of ``x`` [N, C] in float64, descending, via the C x C Gram matrix.

    The Gram matrix is accumulated in chunks of rows so a million-row context matrix needs
    no float64 copy of itself.
    """
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for rows in x.split(rows_per_chunk):
        r = rows.detach().to("cpu", torch.float64)
        gram += r.T @ r
    eig = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    return eig.flip(0)


def effective_rank(s: torch.Tensor) -> float:
    """ER = 1 / sum(p^2), p = s / sum(s), from singular values ``s``; 0 for an all-zero matrix."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    return float(1.0 / (p * p).sum())


@dataclass(frozen=True)
class FixedPointAnalysis:
    """What the fixed contexts of a token stream look like (the seed's fixed-point analysis)."""
    num_tokens: int
    context_dim: int
    effective_rank: float
    effective_rank_fraction: float
    top_singular_values: list[float]
    mean_pairwise_l2: float
    mean_pairwise_cosine: float
    global_attractor: bool
    mean_norm: float
    zero_solution: bool
    norm_min: float
    norm_max: float
    norm_std: float
    sparsity: float

    def to_dict(self) -> dict:
        return asdict(self)


def fixed_point_analysis(contexts: torch.Tensor, num_pairs: int = 1000, seed: int = 0) -> FixedPointAnalysis:
    """The seed's fixed-point analysis of ``contexts`` [N, C]."""
    x = contexts.detach().float().cpu()
    n, dim = x.shape
    s = singular_values(x)
    er = effective_rank(s)
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(n, (num_pairs,), generator=g)
    j = torch.randint(n, (num_pairs,), generator=g)
    keep = i != j
    a, b = x[i[keep]], x[j[keep]]
    l2 = float((a - b).norm(dim=1).mean()) if len(a) else 0.0
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()) if len(a) else 1.0
    norms = x.norm(dim=1)
    mean_norm = float(norms.mean())
    return FixedPointAnalysis(
        num_tokens=n,
        context_dim=dim,
        effective_rank=er,
        effective_rank_fraction=er / dim,
        top_singular_values=[float(v) for v in s[:5]],
        mean_pairwise_l2=l2,
        mean_pairwise_cosine=cos,
        global_attractor=l2 < ATTRACTOR_L2 and cos > ATTRACTOR_COSINE,
        mean_norm=mean_norm,
        zero_solution=mean_norm < ZERO_NORM,
        norm_min=float(norms.min()),
        norm_max=float(norms.max()),
        norm_std=float(norms.std()) if n > 1 else 0.0,
        sparsity=float((x.abs() < SPARSE_ABS).float().mean()),
    )


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on a Phase 1 run, and why."""
    passed: bool
    reason: str


def gate(train: FixedPointAnalysis, val: FixedPointAnalysis, min_train_er: float, min_val_er: float) -> GateResult:
    """Phase 2 runs only if train ER >= ``min_train_er`` * C and val ER >= ``min_val_er`` * C."""
    failures = []
    if train.effective_rank_fraction < min_train_er:
        failures.append(f"train ER {train.effective_rank_fraction:.1%} < {min_train_er:.0%} of C")
    if val.effective_rank_fraction < min_val_er:
        failures.append(f"val ER {val.effective_rank_fraction:.1%} < {min_val_er:.0%} of C")
    if failures:
        return GateResult(False, "; ".join(failures))
    return GateResult(
        True,
        f"train ER {train.effective_rank_fraction:.1%} >= {min_train_er:.0%} and "
        f"val ER {val.effective_rank_fraction:.1%} >= {min_val_er:.0%} of C",
    )
