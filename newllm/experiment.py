"""The experiment directory, ``<storage>/<name>/``: every file a search keeps there, and
reading and writing them.

    trials.parquet/       one row per finished trial (``load``)
    iterations.parquet/   every reported row: Phase 1 passes, analysis, Phase 2 epochs
    space.yaml            the search space as the search loaded it (``--resume`` continues with it)
    distributions.json    the searched Optuna distributions, for the report
    floors.json           the data's unigram and bigram perplexity floors
    optuna.journal        the Optuna studies (unless ``--optuna-storage`` puts them elsewhere)
    driver.lock           the running driver's claim (``driver.lease`` on s3:// or gs://)
    report.html           the report (``python -m newllm.analyze``)
    <trial dirs>/checkpoint_*/   Tune's trial directories and checkpoints

Parquet layout. Each table is a directory of part files, ``part-000001.parquet``,
``part-000002.parquet``, ... numbered in write order. A writer appends one new part holding only
the rows since its last write, so a write costs O(new rows) however long the search has run. A
merged file ``part-<first>-<last>.parquet`` holds the rows of parts first..last, which are then
deleted: the writer merges every ``merge_every`` parts it wrote from the rows it still holds (no
reading back), and when the search ends it compacts each directory into one file, after which
``pd.read_parquet`` of the directory reads that one file.

Atomicity. A file is written under a temporary name starting with "." (which Parquet dataset
readers skip) and renamed into place, or on ``s3://`` / ``gs://`` storage put as one object. A
reader skips every part that a merged file covers, so one that lists a directory in the middle
of a merge, with the merged file and its parts both present, still reads each row once. Files
and directories get the mode the umask allows, so colleagues can read an experiment on shared
storage.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable
from typing import NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

TRIALS_FILE = "trials.parquet"
ITERATIONS_FILE = "iterations.parquet"
SPACE_FILE = "space.yaml"
DISTRIBUTIONS_FILE = "distributions.json"
FLOORS_FILE = "floors.json"
OPTUNA_JOURNAL = "optuna.journal"
LOCK_FILE = "driver.lock"
LEASE_FILE = "driver.lease"
REPORT_FILE = "report.html"
# an iteration row is unique by these: a trial's attempt (run), replicate, phase and step
ITERATION_KEY = ["trial_id", "attempt", "replicate", "phase", "step"]
PART_NAME = re.compile(r"part-(\d+)(?:-(\d+))?\.parquet")
MERGE_EVERY = 100  # parts a writer merges into one file as it goes
READ_TRIES = 5


def filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The file system holding ``path`` (local, ``s3://``, ``gs://``) and the path on it."""
    if "://" not in path:
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    return pyarrow.fs.FileSystem.from_uri(path)


def write_file(path: str, data: bytes) -> None:
    """Put ``data`` at ``path`` atomically, with the mode the umask allows: a new dot-file
    renamed into place, or one object put on object storage."""
    fs, target = filesystem(path)
    if "://" in path:
        with fs.open_output_stream(target) as f:
            f.write(data)
        return
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_file(path: str) -> bytes | None:
    """The bytes at ``path``, None if there is no such file."""
    fs, target = filesystem(path)
    if fs.get_file_info(target).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(target) as f:
        return f.read()


class Part(NamedTuple):
    """A part file: its name and the sequence numbers first..last of the parts it holds."""

    name: str
    first: int
    last: int


def live_parts(parts: list[Part]) -> list[Part]:
    """The parts no other part covers, in write order: a merged file hides the parts it was made
    of (a merge covers consecutive live parts, so two files are either nested or disjoint)."""
    live, covered = [], 0
    for part in sorted(parts, key=lambda p: (p.first, -p.last)):
        if part.last > covered:
            live.append(part)
            covered = part.last
    return live


def concat(tables: list[pa.Table]) -> pa.Table | None:
    """One table of ``tables`` in order, columns by first appearance; a column that a table lacks
    or holds only nulls in takes its type from the others (None if there are no tables)."""
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


