"""The search's Tune callbacks, run in the driver: ``ParquetResults`` lands every reported row
and every finished trial in the experiment's Parquet tables (``newllm.experiment``), with
``TrialRow`` making a finished trial's row, ``Progress`` prints a status line, and
``StagingFolders`` removes the empty folder Tune keeps for each finished trial in the driver's
staging area.

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
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.tune import Callback

from newllm import __version__
from newllm.config import NEWLLM, family_fields, field_types
from newllm.experiment import ITERATIONS_FILE, MERGE_EVERY, TRIALS_FILE, PartsTable, filesystem, live_parts
from newllm.run import REPLICATE_DTYPES, SUMMARY_DTYPES
from newllm.search.packing import reported_row
from newllm.space import ABLATION, MATCHED, SearchSpace

PROGRESS_SECONDS = 10.0
SCALARS = (bool, int, float, str)  # the values of a reported row that land in the iterations table


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
    """Append every reported row (the row each result packs, ``packing.reported_row``, with
    Tune's keys) and every finished trial to the experiment's Parquet tables.

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
        reported = reported_row(result)
        nodes = self._nodes.setdefault(trial_id, [])
        if reported.get("iterations_since_restore") == 1 or not nodes:  # a run of the trial starts
            nodes.append(reported.get("node_id") or "")
        row = {"trial_id": trial_id, "attempt": len(nodes)}
        row.update((k, v) for k, v in reported.items() if v is None or isinstance(v, SCALARS))
        self._pending.append(row)
        if reported.get("should_checkpoint") or time.monotonic() - self._last_flush >= self.flush_seconds:
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
        result = {**reported_row(trial.last_result or {}), **({"status": "error"} if error else {})}
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


def versions() -> dict:
    """The versions a trial's row records, so a result can be traced to the code that made it."""
    return {"newllm_version": __version__, "torch_version": torch.__version__,
            "ray_version": ray.__version__, "optuna_version": optuna.__version__}


# nullable: a setting that means nothing to a trial's family (a baseline's context_dim) is null
CONFIG_DTYPES = {int: "Int64", float: "float64", bool: "boolean", str: "string"}


def outcome(result: dict) -> dict | None:
    """The run summary of a trial that ended with ``result``: its final row, or, if a scheduler
    stopped it in Phase 2, the summary that row carries for that case (status ``passed``,
    ``phase2_stop_reason`` "scheduler", its best epoch's val metrics, which its latest
    checkpoint holds). None for a trial that ended in an error."""
    if result.get("status") == "error":
        return None
    if result.get("phase") == "final":
        return result
    if result.get("phase") == "phase2":
        return result.get("if_stopped")
    return None


@dataclass
class TrialRow:
    """The trials-table row of a finished trial: id, status, summary, where it ran, full config,
    versions. ``node_id`` and ``hostname`` say where its final result came from; ``node_ids``
    lists the node of each attempt (comma-separated, in order: more than one when a lost node or
    a restarted driver made Tune run it again) and ``phase1_restored`` whether the attempt that
    finished started from the Phase 1 checkpoint instead of running Phase 1. The settings that
    mean nothing to the trial's family are null; a baseline's ``matched_trial_id`` names the
    New-LLM trial it was sized to, a sibling's the New-LLM trial it ablates, whose ``ablation`` it
    names (its settings are its parent's but for that one). ``checkpoint_path`` is relative to the experiment directory
    ``experiment``, so that a moved or copied experiment finds its own checkpoints."""

    space: SearchSpace
    versions: dict
    experiment: str

    def __call__(self, trial, result: dict, node_ids: list[str]) -> dict:
        ended = outcome(result)
        summary = {k: (ended or result).get(k) for k in (*SUMMARY_DTYPES, *REPLICATE_DTYPES)}
        if ended is None:
            summary["status"] = "error"
        checkpoint = trial.checkpoint
        where = {"trial_seconds": result.get("time_total_s"), "node_id": result.get("node_id"),
                 "hostname": result.get("hostname"), "node_ids": ",".join(node_ids), "attempts": len(node_ids),
                 "phase1_restored": result.get("phase1_restored")}
        cfg = self.space.trial_config(trial.config)
        settings = {k: v if k in family_fields(cfg.family) else None for k, v in cfg.to_dict().items()}
        return {"trial_id": trial.trial_id, **summary, **where, **settings, MATCHED: trial.config.get(MATCHED),
                ABLATION: trial.config.get(ABLATION),
                "checkpoint_path": None if checkpoint is None else self.relative(checkpoint.path), **self.versions}

    def relative(self, path: str) -> str:
        """A checkpoint's path (on its file system) relative to the experiment directory."""
        return posixpath.relpath(path, filesystem(self.experiment)[1])

    @staticmethod
    def dtypes() -> dict[str, str]:
        return {"trial_id": "string", **SUMMARY_DTYPES, **REPLICATE_DTYPES, "trial_seconds": "float64", "node_id": "string",
                "hostname": "string", "node_ids": "string", "attempts": "Int64", "phase1_restored": "boolean",
                "checkpoint_path": "string", **{name: CONFIG_DTYPES[t] for name, t in field_types().items()},
                MATCHED: "string", ABLATION: "string"}


class Progress(Callback):
    """A status line every PROGRESS_SECONDS and at each finished trial: counts, best, running trials."""

    def __init__(self, total: int):
        self.total = total
        self.start, self.last_print = time.monotonic(), 0.0
        self.latest: dict[str, dict] = {}
        self.finished: dict[str, str] = {}  # trial id -> status
        self.counts: Counter[str] = Counter()  # status -> finished trials: kept, not recounted for each line
        self.stopped: set[str] = set()  # passed trials whose Phase 2 ASHA stopped
        self.best: dict[str, tuple[float, str]] = {}  # family -> (objective, who) of its best passed trial

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.latest[trial.trial_id] = result
        if time.monotonic() - self.last_print >= PROGRESS_SECONDS:
            self.print_line()

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = outcome(reported_row(trial.last_result or {})) or {"status": "error"}
        self.finish(trial.trial_id, result["status"])
        if result.get("phase2_stop_reason") == "scheduler":
            self.stopped.add(trial.trial_id)
        self.latest.pop(trial.trial_id, None)
        family = result.get("family") or NEWLLM
        proposed = trial.config.get(ABLATION) is None  # a sibling is a measurement: never the best
        if result["status"] == "passed" and proposed and (family not in self.best
                                                          or result["objective"] < self.best[family][0]):
            who = trial.trial_id if family == NEWLLM else f"{trial.config.get('architecture')} {trial.trial_id}"
            self.best[family] = (result["objective"], who)
        self.print_line()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finish(trial.trial_id, "error")
        self.latest.pop(trial.trial_id, None)
        print(f"Trial {trial.trial_id} failed: {failure_line(trial)}", flush=True)
        self.print_line()

    def finish(self, trial_id: str, status: str) -> None:
        if (before := self.finished.get(trial_id)) is not None:  # (finished before: its status changes)
            self.counts[before] -= 1
        self.finished[trial_id] = status
        self.counts[status] += 1

    def print_line(self):
        self.last_print = time.monotonic()
        done = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()) if n)
        if self.stopped:
            done += f"; Phase 2 of {len(self.stopped)} stopped early by ASHA"
        best = f"best val_ppl {self.best[NEWLLM][0]:.2f} ({self.best[NEWLLM][1]})" if NEWLLM in self.best \
            else "no passed New-LLM trial yet"
        if "baseline" in self.best:
            best += f" | best baseline {self.best['baseline'][0]:.2f} ({self.best['baseline'][1]})"
        print(f"[{time.monotonic() - self.start:6.0f}s] {len(self.finished)}/{self.total} finished"
              f"{' (' + done + ')' if done else ''} | {best}", flush=True)
        for tid, r in self.latest.items():
            print(f"          {tid}: {_describe(reported_row(r))}", flush=True)


