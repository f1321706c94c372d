"""``python -m newllm.search``: a Ray Tune + Optuna search over New-LLM configurations, and
with ``--baselines`` over LSTM, GRU and transformer baselines at matched sizes.

Everything is checked before anything starts (exit code 2, nothing written): options, the
search-space file, the data. Data is prepared once here in the driver and shared with the
trials through Ray's object store. Each finished trial lands in
``<storage>/<name>/trials.parquet`` and every reported row in ``iterations.parquet``.
Run it locally, or inside ``ray job submit`` where it attaches to the cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import os
import pickle
import posixpath
import re
import shlex
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from newllm import __version__
from newllm.analyze import comparison_line, gate_saving_line, write_report
from newllm.figures import fmt
from newllm.config import (
    BASELINE_ARCHITECTURES,
    add_data_arguments,
    data_config_from_args,
    data_flags,
    family_fields,
    field_types,
)
from newllm.data import DataConfig, TokenData, prepare_data
from newllm.floors import floors, floors_line, record_floors, recorded_floors
from newllm.lock import LOCK_FILE, ExperimentHeld, ExperimentLock
from newllm.results import TRIALS_FILE, PartsTable, best_newllm_trial, checkpoint_dir, filesystem, load
from newllm.run import REPLICATE_DTYPES, SUMMARY_DTYPES
from newllm.space import (
    MATCHED,
    SPACE_FILE,
    Baselines,
    SearchSpace,
    builtin_spaces,
    load_space,
    record_space,
    recorded_space,
    resolve_space,
)
from newllm.storage import (
    check_optuna_storage,
    check_storage_path,
    existing_studies,
    fail_left_running,
    open_storage,
    optuna_storage,
    repair_journal,
    storage_root,
    storage_warning,
)

PROGRESS_SECONDS = 10.0
# an experiment name is one directory name that every file system and object store takes
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
RESOURCE_POLL_SECONDS = 1.0
ADDRESS_TIMEOUT_SECONDS = 10.0
# ASHA's rungs, in Phase 2 epochs: the first after 1 epoch, then every ASHA_REDUCTION times more;
# at each rung a trial continues only if its best val perplexity is in the best 1/ASHA_REDUCTION
# of the trials that reached it
ASHA_GRACE_EPOCHS = 1
ASHA_REDUCTION = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m newllm.search",
        description="Ray Tune + Optuna search over New-LLM configurations (Phase 1 CVFP, gate, Phase 2).",
    )
    p.add_argument("--space", help=f"search-space YAML, or a built-in space: {', '.join(builtin_spaces())} "
                                   f"(default: laptop; with --resume, the experiment's own)")
    p.add_argument("--num-trials", type=int, help="trials to run (default: the space's num_trials)")
    p.add_argument("--concurrency", type=int, help="trials at once (default: CPUs / --cpus-per-trial)")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs (= torch threads) per trial (default: %(default)s)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractions allowed (default: %(default)s)")
    p.add_argument("--name", help="experiment name (default: <space>-<time>; needed with --resume)")
    p.add_argument("--storage-path", default="results",
                   help="experiment root: a local directory, a shared mount, or s3:// / gs:// (default: %(default)s)")
    p.add_argument("--address", help="Ray cluster to attach to (default: RAY_ADDRESS, as inside ray job submit; else a local Ray)")
    p.add_argument("--local", action="store_true", help="laptop CPU mode: a local Ray sized to this machine, ignoring RAY_ADDRESS")
    p.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler and of every trial (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the experiment --name after an interruption")
    p.add_argument("--optuna-storage",
                   help="the Optuna study's storage: a journal file, or an RDB URL (sqlite:///..., postgresql://...) "
                        "(default: optuna.journal in the experiment directory; beside the driver when that is on "
                        "s3:// or gs://)")
    p.add_argument("--scheduler", choices=["asha", "none"],
                   help="asha: stop a passing trial's Phase 2 when its val perplexity is clearly worse than other "
                        "trials' at the same epoch; none: every trial runs Phase 2 to its own end "
                        "(default: asha; none with --repeats > 1)")
    p.add_argument("--baselines", action="store_true",
                   help="also train LSTM, GRU and transformer baselines, one of each per New-LLM trial at its "
                        "non-embedding parameter count (within 10%%), each architecture's learning rate from its "
                        "own study (default: when the space has a baselines section)")
    p.add_argument("--resource-wait", type=float, default=0.0, metavar="SECONDS",
                   help="on a cluster whose nodes may still join (an autoscaler): wait this long for a node "
                        "that fits one trial's CPUs and GPUs before giving up (default: %(default)s, give up at "
                        "once)")
    p.add_argument("--repeats", type=int,
                   help="runs of each sampled configuration, seeds seed, seed + 1, ...: Optuna gets their mean "
                        "objective (default: the space's repeats, else 1)")
    add_data_arguments(p, defaults=False)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first option that cannot be right, whatever else is given."""
    for name in ("num_trials", "concurrency", "cpus_per_trial", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("gpus_per_trial", "resource_wait"):
        value = getattr(args, name)
        if not 0 <= value < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not 0 <= args.seed <= SEED_MAX:
        raise ValueError(f"--seed must be in [0, {SEED_MAX}], got {args.seed}")
    if args.resume and not args.name:
        raise ValueError("--resume needs --name: the experiment to continue")
    if args.name is not None:
        check_name(args.name)
    if args.local and args.address:
        raise ValueError("--local starts its own Ray; it cannot go with --address")
    check_storage_path(args.storage_path)


def check_name(name: str) -> None:
    """ValueError unless ``name`` is a safe experiment name: one path component."""
    if not (NAME_PATTERN.fullmatch(name) and len(name) <= NAME_MAX):
        raise ValueError(f"--name {name!r} is not an experiment name: use letters, digits, '.', '_' and '-', "
                         f"starting with a letter or digit, at most {NAME_MAX} characters (it names a directory)")


def default_name(space: str) -> str:
    """``<space file stem>-<time>``, with the stem's unsafe characters replaced."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(space).stem).lstrip("._-")[:NAME_MAX - 16] or "search"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def experiment_dir(args: argparse.Namespace) -> str:
    return f"{storage_root(args.storage_path).rstrip('/')}/{args.name}"


# --- rows and reports ---------------------------------------------------------------------


def versions() -> dict:
    import optuna
    import ray
    import torch

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
    New-LLM trial it was sized to. ``checkpoint_path`` is relative to the experiment directory
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
                "checkpoint_path": None if checkpoint is None else self.relative(checkpoint.path), **self.versions}

    def relative(self, path: str) -> str:
        """A checkpoint's path (on its file system) relative to the experiment directory."""
        return posixpath.relpath(path, filesystem(self.experiment)[1])

    @staticmethod
    def dtypes() -> dict[str, str]:
        return {"trial_id": "string", **SUMMARY_DTYPES, **REPLICATE_DTYPES, "trial_seconds": "float64", "node_id": "string",
                "hostname": "string", "node_ids": "string", "attempts": "Int64", "phase1_restored": "boolean",
                "checkpoint_path": "string", **{name: CONFIG_DTYPES[t] for name, t in field_types().items()},
                MATCHED: "string"}


class Progress(Callback):
    """A status line every PROGRESS_SECONDS and at each finished trial: counts, best, running trials."""

    def __init__(self, total: int):
        self.total = total
        self.start, self.last_print = time.monotonic(), 0.0
        self.latest: dict[str, dict] = {}
        self.finished: dict[str, str] = {}
        self.stopped: set[str] = set()  # passed trials whose Phase 2 ASHA stopped
        self.best: dict[str, tuple[float, str]] = {}  # family -> (objective, who) of its best passed trial

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.latest[trial.trial_id] = result
        if time.monotonic() - self.last_print >= PROGRESS_SECONDS:
            self.print_line()

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = outcome(trial.last_result or {}) or {"status": "error"}
        self.finished[trial.trial_id] = result["status"]
        if result.get("phase2_stop_reason") == "scheduler":
            self.stopped.add(trial.trial_id)
        self.latest.pop(trial.trial_id, None)
        family = result.get("family") or NEWLLM
        if result["status"] == "passed" and (family not in self.best or result["objective"] < self.best[family][0]):
            who = trial.trial_id if family == NEWLLM else f"{trial.config.get('architecture')} {trial.trial_id}"
            self.best[family] = (result["objective"], who)
        self.print_line()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished[trial.trial_id] = "error"
        self.latest.pop(trial.trial_id, None)
        print(f"Trial {trial.trial_id} failed: {failure_line(trial)}", flush=True)
        self.print_line()

    def print_line(self):
        self.last_print = time.monotonic()
        counts: dict[str, int] = {}
        for s in self.finished.values():
            counts[s] = counts.get(s, 0) + 1
        done = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        if self.stopped:
            done += f"; Phase 2 of {len(self.stopped)} stopped early by ASHA"
        best = f"best val_ppl {self.best[NEWLLM][0]:.2f} ({self.best[NEWLLM][1]})" if NEWLLM in self.best \
            else "no passed New-LLM trial yet"
        if "baseline" in self.best:
            best += f" | best baseline {self.best['baseline'][0]:.2f} ({self.best['baseline'][1]})"
        print(f"[{time.monotonic() - self.start:6.0f}s] {len(self.finished)}/{self.total} finished"
              f"{' (' + done + ')' if done else ''} | {best}", flush=True)
        for tid, r in self.latest.items():
            print(f"          {tid}: {_describe(r)}", flush=True)


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


def print_summary(directory: str, space: SearchSpace) -> None:
    """The end-of-search table, best configuration and the gate's saving, from trials.parquet."""
    import pandas as pd

    trials, _ = load(directory)
    searched = list(space.params)
    family = trials.family if "family" in trials else pd.Series(NEWLLM, index=trials.index)
    cols = ["trial_id", "status", *searched, "phase1_passes", "train_effective_rank_fraction", "phase2_epochs_run",
            "val_ppl", "objective"]
    if space.baselines is not None:  # the baselines' own columns, after their architecture
        cols = [*cols[:2], "architecture", *cols[2:], "num_params_non_embedding", *space.baselines.params]
        cols = list(dict.fromkeys(cols))
    table = trials.sort_values("objective")[[c for c in cols if c in trials]]
    with pd.option_context("display.max_columns", 50, "display.width", 200, "display.float_format", "{:.4g}".format):
        print("\n" + table.to_string(index=False))
    print(f"\n{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in trials.status.value_counts().items()))
    best = best_newllm_trial(trials)
    if best is not None:
        print(f"Best New-LLM trial {best.trial_id}: val_ppl {best.val_ppl:.2f}, val_acc {best.val_acc:.1%}, "
              f"{int(best.num_params):,} parameters")
        if best.replicates > 1:
            spread = f" ± {best.val_ppl_std:.2f}" if pd.notna(best.val_ppl_std) else ""
            print(f"  over its {best.replicates} replicates (seeds): objective {best.objective:.2f}, val_ppl "
                  f"{best.val_ppl_mean:.2f}{spread} over the {best.replicates_passed} that passed; the figures "
                  f"above are replicate 0's, the saved model's")
        print("Best configuration: " + ", ".join(f"{k}={fmt(best[k])}" for k in searched))

    else:
        print("No New-LLM trial passed the gate: no best configuration.")
    stopped = trials[trials.phase2_stop_reason == "scheduler"]
    if len(stopped):
        of = f" ({', '.join(f'{n} {f}' for f, n in family[stopped.index].value_counts().items())})" \
            if space.baselines is not None else ""
        print(f"ASHA stopped Phase 2 of {len(stopped)} passed trials early{of}, after "
              f"{int(stopped.phase2_epochs_run.sum())} epochs in all; their val_ppl is their best epoch's, which "
              f"their checkpoints hold")
    print(gate_saving_line(trials))
    comparison = comparison_line(trials)
    if comparison:
        print(comparison)
    if floor_values := recorded_floors(directory):
        print(floors_line(floor_values))
    print(f"Results: {directory}/trials.parquet, {directory}/iterations.parquet "
          f"(newllm.results.load({directory!r}))")


# --- main ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """A search that passed every check: what it runs, on what data, and where it keeps things."""

    space: SearchSpace
    data_cfg: DataConfig
    data: TokenData
    exp_dir: str
    storage: str  # the Optuna storage (``storage.optuna_storage``)
    num_trials: int


def plan_search(args: argparse.Namespace) -> Plan:
    """Check every option, the space, the experiment and the storages, and prepare the data;
    ValueError (or ExperimentHeld) names what is wrong. Writes nothing but the tokenizer cache."""
    check_args(args)
    args.name = args.name or default_name(resolve_space(args.space or "laptop"))
    from ray import tune

    exp_dir = experiment_dir(args)
    ExperimentLock(exp_dir).check_free()
    exists = tune.Tuner.can_restore(exp_dir)
    # a driver killed before Tune saved any state leaves only the recorded space: resume starts it anew
    started = exists or recorded_space(exp_dir) is not None
    if args.resume and not started:
        raise ValueError(f"--resume: no experiment to continue at {exp_dir}")
    if not args.resume and (exists or has_content(exp_dir)):
        raise ValueError(f"experiment {exp_dir} exists: pass --resume to continue it, or choose another --name")
    if args.resume:
        with contextlib.suppress(FileNotFoundError):  # (no row reported yet)
            load(exp_dir)  # every part file readable (ValueError naming a damaged one) before Tune appends
    space = recorded_space(exp_dir) if args.resume else None
    given = ["--space"] * (args.space is not None) + ["--repeats"] * (args.repeats is not None) + \
        data_flags_given(args)
    if space is None:  # a new search
        space = space_from_args(args)
    elif given and (diff := space_differences(space, space_from_args(args))):
        raise ValueError(f"--resume continues with {exp_dir}/{SPACE_FILE}, the space this experiment recorded, "
                         f"but {', '.join(given)} give another ({', '.join(diff)} differ): drop them")
    if args.baselines and space.baselines is None:
        if args.resume:
            raise ValueError("--resume continues the experiment as it was recorded: --baselines cannot add "
                             "baselines to it")
        space = dataclasses.replace(space, baselines=Baselines())
    if args.scheduler == "asha" and space.repeats > 1:
        raise ValueError(f"--scheduler asha compares one run per trial at each Phase 2 epoch, but each trial "
                         f"runs {space.repeats} (repeats): use --scheduler none")
    data_cfg = DataConfig(**space.data)
    storage = optuna_storage(args.optuna_storage, args.name, exp_dir)
    check_optuna_storage(storage, given=args.optuna_storage is not None)
    existing = existing_studies(storage)
    names = study_names(args.name, space).values()
    taken = [s for s in names if s in existing]
    if not args.resume and taken:
        raise ValueError(f"the Optuna storage {storage} already holds a study named {taken[0]!r}: choose "
                         f"another --name, or another --optuna-storage")
    if args.resume and exists and (missing := [s for s in names if s not in existing]):
        raise ValueError(f"the Optuna storage {storage} holds no study named {missing[0]!r}: pass the "
                         f"--optuna-storage that the search started with")
    if not args.local:
        check_address(args.address or os.environ.get("RAY_ADDRESS"))
    data = prepare_data(data_cfg)
    space.check_baselines(data.vocab_size)
    return Plan(space, data_cfg, data, exp_dir, storage, args.num_trials or space.num_trials)


def has_content(exp_dir: str) -> bool:
    """Whether a local experiment directory holds anything but a driver's claim."""
    return "://" not in exp_dir and Path(exp_dir).is_dir() and any(
        p.name != LOCK_FILE for p in Path(exp_dir).iterdir())


def check_address(address: str | None) -> None:
    """ValueError when ``--address`` (or RAY_ADDRESS) names a host:port where nothing listens:
    ray.init would wait minutes for it."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()):
        raise ValueError(f"Ray address {address!r} is not host:port (e.g. 127.0.0.1:6379), auto or ray://...")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_SECONDS).close()
    except OSError as e:
        raise ValueError(f"no Ray cluster answers at {address} ({e.strerror or e}): start it with ray start "
                         f"--head, or give the address it printed") from None


def start_ray(args: argparse.Namespace) -> None:
    """Attach to the cluster, or start a local Ray (``--local``, or no cluster given)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # checkpoints after Phase 1 and at improving Phase 2 epochs trip Tune's snapshot-rate warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if args.local:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    elif args.address:
        ray.init(address=args.address, log_to_driver=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def check_resources(args: argparse.Namespace) -> None:
    """ValueError when no node of the cluster fits one trial's CPUs and GPUs: the search would
    wait forever. With ``--resource-wait`` (a cluster whose autoscaler may add nodes) wait that
    long for one first."""
    import ray

    need = {k: v for k, v in (("CPU", args.cpus_per_trial), ("GPU", args.gpus_per_trial)) if v > 0}

    def fits() -> bool:
        return any(n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in need.items()) for n in ray.nodes())

    if fits():
        return
    largest = max((n["Resources"] for n in ray.nodes() if n["Alive"]), key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)),
                  default={})
    message = (f"no node of the Ray cluster fits one trial's {args.cpus_per_trial} CPU(s) and "
               f"{args.gpus_per_trial:g} GPU(s): its largest has {largest.get('CPU', 0):g} CPUs and "
               f"{largest.get('GPU', 0):g} GPUs; lower --cpus-per-trial / --gpus-per-trial")
    if args.local or args.resource_wait <= 0:
        raise ValueError(message + ("" if args.local else ", or give --resource-wait SECONDS if nodes may join"))
    print(f"Waiting up to {args.resource_wait:g} s for a node with {args.cpus_per_trial} CPU(s) and "
          f"{args.gpus_per_trial:g} GPU(s) to join the cluster...", flush=True)
    deadline = time.monotonic() + args.resource_wait
    while time.monotonic() < deadline:
        time.sleep(RESOURCE_POLL_SECONDS)  # polling the cluster's node list: nothing to wait on
        if fits():
            return
    raise ValueError(f"{message} (none joined in {args.resource_wait:g} s)")


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this search."""
    words = ["python -m newllm.search --resume --name", args.name, "--storage-path", args.storage_path]
    if args.optuna_storage:
        words += ["--optuna-storage", args.optuna_storage]
    if args.local:
        words.append("--local")
    return " ".join(w if w.startswith("python") or w.startswith("--") else shlex.quote(w) for w in words)


def fault_line(error: OSError, exp_dir: str) -> str:
    """An I/O error in one line, naming its path (else the experiment's, where the search writes)."""
    what = error.strerror or " ".join(str(error).split())
    return f"{error.filename}: {what}" if error.filename else f"{what} (writing to {exp_dir})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return checked_main(args)
    except KeyboardInterrupt:  # before the search started, or while it printed its summary
        print("interrupted", file=sys.stderr)
        return 130


def checked_main(args: argparse.Namespace) -> int:
    """The search of ``args``: its checks, then the search on the experiment it claims."""
    try:
        plan = plan_search(args)
    except (ValueError, FileNotFoundError, ExperimentHeld) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    space, data, exp_dir, storage = plan.space, plan.data, plan.exp_dir, plan.storage
    print(f"newllm {__version__} search '{args.name}': {plan.num_trials} trials of {space.path} "
          f"({', '.join(space.params)}), objectives {space.objectives}")
    if space.baselines is not None:
        print(baselines_line(space, plan.num_trials))
    print(f"Data: {plan.data_cfg.source}, {len(data.train_ids):,} train / {len(data.val_ids):,} val tokens, "
          f"vocab {data.vocab_size}")
    data_floors = floors(data.train_ids, data.val_ids, data.vocab_size)
    print(floors_line(data_floors))

    import ray

    start_ray(args)
    lock = ExperimentLock(exp_dir)
    try:
        check_resources(args)
        lock.acquire()
        if not args.resume and has_content(exp_dir):  # another driver ran it since plan_search looked
            raise ValueError(f"experiment {exp_dir} exists: pass --resume to continue it, or choose another --name")
    except (ValueError, ExperimentHeld) as e:
        lock.release()
        ray.shutdown()
        print(f"error: {e}", file=sys.stderr)
        return 2
    resume = f"what had landed is kept; continue with: {resume_command(args)}"
    try:
        return run_claimed(args, plan, data_floors)
    except KeyboardInterrupt:
        print(f"interrupted: {resume}", file=sys.stderr)
        return 130
    except OSError as e:
        # the trials still in flight are abandoned: Ray would print each one's error as unhandled
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        print(f"error: {fault_line(e, plan.exp_dir)}; {resume}", file=sys.stderr)
        return 1
    finally:
        lock.release()


def run_claimed(args: argparse.Namespace, plan: Plan, data_floors: dict) -> int:
    """The search, on an experiment this driver holds: 0 when every trial finished, 130 when it
    was interrupted."""
    import ray

    space, exp_dir, storage = plan.space, plan.exp_dir, plan.storage
    warning = storage_warning(storage_root(args.storage_path), sum(n["Alive"] for n in ray.nodes()))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrency = args.concurrency or max(1, cpus // args.cpus_per_trial)
    print(f"Ray: {cpus} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; {concurrency} trials at once, "
          f"{args.cpus_per_trial} CPU(s) and {args.gpus_per_trial:g} GPU(s) each\nExperiment: {exp_dir}")
    print(f"Optuna study '{args.name}' in {storage}: watch it with optuna-dashboard {storage}\n", flush=True)
    if "://" not in storage and (aside := repair_journal(storage)):
        print(f"Repaired the Optuna journal {storage}: its last record was cut off mid-write and is kept in "
              f"{aside}", flush=True)
    if not args.resume:
        record_space(exp_dir, space)
    if not args.resume or recorded_floors(exp_dir) is None:
        record_floors(exp_dir, data_floors)
    if not run_search(args, space, plan.data, plan.num_trials, concurrency, exp_dir, storage=storage):
        print(f"interrupted: the search stopped after saving its state; what had landed is kept; continue "
              f"with: {resume_command(args)}", file=sys.stderr)
        return 130
    print_summary(exp_dir, space)
    print(f"Report: {write_report(exp_dir, distributions=space.params)}")
    return 0


def baselines_line(space: SearchSpace, num_trials: int) -> str:
    """What the baselines of a search are, and which of its settings they ignore."""
    b = space.baselines
    ignored = sorted(k for k in (*space.params, *space.fixed) if k not in family_fields("baseline"))
    return (f"Baselines: {num_trials} trials each of {', '.join(b.architectures)}, one per New-LLM trial at its "
            f"non-embedding parameter count (within 10%), each architecture searching "
            f"{', '.join(space.baselines.params) or 'nothing'} in its own study; they take the New-LLM trial's "
            f"shared settings and ignore {', '.join(ignored) or 'no setting of the space'} (New-LLM only)")


def space_from_args(args: argparse.Namespace) -> SearchSpace:
    """The space a new search runs: --space (default laptop) with the command line's data options
    over its data section, and --seed for its trials unless the space sets or searches it."""
    space = load_space(resolve_space(args.space or "laptop"))
    data_cfg = data_config_from_args(args, base=space.data).to_dict()
    space = dataclasses.replace(space, data={k: v for k, v in data_cfg.items() if k != "cache_dir"})
    if "seed" not in space.params and "seed" not in space.fixed:
        space = dataclasses.replace(space, fixed={**space.fixed, "seed": args.seed})
    if args.repeats is not None:
        space = dataclasses.replace(space, repeats=args.repeats)
    return space


def space_differences(a: SearchSpace, b: SearchSpace) -> list[str]:
    """The sections (params.x, fixed.x, data.x, objectives, repeats) in which two spaces differ."""
    diff = [name for name in ("objectives", "repeats", "baselines") if getattr(a, name) != getattr(b, name)]
    for section in ("params", "fixed", "data"):
        x, y = getattr(a, section), getattr(b, section)
        diff += [f"{section}.{k}" for k in sorted(x.keys() | y.keys()) if x.get(k) != y.get(k)]
    return diff


def data_flags_given(args: argparse.Namespace) -> list[str]:
    """The data options given on the command line (their defaults are None)."""
    return [flag for name, flag in data_flags().items() if getattr(args, name) is not None]


class StudySearch(OptunaSearch):
    """OptunaSearch whose study lives in a storage that outlives the driver. At a resume the study
    may be ahead of the searcher's saved state: a trial that ``fail_left_running`` marked FAIL
    gets no more intermediate values, and its result, when it finishes, is added as a new
    finished trial with the same parameters; one that Optuna already has finished is not told
    twice."""

    def _finished_in_study(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return False
        try:
            return self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()
        except KeyError:  # lost with a cut journal's last record: nothing to tell it
            return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._finished_in_study(trial_id):
            super().on_trial_result(trial_id, result)

    def bind(self, storage) -> None:
        """Use ``storage``, the study's storage where the experiment is now, for the study and
        for the Optuna trials of the running Tune trials (a restored searcher still points at
        the storage of the experiment's first place)."""
        import optuna

        self._storage = storage
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=storage, sampler=self._sampler)
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, t._trial_id) for tid, t in self._ot_trials.items()}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials:
            return
        if not self._finished_in_study(trial_id):
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        try:
            failed = self._ot_study._storage.get_trial(ot_trial._trial_id).state == optuna.trial.TrialState.FAIL
        except KeyError:
            failed = False
        if failed and result and not error:
            values = [result.get(m) for m in self.metric] if isinstance(self.metric, list) \
                else [result.get(self.metric)]
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=ot_trial.params, distributions=ot_trial.distributions, values=values))
        self._completed_trials.add(trial_id)


