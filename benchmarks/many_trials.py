"""Many trials: the search at 1,000 real trials on one machine, and 10,000 replayed ones on 32 slots.

Does it hold up as trials pile up?

Two modes, each in its own driver process (``--mode both`` runs them one after the other):

- **real**: the tiny space (``TINY_SPACE``, trials of about a second; the gate passes every trial
  that does not diverge) as ``python -m newllm.search --local`` runs it: a local Ray of this
  machine's CPUs, one trial per CPU, the Optuna study in its journal, ASHA; then the end-of-search
  summary and report;
- **replay**: a loopback ``ray.cluster_utils.Cluster`` (a head that runs no trials, ``--nodes``
  worker nodes of ``--cpus-per-node`` logical CPUs each) running a *replay trainable* through the
  real searcher, scheduler, callbacks and results writer (``SearchRun.trainable``): no torch,
  each trial reports the rows one real tiny trial reported, in the same shape and order, with
  checkpoints of the same sizes, sleeping as long as that trial took to reach each row (times
  ``--time-scale``). The real trial is recorded first, in a child process (``--recording`` keeps
  it in a file for the next run).

Every trial's function notes its start and end (wall clock, a file per worker process). From them:

- **per-trial overhead**: the idle time of a slot between a trial's end and the next trial's
  start on it (the driver's turnaround, Tune's actor reset, the parameters' fetch); the median
  over the first 10% of trials (by start; the first wave, which had no trial before it, left out)
  and over the last 10%. Goal: last / first <= 1.2. Also the driver's CPU seconds per trial in the
  same windows (its process, every thread; the first wave left out). Each is also given for every
  tenth of the trials, which shows where a growth happens;
- **trial time**: each trial's duration, median over the first and last 10% of trials (by start;
  the first wave in) and over each tenth. In real mode the driver's CPU per trial rises and falls
  with the trials' own time (the machine's speed moves both): read the two side by side;
- **trial compute / slots**: the sum of the trials' durations over the slots, against the wall time
  of ``run_search`` (real); in replay the ideal is trials x the recorded trial's seconds (scaled) /
  slots. Goal (replay): wall <= 1.15 x ideal (also given: from the first trial's start to the last
  one's end, without Ray's start of the workers, over the ideal);
- **end of search**: from the last trial's end to ``run_search``'s return (Tune's end, the results'
  compaction, the checkpoints' pruning), then the summary and ``write_report`` as the command
  runs them;
- **Optuna suggest**: the driver's seconds in ``KindSearch.suggest`` for each trial made, median
  over the first and last 10%, and its CPU seconds (the suggestion's share of the driver's CPU per
  trial; in real mode the first tenth's suggestions read a window TPE is still filling);
- Tune's state (``experiment_state-*.json``; goal in replay <= 100 MB) and the driver's peak RSS
  (``ru_maxrss``; goal in replay <= 2 GiB);
- with ``--count-lines``, the driver's **work per trial** whatever the machine's speed: the lines of
  Python its main thread runs (``sys.settrace``) over the first and the last 10% of trials (the
  same windows), by library. The tracer slows the driver in those two tenths, so the CPU figures of
  such a run are not a plain run's.

    .venv/bin/python benchmarks/many_trials.py                       # both, at the issue's sizes
    .venv/bin/python benchmarks/many_trials.py --mode real --trials 20
    .venv/bin/python benchmarks/many_trials.py --mode replay --trials 300

Prints the search's progress lines and a summary per mode, then one JSON line (last).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple
from unittest import mock

import ray
from ray import tune

from newllm.analyze import write_report
from newllm.data import DataConfig, builtin_documents, prepare_data
from newllm.experiment import load
from newllm.floors import floors, record_floors
from newllm.search import algorithms, cli
from newllm.search.algorithms import KindSearch, SearchRun, run_search
from newllm.search.callbacks import ParquetResults
from newllm.search.packing import packed, reported_row
from newllm.search.storage import optuna_storage
from newllm.search.trainable import run_trial
from newllm.space import load_space, record_space

# the tiny space: C and E of 8 or 16, 1-2 layers, 2 Phase 1 passes, 1 Phase 2 epoch, on a
# corpus of TINY_DOCS builtin documents cut to TINY_CHARS characters (about 2,700 train tokens):
# a trial of about a second on one CPU; the gate passes every trial that does not diverge
TINY_DOCS, TINY_CHARS = 10, 500
TINY_SPACE = """
num_trials: 3
params:
  context_dim: {type: categorical, choices: [8, 16]}
  embed_dim: {type: categorical, choices: [8, 16]}
  num_layers: {type: int, low: 1, high: 2}
  dist_reg_weight: {type: float, low: 0.1, high: 0.8}
