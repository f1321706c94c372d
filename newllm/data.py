"""Corpus -> documents -> byte-level BPE tokenizer -> train/val token streams.

Sources (``DataConfig.source``):

- ``builtin`` (default): the Python language reference topics that ship inside every
  Python installation (``pydoc_data.topics``, 79 documents, ~465k characters): offline.
- a directory: one document per ``*.txt`` file (recursive, sorted by path);
- a ``.txt`` file: one document per paragraph (blocks separated by blank lines);
- a table file with a text column, one row per document: ``.parquet`` (read a batch at a
  time with pyarrow), ``.jsonl`` (one JSON object a line) or ``.json`` (an array of objects,
  or JSON Lines);
- ``hf:NAME`` (e.g. ``hf:HuggingFaceH4/ultrachat_200k`` with ``hf_split="train_sft"``): a
  Hugging Face hub data set (on machines that reach the hub), or a local data set folder that
  ``datasets`` can load (e.g. ``hf:/data/corpus`` holding ``train.jsonl``), streamed: rows are
  read only until ``num_samples`` documents are found, nothing is downloaded or cached whole.

A row whose text column is missing but which has the chat ``messages`` column of ultrachat
becomes the messages' contents joined by newlines; the first row's columns are the ones
checked. Documents are deduplicated, the first ``num_samples`` kept and split by document
(train first), so validation text never appears in training. The tokenizer is trained on the
training documents and cached by corpus fingerprint and vocab size; documents are joined with
an end-of-text token. An input that cannot be read as what it claims to be raises ValueError
naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from newllm.checks import number_problem

END_OF_TEXT = "<|endoftext|>"
MAX_VOCAB_SIZE = 2**24  # far above any real vocabulary; the tokenizers library aborts the process on huge ones
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")
JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _f(default, help: str, flag: str | None = ""):
    """A DataConfig field; ``flag`` is its command-line flag ("" = from the name, None = none)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is split and tokenised; validated when made."""
    source: str = _f("builtin", "builtin (offline default), a directory of .txt, a .txt/.parquet/.jsonl/.json "
                                "file, or hf:NAME (a hub or local data set, streamed)", flag="--data")
    num_samples: int = _f(10, "documents used, train + val; 0 = all")
    train_val_split: float = _f(0.8, "train fraction of the documents")
    vocab_size: int = _f(1000, "BPE vocabulary size")
    text_column: str = _f("text", "text column of table data")
    hf_split: str = _f("train", "split of an hf: data set")
    hf_config: str | None = _f(None, "configuration name of an hf: data set")
    tokenizer: str | None = _f(None, "an existing tokenizer.json instead of training one")
    cache_dir: str | None = _f(None, "tokenizer cache (default: $NEWLLM_CACHE or ~/.cache/newllm)", flag=None)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            problem = number_problem(value)
            if problem:
                raise ValueError(f"{f.name} {problem}")
            if isinstance(value, str) and not value.strip() and f.name != "source":
                raise ValueError(f"{f.name} must not be empty" + ("" if f.default is None else
                                                                  f" (default: {f.default!r})"))
        if not self.source.strip():
            raise ValueError("the data source must not be empty: give builtin, a directory, a .txt/.parquet/"
                             ".jsonl/.json file or hf:NAME")
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0 (0 = all documents), got {self.num_samples}")
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"train_val_split must be strictly between 0 and 1, got {self.train_val_split}")
        if self.tokenizer is None and not 260 <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be in [260, {MAX_VOCAB_SIZE}] (256 bytes + merges, at most 2**24), "
                             f"got {self.vocab_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenData:
    """A corpus tokenised once: train and val token ids, and the tokenizer that made them."""
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


def read_text(path: Path, what: str, errors: str = "strict") -> str:
    """The UTF-8 text of ``path`` (a BOM dropped); ValueError naming ``what`` and the file if it
    cannot be read or, with ``errors="strict"``, decoded."""
    try:
        return path.read_text(encoding="utf-8-sig", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({e.reason})") from e
    except OSError as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e.strerror}") from e


# --- documents ---------------------------------------------------------------------------


def builtin_documents() -> list[str]:
    """The offline default corpus: the topics of the Python language reference (``pydoc_data``)."""
    import pydoc_data.topics

    return [text.strip() for text in pydoc_data.topics.topics.values()]


def _row_text(row: dict, column: str) -> str:
    """The row's ``column``, else its chat ``messages``' contents joined by newlines; "" if neither."""
    if row.get(column) is not None:
        return str(row[column])
    messages = row.get("messages")
    if not isinstance(messages, list):
        return ""
    return "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))


def table_documents(rows: Iterable[dict], column: str, limit: int, where: str) -> list[str]:
    """Unique non-empty texts of ``rows`` (``column``, or joined chat ``messages``: ultrachat),
    at most ``limit`` (0 = all); the first row must have one of the two columns."""
    docs: list[str] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if i == 0 and column not in row and "messages" not in row:
            raise ValueError(f"{where}: text column {column!r} not found; the data has columns {list(row)}: "
                             f"pass --text-column")
        text = _row_text(row, column).strip()
        if text and text not in seen:
            seen.add(text)
            docs.append(text)
            if limit and len(docs) >= limit:
                break
    return docs


def _record(value, where: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {what} is a JSON {JSON_TYPES.get(type(value), 'number')}, "
                         f"not a record (an object with a text column)")
    return value


def json_lines(lines: Iterable[str], where: str) -> Iterator[dict]:
    """The records of JSON Lines text, one object a line (blank lines skipped), checked as read."""
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: line {n} is not valid JSON: {e.msg} (column {e.colno})") from e
            yield _record(value, where, f"line {n}")


def json_records(path: Path) -> Iterator[dict]:
    """The records of a ``.jsonl`` file (streamed), or of a ``.json`` file holding an array of
    objects or, as ``datasets`` reads such files too, JSON Lines."""
    where = f"data file {str(path)!r}"
    if path.suffix == ".jsonl":
        try:
            with path.open(encoding="utf-8-sig") as f:
                yield from json_lines(f, where)
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not UTF-8 text ({e.reason})") from e
        except OSError as e:
            raise ValueError(f"cannot read {where}: {e.strerror}") from e
        return
    text = read_text(path, "data file")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise ValueError(f"{where} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from e
        yield from json_lines(text.splitlines(), where)  # more than one JSON value: JSON Lines
        return
    if not isinstance(value, list):
        raise ValueError(f"{where} holds a JSON {JSON_TYPES.get(type(value), 'number')}, not an array of records "
                         f"(or JSON Lines)")
    for i, item in enumerate(value):
        yield _record(item, where, f"item {i} of the array")


def parquet_records(path: Path) -> Iterator[dict]:
    """The rows of a Parquet file, read a batch at a time."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"data file {str(path)!r} is not a readable Parquet file: {e}") from e


