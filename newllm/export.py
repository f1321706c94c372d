"""``python -m newllm.export``: a search trial's model as a Hugging Face Transformers directory.

Picks a trial from ``<experiment dir>/trials.parquet`` (``--best``: the lowest objective among
passed New-LLM trials; ``--trial ID``: that trial; a baseline trial is refused, it is not a
New-LLM model) and exports its final checkpoint with
``newllm.hf.export_checkpoint``, so that after ``import newllm.hf``
``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load
it. The table's ``checkpoint_path`` is relative to the experiment directory, so an experiment
that was moved, renamed or copied still exports; nothing outside it is read. Everything is
checked before the export (exit code 2 with the problem named): ``--out`` must be new or an
empty directory unless ``--force``. The export is written to a hidden sibling of ``--out`` and
renamed into place, so ``--out`` never holds half an export. transformers is imported only for
the export itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa

from newllm.checkpoint import MODEL_FILE
from newllm.checks import check_new_out, path_arg
from newllm.experiment import load
from newllm.trials import best_newllm_trial

# the columns of the trials table that picking and exporting a trial read
TRIAL_COLUMNS = ("trial_id", "status", "objective", "val_ppl", "checkpoint_path")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command's flags: the experiment, which trial (--trial or --best), --out, --force."""
    p = argparse.ArgumentParser(
        prog="python -m newllm.export",
        description="Export a search trial's model as a Hugging Face Transformers directory (safetensors + tokenizer).",
    )
    p.add_argument("experiment", help="local experiment directory holding trials.parquet (<storage>/<name>)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", metavar="ID", help="the trial to export (its trial_id)")
    which.add_argument("--best", action="store_true", help="the passed trial with the lowest objective")
    p.add_argument("--out", required=True, help="output directory, new or empty")
    p.add_argument("--force", action="store_true",
                   help="replace an --out that exists (a non-empty directory or a file)")
    return p.parse_args(argv)


def read_trials(experiment: Path) -> pd.DataFrame:
    """The experiment's trials table; ValueError naming the directory if it cannot be read or
    lacks a column the export reads."""
    try:
        trials, _ = load(experiment)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"cannot read the trials table in {str(experiment)!r}: {str(e).splitlines()[0]}") from e
    missing = [c for c in TRIAL_COLUMNS if c not in trials]
    if len(trials) and missing:
        raise ValueError(f"the trials table in {str(experiment)!r} lacks the columns {missing}: not one that a newllm "
                         f"search wrote")
    return trials


def pick_trial(trials: pd.DataFrame, trial_id: str | None) -> pd.Series:
    """The row of ``trial_id``, or with None the best passed trial (lowest objective)."""
    if trial_id is not None:
        rows = trials[trials.trial_id == trial_id]
        if rows.empty:
            known = ", ".join(f"{r.trial_id} ({r.status})" for r in trials.itertuples())
            raise ValueError(f"unknown trial id {trial_id!r}; the experiment's trials are: {known}")
        return rows.iloc[0]
    best = best_newllm_trial(trials)
    if best is None:
        counts = ", ".join(f"{n} {s}" for s, n in trials.status.value_counts().items())
        raise ValueError(f"--best: no New-LLM trial passed ({counts}); pick one with --trial ID")
    return best


def find_checkpoint(row: pd.Series, experiment: Path) -> Path:
    """The trial's checkpoint directory: its ``checkpoint_path``, relative to ``experiment``.
    FileNotFoundError naming the trial and the path if it is absolute, leads outside
    ``experiment`` or holds no checkpoint."""
    stored = row.get("checkpoint_path")
    if not isinstance(stored, str) or not stored:
        raise FileNotFoundError(f"trial {row.trial_id} ({row.status}) has no checkpoint")
    where = f"the checkpoint of trial {row.trial_id}, {stored!r}"
    if Path(stored).is_absolute():
        raise FileNotFoundError(f"{where}, is an absolute path, where a search stores it relative to the "
                                f"experiment directory: a damaged trials table? (export a checkpoint directory "
                                f"from Python with newllm.hf.export_checkpoint(path, out))")
    checkpoint = experiment / stored
    if not checkpoint.resolve().is_relative_to(experiment.resolve()):
        raise FileNotFoundError(f"{where}, leads outside the experiment directory {str(experiment)!r}: a damaged "
                                f"trials table?")
    if not (checkpoint / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{where}, holds no {MODEL_FILE} under the experiment directory {str(experiment)!r}: "
                                f"was it deleted, or the experiment copied without it?")
    return checkpoint


def export_atomically(checkpoint: Path, out: Path) -> None:
    """Export ``checkpoint`` to a hidden sibling of ``out`` (created with its parents) and rename
    it to ``out``, replacing what is there (``main`` checked that it may): ``out`` never holds
    half an export."""
    try:
        from newllm.hf import export_checkpoint
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("transformers", "safetensors"):
            raise
        raise ValueError(f"exporting needs the hf extra ({e}): pip install 'newllm[hf]'") from e
    out = Path(os.path.abspath(out))  # "." and "x/.." have a name to put a sibling beside
    tag = uuid.uuid4().hex[:12]
    tmp, old = (out.with_name(f".{out.name}.{tag}.{kind}") for kind in ("tmp", "old"))
    try:
        export_checkpoint(checkpoint, tmp)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():
                old.rename(out)  # what was there, back
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """The command: check everything, then export the trial's checkpoint as a Hugging Face model."""
    args = parse_args(argv)
    try:
        experiment = path_arg(args.experiment, "the experiment directory")
        out = path_arg(args.out, "--out")
        check_new_out(out, args.force, replace=True)
        if not experiment.is_dir():
            raise FileNotFoundError(f"experiment directory {str(experiment)!r} "
                                    f"{'is a file' if experiment.exists() else 'does not exist'}: give the directory "
                                    f"of a search (copy s3:// or gs:// storage to a local directory first)")
        trials = read_trials(experiment)
        if trials.empty:
            raise ValueError(f"no trial of {str(experiment)!r} has finished yet: nothing to export")
        row = pick_trial(trials, args.trial)
        if row.get("family", "newllm") == "baseline":
            raise ValueError(f"trial {row.trial_id} is a {row.architecture} baseline, not a New-LLM model: only "
                             f"New-LLM trials export to the newllm model type (its weights are in "
                             f"{row.get('checkpoint_path')})")
        checkpoint = find_checkpoint(row, experiment)
        export_atomically(checkpoint, out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    score = f"val_ppl {row.val_ppl:.2f}" if row.status == "passed" else f"status {row.status}, not a passed trial"
    print(f"Exported trial {row.trial_id} ({score}) from {checkpoint}\nto {out}\n\nLoad it with:\n"
          f"    import newllm.hf  # registers the newllm model type\n"
          f"    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
          f"    model = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
          f"    tokenizer = AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
