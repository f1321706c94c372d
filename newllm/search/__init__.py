"""The search: Ray Tune runs the trials, Optuna proposes them. The only package of newllm that
imports Ray; ``python -m newllm.search`` is its command line (``newllm.search.cli``)."""
