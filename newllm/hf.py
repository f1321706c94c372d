"""Hugging Face Transformers integration: New-LLM as a ``PreTrainedModel`` with ``generate()``.

``NewLLMForCausalLM`` wraps the core ``newllm.model.NewLLM`` unchanged. Its recurrent state
is the context vector: ``forward`` takes an optional ``context`` and returns the one after
the last token. ``generate`` reads the prompt once into a context, then feeds only the newest
token and the carried context at each step: one context update per token, and memory that
stays constant however long the prompt and the output are. There is no key/value cache, and
transformers is told not to build one.

``export_checkpoint`` turns a newllm checkpoint directory (``newllm.checkpoint``: model.pt +
tokenizer.json) into a Hugging Face directory: config.json, model.safetensors,
generation_config.json and the BPE tokenizer as a ``PreTrainedTokenizerFast``. Importing this
module registers the classes with ``AutoConfig`` and ``AutoModelForCausalLM``, so after
``import newllm.hf``::

    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)

Needs the ``hf`` extra (``pip install 'newllm[hf]'``); nothing else in newllm imports
transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import ModelOutput
from transformers.utils.generic import can_return_tuple

from newllm.checkpoint import TOKENIZER_FILE, load_model
from newllm.data import END_OF_TEXT, read_tokenizer
from newllm.model import ModelConfig, NewLLM


class NewLLMConfig(PretrainedConfig):
    """The model configuration of ``newllm.model.ModelConfig``, as a Hugging Face config."""

    model_type = "newllm"

    def __init__(self, vocab_size: int = 1000, context_dim: int = 256, embed_dim: int = 256, hidden_dim: int = 512,
                 num_layers: int = 4, architecture: str = "residual", **kwargs):
        self.vocab_size = vocab_size
        self.context_dim = context_dim
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.architecture = architecture
        super().__init__(**kwargs)
        self.model_config()  # raises ValueError on a combination the model rejects

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, context_dim=self.context_dim, embed_dim=self.embed_dim,
                           hidden_dim=self.hidden_dim, num_layers=self.num_layers, architecture=self.architecture)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> NewLLMConfig:
        return cls(**cfg.to_dict())


@dataclass
class NewLLMCausalLMOutput(ModelOutput):
    """``CausalLMOutput`` with the recurrent state: ``context`` [B, C], the context after the last token."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    context: torch.FloatTensor | None = None


class NewLLMForCausalLM(PreTrainedModel, GenerationMixin):
    """The core ``NewLLM`` (``self.newllm``) with the Hugging Face model and generation API."""

    config_class = NewLLMConfig
    base_model_prefix = "newllm"
    main_input_name = "input_ids"
    # the context cannot be rolled back to an earlier token (assisted decoding), nor reordered
    # across beams: greedy decoding and sampling only
    _is_stateful = True
    _supported_generation_modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)

    def __init__(self, config: NewLLMConfig):
        super().__init__(config)
        self.newllm = NewLLM(config.model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No ``DynamicCache``: the recurrent state is the context, carried by ``generate`` itself."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default initialisation, as in a newllm run (not transformers' normal(0, 0.02))."""
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            module.reset_parameters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.newllm.token_embedding

    def get_output_embeddings(self) -> nn.Linear:
        return self.newllm.head

    @classmethod
    def from_newllm(cls, model: NewLLM) -> NewLLMForCausalLM:
        """A wrapper holding a copy of the weights of the core ``model``, in eval mode."""
        wrapped = cls(NewLLMConfig.from_model_config(model.cfg)).to(model.head.weight.device)
        wrapped.newllm.load_state_dict(model.state_dict())
        return wrapped.eval()

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None,
                context: torch.FloatTensor | None = None, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> NewLLMCausalLMOutput:
        """Read ``input_ids`` [B, T] token by token, starting from ``context`` [B, C] (zeros if None).

        ``logits`` [B, T, V] predict the token after each position; without ``labels``, only the
        last ``logits_to_keep`` positions if > 0 (what ``generate`` asks for), which keeps memory
        constant in T under no_grad. ``labels`` [B, T] give ``loss``, the mean cross-entropy of
        the next token (shifted inside, -100 ignored; ``kwargs`` such as the Trainer's
        ``num_items_in_batch`` go to the loss, ``generate``'s bookkeeping ones are unused). A 0 in
        ``attention_mask`` (left padding) leaves the context unchanged at that position.
        """
        m = self.newllm
        mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:].bool()
        keep_last = logits_to_keep if 0 < logits_to_keep and labels is None else None
        contexts, c = m.scan(input_ids, context, mask=mask, keep_last=keep_last)
        logits = m.head(contexts)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return NewLLMCausalLMOutput(loss=loss, logits=logits, context=c)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, context: torch.FloatTensor | None = None,
                                      attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                                      is_first_iteration: bool = False, **kwargs) -> dict:
        """The whole prompt on the first step; afterwards only the newest token and the carried context."""
        if context is not None and not is_first_iteration:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "context": context, "attention_mask": attention_mask,
                "logits_to_keep": logits_to_keep}

    def _update_model_kwargs_for_generation(self, outputs: NewLLMCausalLMOutput, model_kwargs: dict,
                                            *args, **kwargs) -> dict:
        """Carry the context to the next step (besides what transformers updates itself)."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["context"] = outputs.context
        return model_kwargs


AutoConfig.register(NewLLMConfig.model_type, NewLLMConfig)
AutoModelForCausalLM.register(NewLLMConfig, NewLLMForCausalLM)


def hf_tokenizer(tokenizer_json: str) -> PreTrainedTokenizerFast:
    """The trained byte-level BPE tokenizer as a ``PreTrainedTokenizerFast``: end-of-text as
    eos and pad token (when the vocabulary has it), left padding for batched generation."""
    tok = Tokenizer.from_str(tokenizer_json)
    special = {"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT} if tok.token_to_id(END_OF_TEXT) is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"], **special)


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the newllm checkpoint in ``checkpoint_dir`` to ``out_dir`` as a Hugging Face
    directory (model, generation config and tokenizer); returns ``out_dir``. Both files of the
    checkpoint are read and checked before anything is written."""
    core, record = load_model(checkpoint_dir)
    if not isinstance(core, NewLLM):
        raise ValueError(f"{str(checkpoint_dir)!r} holds a {record['model_config']['architecture']} baseline, not a "
                         f"New-LLM model: only New-LLM models export to the newllm model type")
    # read and checked before anything is written: a damaged file is a ValueError naming it
    tokenizer = read_tokenizer(Path(checkpoint_dir) / TOKENIZER_FILE, "the checkpoint's tokenizer")
    tokenizer = hf_tokenizer(tokenizer.to_str())
    model = NewLLMForCausalLM.from_newllm(core)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