def hf_dataset(name: str, config: str | None, split: str):
    """A Hugging Face data set (a hub id or a local data set folder) opened for streaming: an
    ``IterableDataset`` whose rows are read as it is iterated; ValueError naming it if it cannot
    be opened."""
    if not name:
        raise ValueError("hf: needs a data set name, e.g. hf:HuggingFaceH4/ultrachat_200k")
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:  # unknown, unreachable, bad split
        raise ValueError(f"cannot load hf data set {name!r}: {' '.join(str(e).split())}; check the name "
                         f"(a hub id or a local data set folder), --hf-split ({split!r}) and "
                         f"--hf-config ({config!r})") from e


def hf_records(name: str, config: str | None, split: str) -> Iterator[dict]:
    """The rows of a streamed hf data set, read only as far as they are iterated; ValueError
    naming it if one cannot be read (a malformed file, a dropped connection)."""
    import datasets

    dataset = hf_dataset(name, config, split)
    try:
        yield from dataset
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise ValueError(f"cannot read hf data set {name!r}: {' '.join(str(e).split())}") from e


def load_documents(cfg: DataConfig) -> list[str]:
    """Unique non-empty documents of the source, in source order, at most ``num_samples``."""
    src = cfg.source
    if src == "builtin":
        docs = builtin_documents()
    elif src.startswith("hf:"):
        return table_documents(hf_records(src[3:], cfg.hf_config, cfg.hf_split), cfg.text_column,
                               cfg.num_samples, f"hf data set {src[3:]!r}")
    else:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(
                f"data source {src!r} does not exist: give 'builtin', a directory of .txt files, "
                f"a .txt/.parquet/.jsonl/.json file, or hf:NAME"
            )
        if path.is_dir():
            files = sorted(f for f in path.rglob("*.txt") if f.is_file())
            if not files:
                raise ValueError(f"directory {src!r} holds no .txt files")
            docs = [read_text(f, "data file", errors="replace") for f in files]
        elif path.suffix in TABLE_SUFFIXES:
            rows = parquet_records(path) if path.suffix == ".parquet" else json_records(path)
            return table_documents(rows, cfg.text_column, cfg.num_samples, f"data file {src!r}")
        else:
            docs = re.split(r"\n\s*\n", read_text(path, "data file", errors="replace"))
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
    """A hash of the documents, naming the tokenizer cached for them."""
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