fixed:
  phase1_max_iter: 2
  phase1_streams: 4
  phase2_epochs: 1
  phase2_lr: 0.001
  phase2_batch_size: 64
  gate_train_er: 0.0
  gate_val_er: 0.0
data:
  source: {corpus}
  num_samples: 0
  vocab_size: 300
"""
# the configuration of the recorded trial (the largest of the tiny space's models)
RECORDED_CONFIG = {"context_dim": 16, "embed_dim": 16, "num_layers": 2, "dist_reg_weight": 0.45}
DEFAULT_TRIALS = {"real": 1_000, "replay": 10_000}
GOALS = {"overhead_last_over_first": 1.2, "wall_over_ideal": 1.15, "driver_rss_gib": 2.0, "tune_state_mb": 100.0}


# ---- what runs in the trials' workers (pickled by value from here; the replay imports no torch)

def _note(timings: str, start: float) -> None:
    """Append this trial's start and end (wall clock) to its worker process's file under ``timings``."""
    line = json.dumps({"trial_id": tune.get_context().get_trial_id(), "start": start, "end": time.time()})
    with open(f"{timings}/{os.getpid()}.jsonl", "a") as f:
        f.write(line + "\n")


def real_trial(config: dict, space, data, timings: str) -> None:
    """``run_trial``, noting its start and end (also when ASHA stops it: Tune ends its thread)."""
    start = time.time()
    try:
        run_trial(config, space, data)
    finally:
        _note(timings, start)


def replay_trial(config: dict, recording: dict, metrics: list[str], time_scale: float, timings: str) -> None:
    """The recorded trial's rows, each ``packed`` as the real trainable reports it (its ``node_id`` this
    node's), at the recorded seconds after the start times ``time_scale``, with a checkpoint of the
    recorded size where the row had one."""
    start = time.time()
    try:
        node = ray.get_runtime_context().get_node_id()
        for step in recording["steps"]:
            time.sleep(max(0.0, start + step["at"] * time_scale - time.time()))
            row = {**step["row"], **({"node_id": node} if "node_id" in step["row"] else {})}
            if step["checkpoint_bytes"] is None:
                tune.report(packed(row, metrics))
                continue
            with tempfile.TemporaryDirectory() as d:
                Path(d, "model.bin").write_bytes(bytes(step["checkpoint_bytes"]))
                tune.report(packed(row, metrics), checkpoint=tune.Checkpoint.from_directory(d))
        time.sleep(max(0.0, start + recording["seconds"] * time_scale - time.time()))
        if "torch" in sys.modules:
            raise RuntimeError("the replay trainable's worker imported torch")
    finally:
        _note(timings, start)


# ---- the recording (in a child process: its torch stays out of the driver's RSS)

def record_trial(space_path: str, config: dict) -> dict:
    """One real trial of ``config`` run twice (the first warms up) without Ray, as ``run_trial`` runs it
    in a Tune worker of 1 CPU; the second's rows as reported, the seconds after the start at which each
    was reported, its checkpoints' sizes and the trial's seconds."""
    from newllm.search import trainable

    space = load_space(space_path)
    data = prepare_data(DataConfig(**space.data))
    steps: list[dict] = []

    def report(result: dict, checkpoint=None) -> None:
        size = None if checkpoint is None else sum(p.stat().st_size for p in Path(checkpoint.path).rglob("*")
                                                   if p.is_file())
        steps.append({"at": time.perf_counter() - start, "row": reported_row(result), "checkpoint_bytes": size})

    context = SimpleNamespace(get_node_id=lambda: "recorded", get_assigned_resources=lambda: {"CPU": 1})
    trainable.ray = SimpleNamespace(get_runtime_context=lambda: context)
    trainable.tune = SimpleNamespace(report=report, get_checkpoint=lambda: None, Checkpoint=tune.Checkpoint)
    for _ in range(2):
        steps.clear()
        start = time.perf_counter()
        trainable.run_trial(config, space, data)
        seconds = time.perf_counter() - start
    return {"config": config, "seconds": seconds, "steps": steps}


def recording_of(space_path: str, path: str | None) -> dict:
    """The recorded trial: read from ``path`` when it exists, else recorded (and kept at ``path``)."""
    if path and os.path.exists(path):
        return json.loads(Path(path).read_text())
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        recording = pool.submit(record_trial, space_path, RECORDED_CONFIG).result()
    if path:
        Path(path).write_text(json.dumps(recording))
    return recording


# ---- measurements in the driver

class Call(NamedTuple):
    start: float      # wall clock
    seconds: float    # wall seconds
    cpu_s: float      # the driver's CPU seconds during the call (its process, every thread)
    cpu_after: float  # the driver's CPU seconds so far, at its end
    result: object


class Timed:
    """Wraps a function: records each ``Call``."""

    def __init__(self, function):
        self.function, self.calls = function, []

    def __call__(self, *args, **kwargs):
        t0, start, cpu = time.time(), time.perf_counter(), time.process_time()
        result = self.function(*args, **kwargs)
        cpu_after = time.process_time()
        self.calls.append(Call(t0, time.perf_counter() - start, cpu_after - cpu, cpu_after, result))
        return result

    def method(self):
        timed = self

        def call(*args, **kwargs):
            return timed(*args, **kwargs)
        return call


def windows(values: list[float]) -> dict:
    """The median of the first and of the last 10% of ``values`` (at least one each), their ratio,
    and the median of each tenth (where the growth happens)."""
    if not values:
        return {"n": 0, "first": None, "last": None, "last_over_first": None, "tenths": []}
    k = max(1, len(values) // 10)
    first, last = statistics.median(values[:k]), statistics.median(values[-k:])
    tenths = [statistics.median(values[i * k:(i + 1) * k]) for i in range(10)] if len(values) >= 10 else []
    return {"n": len(values), "first": first, "last": last, "last_over_first": last / first if first > 0 else None,
            "tenths": tenths}


def read_timings(timings: str) -> list[dict]:
    """Every trial's start and end, by start."""
    rows = [json.loads(line) for f in Path(timings).glob("*.jsonl") for line in f.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["start"])


