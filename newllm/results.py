"""Search results in Parquet, under ``<storage>/<experiment>/``: ``trials.parquet`` (one row per
finished trial) and ``iterations.parquet`` (every reported row).

Layout. Each table is a directory of Parquet part files, ``part-000001.parquet``,
``part-000002.parquet``, ... numbered in write order. ``ParquetResults``, a Tune callback in the
driver, appends by writing one new part holding only the rows since its last write, so a write
costs O(new rows) however long the search has run. A merged file ``part-<first>-<last>.parquet``
holds the rows of parts first..last, which are then deleted: the writer merges every
``merge_every`` parts it wrote from the rows it still holds (no reading back; it keeps a long
search's directory small for readers), and when the search ends it compacts each directory into
one file, after which ``pd.read_parquet`` of the directory reads that one file.

Atomicity. A file is written under a temporary name starting with "." (which Parquet dataset
readers skip) and renamed into place, or on ``s3://`` / ``gs://`` storage put as one object. A
reader skips every part that a merged file covers, so one that lists a directory in the middle
of a merge, with the merged file and its parts both present, still reads each row once.

When rows land. A finished (or errored) trial's row lands at once, after the iteration rows
pending for all trials, so a reader that reads the trials first has their rows. Iteration rows
land at least every ``flush_seconds``, at every finish, at the end, and at once with a result
that carries a checkpoint: a driver killed after Tune recorded the checkpoint loses no row that
the checkpoint's trial would not report again.

Attempts. Each run of a trial's function is an attempt: its first run, a retry after a lost node
(from its latest checkpoint), or a restart after the driver was killed and the search resumed.
Tune counts ``iterations_since_restore`` from 1 in each, and each iteration row carries its
``attempt`` (1, 2, ...) and, as the trainable reports it, its ``node_id``; a row is unique by
``ITERATION_KEY``. A resumed search reads the attempts on disk and continues their numbering. It
never writes a trial's row twice: it drops the reports of a trial whose row has landed (a resumed
Tune may run a finished trial again when its saved state missed the finish).

Permissions. Files and directories get the mode the umask allows (0644 / 0755 under umask 022),
so colleagues can read an experiment on shared storage.

``load(path)`` gives the two tables back as pandas DataFrames, raw rows in write order, from any
of these layouts, during a search or after it, and from the single files of earlier versions.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq
from ray.tune import Callback

TRIALS_FILE = "trials.parquet"
ITERATIONS_FILE = "iterations.parquet"
ITERATION_KEY = ["trial_id", "attempt", "replicate", "phase", "step"]
PART_NAME = re.compile(r"part-(\d+)(?:-(\d+))?\.parquet")
SCALARS = (bool, int, float, str)
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
    """One table: a directory of part files at a local path or an ``s3://`` / ``gs://`` URI (or,
    as earlier versions wrote it, a single Parquet file there, which is only read).

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

    def is_single_file(self) -> bool:
        return self.fs.get_file_info(self.root).type == pyarrow.fs.FileType.File

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
                how = "restore it from a copy" if path == self.root else \
                    f"restore it, or move it out of {self.root} to go on without its rows"
                raise ValueError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())[:120]}): "
                                 f"{how}") from None

    def read(self, columns: list[str] | None = None) -> pa.Table | None:
        """The rows of every live part in write order (None if there is none). A part deleted
        between listing and reading was merged, the merged file already in place: list again."""
        if self.is_single_file():
            return self.read_file(self.root, columns)
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


def rows_table(rows: list[dict]) -> pa.Table:
    """Rows with possibly different keys as one table, columns by first appearance; a key that a
    row lacks is null there."""
    return pa.Table.from_struct_array(pa.array(rows))


