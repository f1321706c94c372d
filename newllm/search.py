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
import dataclasses
import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from newllm import __version__
from newllm.analyze import comparison_line, gate_saving_line, write_report
from newllm.config import (
    BASELINE_ARCHITECTURES,
    add_data_arguments,
    data_config_from_args,
    data_flags,
    family_fields,
    field_types,
)
from newllm.data import DataConfig, prepare_data
from newllm.floors import floors, floors_line, record_floors, recorded_floors
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

PROGRESS_SECONDS = 10.0
OPTUNA_JOURNAL = "optuna.journal"
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
    p.add_argument("--repeats", type=int,
                   help="runs of each sampled configuration, seeds seed, seed + 1, ...: Optuna gets their mean "
                        "objective (default: the space's repeats, else 1)")
    add_data_arguments(p, defaults=False)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_trials", "concurrency", "cpus_per_trial", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.gpus_per_trial < 0:
        raise ValueError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.resume and not args.name:
        raise ValueError("--resume needs --name: the experiment to continue")
    if args.local and args.address:
        raise ValueError("--local starts its own Ray; it cannot go with --address")


def storage_root(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def experiment_dir(args: argparse.Namespace) -> str:
    return f"{storage_root(args.storage_path).rstrip('/')}/{args.name}"


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "beegfs", "glusterfs", "fuse")


