"""``python -m newllm.export``: a search trial's model as a Hugging Face Transformers directory.

Picks a trial from ``<experiment dir>/trials.parquet`` (``--best``: the lowest objective among
passed New-LLM trials; ``--trial ID``: that trial; a baseline trial is refused, it is not a
New-LLM model) and exports its final checkpoint with
``newllm.hf.export_checkpoint``, so that after ``import newllm.hf``
``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load
it. An experiment directory that was moved or renamed since the search still works: a stored
checkpoint path that no longer exists is looked up under the experiment directory by its
trailing components (``<trial dir>/checkpoint_...``). Everything is checked before the export
(exit code 2 with the problem named); transformers is imported only for the export itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from newllm.checkpoint import MODEL_FILE
from newllm.results import load


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m newllm.export",
        description="Export a search trial's model as a Hugging Face Transformers directory (safetensors + tokenizer).",
    )
    p.add_argument("experiment", help="local experiment directory holding trials.parquet (<storage>/<name>)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", metavar="ID", help="the trial to export (its trial_id)")
    which.add_argument("--best", action="store_true", help="the passed trial with the lowest objective")
    p.add_argument("--out", required=True, help="output directory (written, or overwritten file by file)")
    return p.parse_args(argv)


def pick_trial(trials: pd.DataFrame, trial_id: str | None) -> pd.Series:
    """The row of ``trial_id``, or with None the best passed trial (lowest objective)."""
    if trial_id is not None:
        rows = trials[trials.trial_id == trial_id]
        if rows.empty:
            known = ", ".join(f"{r.trial_id} ({r.status})" for r in trials.itertuples())
            raise ValueError(f"unknown trial id {trial_id!r}; the experiment's trials are: {known}")
        return rows.iloc[0]
    passed = trials[(trials.status == "passed") & (trials.get("family", "newllm") == "newllm")]
    if passed.empty:
        counts = ", ".join(f"{n} {s}" for s, n in trials.status.value_counts().items())
        raise ValueError(f"--best: no New-LLM trial passed ({counts}); pick one with --trial ID")
    return passed.sort_values("objective").iloc[0]


def find_checkpoint(row: pd.Series, experiment: Path) -> Path:
    """The trial's checkpoint directory: as stored, or under ``experiment`` if that moved."""
    stored = row.checkpoint_path
    if pd.isna(stored):
        raise FileNotFoundError(f"trial {row.trial_id} ({row.status}) has no checkpoint")
    stored = Path(stored)
    if (stored / MODEL_FILE).is_file():
        return stored
    parts = stored.parts
    for i in range(1, len(parts)):  # the longest trailing part that exists under the experiment dir
        candidate = experiment.joinpath(*parts[i:])
        if (candidate / MODEL_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"the checkpoint of trial {row.trial_id}, {str(stored)!r}, does not exist, "
                            f"nor does its trailing part under {str(experiment)!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    experiment = Path(args.experiment)
    try:
        if not experiment.is_dir():
            raise FileNotFoundError(f"experiment directory {str(experiment)!r} does not exist "
                                    f"(copy s3:// or gs:// storage to a local directory first)")
        trials, _ = load(experiment)
        if trials.empty:
            raise ValueError(f"no trial of {str(experiment)!r} has finished yet: nothing to export")
        row = pick_trial(trials, args.trial)
        if row.get("family", "newllm") == "baseline":
            raise ValueError(f"trial {row.trial_id} is a {row.architecture} baseline, not a New-LLM model: only "
                             f"New-LLM trials export to the newllm model type (its weights are in {row.checkpoint_path})")
        checkpoint = find_checkpoint(row, experiment)
        try:
            from newllm.hf import export_checkpoint
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in ("transformers", "safetensors"):
                raise
            raise ValueError(f"exporting needs the hf extra ({e}): pip install 'newllm[hf]'") from e
        out = export_checkpoint(checkpoint, args.out)
    except (ValueError, FileNotFoundError) as e:
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
