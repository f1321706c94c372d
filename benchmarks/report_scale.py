"""The end of a large search: the report at N trials, in seconds, megabytes and a browser's load time.

The trials and their reported rows are grown from a finished search (``--from``, for example a
tiny search of a few trials): each of the N trials copies the rows of one of its trials, under
its own trial id, with its searched numbers and its perplexities scaled by a random factor, so
the figures have N distinct curves and points. Times ``write_report`` at N and at N / 10 in the
same process (the ratio says whether the work grows linearly: 10 is linear), the size of
``report.html``, and, where Chromium is installed, the seconds headless Chromium takes to load
and draw it. The JSON line is last.

    python benchmarks/report_scale.py --from <experiment> --trials 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna.distributions as od
import pandas as pd

from newllm import experiment
from newllm.analyze import write_report
from newllm.space import recorded_distributions

PERPLEXITY_COLUMNS = ("objective", "val_ppl", "val_ppl_mean")


def grow(trials: pd.DataFrame, iterations: pd.DataFrame, searched: dict[str, od.BaseDistribution], n: int,
         seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """N trials (and their rows), each a copy of one of ``trials`` with its own id and scaled numbers."""
    rng = np.random.default_rng(seed)
    source = rng.integers(len(trials), size=n)
    grown = trials.iloc[source].reset_index(drop=True)
    ids = pd.Series([f"{i:08x}" for i in range(n)])
    factor = rng.uniform(0.8, 1.25, size=n)
    for column, d in searched.items():
        if isinstance(d, od.FloatDistribution):
            grown[column] = (grown[column] * rng.uniform(0.9, 1.1, size=n)).clip(d.low, d.high)
    passed = grown.status.eq("passed").to_numpy()
    for column in PERPLEXITY_COLUMNS:
        if column in grown:
            grown.loc[passed, column] = grown.loc[passed, column] * factor[passed]
    old_ids = grown.trial_id.to_numpy()
    grown["trial_id"] = ids
    if "time_finished" in grown:
        grown["time_finished"] = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="s")
    rows = iterations.groupby("trial_id", sort=False)
    parts = []
    for i, old in enumerate(old_ids):
        part = rows.get_group(old).copy()
        part["trial_id"] = ids[i]
        if "val_ppl" in part:
            part["val_ppl"] = part["val_ppl"] * factor[i]
        parts.append(part)
    return grown, pd.concat(parts, ignore_index=True)


def chromium_seconds(report: Path) -> float | None:
    """Seconds for headless Chromium to load ``report`` and print its DOM (every figure drawn), or
    None without Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return None
    with tempfile.TemporaryDirectory() as profile:
        t0 = time.perf_counter()
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        "--dump-dom", report.as_uri()], check=True, capture_output=True, timeout=300)
        return time.perf_counter() - t0


def report_at(trials: pd.DataFrame, iterations: pd.DataFrame, source: Path, n: int, work: Path) -> dict:
    """Build the report of N grown trials; its seconds and size."""
    searched = recorded_distributions(str(source)) or {}
    grown, rows = grow(trials, iterations, searched, n)
    directory = work / f"n{n}"
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns(
        experiment.TRIALS_FILE, experiment.ITERATIONS_FILE, "run_*", "experiment_state-*", "*.pkl", "*.journal"))
    for frame, name in ((grown, experiment.TRIALS_FILE), (rows, experiment.ITERATIONS_FILE)):
        (directory / name).mkdir()
        frame.to_parquet(directory / name / "part-000001.parquet", index=False)
    t0 = time.perf_counter()
    report = Path(write_report(directory))
    seconds = time.perf_counter() - t0
    return {"trials": n, "rows": len(rows), "report_seconds": round(seconds, 2),
            "report_mb": round(report.stat().st_size / 2**20, 2), "chromium_seconds": None, "path": report}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", required=True, help="a finished experiment whose trials are grown")
    p.add_argument("--trials", type=int, default=10_000)
    args = p.parse_args()
    source = Path(args.source)
    trials, iterations = experiment.load(source)
    with tempfile.TemporaryDirectory() as work:
        small = report_at(trials, iterations, source, max(1, args.trials // 10), Path(work))
        large = report_at(trials, iterations, source, args.trials, Path(work))
        large["chromium_seconds"] = chromium_seconds(large.pop("path"))
        small.pop("path")
    for r in (small, large):
        print(f"{r['trials']:>6} trials, {r['rows']:>8,} rows: report {r['report_seconds']:.1f}s, {r['report_mb']:.1f} MB"
              + (f", Chromium {r['chromium_seconds']:.1f}s" if r.get("chromium_seconds") is not None else ""))
    print(json.dumps({"benchmark": "report_scale", "source_trials": len(trials), "small": small, "large": large,
                      "seconds_ratio": round(large["report_seconds"] / small["report_seconds"], 2),
                      "trials_ratio": large["trials"] / small["trials"], "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