def read_tokenizer(path: Path, what: str = "tokenizer file"):
    """The tokenizer saved at ``path`` (a ``tokenizer.json`` of the tokenizers library);
    ValueError naming ``what`` and the file if it is not one."""
    from tokenizers import Tokenizer

    where = f"{what} {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} {'is a directory' if path.is_dir() else 'does not exist'}")
    text = read_text(path, what)
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from e
    if not isinstance(spec, dict) or "model" not in spec:
        raise ValueError(f"{where} is not a tokenizer.json of the tokenizers library (no 'model' in it)")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a plain Exception on a spec it cannot build
        raise ValueError(f"{where} is not a valid tokenizer.json: {e}") from e
    if tok.get_vocab_size() < 1:
        raise ValueError(f"{where} has an empty vocabulary")
    return tok


def cache_dir(cfg: DataConfig) -> Path:
    """Where tokenizers are cached: ``cache_dir``, else $NEWLLM_CACHE, else ~/.cache/newllm."""
    return Path(cfg.cache_dir or os.environ.get("NEWLLM_CACHE") or Path.home() / ".cache" / "newllm")


def load_or_train_tokenizer(cfg: DataConfig, train_docs: list[str]):
    """The tokenizer cached for these documents and vocab size, or a newly trained (and cached) one."""
    path = cache_dir(cfg) / "tokenizers" / f"{fingerprint(train_docs)}-{cfg.vocab_size}.json"
    if path.is_file():
        return read_tokenizer(path, "cached tokenizer")
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(tok.to_str())
        os.replace(f.name, path)
    except OSError as e:
        raise ValueError(f"cannot write the tokenizer cache {str(path.parent)!r}: {e.strerror}; "
                         f"set NEWLLM_CACHE to a writable directory") from e
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
    """Read, split, tokenize: what every run and every search trial trains on. A given
    tokenizer is read first, so a bad one fails before the corpus is read."""
    given = None if cfg.tokenizer is None else read_tokenizer(Path(cfg.tokenizer))
    docs = load_documents(cfg)
    if not docs:
        raise ValueError(f"data source {cfg.source!r} holds no non-empty documents")
    train_docs, val_docs = split_documents(docs, cfg.train_val_split)
    tok = load_or_train_tokenizer(cfg, train_docs) if given is None else given
    return TokenData(
        train_ids=encode_documents(tok, train_docs),
        val_ids=encode_documents(tok, val_docs),
        vocab_size=tok.get_vocab_size(),
        tokenizer_json=tok.to_str(),
        fingerprint=fingerprint(train_docs),
        num_train_docs=len(train_docs),
        num_val_docs=len(val_docs),
    )