class PartsTable:
    """One table: a directory of part files at a local path or an ``s3://`` / ``gs://`` URI.

    A writer appends parts numbered from ``next_seq``; every ``merge_every`` parts it merges
    those into one file from the tables it still holds, so the directory stays small for
    readers without reading anything back.
    """

    def __init__(self, path: str, merge_every: int = MERGE_EVERY):
        self.path = path.rstrip("/")
        self.fs, self.root = filesystem(self.path)
        self.merge_every = merge_every
        self.next_seq = 1  # a writer sets it from the parts on disk (ParquetResults.setup)
        self._unmerged: list[tuple[Part, pa.Table]] = []  # parts this writer wrote since its last merge

    def parts(self) -> list[Part]:
        """Every part file in the directory, covered or not (none if there is no directory)."""
        if self.fs.get_file_info(self.root).type != pyarrow.fs.FileType.Directory:
            return []
        parts = []
        for info in self.fs.get_file_info(pyarrow.fs.FileSelector(self.root)):
            match = PART_NAME.fullmatch(info.base_name)
            if match and info.type == pyarrow.fs.FileType.File:
                parts.append(Part(info.base_name, int(match[1]), int(match[2] or match[1])))
        return parts

    def read_file(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """The file at ``path``; of ``columns``, those it has. ValueError naming a damaged file."""
        with self.fs.open_input_file(path) as f:
            try:
                parquet = pq.ParquetFile(f)
                names = parquet.schema_arrow.names
                return parquet.read(columns=None if columns is None else [c for c in columns if c in names],
                                    use_threads=False)  # threads only slow down small files
            except pa.ArrowInvalid as e:
                raise ValueError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())[:120]}): "
                                 f"restore it, or move it out of {self.root} to go on without its rows") from None

    def read(self, columns: list[str] | None = None) -> pa.Table | None:
        """The rows of every live part in write order (None if there is none). A part deleted
        between listing and reading was merged, the merged file already in place: list again."""
        for attempt in range(READ_TRIES):
            try:
                return concat([self.read_file(f"{self.root}/{p.name}", columns) for p in live_parts(self.parts())])
            except FileNotFoundError:
                if attempt == READ_TRIES - 1:
                    raise

    def write(self, name: str, table: pa.Table) -> None:
        """Put ``table`` at ``name`` in the directory atomically (``write_file``)."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_file(f"{self.path}/{name}", sink.getvalue().to_pybytes())

    def append(self, table: pa.Table) -> None:
        """Write ``table`` as the next part; merge the parts since the last merge when they are
        ``merge_every``."""
        part = Part(f"part-{self.next_seq:06d}.parquet", self.next_seq, self.next_seq)
        self.write(part.name, table)
        self.next_seq += 1
        self._unmerged.append((part, table))
        if len(self._unmerged) == self.merge_every:
            parts, tables = zip(*self._unmerged)
            self.merge(list(parts), concat(list(tables)))
            self._unmerged = []

    def merge(self, parts: list[Part], table: pa.Table) -> None:
        """Write ``table``, the rows of the consecutive live ``parts``, as the one file
        ``part-<first>-<last>.parquet`` covering them, then delete them."""
        self.write(f"part-{parts[0].first:06d}-{parts[-1].last:06d}.parquet", table)
        for part in parts:
            self.fs.delete_file(f"{self.root}/{part.name}")

    def compact(self, keep: Callable[[pa.Table], pa.Table] | None = None) -> int:
        """Merge every live part into one file, after deleting the parts a merged file already
        covers (left by a driver that died while merging). ``keep`` filters the rows: those it
        drops are deleted. Returns how many it dropped."""
        parts = self.parts()
        live = live_parts(parts)
        for part in parts:
            if part not in live:
                self.fs.delete_file(f"{self.root}/{part.name}")
        if not live or (len(live) == 1 and keep is None):
            return 0
        table = concat([self.read_file(f"{self.root}/{p.name}") for p in live])
        kept = table if keep is None else keep(table)
        if kept.num_rows == table.num_rows:
            if len(live) > 1:
                self.merge(live, table)
            return 0
        # rows dropped: under a sequence number no part has, so that the file written is never
        # one of those deleted
        self.next_seq = max(self.next_seq, max(p.last for p in parts) + 1)
        self.write(f"part-{live[0].first:06d}-{self.next_seq:06d}.parquet", kept)
        self.next_seq += 1
        for part in live:
            self.fs.delete_file(f"{self.root}/{part.name}")
        return table.num_rows - kept.num_rows


def compact(path: str | os.PathLike) -> None:
    """Compact both tables of the experiment directory ``path`` into one file each. A search does
    it when it ends; do it by hand only to an experiment whose driver is not running."""
    d = str(path).rstrip("/")
    for name in (TRIALS_FILE, ITERATIONS_FILE):
        PartsTable(f"{d}/{name}").compact()


def load(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, iterations) of the experiment directory ``path``: every row as written, in write
    order. Trials are read first: every trial read has its iteration rows. Until a trial has
    finished, trials is empty."""
    d = str(path).rstrip("/")
    trials = PartsTable(f"{d}/{TRIALS_FILE}").read()
    iterations = PartsTable(f"{d}/{ITERATIONS_FILE}").read()
    if trials is None and iterations is None:
        raise FileNotFoundError(f"no {TRIALS_FILE} or {ITERATIONS_FILE} in {d!r}: not a newllm experiment "
                                f"directory, or its search has not reported anything yet")
    return tuple(pd.DataFrame() if t is None else t.to_pandas() for t in (trials, iterations))


def checkpoint_dir(experiment: str | os.PathLike, checkpoint_path: str) -> str:
    """Where a trials row's ``checkpoint_path``, stored relative to the experiment directory so
    that a moved or copied experiment keeps working, is now."""
    return f"{str(experiment).rstrip('/')}/{checkpoint_path}"


def experiment_dir(storage_root: str, name: str) -> str:
    """The directory of experiment ``name`` under ``storage_root`` (``search.storage.storage_root``)."""
    return f"{storage_root.rstrip('/')}/{name}"


def trials_table(experiment: str) -> PartsTable:
    """The experiment's trials table, to read only the columns a question needs."""
    return PartsTable(f"{experiment.rstrip('/')}/{TRIALS_FILE}")


# --- the small files an experiment keeps ------------------------------------------------


def damaged(path: str, problem: str, without: str) -> str:
    """The message for a file an experiment keeps that is damaged, cut off or edited by hand."""
    return f"{path} is {problem}: restore it from a copy, or delete it ({without})"


def recorded_text(path: str, without: str) -> str | None:
    """The text of a file an experiment directory keeps (``space.yaml``, ``distributions.json``,
    ``floors.json``), None if there is none; ValueError naming it if it cannot be read.
    ``without`` says what happens if it is deleted, for the message."""
    try:
        data = read_file(path)
        return None if data is None else data.decode("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(damaged(path, f"not UTF-8 text ({e.reason} at byte {e.start})", without)) from e


def recorded_json(path: str, without: str):
    """The JSON value of a file an experiment directory keeps (``recorded_text``), None if there
    is none; ValueError naming it if it is not valid JSON."""
    text = recorded_text(path, without)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(damaged(path, f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})", without)) from e
