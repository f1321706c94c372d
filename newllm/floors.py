"""Perplexity floors that need no training: what a model must beat to have learned anything
beyond token frequencies (unigram) or the previous token (bigram).

Both are scored on the same val positions as every model in newllm (``newllm.phase2.stream_metrics``):
every val token after the first, N - 1 predictions for N val tokens. The unigram predicts
token t + 1 from nothing, the bigram from token t. Counts come from the train stream alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch

from newllm.experiment import FLOORS_FILE, damaged, recorded_json, write_file

# pseudo-count per vocabulary entry: fixed, never fitted (fitting it on val would flatter the floor)
UNIGRAM_K = 1.0
BIGRAM_K = 0.1


def _as_ids(ids: torch.Tensor | Sequence[int], what: str, vocab_size: int) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{what} holds token ids outside [0, {vocab_size})")
    return ids


def _check(train: torch.Tensor, val: torch.Tensor, k: float, min_train: int) -> None:
    if len(val) < 2:
        raise ValueError(f"a val stream of {len(val)} tokens has no next token to predict")
    if len(train) < min_train:
        raise ValueError(f"a train stream of {len(train)} tokens is too short (need >= {min_train})")
    if not k > 0:
        raise ValueError(f"k must be > 0, got {k}")


def _perplexity(log_probs: torch.Tensor) -> float:
    return math.exp(-float(log_probs.double().mean()))


def unigram_probs(train_ids: torch.Tensor, vocab_size: int, k: float = UNIGRAM_K) -> torch.Tensor:
    """Add-k unigram [vocab_size]: p(w) = (c(w) + k) / (N + k V), c(w) the train count of w."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double()
    return (counts + k) / (len(train_ids) + k * vocab_size)


def unigram_ppl(train_ids: torch.Tensor | Sequence[int], val_ids: torch.Tensor | Sequence[int], vocab_size: int,
                k: float = UNIGRAM_K) -> float:
    """Perplexity of the add-k unigram (``unigram_probs``, default add-one) of the train stream
    on every val token after the first."""
    train = _as_ids(train_ids, "train_ids", vocab_size)
    val = _as_ids(val_ids, "val_ids", vocab_size)
    _check(train, val, k, min_train=0)
    return _perplexity(unigram_probs(train, vocab_size, k).log()[val[1:]])


def pair_counts(keys: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """How often each of ``keys`` occurs in ``table`` (both int64), without a V x V array."""
    values, counts = torch.unique(table, return_counts=True)
    if len(values) == 0:
        return torch.zeros_like(keys)
    at = torch.searchsorted(values, keys).clamp_max(len(values) - 1)
    return torch.where(values[at] == keys, counts[at], 0)


def bigram_ppl(train_ids: torch.Tensor | Sequence[int], val_ids: torch.Tensor | Sequence[int], vocab_size: int,
               k: float = BIGRAM_K) -> float:
    """Perplexity on every val token after the first of the bigram with an add-k unigram prior
    (Dirichlet / MacKay-Peto smoothing), predicting token b from the token a before it:

        p(b | a) = (c(a, b) + k V u(b)) / (c(a) + k V)

    c(a, b) counts the train pairs (a, b), c(a) the train pairs that start with a, and u is the
    add-one unigram of ``unigram_probs``. The prior adds k V pseudo-pairs after every token, k
    per vocabulary entry on average, spread as the unigram: with a uniform u this is add-k; an
    unseen a falls back to u(b). ``k`` is a fixed default, fitted on nothing."""
    train = _as_ids(train_ids, "train_ids", vocab_size)
    val = _as_ids(val_ids, "val_ids", vocab_size)
    _check(train, val, k, min_train=2)
    prior = unigram_probs(train, vocab_size)
    pair_c = pair_counts(val[:-1] * vocab_size + val[1:], train[:-1] * vocab_size + train[1:]).double()
    first_c = torch.bincount(train[:-1], minlength=vocab_size).double()[val[:-1]]
    strength = k * vocab_size
    probs = (pair_c + strength * prior[val[1:]]) / (first_c + strength)
    return _perplexity(probs.log())


def floors(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> dict:
    """The floors of a data split: ``unigram_ppl`` and ``bigram_ppl`` on its val tokens, with
    their pseudo-counts."""
    return {"unigram_ppl": unigram_ppl(train_ids, val_ids, vocab_size),
            "bigram_ppl": bigram_ppl(train_ids, val_ids, vocab_size), "unigram_k": UNIGRAM_K, "bigram_k": BIGRAM_K}


def record_floors(experiment: str, values: dict) -> None:
    """Keep ``floors`` of the search's data in the experiment directory, for the report."""
    write_file(f"{experiment}/{FLOORS_FILE}", json.dumps(values, indent=1).encode())


def recorded_floors(experiment: str) -> dict | None:
    """The floors kept in the experiment directory; None for an experiment without them.
    ValueError naming the file if it is not what ``record_floors`` writes."""
    path = f"{experiment}/{FLOORS_FILE}"
    without = "the floors are then left out"
    values = recorded_json(path, without)
    if values is None:
        return None
    if not isinstance(values, dict):
        raise ValueError(damaged(path, "not a mapping of floors to numbers", without))
    for key in ("unigram_ppl", "bigram_ppl", "bigram_k"):
        value = values.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(damaged(path, f"unusable: its {key} must be a positive finite number, got {value!r}",
                                     without))
    return values


def floors_line(values: dict) -> str:
    """The floors in one sentence (the search's summary and the report both print it)."""
    return (f"Floors on the val tokens, from train-token counts (no training): unigram perplexity "
            f"{values['unigram_ppl']:.2f}, bigram {values['bigram_ppl']:.2f} (add-k, k = {values['bigram_k']:g}, with a "
            f"unigram prior): a model that does not beat them learned only word statistics.")
