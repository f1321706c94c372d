"""The Hugging Face integration: forward and loss, generate() carrying the context, constant
memory, save/load through the Auto classes, training with ``Trainer``, and
``python -m newllm.export``."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import write_table
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from newllm import experiment as exp
from newllm import export
from newllm.checkpoint import load_model, save_model
from newllm.data import END_OF_TEXT, builtin_documents, train_tokenizer
from newllm.model import ModelConfig, NewLLM

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from newllm.hf import NewLLMConfig, NewLLMForCausalLM, export_checkpoint  # noqa: E402

VOCAB = 300
TEXT = "def f(x):\n    return x + 1  # the answer"


def tiny_core(architecture: str = "residual", vocab_size: int = VOCAB, dim: int = 8) -> NewLLM:
    """The same weights on every call (seed 0): C = E = dim, H = 2 dim, 2 layers."""
    torch.manual_seed(0)
    return NewLLM(ModelConfig(vocab_size=vocab_size, context_dim=dim, embed_dim=dim, hidden_dim=2 * dim,
                              num_layers=2, architecture=architecture))


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return train_tokenizer(builtin_documents()[:8], VOCAB).to_str()


@pytest.fixture
def checkpoint(tmp_path, tokenizer_json) -> Path:
    save_model(tmp_path / "ckpt", tiny_core(), tokenizer_json)
    return tmp_path / "ckpt"


@pytest.fixture
def exported(tmp_path, checkpoint) -> Path:
    return export_checkpoint(checkpoint, tmp_path / "hf")


def assert_same_model(model: NewLLMForCausalLM, reference: NewLLMForCausalLM, ids: torch.Tensor) -> None:
    """Bitwise-equal weights, and logits equal up to float rounding: weights loaded from
    safetensors are not 64-byte aligned, so CPU kernels may take another SIMD path."""
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-6)


# --- forward and generate -------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["residual", "gated"])
def test_forward_is_the_core_model_with_shifted_loss(architecture):
    core = tiny_core(architecture)
    model = NewLLMForCausalLM.from_newllm(core)
    ids = torch.randint(0, VOCAB, (2, 9))
    labels = ids.clone()
    labels[0, 3] = labels[1, :4] = -100
    out = model(ids, labels=labels)
    logits, last = core(ids)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.context, last, rtol=1e-5, atol=1e-6)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # the context is the recurrent state: reading the rest from it continues the sequence
    rest = model(ids[:, 5:], context=model(ids[:, :5]).context, logits_to_keep=1)
    torch.testing.assert_close(rest.logits, logits[:, -1:], rtol=1e-5, atol=1e-6)


def manual_greedy(core: NewLLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Read the prompt into a context, then n times: argmax of the head, read that token."""
    with torch.no_grad():
        c = core.initial_context(prompt.shape[:1])
        for t in range(prompt.shape[1]):
            c = core.update(core.embed(prompt[:, t]), c)
        tokens = []
        for _ in range(n):
            tokens.append(core.head(c).argmax(-1))
            c = core.update(core.embed(tokens[-1]), c)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("architecture", ["residual", "gated"])
def test_greedy_generate_is_the_step_by_step_decode_one_update_per_token(architecture):
    core = tiny_core(architecture)
    model = NewLLMForCausalLM.from_newllm(core)
    prompt, n = torch.randint(0, VOCAB, (2, 6)), 12
    calls, updates = [], []
    model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    update = model.newllm.update

    def counted_update(e: torch.Tensor, c: torch.Tensor, *linear) -> torch.Tensor:
        updates.append(e.shape)
        return update(e, c, *linear)

    model.newllm.update = counted_update

    out = model.generate(prompt, max_new_tokens=n, do_sample=False)
    assert torch.equal(out[:, :6], prompt)
    assert torch.equal(out[:, 6:], manual_greedy(core, prompt, n))
    # the prompt is read once; then each step reads only the newest token from the carried context
    assert [c["input_ids"].shape[1] for c in calls] == [6] + [1] * (n - 1)
    assert calls[0]["context"] is None and all(c["context"].shape == (2, 8) for c in calls[1:])
    assert not any("past_key_values" in c for c in calls)
    assert len(updates) == 6 + n - 1