def filesystem_type(path: str) -> str | None:
    """The type of the file system holding ``path`` (Linux /proc/mounts), or None if unknown."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    path = os.path.realpath(path)
    inside = [(m, t) for m, t in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
    return max(inside, key=lambda mt: len(mt[0]))[1] if inside else None


def storage_warning(storage: str, num_nodes: int) -> str | None:
    """A warning when a multi-node cluster gets a storage path that only this machine sees."""
    if num_nodes <= 1 or "://" in storage:
        return None
    fs = filesystem_type(storage)
    if fs is not None and fs.split(".")[0] in NETWORK_FILESYSTEMS:
        return None
    return (f"warning: --storage-path {storage} is a local directory ({fs or 'unknown'} file system), but the "
            f"Ray cluster has {num_nodes} nodes. Trials on other machines would write their checkpoints to "
            f"their own disks, where a retry on another node and this driver cannot find them. Use storage "
            f"every node mounts (NFS), or s3:// / gs://. (Fine if every node runs on this machine.)")


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
    New-LLM trial it was sized to."""

    space: SearchSpace
    versions: dict

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
                "checkpoint_path": checkpoint.path if checkpoint is not None else None, **self.versions}

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


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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

    from newllm.results import load

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
    passed = trials[(trials.status == "passed") & (family == NEWLLM)]
    print(f"\n{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in trials.status.value_counts().items()))
    if len(passed):
        best = passed.sort_values("objective").iloc[0]
        print(f"Best New-LLM trial {best.trial_id}: val_ppl {best.val_ppl:.2f}, val_acc {best.val_acc:.1%}, "
              f"{int(best.num_params):,} parameters")
        if best.replicates > 1:
            spread = f" ± {best.val_ppl_std:.2f}" if pd.notna(best.val_ppl_std) else ""
            print(f"  over its {best.replicates} replicates (seeds): objective {best.objective:.2f}, val_ppl "
                  f"{best.val_ppl_mean:.2f}{spread} over the {best.replicates_passed} that passed; the figures "
                  f"above are replicate 0's, the saved model's")
        print("Best configuration: " + ", ".join(f"{k}={_fmt(best[k])}" for k in searched))

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        args.name = args.name or f"{Path(resolve_space(args.space or 'laptop')).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        from ray import tune

        exp_dir = experiment_dir(args)
        exists = tune.Tuner.can_restore(exp_dir)
        if args.resume and not exists:
            raise ValueError(f"--resume: no experiment to continue at {exp_dir}")
        if not args.resume and (exists or ("://" not in exp_dir and Path(exp_dir).exists())):
            raise ValueError(f"experiment {exp_dir} exists: pass --resume to continue it, or choose another --name")
        space = recorded_space(exp_dir) if args.resume else None
        given = ["--space"] * (args.space is not None) + ["--repeats"] * (args.repeats is not None) + \
            data_flags_given(args)
        if space is None:  # a new search (or one of an earlier newllm, which recorded no space)
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
        storage = optuna_storage(args, exp_dir)
        existing = existing_studies(storage)
        taken = [s for s in study_names(args.name, space).values() if s in existing]
        if not args.resume and taken:
            raise ValueError(f"the Optuna storage {storage} already holds a study named {taken[0]!r}: choose "
                             f"another --name, or another --optuna-storage")
        data = prepare_data(data_cfg)
        space.check_baselines(data.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    num_trials = args.num_trials or space.num_trials
    print(f"newllm {__version__} search '{args.name}': {num_trials} trials of {space.path} "
          f"({', '.join(space.params)}), objectives {space.objectives}")
    if space.baselines is not None:
        print(baselines_line(space, num_trials))
    print(f"Data: {data_cfg.source}, {len(data.train_ids):,} train / {len(data.val_ids):,} val tokens, "
          f"vocab {data.vocab_size}")
    data_floors = floors(data.train_ids, data.val_ids, data.vocab_size)
    print(floors_line(data_floors))

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
    warning = storage_warning(storage_root(args.storage_path), sum(n["Alive"] for n in ray.nodes()))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrency = args.concurrency or max(1, cpus // args.cpus_per_trial)
    print(f"Ray: {cpus} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; {concurrency} trials at once, "
          f"{args.cpus_per_trial} CPU(s) and {args.gpus_per_trial:g} GPU(s) each\nExperiment: {exp_dir}")
    print(f"Optuna study '{args.name}' in {storage}: watch it with optuna-dashboard {storage}\n", flush=True)

    if not args.resume:
        record_space(exp_dir, space)
        record_floors(exp_dir, data_floors)
    run_search(args, space, data, num_trials, concurrency, exp_dir, storage=storage)
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


def optuna_storage(args: argparse.Namespace, exp_dir: str) -> str:
    """Where the Optuna study lives: --optuna-storage, else a journal in the experiment directory,
    else (an experiment on object storage, where a file cannot be appended) beside the driver."""
    if args.optuna_storage:
        return args.optuna_storage
    if "://" in exp_dir:
        return str(Path(f"{args.name}.optuna.journal").resolve())
    return f"{exp_dir}/{OPTUNA_JOURNAL}"


def open_storage(storage: str):
    """The Optuna storage object of ``optuna_storage``'s answer: an RDB URL or a journal file."""
    import optuna

    if "://" in storage:
        return optuna.storages.get_storage(storage)
    from optuna.storages.journal import JournalFileBackend

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(storage))


def existing_studies(storage: str) -> set[str]:
    """The names of the studies ``storage`` holds (none in a journal not written yet)."""
    if "://" not in storage and not Path(storage).exists():
        return set()
    import optuna

    return {s.study_name for s in optuna.study.get_all_study_summaries(open_storage(storage))}


def fail_left_running(storage, name: str) -> None:
    """Mark FAIL the trials of study ``name`` that a killed driver left RUNNING, so that the
    sampler stops treating them as pending. The Tune trials behind them run on after the resume,
    and StudySearch gives Optuna their results then."""
    import optuna

    for trial in optuna.load_study(study_name=name, storage=storage).get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


class StudySearch(OptunaSearch):
    """OptunaSearch whose study lives in a storage that outlives the driver. At a resume the study
    may be ahead of the searcher's saved state: a trial that ``fail_left_running`` marked FAIL
    gets no more intermediate values, and its result, when it finishes, is added as a new
    finished trial with the same parameters; one that Optuna already has finished is not told
    twice."""

    def _finished_in_study(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        return ot_trial is not None and trial_id not in self._completed_trials and \
            self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._finished_in_study(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if not self._finished_in_study(trial_id):
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        failed = self._ot_study._storage.get_trial(ot_trial._trial_id).state == optuna.trial.TrialState.FAIL
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

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


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
               points: list[dict] | None = None, storage: str | None = None) -> None:
    """Run the search's trials: ``num_trials`` New-LLM trials, and as many of each baseline
    architecture when the space has baselines; ``points``: New-LLM configurations to try first,
    in order, after the space's own (benchmarks give the same ones to every side); ``storage``: the Optuna studies'
    (``optuna_storage``), in memory if None."""
    import optuna
    from ray import tune

    from newllm.results import ParquetResults
    from newllm.trainable import run_trial

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    trainable = tune.with_resources(tune.with_parameters(run_trial, space=space, data=data),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    studies = None if storage is None else open_storage(storage)
    if args.resume:
        if studies is not None:
            for study in study_names(args.name, space).values():
                fail_left_running(studies, study)
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
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
        total = num_trials * len(searchers)
        callbacks = [ParquetResults(exp_dir, TrialRow(space, versions()), TrialRow.dtypes()), Progress(total)]
        tuner = tune.Tuner(
            trainable,
            # a finished trial's actor (its process, torch imported) runs the next trial; run_trial
            # sets everything per trial (threads, seeds), so nothing carries over
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler(args.scheduler, space),
                                        num_samples=total, max_concurrent_trials=concurrency,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=args.name, storage_path=storage_root(args.storage_path),
                                      callbacks=callbacks, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      # every checkpoint stays while the search runs: a driver killed
                                      # and resumed goes back to its last snapshot of Tune's state, which
                                      # may name any of them (prune_checkpoints thins them at the end)
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
        )
    tuner.fit()
    prune_checkpoints(exp_dir)


def prune_checkpoints(exp_dir: str) -> int:
    """Delete the checkpoints of finished trials except their first (after Phase 1) and their
    latest (the trials table's ``checkpoint_path``); return how many. Unfinished trials (an
    interrupted search) keep all theirs, one of which a resume will start from."""
    import pyarrow.fs

    from newllm.results import filesystem, load

    try:
        trials, _ = load(exp_dir)
    except FileNotFoundError:
        return 0
    deleted = 0
    for path in trials.checkpoint_path.dropna():
        fs, latest = filesystem(path)
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