NEWLLM = "newllm"


def kind(config: dict) -> str:
    """``newllm``, or a baseline trial's architecture: the study that proposes a trial and the
    ASHA that compares it."""
    architecture = config.get("architecture")
    return architecture if architecture in BASELINE_ARCHITECTURES else NEWLLM


def kinds(space: SearchSpace) -> list[str]:
    return [NEWLLM, *(space.baselines.architectures if space.baselines else ())]


def study_names(name: str, space: SearchSpace) -> dict[str, str]:
    """Each kind's Optuna study: the experiment's name for New-LLM, ``<name>-<architecture>`` for a baseline."""
    return {k: name if k == NEWLLM else f"{name}-{k}" for k in kinds(space)}


class FamilySearch(Searcher):
    """The search's trials in turns: a New-LLM trial from the New-LLM study, then, with baselines,
    one trial of each baseline architecture, sized to that New-LLM trial (``space.baseline_trial``)
    with what its own study proposes (its learning rate). Every kind gets the same number of
    trials, and each study learns from its own trials only."""

    def __init__(self, searchers: dict[str, Searcher], space: SearchSpace, vocab_size: int, metric, mode):
        super().__init__(metric=metric, mode=mode)
        self.searchers, self.space, self.vocab_size = searchers, space, vocab_size
        self.turn = 0                              # trials proposed so far
        self.owner: dict[str, str] = {}            # trial id -> kind
        self.matched: tuple[str, dict] | None = None  # the latest New-LLM trial: id, sampled values
        self.storage = None  # the studies' Optuna storage (None: in memory)
        self.landed: dict[str, dict] = {}  # at a resume: the results of the trials whose rows landed

    def suggest(self, trial_id: str):
        kind_ = list(self.searchers)[self.turn % len(self.searchers)]
        config = self.searchers[kind_].suggest(trial_id)
        if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
            return config
        self.turn += 1
        self.owner[trial_id] = kind_
        if kind_ == NEWLLM:
            self.matched = (trial_id, config)
            return config
        matched_id, matched = self.matched
        return {**self.space.baseline_trial(kind_, matched, config, self.vocab_size), MATCHED: matched_id}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result, error)

    def bind(self, storage) -> None:
        """Use ``storage`` for every study, now and after ``restore``."""
        self.storage = storage
        for searcher in self.searchers.values():
            searcher.bind(storage)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        """The state saved by ``save``, with the storage this searcher was bound to kept."""
        storage, landed = self.storage, self.landed
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        if storage is not None:
            self.bind(storage)
        self.tell_landed(landed)

    def tell_landed(self, landed: dict[str, dict]) -> None:
        """Tell each study the results of its landed trials that it has not been told: a driver
        killed between a trial's row and Optuna's record, or a journal whose cut last record was
        set aside, leaves the study behind the trials table."""
        for trial_id, result in landed.items():
            if trial_id in self.owner:
                self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result)