def test_generate_continues_from_a_given_context():
    model = NewLLMForCausalLM.from_newllm(tiny_core())
    ids = torch.randint(0, VOCAB, (2, 9))
    whole = model.generate(ids, max_new_tokens=10, do_sample=False)
    context = model(ids[:, :4]).context
    continued = model.generate(ids[:, 4:], context=context, max_new_tokens=10, do_sample=False)
    assert torch.equal(continued[:, 5:], whole[:, 9:])


def test_sampling_is_reproducible_with_a_seed_and_has_the_requested_length():
    model = NewLLMForCausalLM.from_newllm(tiny_core())
    prompt = torch.randint(0, VOCAB, (2, 5))

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return model.generate(prompt, max_new_tokens=30, do_sample=True)

    first = sample(1)
    assert first.shape == (2, 35) and torch.equal(first[:, :5], prompt)
    assert torch.equal(sample(1), first)
    assert not torch.equal(sample(2), first)
    assert not torch.equal(model.generate(prompt, max_new_tokens=30, do_sample=False), first)


class TensorMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated by torch ops inside the ``with`` block and still alive,
    and their peak. tracemalloc cannot see tensor storage (torch allocates it in C++), so this
    counts each op's freshly allocated outputs (not views or in-place results) until the
    tensor object is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info for r in func._schema.returns):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


def test_generation_memory_does_not_grow_with_prompt_or_output_length():
    # a vocabulary and context large enough that any per-token state (a cache of contexts or
    # logits) would dwarf the token ids themselves
    model = NewLLMForCausalLM.from_newllm(tiny_core(vocab_size=4096, dim=64))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def peak(prompt_length: int, new_tokens: int) -> int:
        prompt = torch.randint(0, 4096, (1, prompt_length))
        with TensorMemory() as memory:
            out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        assert out.shape == (1, prompt_length + new_tokens)
        return memory.peak

    base, long_output, long_prompt = peak(16, 200), peak(16, 2000), peak(2000, 200)
    # weights plus everything generate allocates: within a few percent for 10x the tokens
    assert weights + long_output <= 1.03 * (weights + base)
    assert weights + long_prompt <= 1.03 * (weights + base)
    # what grows at all is only the returned token ids (int64, 8 bytes a token), which
    # generate must hold; a cached context alone would be 256 bytes a token here
    assert long_output - base <= 4 * 8 * 1800 and long_prompt - base <= 4 * 8 * 1984


# --- saving, loading, Auto classes --------------------------------------------------------------


def test_export_writes_a_directory_the_auto_classes_load(tmp_path, exported, tokenizer_json):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names and "model.pt" not in names

    core = tiny_core()
    config = AutoConfig.from_pretrained(exported)
    assert isinstance(config, NewLLMConfig) and config.model_config() == core.cfg
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert isinstance(model, NewLLMForCausalLM)
    ids = torch.randint(0, VOCAB, (2, 7))
    reference = NewLLMForCausalLM.from_newllm(core)
    assert_same_model(model, reference, ids)
    # and save_pretrained / from_pretrained of the loaded model round-trips too
    model.save_pretrained(tmp_path / "again")
    assert_same_model(NewLLMForCausalLM.from_pretrained(tmp_path / "again"), reference, ids)

    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == Tokenizer.from_str(tokenizer_json).encode(TEXT).ids and tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_token == tokenizer.pad_token == END_OF_TEXT
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_config_rejects_dimensions_the_model_rejects():
    with pytest.raises(ValueError, match="hidden_dim == context_dim \\+ embed_dim"):
        NewLLMConfig(vocab_size=50, context_dim=8, embed_dim=8, hidden_dim=10)


def test_left_padded_batch_generates_as_each_prompt_alone(exported):
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompts = ["for item in items:", "x"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    together = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    for prompt, row in zip(prompts, together):
        alone = tokenizer(prompt, return_tensors="pt")
        assert torch.equal(model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1]:], row)


