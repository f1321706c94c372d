"""newllm: distributed hyperparameter search for New-LLM, an attention-free language model."""

__version__ = "0.1.0"
