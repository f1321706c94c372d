"""Search results in Parquet: ``trials.parquet`` (one row per finished trial) and
``iterations.parquet`` (every reported row), under ``<storage>/<experiment>/``.

``ParquetResults`` is a Tune callback; it runs in the driver. It flushes the trial table
whenever a trial finishes and the iteration rows at least every ``flush_seconds`` and at
each finish. Each flush writes the whole table to a temporary file and renames it over
the old one, so a reader never sees a half-written file and a crash loses no finished
trial. Rows are keyed by trial id (and phase/step), so a resumed search that reports a
trial again replaces its rows instead of duplicating them.

``load(path)`` gives the two tables back as pandas DataFrames.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs
from ray.tune import Callback

TRIALS_FILE = "trials.parquet"
ITERATIONS_FILE = "iterations.parquet"
ITERATION_KEY = ["trial_id", "phase", "step"]


def write_parquet(df: pd.DataFrame, path: str) -> None:
    """Write ``df`` to ``path`` atomically: a temporary file renamed over the old one, or, on
    ``s3://`` / ``gs://`` storage, one object put (atomic there)."""
    if "://" in path:
        fs, key = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_output_stream(key) as f:
            df.to_parquet(f, index=False)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_parquet(path: str) -> pd.DataFrame:
    """The table at ``path`` (local or URI); empty if there is none yet."""
    if "://" in path:
        fs, key = pyarrow.fs.FileSystem.from_uri(path)
        if fs.get_file_info(key).type == pyarrow.fs.FileType.NotFound:
            return pd.DataFrame()
        with fs.open_input_file(key) as f:
            return pd.read_parquet(f)
    return pd.read_parquet(path) if Path(path).is_file() else pd.DataFrame()


def load(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, iterations) of the experiment directory ``path``."""
    d = str(path).rstrip("/")
    trials = read_parquet(f"{d}/{TRIALS_FILE}")
    if trials.empty:
        raise FileNotFoundError(f"no {TRIALS_FILE} in {d!r}: not a newllm experiment directory")
    return trials, read_parquet(f"{d}/{ITERATIONS_FILE}")


class ParquetResults(Callback):
    """Append every reported row and every finished trial to the experiment's Parquet files.

    ``trial_row(trial, result)`` turns a finished trial and its last result into the row of
    the trials table, whose columns get the pandas ``dtypes`` given; the search module
    supplies both.
    """

    def __init__(self, directory: str, trial_row, dtypes: dict[str, str], flush_seconds: float = 5.0):
        self.directory = directory
        self.trial_row = trial_row
        self.dtypes = dtypes
        self.flush_seconds = flush_seconds
        self._trials: dict[str, dict] = {}
        self._iterations: dict[tuple, dict] = {}
        self._last_flush = 0.0
        self._dirty = False

    @property
    def trials_path(self) -> str:
        return f"{self.directory}/{TRIALS_FILE}"

    @property
    def iterations_path(self) -> str:
        return f"{self.directory}/{ITERATIONS_FILE}"

    def setup(self, **info) -> None:
        """Start from what is already on disk (a resumed search)."""
        for row in read_parquet(self.trials_path).to_dict("records"):
            self._trials[row["trial_id"]] = row
        for row in read_parquet(self.iterations_path).to_dict("records"):
            self._iterations[tuple(row[k] for k in ITERATION_KEY)] = row

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        row = {"trial_id": trial.trial_id, **{k: v for k, v in result.items() if _scalar(v)}}
        self._iterations[tuple(row.get(k) for k in ITERATION_KEY)] = row
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush_iterations()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, {**(trial.last_result or {}), "status": "error"})

    def on_experiment_end(self, trials, **info) -> None:
        self.flush_iterations()

    def _finish(self, trial, result: dict) -> None:
        self._trials[trial.trial_id] = self.trial_row(trial, result)
        table = pd.DataFrame(list(self._trials.values()))
        table = table.astype({k: v for k, v in self.dtypes.items() if k in table})
        write_parquet(table, self.trials_path)
        self.flush_iterations()

    def flush_iterations(self) -> None:
        if self._dirty and self._iterations:
            write_parquet(pd.DataFrame(list(self._iterations.values())), self.iterations_path)
        self._dirty = False
        self._last_flush = time.monotonic()


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