class ExperimentSearch(SearchGenerator):
    """Tune's trial generator around the search's searcher, which makes every new trial under
    the experiment directory where the experiment is now. (Tune's own generator, restored,
    makes them where the experiment began: a moved experiment would write to its old place.)"""

    def __init__(self, searcher: FamilySearch, concurrency: int, exp_dir: str):
        super().__init__(ConcurrencyLimiter(searcher, max_concurrent=concurrency))
        self.exp_dir = exp_dir

    @property
    def family_search(self) -> FamilySearch:
        return self.searcher.searcher

    def relocate(self, exp_dir: str, storage, landed: dict[str, dict]) -> None:
        """Make new trials under ``exp_dir``, keep the studies in ``storage`` and, once restored,
        tell them the ``landed`` results they lack (``FamilySearch.restore``)."""
        self.exp_dir = exp_dir
        self.family_search.landed = landed
        if storage is not None:
            self.family_search.bind(storage)

    def create_trial_if_possible(self, experiment_spec: dict):
        return super().create_trial_if_possible({**experiment_spec, "storage": self._here(experiment_spec["storage"])})

    def _here(self, storage):
        """``storage`` (a Tune StorageContext) pointed at ``exp_dir``, as Tune points restored trials."""
        parent, name = self.exp_dir.rstrip("/").rsplit("/", 1)
        fs, fs_path = filesystem(parent)
        if storage.storage_fs_path == fs_path and storage.experiment_dir_name == name:
            return storage
        moved = copy.copy(storage)
        moved.storage_filesystem, moved.storage_fs_path, moved.experiment_dir_name = fs, fs_path, name
        return moved