def test_trainer_trains_an_exported_model(tmp_path, exported):
    """A few ``transformers.Trainer`` steps (the hf extra brings the accelerate it needs) change
    the weights with a finite loss, and the trained model saves and loads through the Auto class."""
    from transformers import Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(exported)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (6, 10))
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(model(ids, labels=ids).loss, list(params.values()), allow_unused=True)
    learning = {name for name, g in zip(params, grads) if g is not None and g.any()}
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids]).train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed == learning  # every weight with a gradient moved (some, like an unread norm, have none)
    model.save_pretrained(tmp_path / "trained")
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "trained"), model.eval(), ids[:2])


# --- python -m newllm.export ---------------------------------------------------------------------


@pytest.fixture
def experiment(tmp_path, checkpoint) -> Path:
    """A hand-written experiment: a (passed, best), b (gate_failed), c (passed, checkpoint gone);
    checkpoint paths relative to it, as the search stores them."""
    d = tmp_path / "exp"
    shutil.copytree(checkpoint, d / "trial_a" / "checkpoint_000001")
    pd.DataFrame({
        "trial_id": ["a", "b", "c"], "status": ["passed", "gate_failed", "passed"],
        "objective": [10.0, 1.5e6, 20.0], "val_ppl": [10.0, None, 20.0],
        "checkpoint_path": ["trial_a/checkpoint_000001", "trial_a/checkpoint_000001", "trial_c/checkpoint_000001"],
    }).pipe(write_table, d / "trials.parquet")
    return d


def test_export_best_trial(tmp_path, experiment, capsys):
    assert export.main([str(experiment), "--best", "--out", str(tmp_path / "best")]) == 0
    assert "Exported trial a (val_ppl 10.00)" in capsys.readouterr().out
    ids = torch.randint(0, VOCAB, (1, 5))
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "best"),
                      NewLLMForCausalLM.from_newllm(tiny_core()), ids)


@pytest.mark.parametrize("where, args, message", [
    ("missing", ["--best"], "does not exist"),
    ("tmp", ["--best"], "no trials.parquet"),
    ("exp", ["--trial", "zzz"], "unknown trial id 'zzz'; the experiment's trials are: a (passed), b (gate_failed), c"),
    ("gate_only", ["--best"], "no New-LLM trial passed (1 gate_failed)"),
    ("exp", ["--trial", "c"], "the checkpoint of trial c"),
])
def test_export_errors_exit_2(tmp_path, experiment, capsys, where, args, message):
    if where == "gate_only":
        trials = pd.read_parquet(experiment / "trials.parquet")
        write_table(trials[trials.status == "gate_failed"], tmp_path / "gate_only" / "trials.parquet")
    path = {"missing": tmp_path / "missing", "tmp": tmp_path, "exp": experiment}.get(where, tmp_path / where)
    assert export.main([str(path), *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--best", "--trial", "a"], "not allowed with"),
    ([], "one of the arguments --trial --best is required"),
])
def test_export_needs_exactly_one_of_trial_and_best(tmp_path, experiment, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(experiment), *args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_export_of_a_tiny_search_loads_and_generates(tmp_path, tiny_search):
    trials, _ = exp.load(tiny_search.directory)
    best = trials[trials.status == "passed"].sort_values("objective").iloc[0]
    # a moved and renamed experiment: its checkpoint paths are relative to it
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(tiny_search.directory, moved)

    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "newllm.export", str(moved), "--best", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Exported trial {best.trial_id}" in r.stdout and "AutoModelForCausalLM.from_pretrained" in r.stdout

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (model.config.context_dim, model.config.num_layers) == (best.context_dim, best.num_layers)
    checkpoint = moved / best.checkpoint_path
    core, _ = load_model(checkpoint)
    prompt = tokenizer("The for statement", return_tensors="pt")
    torch.testing.assert_close(model(**prompt).logits, core(prompt["input_ids"])[0], rtol=1e-5, atol=1e-6)
    generated = model.generate(**prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 20
    text = tokenizer.decode(generated[0])
    assert text.startswith("The for statement") and len(text) > len("The for statement")
