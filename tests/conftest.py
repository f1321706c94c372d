"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest

# a search space whose trials finish in seconds; %s takes more fixed settings
TINY_SPACE = """
num_trials: 3
params:
  context_dim: {type: categorical, choices: [8, 16]}
  num_layers: {type: int, low: 1, high: 2}
  dist_reg_weight: {type: float, low: 0.1, high: 0.8}
fixed:
  embed_dim: 8
  phase1_max_iter: 4
  phase1_streams: 4
  phase2_epochs: 2
  phase2_lr: 0.001
  phase2_batch_size: 64
  %s
data:
  num_samples: 6
  vocab_size: 300
"""


@pytest.fixture
def tiny_space(tmp_path) -> Callable[..., str]:
    """Writes TINY_SPACE with ``extra`` fixed settings (YAML lines) to a file; returns its path."""
    def write(extra: str = "", name: str = "tiny.yaml") -> str:
        path = tmp_path / name
        path.write_text(TINY_SPACE % extra)
        return str(path)
    return write
