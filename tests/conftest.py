"""Shared test fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from newllm.data import TokenData

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


@dataclass(frozen=True)
class TinySearch:
    """A finished tiny search: its experiment directory and the data its trials trained on."""

    directory: Path
    data: TokenData


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory) -> TinySearch:
    """One small real search (3 trials, default Phase 2 mode at LR 1e-3, a gate every trial
    that does not diverge passes) shared by the tests that read a search's results. Tests
    that change the experiment must copy it first."""
    import ray

    from newllm import search
    from newllm.data import DataConfig, prepare_data
    from newllm.space import load_space

    root = tmp_path_factory.mktemp("tiny_search")
    space = root / "tiny.yaml"
    space.write_text(TINY_SPACE % "gate_train_er: 0.0\n  gate_val_er: 0.0")
    saved = {k: os.environ.get(k) for k in ("NEWLLM_CACHE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(NEWLLM_CACHE=str(root / "cache"), RAY_USAGE_STATS_ENABLED="0")
    try:
        code = search.main(["--local", "--space", str(space), "--name", "tiny", "--storage-path", str(root / "res")])
        assert code == 0
        data = prepare_data(DataConfig(**load_space(space).data))
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return TinySearch(root / "res" / "tiny", data)