def attempts_on_disk(rows: pa.Table | None, skip: set[str]) -> dict[str, list[str]]:
    """Per trial not in ``skip``, the node id of each attempt its iteration ``rows`` record, in
    order ("" where none did)."""
    nodes: dict[str, list[str]] = {}
    if rows is None:
        return nodes
    node_ids = rows.column("node_id").to_pylist() if "node_id" in rows.column_names else [None] * len(rows)
    for trial_id, attempt, node_id in zip(rows.column("trial_id").to_pylist(),
                                          rows.column("attempt").to_pylist(), node_ids):
        if trial_id in skip:
            continue
        seen = nodes.setdefault(trial_id, [])
        seen.extend([""] * (attempt - len(seen)))
        if node_id and not seen[attempt - 1]:
            seen[attempt - 1] = node_id
    return nodes


class ParquetResults(Callback):
    """Append every reported row and every finished trial to the experiment's Parquet tables.

    ``trial_row(trial, result, node_ids)`` turns a finished trial, its last result and the node
    id of each of its attempts into the row of the trials table, whose columns get the pandas
    ``dtypes`` given; the search module supplies both. A reported row waits at most
    ``flush_seconds``; each table merges every ``merge_every`` parts into one file.
    """

    def __init__(self, directory: str, trial_row: Callable[[Any, dict, list[str]], dict],
                 dtypes: dict[str, str], flush_seconds: float = 2.0, merge_every: int = MERGE_EVERY):
        self.directory = directory.rstrip("/")
        self.trial_row = trial_row
        self.dtypes = dtypes
        self.flush_seconds = flush_seconds
        self.merge_every = merge_every
        # the Arrow type of each declared column, and the pandas metadata that gives load() the
        # declared dtypes back (see _trial_table)
        schema = pa.Schema.from_pandas(pd.DataFrame({k: pd.Series(dtype=v) for k, v in dtypes.items()}),
                                       preserve_index=False)
        self._types = {field.name: field.type for field in schema}
        self._metadata = schema.metadata
        self._pending: list[dict] = []           # iteration rows not yet written
        self._nodes: dict[str, list[str]] = {}   # per running trial, the node id of each attempt
        self._landed: set[str] = set()           # trials whose row is written
        self._last_flush = 0.0
        self._failure: OSError | None = None     # a row's write error, for on_step_begin to raise
        self._reconciled = False

    def setup(self, **info) -> None:
        """Open the tables and read, once, what a previous driver of this experiment wrote: the
        next part numbers, the trials that landed and the attempts of the others."""
        self._trials = PartsTable(f"{self.directory}/{TRIALS_FILE}", self.merge_every)
        self._iterations = PartsTable(f"{self.directory}/{ITERATIONS_FILE}", self.merge_every)
        for table in (self._trials, self._iterations):
            if table.is_single_file():
                raise RuntimeError(f"{table.root} is a single file written by an earlier newllm: load() "
                                   f"reads it, but a search cannot continue it")
            table.next_seq = max((p.last for p in table.parts()), default=0) + 1
        landed = self._trials.read()
        if landed is not None and "error" in landed.column("status").to_pylist():
            landed = self._drop_errors(landed)
        self._landed = set(landed.column("trial_id").to_pylist()) if landed is not None else set()
        self._nodes = attempts_on_disk(self._iterations.read(["trial_id", "attempt", "node_id"]), self._landed)
        self._pending = []
        self._last_flush = time.monotonic()

    def _drop_errors(self, trials: pa.Table) -> pa.Table:
        """Rewrite the trials table without its errored trials, which a resumed search runs again
        (``resume_errored``): each trial's row lands once, with its outcome. One file covering
        every part so far replaces them, under the next part number."""
        kept = trials.filter(pc.fill_null(pc.not_equal(trials.column("status"), "error"), True))
        live, seq = live_parts(self._trials.parts()), self._trials.next_seq
        self._trials.write(f"part-{live[0].first:06d}-{seq:06d}.parquet", kept)
        for part in live:
            self._trials.fs.delete_file(f"{self._trials.root}/{part.name}")
        self._trials.next_seq += 1
        return kept

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        trial_id = trial.trial_id
        if trial_id in self._landed:
            return
        nodes = self._nodes.setdefault(trial_id, [])
        if result.get("iterations_since_restore") == 1 or not nodes:  # a run of the trial starts
            nodes.append(result.get("node_id") or "")
        row = {"trial_id": trial_id, "attempt": len(nodes)}
        row.update((k, v) for k, v in result.items() if v is None or isinstance(v, SCALARS))
        self._pending.append(row)
        if result.get("should_checkpoint") or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def on_step_begin(self, iteration, trials, **info) -> None:
        """Raise the write error of a trial's row, which Tune would swallow where it happened;
        at the first step of a resumed search, land the rows of the finished trials that have
        none (their driver died, or its disk filled, between the finish and the write)."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if not self._reconciled:
            self._reconciled = True
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR"):
                    self._finish(trial, error=trial.status == "ERROR")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish_or_keep_error(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish_or_keep_error(trial, error=True)

    def _finish_or_keep_error(self, trial, error: bool) -> None:
        try:
            self._finish(trial, error)
        except OSError as e:  # Tune logs and ignores a callback's error here: on_step_begin raises it
            self._failure = e

    def on_experiment_end(self, trials, **info) -> None:
        """Compact both tables. The iteration rows of trials that Tune no longer knows and that
        never landed go: a driver killed after starting a trial, before Tune's next snapshot of
        its state, leaves rows of a trial that the resumed search never runs again (it runs a new
        one instead). A landed trial's rows always stay."""
        self.flush()
        known = pa.array(sorted({t.trial_id for t in trials} | self._landed), pa.string())
        dropped = self._iterations.compact(keep=lambda rows: rows.filter(pc.is_in(rows.column("trial_id"), known)))
        self._trials.compact()
        if dropped:
            print(f"Dropped {dropped} iteration rows of trials that a killed driver had started and the resumed "
                  f"search replaced", flush=True)

    def _finish(self, trial, error: bool) -> None:
        if trial.trial_id in self._landed:
            return
        result = {**(trial.last_result or {}), **({"status": "error"} if error else {})}
        self.flush()
        row = self.trial_row(trial, result, self._nodes.pop(trial.trial_id, []))
        self._trials.append(self._trial_table(row))
        self._landed.add(trial.trial_id)

    def _trial_table(self, row: dict) -> pa.Table:
        """``row`` as a one-row table of the declared dtypes: converted by Arrow, 40x faster than
        ``DataFrame.astype``, or, for a value Arrow will not convert (an int for a string), by pandas."""
        try:
            columns = {k: pa.array([v], type=self._types.get(k)) for k, v in row.items()}
            return pa.table(columns).replace_schema_metadata(self._metadata)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            frame = pd.DataFrame([row]).astype({k: v for k, v in self.dtypes.items() if k in row})
            return pa.Table.from_pandas(frame, preserve_index=False)

    def flush(self) -> None:
        """Write the pending iteration rows as one new part."""
        if self._pending:
            self._iterations.append(rows_table(self._pending))
            self._pending = []
        self._last_flush = time.monotonic()


# --- queries every reader of the trials table shares ------------------------------------


def status_is(trials: pd.DataFrame, status: str) -> pd.Series:
    """Boolean mask of the trials with ``status`` (a null status is no status)."""
    return trials["status"].eq(status).fillna(False).astype(bool)


def is_baseline(trials: pd.DataFrame) -> pd.Series:
    """Boolean mask of the baseline trials (an experiment without a ``family`` column has none)."""
    if "family" not in trials:
        return pd.Series(False, index=trials.index)
    return trials["family"].eq("baseline").fillna(False).astype(bool)


def newllm_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The New-LLM trials: the only ones with a Phase 1, a gate and New-LLM's configuration."""
    return trials[~is_baseline(trials)]


def best_newllm_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The best New-LLM trial: the passed one with the lowest objective (the first written among
    equals); None when none passed. Export's ``--best``, the search's summary and the report all
    mean this one."""
    newllm = newllm_trials(trials)
    passed = newllm[status_is(newllm, "passed")]
    return None if passed.empty else passed.sort_values("objective", kind="stable").iloc[0]


def baseline_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The baseline trials (LSTM, GRU, transformer trained end to end), New-LLM's yardstick."""
    return trials[is_baseline(trials)]
