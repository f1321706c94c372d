"""Corpus -> documents -> byte-level BPE tokenizer -> train/val token streams.

Sources (``DataConfig.source``):

- ``builtin`` (default): the Python language reference topics that ship inside every
  Python installation (``pydoc_data.topics``, 79 documents, ~465k characters): offline.
- a directory: one document per ``*.txt`` file (recursive, sorted by path);
- a ``.txt`` file: one document per paragraph (blocks separated by blank lines);
- a ``.parquet``, ``.jsonl`` or ``.json`` file with a text column, read by ``datasets``;
- ``hf:NAME`` (e.g. ``hf:HuggingFaceH4/ultrachat_200k`` with ``hf_split="train_sft"``): a
  Hugging Face hub data set, for machines that reach the hub.

A row whose text column is missing but which has the chat ``messages`` column of ultrachat
becomes the messages' contents joined by newlines. Documents are deduplicated, the first
``num_samples`` kept and split by document (train first), so validation text never appears
in training. The tokenizer is trained on the training documents and cached by corpus
fingerprint and vocab size; documents are joined with an end-of-text token.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

END_OF_TEXT = "<|endoftext|>"
TABLE_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


@dataclass(frozen=True)
class DataConfig:
    source: str = "builtin"
    num_samples: int = 10          # documents used, train + val; 0 = all
    train_val_split: float = 0.8
    vocab_size: int = 1000
    text_column: str = "text"
    hf_split: str = "train"
    hf_config: str | None = None
    tokenizer: str | None = None   # an existing tokenizer.json instead of training one
    cache_dir: str | None = None   # default: $NEWLLM_CACHE or ~/.cache/newllm

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0 (0 = all documents), got {self.num_samples}")
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"train_val_split must be strictly between 0 and 1, got {self.train_val_split}")
        if self.tokenizer is None and self.vocab_size < 260:
            raise ValueError(f"vocab_size must be >= 260 (256 bytes + merges), got {self.vocab_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenData:
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    vocab_size: int
    tokenizer_json: str
    fingerprint: str
    num_train_docs: int
    num_val_docs: int

    def summary(self) -> dict:
        return {"train_tokens": len(self.train_ids), "val_tokens": len(self.val_ids),
                "train_docs": self.num_train_docs, "val_docs": self.num_val_docs,
                "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}


# --- documents ---------------------------------------------------------------------------


def builtin_documents() -> list[str]:
    import pydoc_data.topics

    return [text.strip() for text in pydoc_data.topics.topics.values()]


def _row_text(row: dict, column: str) -> str:
    if column in row:
        return str(row[column] or "")
    return "\n".join(str(m.get("content", "")) for m in row["messages"])


def table_documents(dataset, column: str, limit: int) -> list[str]:
    """Texts of a ``datasets.Dataset``: ``column``, or joined chat ``messages`` (ultrachat)."""
    names = dataset.column_names
    if column not in names and "messages" not in names:
        raise ValueError(f"text column {column!r} not found; the data has columns {names}: pass --text-column")
    docs: list[str] = []
    seen: set[str] = set()
    for row in dataset:
        text = _row_text(row, column).strip()
        if text and text not in seen:
            seen.add(text)
            docs.append(text)
            if limit and len(docs) >= limit:
                break
    return docs


def load_documents(cfg: DataConfig) -> list[str]:
    """Unique non-empty documents of the source, in source order, at most ``num_samples``."""
    src = cfg.source
    if src == "builtin":
        docs = builtin_documents()
    elif src.startswith("hf:"):
        import datasets

        return table_documents(datasets.load_dataset(src[3:], cfg.hf_config, split=cfg.hf_split),
                               cfg.text_column, cfg.num_samples)
    else:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(
                f"data source {src!r} does not exist: give 'builtin', a directory of .txt files, "
                f"a .txt/.parquet/.jsonl file, or hf:NAME"
            )
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise ValueError(f"directory {src!r} holds no .txt files")
            docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        elif path.suffix in TABLE_SUFFIXES:
            import datasets

            table = datasets.load_dataset(TABLE_SUFFIXES[path.suffix], data_files=str(path), split="train")
            return table_documents(table, cfg.text_column, cfg.num_samples)
        else:
            docs = re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))
    unique = list(dict.fromkeys(d.strip() for d in docs if d.strip()))
    return unique[: cfg.num_samples] if cfg.num_samples else unique


def split_documents(docs: list[str], train_val_split: float) -> tuple[list[str], list[str]]:
    """Train first, validation after, by whole document; both must be non-empty."""
    n_train = int(len(docs) * train_val_split)
    if n_train < 1 or n_train >= len(docs):
        raise ValueError(
            f"{len(docs)} documents with train_val_split={train_val_split} leave "
            f"{n_train} for training and {len(docs) - n_train} for validation; both need >= 1: "
            f"raise --num-samples or change --train-val-split"
        )
    return docs[:n_train], docs[n_train:]


# --- tokenizer ---------------------------------------------------------------------------


def fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens trained on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    if tok.get_vocab_size() < vocab_size:
        raise ValueError(
            f"the training documents are too small for vocab_size={vocab_size}: BPE found only "
            f"{tok.get_vocab_size()} tokens; lower --vocab-size or raise --num-samples"
        )
    return tok


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("NEWLLM_CACHE") or Path.home() / ".cache" / "newllm")


def load_or_train_tokenizer(cfg: DataConfig, train_docs: list[str]):
    from tokenizers import Tokenizer

    if cfg.tokenizer is not None:
        if not Path(cfg.tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer file {cfg.tokenizer!r} does not exist")
        return Tokenizer.from_file(cfg.tokenizer)
    path = cache_dir(cfg) / "tokenizers" / f"{fingerprint(train_docs)}-{cfg.vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(tok.to_str())
    os.replace(f.name, path)
    return tok


def encode_documents(tok, docs: list[str]) -> torch.Tensor:
    """One token stream: each document followed by the end-of-text token."""
    eot = tok.token_to_id(END_OF_TEXT)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        if eot is not None:
            ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def prepare_data(cfg: DataConfig) -> TokenData:
    """Read, split, tokenize: what every run and every search trial trains on."""
    docs = load_documents(cfg)
    if not docs:
        raise ValueError(f"data source {cfg.source!r} holds no non-empty documents")
    train_docs, val_docs = split_documents(docs, cfg.train_val_split)
    tok = load_or_train_tokenizer(cfg, train_docs)
    return TokenData(
        train_ids=encode_documents(tok, train_docs),
        val_ids=encode_documents(tok, val_docs),
        vocab_size=tok.get_vocab_size(),
        tokenizer_json=tok.to_str(),
        fingerprint=fingerprint(train_docs),
        num_train_docs=len(train_docs),
        num_val_docs=len(val_docs),
    )
