"""A trained model on disk: ``model.pt`` (weights and configs) and ``tokenizer.json``.

The single-run CLI, the search's trial checkpoints and ``newllm.export`` all use this one
layout. ``model.pt`` holds only tensors and plain values (dicts, lists, str, numbers, bool,
None) and is loaded with ``weights_only=True``: a file holding any other object is refused,
since unpickling it could run code.
"""

from __future__ import annotations

import os
import pickle
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from newllm.baselines import BaselineLM, build_baseline
from newllm.config import BASELINE_ARCHITECTURES, BaselineConfig
from newllm.model import ModelConfig, NewLLM

MODEL_FILE = "model.pt"
TOKENIZER_FILE = "tokenizer.json"


def save_model(directory: str | os.PathLike, model: NewLLM | BaselineLM, tokenizer_json: str, **extra) -> None:
    """Write weights, model config, ``extra`` (e.g. the train config, Phase 1 history) and
    tokenizer. A baseline's model config is its ``BaselineConfig`` with ``vocab_size`` (its
    ``architecture`` says it is one)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = model.cfg.to_dict()
    if isinstance(model, BaselineLM):
        config["vocab_size"] = model.head.out_features
    write_atomic(d / MODEL_FILE, lambda tmp: torch.save({"model_config": config, "state_dict": state, **extra}, tmp))
    write_atomic(d / TOKENIZER_FILE, lambda tmp: tmp.write_text(tokenizer_json, encoding="utf-8"))


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a file to a temporary name beside ``path``, then rename it to ``path``: a reader
    finds the old file or the whole new one, never one cut off."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_baseline(model_config: dict) -> bool:
    """Whether a saved model config is a baseline's (not a New-LLM model)."""
    return model_config.get("architecture") in BASELINE_ARCHITECTURES


def load_model(directory: str | os.PathLike, device: str = "cpu") -> tuple[NewLLM | BaselineLM, dict]:
    """The model saved in ``directory`` and the whole saved record (configs, extras); ValueError
    naming the file if it is not a checkpoint ``save_model`` wrote."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {str(directory)!r}: not a newllm checkpoint directory")
    bad = f"{str(path)!r} is not a newllm checkpoint"
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{bad}: not a torch.save archive (a damaged or foreign file)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{bad}: it holds objects other than tensors and plain values, "
                         f"which are not loaded because unpickling them could run code") from e
    except Exception as e:  # a damaged archive: torch raises RuntimeError, EOFError, KeyError...
        raise ValueError(f"{bad}: torch cannot read it ({type(e).__name__})") from e
    if not (isinstance(record, dict) and isinstance(record.get("model_config"), dict)
            and isinstance(record.get("state_dict"), dict)):
        raise ValueError(f"{bad}: it lacks the model_config and state_dict that save_model writes")
    try:
        config = dict(record["model_config"])
        if is_baseline(config):
            vocab_size = config.pop("vocab_size")
            model = build_baseline(BaselineConfig(**config), vocab_size)
        else:
            model = NewLLM(ModelConfig(**config))
        model.load_state_dict(record["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{bad}: its model_config or state_dict is invalid: {' '.join(str(e).split())}") from e
    return model.to(device), record