class FamilyScheduler(FIFOScheduler):
    """One scheduler per kind (New-LLM, each baseline architecture): a trial is compared only with
    trials of its own kind."""

    def __init__(self, schedulers: dict[str, FIFOScheduler]):
        super().__init__()
        self.schedulers = schedulers

    def of(self, trial) -> FIFOScheduler:
        return self.schedulers[kind(trial.config)]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return all([s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()])

    def on_trial_add(self, tune_controller, trial) -> None:
        self.of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{k}: {s.debug_string()}" for k, s in self.schedulers.items())


def max_phase2_epochs(space: SearchSpace) -> int:
    """The most Phase 2 epochs a trial of ``space`` can run (a baseline's own setting included)."""
    import optuna.distributions as od

    def most(d) -> int:
        return max(d.choices) if isinstance(d, od.CategoricalDistribution) else int(d.high)

    d = space.params.get("phase2_epochs")
    epochs = [most(d) if d is not None else space.trial_config({}).phase2_epochs]
    if space.baselines is not None:
        own = space.baselines.params.get("phase2_epochs")
        epochs.append(most(own) if own is not None else space.baselines.fixed.get("phase2_epochs", 0))
    return max(epochs)


def scheduler(name: str | None, space: SearchSpace):
    """The trial scheduler of ``--scheduler`` (None: asha, or none when a trial runs replicates):
    an ASHA over Phase 2 epochs per kind (New-LLM, each baseline architecture), or None (FIFO). Its time
    is ``phase2_epoch``, which only Phase 2 rows carry, so Phase 1 passes and the analysis are
    never rungs and a gate-failed trial is never stopped by it. Its metric ``objective`` is a
    trial's best val perplexity so far. A trial that reaches its last epoch is never cut
    (``stop_last_trials=False``): it ends with its own final row."""
    if (name or ("asha" if space.repeats == 1 else "none")) == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = max(max_phase2_epochs(space), ASHA_GRACE_EPOCHS)
    return FamilyScheduler({k: ASHAScheduler(time_attr="phase2_epoch", metric="objective", mode="min", max_t=max_t,
                                             grace_period=ASHA_GRACE_EPOCHS, reduction_factor=ASHA_REDUCTION,
                                             stop_last_trials=False) for k in kinds(space)})


