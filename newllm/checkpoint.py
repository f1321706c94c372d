"""A trained model on disk: ``model.pt`` (weights and configs) and ``tokenizer.json``.

The single-run CLI, the search's trial checkpoints and ``newllm.export`` all use this one
layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from newllm.model import ModelConfig, NewLLM

MODEL_FILE = "model.pt"
TOKENIZER_FILE = "tokenizer.json"


def save_model(directory: str | os.PathLike, model: NewLLM, tokenizer_json: str, **extra) -> None:
    """Write weights, model config, ``extra`` (e.g. the train config, Phase 1 history) and tokenizer."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = d / (MODEL_FILE + ".tmp")
    torch.save({"model_config": model.cfg.to_dict(), "state_dict": state, **extra}, tmp)
    os.replace(tmp, d / MODEL_FILE)
    (d / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")


def load_model(directory: str | os.PathLike, device: str = "cpu") -> tuple[NewLLM, dict]:
    """The model saved in ``directory`` and the whole saved record (configs, extras)."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {str(directory)!r}: not a newllm checkpoint directory")
    record = torch.load(path, map_location=device, weights_only=False)
    model = NewLLM(ModelConfig(**record["model_config"])).to(device)
    model.load_state_dict(record["state_dict"])
    return model, record
