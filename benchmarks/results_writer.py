"""Results writer: does a flush cost the same late in a long search as early on?

Drives ``newllm.search.callbacks.ParquetResults`` directly, without Ray: fake trials, ``--concurrency`` at
once, each reporting 40 rows as a real trial does (30 Phase 1 passes, the analysis row with a
checkpoint, 8 Phase 2 epochs, the final row with a checkpoint) with Tune's own result keys, and
finishing as it goes. Times every flush (a callback call that wrote a file: pending iteration
rows at a checkpoint or on the timer, or a finished trial's row) and every finish, and compares
the median of the first 5% with that of the last 5% (the 99th percentile shows the merges of
every 100 parts); then the compaction at the end, the files left, and ``load()`` before and
after it.

With ``--old-trials N`` it also drives the previous writer (``newllm/results.py`` at
OLD_REVISION, which rewrote both tables whole on every flush) for N trials, for a before/after
comparison.

    .venv/bin/python benchmarks/results_writer.py [--trials 10000] [--old-trials 200]

Prints a summary, then one JSON line (last).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from unittest import mock

from newllm import experiment
from newllm.search import callbacks

METRICS = [f"metric_{i}" for i in range(15)]
OLD_REVISION = "fc9529d"  # the last commit with the whole-table writer
DTYPES = {"trial_id": "string", "status": "string", "objective": "float64", "attempts": "Int64",
          "node_ids": "string", "lr": "float64", "layers": "int64"}


def trial_row(trial, result: dict, node_ids: list[str]) -> dict:
    return {"trial_id": trial.trial_id, "status": result.get("status"), "objective": result.get("objective"),
            "attempts": len(node_ids), "node_ids": ",".join(node_ids), **trial.config}


def reports(trial, index: int) -> Iterator[dict]:
    """The 40 results of one trial, with the keys Tune adds to each."""
    steps = [("phase1", s) for s in range(30)] + [("analysis", 0)] + [("phase2", s) for s in range(8)] + [("final", 0)]
    for i, (phase, step) in enumerate(steps, start=1):
        checkpoint = phase in ("analysis", "final")
        yield {"phase": phase, "step": step, "objective": 1e6 - index - i, "num_params": 12345,
               "node_id": f"node-{index % 4}", "phase1_restored": False,
               **{m: (index + i) * 0.001 + k for k, m in enumerate(METRICS)},
               **({"status": "passed"} if phase == "final" else {}),
               "timestamp": 1_700_000_000 + i, "checkpoint_dir_name": f"checkpoint_{i:06d}" if checkpoint else None,
               "should_checkpoint": checkpoint, "done": False, "training_iteration": i, "trial_id": trial.trial_id,
               "date": "2025-01-01_00-00-00", "time_this_iter_s": 0.1, "time_total_s": 0.1 * i, "pid": 4242,
               "hostname": "host", "node_ip": "10.0.0.1", "config": trial.config, "time_since_restore": 0.1 * i,
               "iterations_since_restore": i, "experiment_tag": f"{index}_lr=0.001"}


def drive(module: ModuleType | None, directory: str, num_trials: int, concurrency: int, new_api: bool) -> dict:
    """Run ``num_trials`` fake trials through ``module``'s ParquetResults (None: this newllm's), the next report coming
    from a random running trial. A flush is a callback call that wrote a file; times in seconds."""
    writes = 0
    owner, name = (experiment.PartsTable, "write") if new_api else (module, "write_parquet")
    write = getattr(owner, name)

    def counted_write(*args, **kwargs):
        nonlocal writes
        writes += 1
        return write(*args, **kwargs)

    row = trial_row if new_api else (lambda trial, result: trial_row(trial, result, []))
    cb = (callbacks if new_api else module).ParquetResults(directory, row, DTYPES)
    cb.setup()
    flushes, finishes, rng = [], [], random.Random(0)
    started, running = 0, []
    with mock.patch.object(owner, name, counted_write):
        start = time.perf_counter()
        while running or started < num_trials:
            while len(running) < concurrency and started < num_trials:
                trial = SimpleNamespace(trial_id=f"t{started:05d}", config={"lr": 1e-3, "layers": 2},
                                        checkpoint=None, last_result={})
                running.append((trial, reports(trial, started)))
                started += 1
            i = rng.randrange(len(running))
            trial, left = running[i]
            result, before, t = next(left, None), writes, time.perf_counter()
            if result is None:
                running.pop(i)
                cb.on_trial_complete(0, [], trial)
                finishes.append(time.perf_counter() - t)
            else:
                cb.on_trial_result(0, [], trial, result)
                trial.last_result = result
            if writes > before:
                flushes.append(time.perf_counter() - t)
        run = time.perf_counter() - start
    return {"cb": cb, "run_s": run, "flushes": flushes, "finishes": finishes}


def early_late(times: list[float]) -> dict:
    k = max(1, len(times) // 20)
    early, late = statistics.median(times[:k]), statistics.median(times[-k:])
    p99 = statistics.quantiles(times, n=100)[98]
    return {"n": len(times), "early_ms": round(early * 1e3, 3), "late_ms": round(late * 1e3, 3),
            "late_over_early": round(late / early, 2), "p99_ms": round(p99 * 1e3, 3)}


def files_in(directory: str) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


def old_module(directory: str) -> ModuleType | None:
    """The previous writer, from git, loaded from a copy in ``directory`` (None outside a git checkout)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(["git", "show", f"{OLD_REVISION}:newllm/results.py"], cwd=repo,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(directory) / "old_results.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--old-trials", type=int, default=200, help="trials for the previous writer (0: skip)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        exp = f"{tmp}/exp"
        new = drive(None, exp, args.trials, args.concurrency, new_api=True)
        files_before = files_in(exp)
        t = time.perf_counter()
        trials_before, iterations_before = experiment.load(exp)
        load_before = time.perf_counter() - t
        t = time.perf_counter()
        new["cb"].on_experiment_end([SimpleNamespace(trial_id=f"t{i:05d}") for i in range(args.trials)])
        compaction = time.perf_counter() - t
        t = time.perf_counter()
        trials, iterations = experiment.load(exp)
        load_after = time.perf_counter() - t
        assert len(trials) == args.trials and len(iterations) == 40 * args.trials
        assert trials.equals(trials_before) and iterations.equals(iterations_before)
        out = {"trials": args.trials, "rows": len(iterations), "concurrency": args.concurrency,
               "flush": early_late(new["flushes"]), "finish": early_late(new["finishes"]),
               "run_s": round(new["run_s"], 2), "compaction_s": round(compaction, 2),
               "files_before_compaction": files_before, "files_after_compaction": files_in(exp),
               "load_before_compaction_s": round(load_before, 2), "load_s": round(load_after, 3)}

        module = old_module(tmp) if args.old_trials else None
        if module is not None:
            old = drive(module, f"{tmp}/old", args.old_trials, args.concurrency, new_api=False)
            out["old"] = {"trials": args.old_trials, "flush": early_late(old["flushes"]),
                          "finish": early_late(old["finishes"]), "run_s": round(old["run_s"], 2)}
            out["old_late_finish_over_new_late_finish"] = round(
                out["old"]["finish"]["late_ms"] / out["finish"]["late_ms"], 1)

    print(f"{args.trials} trials x 40 rows, {args.concurrency} at once: driven in {out['run_s']} s "
          f"({out['flush']['n']} flushes, {out['finish']['n']} finishes)")
    for what in ("flush", "finish"):
        r = out[what]
        print(f"  {what}: {r['early_ms']} ms early, {r['late_ms']} ms late (median of first/last 5%): "
              f"late/early {r['late_over_early']}; 99th percentile {r['p99_ms']} ms")
    print(f"  {out['files_before_compaction']} files before compaction, load() {out['load_before_compaction_s']} s; "
          f"compaction {out['compaction_s']} s; {out['files_after_compaction']} files after, "
          f"load() {out['load_s']} s")
    if "old" in out:
        o = out["old"]
        print(f"previous writer, {o['trials']} trials: finish {o['finish']['early_ms']} ms early, "
              f"{o['finish']['late_ms']} ms late (late/early {o['finish']['late_over_early']}); its late finish is "
              f"{out['old_late_finish_over_new_late_finish']}x the new one's late finish at {args.trials} trials")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