class StagingFolders(Callback):
    """Removes a finished trial's folder in Tune's staging area of the driver (``trial.local_path``)
    when it is empty, as it is unless Tune wrote an error there: the trials write their checkpoints
    to the experiment, and Tune's per-trial loggers are off. At each save of its state (every 10 s)
    Tune copies the whole staging area to the experiment; with a folder for every trial made, that
    copy grew with the search (26 ms a save at 1,000 trials, against 4 ms for the state's file
    alone)."""

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        with contextlib.suppress(OSError):  # not empty, or not there: nothing to do
            os.rmdir(trial.local_path)


def failure_line(trial) -> str:
    """The last line of a failed trial's traceback, and where the whole of it is."""
    path = trial.error_file
    try:
        last = Path(path).read_text(errors="replace").strip().splitlines()[-1]
    except (OSError, TypeError, IndexError):
        last = "no error file"
    where = f"{trial.path}/{Path(path).name}" if path else trial.path
    return f"{' '.join(last.split())[:300]} (traceback: {where})"


def _describe(r: dict) -> str:
    replicate = f"replicate {r['replicate']} " if r.get("replicate") else ""
    if r.get("phase") == "phase1":
        return f"{replicate}phase1 pass {r['step']} conv {r['converged_ratio']:.0%} ER {r['effective_rank_fraction']:.0%}"
    if r.get("phase") == "phase2":
        return f"{replicate}phase2 epoch {r['step']} val_ppl {r['val_ppl']:.1f}"
    return replicate + r.get("phase", "?")