def slot_gaps(trials: list[dict], slots: int) -> list[float]:
    """For each trial after the first ``slots`` (by start): its start minus the end of the trial whose
    slot it took, the earliest end not yet taken."""
    ends = sorted(t["end"] for t in trials)
    gaps, taken = [], 0
    for t in trials[slots:]:
        if taken < len(ends) and ends[taken] <= t["start"]:
            gaps.append(t["start"] - ends[taken])
            taken += 1
    return gaps


class LineCounts:
    """The lines of Python the driver's main thread runs between the suggestions that make trials,
    over the first and the last 10% of ``trials`` (``driver_cpu_per_trial``'s windows), by library:
    the driver's work per trial, which the machine's speed does not move (its time, it does). A loop
    counts a line per turn; what C code does inside one line (a JSON encoding, a sort) counts once."""

    def __init__(self, trials: int, slots: int):
        k = max(1, (trials - slots + 1) // 10)
        self.windows = {"first": (slots - 1, slots - 1 + k), "last": (trials - 1 - k, trials - 1)}
        self.lines = {name: collections.Counter() for name in self.windows}
        self.made, self.window = 0, None
        self._library: dict = {}   # code object -> its library
        self._tracers: dict = {}   # library -> the tracer counting its lines in the open window

    def wrap(self, suggest):
        """``suggest``, each trial it makes counted: a window starts and ends just after one."""
        def call(*args, **kwargs):
            result = suggest(*args, **kwargs)
            if isinstance(result, dict):
                for name, (first, last) in self.windows.items():
                    if self.made == first:
                        self.window, self._tracers = name, {}
                        sys.settrace(self._call)
                    elif self.made == last:
                        self.stop()
                self.made += 1
            return result
        return call

    def stop(self) -> None:
        sys.settrace(None)
        self.window = None

    def _call(self, frame, event, arg):
        code = frame.f_code
        library = self._library.get(code) or self._library.setdefault(code, self.library(code.co_filename))
        tracer = self._tracers.get(library)
        if tracer is None:
            lines = self.lines[self.window]

            def tracer(frame, event, arg):
                if event == "line":
                    lines[library] += 1
                return tracer
            self._tracers[library] = tracer
        return tracer

    @staticmethod
    def library(filename: str) -> str:
        """Whose code ``filename`` is: a package under site-packages (Ray's Tune, Train and AIR as
        ``ray.tune``), newllm, this benchmark, or Python's own modules."""
        path = filename.replace(os.sep, "/")
        if "/site-packages/" in path:
            parts = path.split("/site-packages/")[-1].split("/")
            if parts[:2] in (["ray", "tune"], ["ray", "train"], ["ray", "air"]):
                return "ray.tune"
            return parts[0].removesuffix(".py")
        return next((name for name in ("newllm", "benchmarks") if f"/{name}/" in path), "python")

    def per_trial(self) -> dict:
        """Lines per trial in each window, by library and in all, with last / first."""
        counts: dict[str, dict[str, float]] = {}
        for name, lines in self.lines.items():
            first, last = self.windows[name]
            trials = max(1, min(last, self.made - 1) - first)
            for library, n in [*lines.items(), ("all", sum(lines.values()))]:
                counts.setdefault(library, {"first": 0.0, "last": 0.0})[name] = n / trials
        return {library: {**c, "last_over_first": c["last"] / c["first"] if c["first"] else None}
                for library, c in sorted(counts.items(), key=lambda kv: -kv[1]["last"])}


def driver_cpu_per_trial(suggests: list[Call], slots: int) -> dict:
    """The driver's CPU seconds per trial made, over the first and the last 10% of trials (between
    the suggest calls that made them), the first wave (``slots`` trials made at once) left out."""
    cpu = [c.cpu_after for c in suggests if isinstance(c.result, dict)][slots - 1:]
    k = max(1, len(cpu) // 10)
    if len(cpu) < 2 * k + 1:
        return {"first": None, "last": None, "last_over_first": None, "tenths": []}
    first, last = (cpu[k] - cpu[0]) / k, (cpu[-1] - cpu[-1 - k]) / k
    return {"first": first, "last": last, "last_over_first": last / first if first > 0 else None,
            "tenths": [(cpu[(i + 1) * k] - cpu[i * k]) / k for i in range(10) if (i + 1) * k < len(cpu)]}


def measured_search(run: SearchRun, space, data, slots: int, timings: str, count_lines: bool = False) -> dict:
    """``run_search(run)`` with its suggest calls, compaction and pruning timed (and with
    ``count_lines``, the driver's lines of Python counted), then the summary and report as the command makes
    them; every figure of one mode but the goals."""
    suggest = Timed(KindSearch.suggest)
    counts = LineCounts(run.num_trials, slots) if count_lines else None
    compaction = Timed(ParquetResults.on_experiment_end)
    prune = Timed(algorithms.prune_checkpoints)
    record_space(run.exp_dir, space)
    record_floors(run.exp_dir, floors(data.train_ids, data.val_ids, data.vocab_size))
    with mock.patch.object(KindSearch, "suggest", counts.wrap(suggest.method()) if counts else suggest.method()), \
            mock.patch.object(ParquetResults, "on_experiment_end", compaction.method()), \
            mock.patch.object(algorithms, "prune_checkpoints", prune):
        t0 = time.time()
        finished = run_search(run)
        search_end = time.time()
    if counts:
        counts.stop()  # (a search that made fewer trials than asked ends inside a window)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        cli.print_summary(run.exp_dir, space)
    summary_s = time.perf_counter() - t
    t = time.perf_counter()
    write_report(run.exp_dir, distributions=space.params)
    report_s = time.perf_counter() - t

    trials = read_timings(timings)
    last_end = max(t["end"] for t in trials)
    compute = sum(t["end"] - t["start"] for t in trials)
    table, _ = load(run.exp_dir)
    made = [c for c in suggest.calls if isinstance(c.result, dict)]
    state = list(Path(run.exp_dir).glob("experiment_state-*.json"))
    return {
        "finished": finished, "trials": len(trials), "slots": slots,
        "statuses": {k: int(v) for k, v in table.status.value_counts().items()},
        "stopped_by_asha": int((table.get("phase2_stop_reason") == "scheduler").sum()),
        "wall_s": search_end - t0, "compute_over_slots_s": compute / slots,
        "trial_s_median": statistics.median(t["end"] - t["start"] for t in trials),
        # (the trials' own time by tenth: the driver's CPU per trial rises and falls with it, as the
        # machine's speed moves both)
        "trial_s": windows([t["end"] - t["start"] for t in trials]),
        "first_start_s": trials[0]["start"] - t0, "trials_span_s": last_end - trials[0]["start"],
        "per_trial_overhead_s": windows(slot_gaps(trials, slots)),
        "driver_cpu_per_trial_s": driver_cpu_per_trial(suggest.calls, slots),
        "suggest_s": windows([c.seconds for c in made]),
        # (the suggestion's share of the driver's CPU per trial: TPE's window fills over the first
        # TPE_WINDOW trials, and each trial in it is read at every suggestion)
        "suggest_cpu_s": windows([c.cpu_s for c in made]),
        "end_of_search": {"after_last_trial_s": search_end - last_end,
                          "compaction_s": sum(c.seconds for c in compaction.calls), "prune_s": sum(c.seconds for c in prune.calls),
                          "summary_s": summary_s, "report_s": report_s,
                          "total_s": search_end - last_end + summary_s + report_s},
        "tune_state_bytes": sum(p.stat().st_size for p in state),
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **({"driver_lines_per_trial": counts.per_trial()} if counts else {}),
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_space(root: str) -> str:
    """The tiny space and its corpus (JSON lines) written under ``root``; the space's path."""
    corpus = Path(root, "tiny.jsonl")
    corpus.write_text("".join(json.dumps({"text": d[:TINY_CHARS]}) + "\n" for d in builtin_documents()[:TINY_DOCS]))
    Path(root, "tiny.yaml").write_text(TINY_SPACE.replace("{corpus}", str(corpus)))
    return f"{root}/tiny.yaml"


def slots_of(args) -> int:
    """Trials at once: one per CPU of this machine (real), every logical CPU of the worker nodes (replay)."""
    return os.cpu_count() if args.mode == "real" else args.nodes * args.cpus_per_node


def run_mode(args, root: str) -> dict:
    """One mode's search in ``root`` (this process its driver): its figures."""
    space_path = write_tiny_space(root)
    space = load_space(space_path)
    data = prepare_data(DataConfig(**space.data))
    timings = f"{root}/timings"
    os.makedirs(timings)
    name = f"many-{args.mode}"
    storage = f"{root}/results"
    base = {"name": name, "storage_root": storage, "space": space, "data": data, "num_trials": args.trials,
            "optuna_storage": optuna_storage(None, name, f"{storage}/{name}")}
    if args.mode == "real":
        slots = slots_of(args)
        print(f"real: {args.trials} trials of the tiny space on a local Ray of {slots} CPUs", flush=True)
        ray.init(address="local", num_cpus=slots, include_dashboard=False, log_to_driver=False)
        try:
            trainable = tune.with_parameters(real_trial, space=space, data=data, timings=timings)
            out = measured_search(SearchRun(**base, concurrency=slots, trainable=trainable), space, data, slots,
                                  timings, args.count_lines)
        finally:
            ray.shutdown()
        return {"mode": "real", **out}

    from ray.cluster_utils import Cluster

    recording = recording_of(space_path, args.recording)
    slots = slots_of(args)
    trial_s = recording["seconds"] * args.time_scale
    print(f"replay: {args.trials} trials on {args.nodes} nodes x {args.cpus_per_node} CPUs ({slots} slots); the "
          f"recorded trial: {len(recording['steps'])} rows in {recording['seconds']:.2f} s, replayed in "
          f"{trial_s:.2f} s", flush=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "dashboard_agent_listen_port": free_port()})
    try:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=args.cpus_per_node)  # (its agent on a port of its own)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        # a SIGTERM (as from timeout) is a Ctrl+C: Tune stops the search, then the finally below ends
        # the cluster (a SystemExit raised inside Tune's loop left the driver hung, the cluster half down)
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
        trainable = tune.with_parameters(replay_trial, recording=recording, metrics=space.metrics,
                                         time_scale=args.time_scale, timings=timings)
        out = measured_search(SearchRun(**base, concurrency=slots, trainable=trainable), space, data, slots,
                              timings, args.count_lines)
    finally:
        ray.shutdown()
        cluster.shutdown()
    ideal = args.trials * trial_s / slots
    return {"mode": "replay", "nodes": args.nodes, "cpus_per_node": args.cpus_per_node, "time_scale": args.time_scale,
            "recorded_trial_s": recording["seconds"], "recorded_rows": len(recording["steps"]),
            "ideal_s": ideal, **out, "wall_over_ideal": out["wall_s"] / ideal,
            "span_over_ideal": out["trials_span_s"] / ideal}


def goals(out: dict) -> dict:
    """Which of the issue's goals the figures of one mode meet."""
    met = {}
    for name in ("per_trial_overhead_s", "driver_cpu_per_trial_s"):
        ratio = out[name]["last_over_first"]
        met[f"{name.removesuffix('_s')}_last_over_first_le_{GOALS['overhead_last_over_first']}"] = \
            ratio is not None and ratio <= GOALS["overhead_last_over_first"]
    if out["mode"] == "replay":
        met[f"wall_over_ideal_le_{GOALS['wall_over_ideal']}"] = out["wall_over_ideal"] <= GOALS["wall_over_ideal"]
        met[f"driver_rss_le_{GOALS['driver_rss_gib']}_gib"] = out["driver_peak_rss_bytes"] <= GOALS["driver_rss_gib"] * 2**30
        met[f"tune_state_le_{GOALS['tune_state_mb']:g}_mb"] = out["tune_state_bytes"] <= GOALS["tune_state_mb"] * 1e6
    return met


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def print_figures(out: dict) -> None:
    o, e = out, out["end_of_search"]
    print(f"{o['mode']}: {o['trials']} trials on {o['slots']} slots in {o['wall_s']:.1f} s; trial compute / slots "
          f"{o['compute_over_slots_s']:.1f} s" + (f"; ideal {o['ideal_s']:.1f} s (wall / ideal {o['wall_over_ideal']:.3f})"
                                                  if "ideal_s" in o else ""))
    for name in ("trial_s", "per_trial_overhead_s", "driver_cpu_per_trial_s", "suggest_s", "suggest_cpu_s"):
        w = o[name]
        if w["first"] is not None:
            print(f"  {name}: first 10% {w['first'] * 1e3:.1f} ms, last 10% {w['last'] * 1e3:.1f} ms"
                  + (f" (last / first {w['last_over_first']:.2f})" if w["last_over_first"] is not None else "")
                  + (f"; by tenth of the trials: {' '.join(f'{v * 1e3:.1f}' for v in w['tenths'])} ms" if w["tenths"] else ""))
    print(f"  end of search {e['total_s']:.1f} s: {e['after_last_trial_s']:.1f} s from the last trial's end to "
          f"run_search's return (compaction {e['compaction_s']:.1f} s, pruning {e['prune_s']:.1f} s), summary "
          f"{e['summary_s']:.1f} s, report {e['report_s']:.1f} s")
    print(f"  Tune state {o['tune_state_bytes'] / 1e6:.2f} MB; driver peak RSS {o['driver_peak_rss_bytes'] / 2**30:.2f} GiB; "
          f"statuses {o['statuses']}; goals {o['goals']}", flush=True)
    if "driver_lines_per_trial" in o:
        print("  driver's lines of Python per trial (main thread, traced: this run's CPU figures are not a plain run's), "
              "first 10% -> last 10%: " + "; ".join(
                  f"{library} {c['first']:,.0f} -> {c['last']:,.0f}"
                  + (f" ({c['last_over_first']:.2f})" if c["last_over_first"] is not None else "")
                  for library, c in o["driver_lines_per_trial"].items()), flush=True)


def child(args, mode: str) -> dict:
    """Run ``mode`` in a driver process of its own (its own peak RSS); its progress passes through."""
    argv = [sys.executable, __file__, "--mode", mode, "--nodes", str(args.nodes), "--cpus-per-node",
            str(args.cpus_per_node), "--time-scale", str(args.time_scale)]
    argv += ["--trials", str(args.trials)] if args.trials else []
    argv += ["--recording", args.recording] if args.recording else []
    argv += ["--count-lines"] if args.count_lines else []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as p:
        last = ""
        for line in p.stdout:
            sys.stdout.write(line)
            last = line
    if p.returncode:
        raise SystemExit(f"{mode} failed (exit code {p.returncode})")
    return json.loads(last)[mode]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("real", "replay", "both"), default="both")
    p.add_argument("--trials", type=int, help=f"trials (default: {DEFAULT_TRIALS['real']:,} real, "
                                              f"{DEFAULT_TRIALS['replay']:,} replay)")
    p.add_argument("--nodes", type=int, default=4, help="replay: worker nodes (default: %(default)s)")
    p.add_argument("--cpus-per-node", type=int, default=8, help="replay: logical CPUs of each (default: %(default)s)")
    p.add_argument("--time-scale", type=float, default=8.0,
                   help="replay: multiplier on the recorded times (default: %(default)s: a tiny trial of 0.5 to "
                        "1.7 s, as fast as the machine runs it, lasts 4 to 13 s, so that 32 slots end 2.4 to 8 "
                        "trials a second, which one driver and the cluster's processes on 2 cores keep up with)")
    p.add_argument("--recording", help="replay: the recorded trial's file (read if it exists, else written)")
    p.add_argument("--count-lines", action="store_true",
                   help="count the lines of Python the driver runs per trial over the first and last 10%% of "
                        "trials, by library (a tracer: it slows those tenths)")
    args = p.parse_args()
    if args.trials is not None and args.trials < 1:
        p.error(f"--trials must be at least 1, not {args.trials}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    if args.mode == "both":
        results = {mode: child(args, mode) for mode in ("real", "replay")}
    else:
        args.trials = args.trials or DEFAULT_TRIALS[args.mode]
        if args.count_lines and args.trials < slots_of(args) + 2:
            # (its first and last 10% of the trials after the first wave must not overlap)
            p.error(f"--count-lines needs at least {slots_of(args) + 2} trials on {slots_of(args)} slots, "
                    f"not {args.trials}: give a larger --trials")
        with tempfile.TemporaryDirectory() as root:
            out = run_mode(args, root)
            shutil.rmtree(f"{root}/results", ignore_errors=True)
        out["goals"] = goals(out)
        print_figures(out)
        results = {args.mode: rounded(out)}
    print(json.dumps({"benchmark": "many_trials", **results,
                      "goals_met": all(all(r["goals"].values()) for r in results.values()), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