def run_search(args, space: SearchSpace, data, num_trials: int, concurrency: int, exp_dir: str,
               points: list[dict] | None = None, storage: str | None = None) -> bool:
    """Run the search's trials: ``num_trials`` New-LLM trials, and as many of each baseline
    architecture when the space has baselines; ``points``: New-LLM configurations to try first,
    in order, after the space's own (benchmarks give the same ones to every side); ``storage``: the Optuna studies'
    (``optuna_storage``), in memory if None. Returns whether every trial finished: False when
    the search was interrupted (Ctrl+C), its state saved for ``--resume``."""
    import optuna
    from ray import tune

    from newllm.results import ParquetResults
    from newllm.trainable import run_trial

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    trainable = tune.with_resources(tune.with_parameters(run_trial, space=space, data=data),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    studies = None if storage is None else open_storage(storage)
    total = num_trials * len(kinds(space))
    callbacks = [ParquetResults(exp_dir, TrialRow(space, versions(), exp_dir), TrialRow.dtypes()), Progress(total)]
    if args.resume and studies is not None:
        for study in study_names(args.name, space).values():
            fail_left_running(studies, study)
    # (a driver killed before Tune saved any state leaves nothing to restore: the search starts anew)
    if args.resume and tune.Tuner.can_restore(exp_dir):
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
        # Tune restores the searcher and callbacks pickled when the search began, with the paths
        # they had then: a moved or copied experiment must use its own. Tuner has no public way to
        # give them; tests/test_faults.py's relocation test fails if this stops working.
        restored = tuner._local_tuner
        restored._run_config.callbacks = callbacks
        search_alg = restored._tune_config.search_alg
        search_alg.relocate(exp_dir, studies, landed_results(exp_dir, space))
    else:
        metrics = space.metrics
        metric, mode = (metrics, ["min"] * len(metrics)) if len(metrics) > 1 else (metrics[0], "min")
        searchers = {
            k: StudySearch(space=space.params if k == NEWLLM else space.baselines.params, metric=metric, mode=mode,
                           sampler=optuna.samplers.TPESampler(seed=args.seed, multivariate=True, constant_liar=True),
                           study_name=study, storage=studies)
            for k, study in study_names(args.name, space).items()}
        for point in [*space.points, *(points or [])]:
            # enqueued in the study, the sampler proposes what a point leaves out
            searchers[NEWLLM]._ot_study.enqueue_trial(point)
        searcher = FamilySearch(searchers, space, data.vocab_size, metric, mode)
        searcher.storage = studies
        search_alg = ExperimentSearch(searcher, concurrency, exp_dir)
        tuner = tune.Tuner(
            trainable,
            # a finished trial's actor (its process, torch imported) runs the next trial; run_trial
            # sets everything per trial (threads, seeds), so nothing carries over
            tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler(args.scheduler, space),
                                        num_samples=total, reuse_actors=True),
            run_config=tune.RunConfig(name=args.name, storage_path=storage_root(args.storage_path),
                                      callbacks=callbacks, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      # every checkpoint stays while the search runs: a driver killed
                                      # and resumed goes back to its last snapshot of Tune's state, which
                                      # may name any of them (prune_checkpoints thins them at the end)
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
        )
    with quiet_tune():
        results = tuner.fit()
    # every trial made and landed (not the result grid's counts: Tune counts the trials it stops
    # on an interruption as terminated)
    finished = search_alg.is_finished() and landed_trials(exp_dir) >= len(results)
    if finished:
        prune_checkpoints(exp_dir)
    return finished


class TrialFailureFilter(logging.Filter):
    """Drops Tune's traceback of each failed trial: Progress prints one line for it, which names
    the trial's error.txt, where the traceback is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trial task failed")


@contextlib.contextmanager
def quiet_tune():
    """Tune's console lines that newllm says better: its interruption lines name its Python API
    (main prints the command that resumes), and a failed trial's traceback is one line."""
    tune_log, controller_log = logging.getLogger("ray.tune.tune"), logging.getLogger("ray.tune.execution.tune_controller")
    level, failures = tune_log.level, TrialFailureFilter()
    tune_log.setLevel(logging.CRITICAL)
    controller_log.addFilter(failures)
    try:
        yield
    finally:
        tune_log.setLevel(level)
        controller_log.removeFilter(failures)


def landed_results(exp_dir: str, space: SearchSpace) -> dict[str, dict]:
    """Trial id -> the metrics Optuna minimises, of each trial whose row landed (errored trials,
    which the resumed search runs again, left out)."""
    table = trials_table(exp_dir).read(["trial_id", "status", *space.metrics])
    if table is None:
        return {}
    return {row["trial_id"]: {m: row[m] for m in space.metrics} for row in table.to_pylist()
            if row["status"] != "error"}


def landed_trials(exp_dir: str) -> int:
    """How many trials have their row in the experiment's trials table."""
    table = trials_table(exp_dir).read(["trial_id"])
    return 0 if table is None else table.num_rows


def trials_table(exp_dir: str) -> PartsTable:
    """The experiment's trials table, to read only the columns a question needs."""
    return PartsTable(f"{exp_dir.rstrip('/')}/{TRIALS_FILE}")


def prune_checkpoints(exp_dir: str) -> int:
    """Delete the checkpoints of finished trials except their first (after Phase 1) and their
    latest (the trials table's ``checkpoint_path``); return how many. Unfinished trials (an
    interrupted search) keep all theirs, one of which a resume will start from."""
    import pyarrow.fs

    try:
        trials, _ = load(exp_dir)
    except FileNotFoundError:
        return 0
    deleted = 0
    for path in trials.checkpoint_path.dropna():
        fs, latest = filesystem(checkpoint_dir(exp_dir, path))
        parent = latest.rsplit("/", 1)[0]
        checkpoints = sorted(i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(parent))
                             if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
        for c in checkpoints[1:]:
            if c != latest:
                fs.delete_dir(c)
                deleted += 1
    return deleted


if __name__ == "__main__":
    sys.exit(main())
