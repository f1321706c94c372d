"""TrainConfig: every setting of one New-LLM or baseline training run, validated once; the
baselines' BaselineConfig; and the command-line flags of TrainConfig and DataConfig, generated
from their fields.

Field names are the seed's command-line names with underscores (``--context-dim`` is
``context_dim``). The CLIs build their flags from these fields, a search space names them as
keys, and a trial's config is ``TrainConfig(**params)``: one vocabulary.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Literal, get_args

import torch

from newllm.checks import number_problem
from newllm.data import DataConfig
from newllm.model import ARCHITECTURES, ModelConfig, NewLLM

# standard language models trained end to end, to compare New-LLM with (newllm.baselines)
BaselineArchitecture = Literal["lstm", "gru", "transformer"]
BASELINE_ARCHITECTURES: tuple[str, ...] = get_args(BaselineArchitecture)
Family = Literal["newllm", "baseline"]
NEWLLM: Family = "newllm"

SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit
PHASE1_MODES = ("exact", "jacobi")


def _f(default, help: str, family: Family | None = None, **extra):
    """A field; ``family``: the one model family it means something to (None: both)."""
    return field(default=default, metadata={"help": help, "family": family, **extra})


def _n(default, help: str, **extra):
    return _f(default, help, NEWLLM, **extra)


def _b(default, help: str, **extra):
    return _f(default, help, "baseline", **extra)


@dataclass(frozen=True)
class TrainConfig:
    """One run's settings (model, Phase 1, gate, Phase 2, seed), validated when made; the
    metadata of each field gives its help, flag and the family it means something to."""
    # model architecture
    architecture: str = _f("residual", "New-LLM's context update: residual (seed 002) or gated (seed 000); or a "
                                       "baseline trained end to end: lstm, gru or transformer",
                           choices=ARCHITECTURES + BASELINE_ARCHITECTURES)
    context_dim: int = _n(256, "context vector dimension C")
    embed_dim: int = _f(256, "token embedding dimension E")
    hidden_dim: int = _f(512, "hidden layer dimension H (residual needs H == C + E; a baseline's LSTM/GRU "
                              "hidden size or transformer width)")
    num_layers: int = _f(4, "number of context-update layers (a baseline's recurrent or transformer layers)")
    # baselines only
    context_window: int = _b(64, "transformer baseline: most tokens it attends to (val: a sliding window)")
    num_heads: int = _b(2, "transformer baseline: attention heads (must divide hidden_dim; its width steps by them)")
    dropout: float = _b(0.0, "baselines: dropout")
    # Phase 1 (CVFP)
    phase1_max_iter: int = _n(10, "maximum Phase 1 training passes (0 = no Phase 1: Phase 2 starts from the "
                                   "initial weights, with no analysis or gate)")
    phase1_min_iter: int = _n(3, "a converged stop counts from this pass on (pass 1 compares untrained weights)")
    phase1_lr_warmup: float = _n(0.002, "Phase 1 LR for passes 1-3")
    phase1_lr_medium: float = _n(0.0005, "Phase 1 LR for passes 4-8")
    phase1_lr_finetune: float = _n(0.0001, "Phase 1 LR from pass 9 on")
    dist_reg_weight: float = _n(0.2, "distribution-regulariser weight w: loss = (1-w)*cvfp + w*dist")
    dist_reg: bool = _n(True, "distribution regularisation (--no-dist-reg sets w = 0)")
    convergence_threshold: float = _n(0.02, "a token is converged when MSE to its previous-pass context < this")
    min_converged_ratio: float = _n(0.95, "Phase 1 succeeds when this fraction of tokens converged")
    collapse_patience: int = _n(3, "stop Phase 1 after this many passes with train ER below the gate")
    phase1_mode: str = _n("exact", "exact: the sequential recurrence; jacobi: every position at once from the "
                                   "previous pass's contexts", choices=PHASE1_MODES)
    phase1_streams: int = _n(128, "B contiguous chunks of the stream processed side by side, each >= 128 "
                                  "tokens (fewer on short streams; 1 = the seed's single stream)")
    phase1_chunk_tokens: int = _n(4096, "tokens per batched backward chunk (bounds memory)")
    phase1_keep_gib: float = _n(4.0, "GiB for keeping the sequential pass's matmul outputs, so that the backward "
                                      "need not compute them again (a pass that needs more recomputes; 0 = always)")
    # gate
    gate_train_er: float = _n(0.20, "Phase 2 needs train effective rank >= this fraction of C")
    gate_val_er: float = _n(0.08, "Phase 2 needs val effective rank >= this fraction of C")
    # Phase 2 (token prediction)
    phase2_lr: float = _f(0.0001, "Phase 2 learning rate")
    phase2_epochs: int = _f(10, "maximum Phase 2 epochs")
    phase2_batch_size: int = _f(32, "Phase 2 tokens per optimiser step: streams x phase2_bptt window "
                                    "(shuffled positions with freeze_context)")
    phase2_bptt: int = _f(8, "Phase 2 truncated-backpropagation window (tokens) through the recurrence")
    phase2_patience: int = _f(3, "Phase 2 early-stopping patience (epochs without val improvement)")
    skip_phase2: bool = _n(False, "run Phase 1 only")
    freeze_context: bool = _n(False, "train only the token head in Phase 2 (context layers frozen)")
    seed: int = _f(42, "random seed: same seed, same numbers")

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = setting_problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"{f.name} {problem}")
        if self.family == "newllm":
            self.model_config(vocab_size=1)  # raises on a dimension combination the model rejects
        else:
            self.baseline_config()
            if self.architecture == "transformer" and self.phase2_bptt > self.context_window:
                raise ValueError(f"phase2_bptt ({self.phase2_bptt}) must be <= context_window "
                                 f"({self.context_window}) for the transformer baseline")
        # checked in every family, though only one reads them: a value no run can use is a mistake
        positive = ("phase1_min_iter", "phase1_streams", "phase1_chunk_tokens", "phase2_epochs",
                    "phase2_batch_size", "phase2_bptt", "phase2_patience", "collapse_patience", "context_window",
                    "num_heads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.phase1_max_iter < 0:
            raise ValueError(f"phase1_max_iter must be >= 0 (0 = no Phase 1), got {self.phase1_max_iter}")
        if self.family == NEWLLM and not self.phase1 and self.skip_phase2:
            raise ValueError("phase1_max_iter 0 (no Phase 1) with skip_phase2 leaves nothing to run")
        for name in ("phase1_lr_warmup", "phase1_lr_medium", "phase1_lr_finetune", "phase2_lr",
                     "convergence_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.phase1_keep_gib < 0:
            raise ValueError(f"phase1_keep_gib must be >= 0 (0 = always recompute), got {self.phase1_keep_gib}")
        for name in ("dist_reg_weight", "min_converged_ratio", "gate_train_er", "gate_val_er"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.phase2_bptt > self.phase2_batch_size:
            raise ValueError(f"phase2_bptt ({self.phase2_bptt}) must be <= phase2_batch_size ({self.phase2_batch_size}): "
                             f"a step's batch is streams x window tokens")
        if self.phase1_mode not in PHASE1_MODES:
            raise ValueError(f"phase1_mode must be one of {PHASE1_MODES}, got {self.phase1_mode!r}")

    @property
    def family(self) -> Family:
        return "baseline" if self.architecture in BASELINE_ARCHITECTURES else NEWLLM

    def ignored(self) -> list[str]:
        """The settings this run ignores: those that differ from their defaults but mean
        nothing to its family (a baseline has no Phase 1 or gate; New-LLM no dropout)."""
        return [f.name for f in fields(self) if f.metadata["family"] not in (None, self.family)
                and getattr(self, f.name) != f.default]

    @property
    def phase1(self) -> bool:
        """Whether a New-LLM run has a Phase 1 (``phase1_max_iter`` 0: none)."""
        return self.phase1_max_iter > 0

    @property
    def effective_dist_reg_weight(self) -> float:
        return self.dist_reg_weight if self.dist_reg else 0.0

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, context_dim=self.context_dim, embed_dim=self.embed_dim,
                           hidden_dim=self.hidden_dim, num_layers=self.num_layers, architecture=self.architecture)

    def non_embedding_params(self, vocab_size: int) -> int:
        """``num_params(non_embedding=True)`` of the model this config builds, counted on the
        meta device (no memory, no initialisation)."""
        if self.family == "baseline":
            return non_embedding_params(self.baseline_config(), vocab_size)
        return _newllm_non_embedding_params(self.model_config(vocab_size))

    def baseline_config(self) -> BaselineConfig:
        """The baseline model this config describes (the baseline family's fields)."""
        return BaselineConfig(self.architecture, self.embed_dim, self.hidden_dim, self.num_layers,
                              self.context_window, self.num_heads, self.dropout, self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BaselineConfig:
    """A baseline model (``newllm.baselines``), as ``TrainConfig.baseline_config`` gives it."""

    architecture: BaselineArchitecture = "lstm"
    embed_dim: int = 32
    hidden_dim: int = 64          # LSTM/GRU hidden size; the transformer's d_model
    num_layers: int = 1
    context_window: int = 64      # transformer only: most tokens it attends to
    num_heads: int = 4            # transformer only: must divide hidden_dim
    dropout: float = 0.0
    seed: int = 42                # weight initialisation (build_baseline)

    def __post_init__(self) -> None:
        if self.architecture not in BASELINE_ARCHITECTURES:
            raise ValueError(f"architecture must be one of {BASELINE_ARCHITECTURES}, got {self.architecture!r}")
        for name in ("embed_dim", "hidden_dim", "num_layers", "context_window", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.architecture == "transformer" and self.hidden_dim % self.num_heads:
            raise ValueError(f"the transformer needs hidden_dim (d_model) divisible by num_heads, "
                             f"got hidden_dim={self.hidden_dim}, num_heads={self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


def non_embedding_params(cfg: BaselineConfig, vocab_size: int) -> int:
    """``num_params(non_embedding=True)`` of the baseline ``cfg`` describes, by formula
    (``newllm.baselines.size_for`` evaluates it many times; a test holds it equal to the built
    model's count)."""
    h, e, layers, head = cfg.hidden_dim, cfg.embed_dim, cfg.num_layers, cfg.hidden_dim * vocab_size + vocab_size
    if cfg.architecture == "transformer":
        # input projection; per layer attention (in 3d^2 + 3d, out d^2 + d), feed-forward
        # (4d^2 + 4d, 4d^2 + d) and two LayerNorms (4d); the final LayerNorm (2d)
        return e * h + layers * (12 * h * h + 13 * h) + 2 * h + head
    gates = 4 if cfg.architecture == "lstm" else 3  # per layer: weights of input and state, two biases
    return sum(gates * h * ((e if layer == 0 else h) + h + 2) for layer in range(layers)) + head


@functools.cache
def _newllm_non_embedding_params(model_config: ModelConfig) -> int:
    """Counted on the meta device (no memory, no initialisation); cached, as a search space's
    check asks for the same sizes many times."""
    with torch.device("meta"):
        return NewLLM(model_config).num_params(non_embedding=True)


def setting_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be the TrainConfig setting ``name`` whatever the others are: a float
    that is not finite, an int beyond 2**31 - 1, a seed outside [0, 2**32) (what NumPy takes);
    None if it may be. A search space checks its fixed values with it, TrainConfig every field."""
    if name == "seed" and isinstance(value, int):
        return None if 0 <= value <= SEED_MAX else f"must be in [0, {SEED_MAX}] (2**32 - 1), got {value}"
    return number_problem(value)


def family_fields(family: Family) -> list[str]:
    """The TrainConfig fields that mean something to ``family``."""
    return [f.name for f in fields(TrainConfig) if f.metadata["family"] in (None, family)]


def field_types() -> dict[str, type]:
    """Name -> Python type of every TrainConfig field."""
    return {f.name: {"int": int, "float": float, "bool": bool, "str": str}[f.type] for f in fields(TrainConfig)}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per TrainConfig field, defaults and help taken from the field."""
    types = field_types()
    for f in fields(TrainConfig):
        assert f.default is not MISSING
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {f.default})"
        if types[f.name] is bool:
            if f.default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=help)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help)
        else:
            parser.add_argument(flag, dest=f.name, type=types[f.name], default=f.default,
                                choices=f.metadata.get("choices"), help=help)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``add_train_arguments`` flags."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def data_flags() -> dict[str, str]:
    """DataConfig field name -> its command-line flag, for the fields that have one."""
    return {f.name: f.metadata["flag"] or "--" + f.name.replace("_", "-")
            for f in fields(DataConfig) if f.metadata["flag"] is not None}


def add_data_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """One flag per DataConfig field, help taken from the field; with ``defaults=False`` unset
    flags stay None (a search space's data section may set them)."""
    group = parser.add_argument_group("data")
    flags = data_flags()
    for f in fields(DataConfig):
        if f.name in flags:
            kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
            group.add_argument(flags[f.name], dest=f.name, type=kind, default=f.default if defaults else None,
                               help=f"{f.metadata['help']} (default: {f.default})")


def data_config_from_args(args: argparse.Namespace, base: dict | None = None) -> DataConfig:
    """DataConfig from the flags given, over ``base`` (a search space's data section)."""
    given = {name: getattr(args, name) for name in data_flags()}
    return DataConfig(**{**(base or {}), **{k: v for k, v in given.items() if v is not None}})
