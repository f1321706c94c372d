"""``hf:`` sources are streamed: rows are read only until ``num_samples`` documents are found and
nothing is downloaded or cached whole. The hub cannot be reached here, so the tests give ``hf:`` a
local data set folder, which goes through the very ``datasets.load_dataset`` call a hub id does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import newllm.data as data
from newllm.data import DataConfig, builtin_documents, load_documents, prepare_data

datasets = pytest.importorskip("datasets")


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    """Offline ``datasets`` whose cache is an empty folder under ``tmp_path`` (returned). The
    variables are read when ``datasets`` and ``huggingface_hub`` are imported, so the values they
    took then are patched too."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    for var, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
                       "HF_DATASETS_CACHE": str(cache)}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def data_set(folder: Path, rows: list[dict]) -> Path:
    """A local data set folder holding ``rows`` as its ``train`` split (``train.jsonl``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def arrow_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.arrow"))


def test_hf_source_streams_only_the_rows_it_needs(tmp_path, hf_cache, monkeypatch):
    # 21,000 rows: each document, then a duplicate of it, then a blank text
    rows = [{"text": t} for i in range(7000) for t in (f"document {i}", f"document {i}", "  ")]
    folder = data_set(tmp_path / "corpus", rows)
    assert isinstance(data.hf_dataset(str(folder), None, "train"), datasets.IterableDataset)

    opened, pulled = [], []
    real = data.hf_dataset

    def counting(*args):
        dataset = real(*args)
        opened.append(dataset)
        return (pulled.append(row) or row for row in dataset)

    monkeypatch.setattr(data, "hf_dataset", counting)
    docs = load_documents(DataConfig(source=f"hf:{folder}", num_samples=50))
    assert docs == [f"document {i}" for i in range(50)]
    assert len(opened) == 1 and isinstance(opened[0], datasets.IterableDataset)
    assert len(pulled) == 3 * 49 + 1  # up to the first row of document 49, not one row more
    assert arrow_files(hf_cache) == []

    # control: a load that is not streamed writes Arrow files to this cache, so the check above sees it
    datasets.load_dataset(str(folder), split="train")
    assert arrow_files(hf_cache)


def test_hf_source_with_num_samples_0_streams_every_row(tmp_path, hf_cache):
    rows = [{"text": t} for t in ("b", "a", "b", "", "c", "a")]
    folder = data_set(tmp_path / "corpus", rows)
    assert load_documents(DataConfig(source=f"hf:{folder}", num_samples=0)) == ["b", "a", "c"]
    assert arrow_files(hf_cache) == []


def test_prepare_data_from_hf_matches_the_same_rows_read_as_a_local_table(tmp_path, hf_cache):
    docs = builtin_documents()[:30]
    folder = data_set(tmp_path / "corpus", [{"text": d, "id": i} for i, d in enumerate(docs + docs)])
    common = {"num_samples": 20, "vocab_size": 300, "cache_dir": str(tmp_path / "newllm-cache")}
    from_hf = prepare_data(DataConfig(source=f"hf:{folder}", **common))
    from_file = prepare_data(DataConfig(source=str(folder / "train.jsonl"), **common))
    assert (from_hf.num_train_docs, from_hf.num_val_docs) == (16, 4)
    assert from_hf.summary() == from_file.summary()
    assert torch.equal(from_hf.train_ids, from_file.train_ids) and torch.equal(from_hf.val_ids, from_file.val_ids)
    assert arrow_files(hf_cache) == []


def test_hf_source_reads_chat_messages_and_another_text_column(tmp_path, hf_cache):
    chat = data_set(tmp_path / "chat", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]}])
    assert load_documents(DataConfig(source=f"hf:{chat}")) == ["hi\nhello"]
    body = data_set(tmp_path / "body", [{"body": "one"}, {"body": "two"}])
    assert load_documents(DataConfig(source=f"hf:{body}", text_column="body")) == ["one", "two"]


def test_hf_source_errors_say_what_is_wrong_and_how_to_fix_it(tmp_path, hf_cache):
    folder = data_set(tmp_path / "corpus", [{"body": "one"}])
    name = re.escape(repr(str(folder)))
    with pytest.raises(ValueError, match=rf"^hf data set {name}: text column 'text' not found; the data has "
                                         rf"columns \['body'\]: pass --text-column$"):
        load_documents(DataConfig(source=f"hf:{folder}"))
    with pytest.raises(ValueError, match=rf"^cannot load hf data set {name}: Bad split: test\. Available splits: "
                                         rf"\['train'\]; check the name .*--hf-split \('test'\)"):
        load_documents(DataConfig(source=f"hf:{folder}", hf_split="test"))
    with pytest.raises(ValueError, match=r"^cannot load hf data set '[^']*missing': Couldn't find any data file"):
        load_documents(DataConfig(source=f"hf:{tmp_path / 'missing'}"))

    (folder / "train.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"^cannot read hf data set {name}: JSON parse error"):
        load_documents(DataConfig(source=f"hf:{folder}"))
