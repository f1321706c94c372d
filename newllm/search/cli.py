"""``python -m newllm.search``: a Ray Tune + Optuna search over New-LLM configurations, and
with ``--baselines`` over LSTM, GRU and transformer baselines at matched sizes.

Everything is checked before anything starts (exit code 2, nothing written): options, the
search-space file, the data, the experiment and its storages (``plan_search``); then the driver
claims the experiment (``newllm.search.lock``) and runs it (``algorithms.run_search``). Data is prepared once here in the driver and shared with the
trials through Ray's object store. Each finished trial lands in
``<storage>/<name>/trials.parquet`` and every reported row in ``iterations.parquet``.
Run it locally, or inside ``ray job submit`` where it attaches to the cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from newllm import __version__
from newllm.analyze import summary, trials_table_text, write_report
from newllm.config import SEED_MAX, add_data_arguments, data_config_from_args, data_flags, family_fields
from newllm.data import DataConfig, prepare_data
from newllm.experiment import ITERATIONS_FILE, LOCK_FILE, SPACE_FILE, TRIALS_FILE, experiment_dir, load
from newllm.floors import floors, floors_line, record_floors, recorded_floors
from newllm.search.algorithms import SearchRun, missing_code, run_search, study_names
from newllm.search.lock import ExperimentHeld, ExperimentLock
from newllm.search.storage import (
    check_optuna_storage,
    check_storage_path,
    existing_studies,
    optuna_storage,
    repair_journal,
    storage_root,
    storage_warning,
)
from newllm.space import Baselines, SearchSpace, builtin_spaces, load_space, record_space, recorded_space, resolve_space

# an experiment name is one directory name that every file system and object store takes
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100
RESOURCE_POLL_SECONDS = 1.0
ADDRESS_TIMEOUT_SECONDS = 10.0


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, the data flags of ``newllm.train`` among them (their defaults None: the space's)."""
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


# --- main ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A search that passed every check: the run, and the data configuration it prepared."""

    run: SearchRun
    data_cfg: DataConfig


def plan_search(args: argparse.Namespace) -> Plan:
    """Check every option, the space, the experiment and the storages, and prepare the data;
    ValueError (or ExperimentHeld) names what is wrong. Writes nothing but the tokenizer cache."""
    check_args(args)
    args.name = args.name or default_name(resolve_space(args.space or "laptop"))
    exp_dir = experiment_dir(storage_root(args.storage_path), args.name)
    ExperimentLock(exp_dir).check_free()
    exists = tune.Tuner.can_restore(exp_dir)
    # a driver killed before Tune saved any state leaves only the recorded space: resume starts it anew
    started = exists or recorded_space(exp_dir) is not None
    if args.resume and not started:
        raise ValueError(f"--resume: no experiment to continue at {exp_dir}")
    if not args.resume and (exists or has_content(exp_dir)):
        raise ValueError(f"experiment {exp_dir} exists: pass --resume to continue it, or choose another --name")
    if args.resume and exists and (why := missing_code(exp_dir)):
        raise ValueError(f"experiment {exp_dir} was started by an earlier newllm, whose saved search state this "
                         f"one cannot read ({why}): start a new --name; its landed trials stay readable with "
                         f"newllm.experiment.load")
    if args.resume:
        with contextlib.suppress(FileNotFoundError):  # (no row reported yet)
            load(exp_dir)  # every part file readable (ValueError naming a damaged one) before Tune appends
    space = recorded_space(exp_dir) if args.resume else None
    given = ["--space"] * (args.space is not None) + ["--repeats"] * (args.repeats is not None) + \
        ["--num-trials"] * (args.num_trials is not None) + data_flags_given(args)
    if space is None:  # a new search
        space = space_from_args(args)
    elif given and (diff := space_differences(space, space_from_args(args) if args.space
                                              else with_options(space, args))):
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
    run = SearchRun(name=args.name, storage_root=storage_root(args.storage_path), space=space, data=data,
                    num_trials=space.num_trials, concurrency=args.concurrency,
                    cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, seed=args.seed,
                    scheduler=args.scheduler, resume=args.resume, optuna_storage=storage)
    return Plan(run, data_cfg)


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
    """The command: exit code 0 when every trial finished, 2 for a usage error, 1 for an I/O fault, 130 on Ctrl+C."""
    args = build_parser().parse_args(argv)
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
    run = plan.run
    space, data, exp_dir = run.space, run.data, run.exp_dir
    print(f"newllm {__version__} search '{args.name}': {run.num_trials} trials of {space.path} "
          f"({', '.join(space.params)}), objectives {space.objectives}")
    if space.baselines is not None:
        print(baselines_line(space, run.num_trials))
    print(f"Data: {plan.data_cfg.source}, {len(data.train_ids):,} train / {len(data.val_ids):,} val tokens, "
          f"vocab {data.vocab_size}")
    data_floors = floors(data.train_ids, data.val_ids, data.vocab_size)
    print(floors_line(data_floors))

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
        return run_claimed(args, run, data_floors)
    except KeyboardInterrupt:
        print(f"interrupted: {resume}", file=sys.stderr)
        return 130
    except OSError as e:
        # the trials still in flight are abandoned: Ray would print each one's error as unhandled
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        print(f"error: {fault_line(e, exp_dir)}; {resume}", file=sys.stderr)
        return 1
    finally:
        lock.release()


def run_claimed(args: argparse.Namespace, run: SearchRun, data_floors: dict) -> int:
    """The search, on an experiment this driver holds: 0 when every trial finished, 130 when it
    was interrupted."""
    space, exp_dir, storage = run.space, run.exp_dir, run.optuna_storage
    warning = storage_warning(run.storage_root, sum(n["Alive"] for n in ray.nodes()))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    run = dataclasses.replace(run, concurrency=run.trials_at_once())
    resources = ray.cluster_resources()
    print(f"Ray: {int(resources.get('CPU', 1))} CPUs, {resources.get('GPU', 0):g} GPUs; {run.concurrency} trials at "
          f"once, {run.cpus_per_trial} CPU(s) and {run.gpus_per_trial:g} GPU(s) each\nExperiment: {exp_dir}")
    # optuna-dashboard is an extra (newllm[dashboard]): the hint says how to install it when it is missing
    install = "" if importlib.util.find_spec("optuna_dashboard") else "pip install 'newllm[dashboard]' && "
    print(f"Optuna study '{run.name}' in {storage}: watch it with {install}optuna-dashboard {storage}\n", flush=True)
    if "://" not in storage and (aside := repair_journal(storage)):
        print(f"Repaired the Optuna journal {storage}: its last record was cut off mid-write and is kept in "
              f"{aside}", flush=True)
    if not run.resume:
        record_space(exp_dir, space)
    if not run.resume or recorded_floors(exp_dir) is None:
        record_floors(exp_dir, data_floors)
    if not run_search(run):
        print(f"interrupted: the search stopped after saving its state; what had landed is kept; continue "
              f"with: {resume_command(args)}", file=sys.stderr)
        return 130
    print_summary(exp_dir, space)
    print(f"Report: {write_report(exp_dir, distributions=space.params)}")
    return 0


def print_summary(exp_dir: str, space: SearchSpace) -> None:
    """The end-of-search table of trials, then the lines the report opens with (``analyze.summary``)."""
    trials, iterations = load(exp_dir)
    baseline_params = None if space.baselines is None else list(space.baselines.params)
    print("\n" + trials_table_text(trials, list(space.params), baseline_params) + "\n")
    print("\n".join(summary(trials, iterations, space.params, recorded_floors(exp_dir))))
    print(f"Results: {exp_dir}/{TRIALS_FILE}, {exp_dir}/{ITERATIONS_FILE} (newllm.experiment.load({exp_dir!r}))")


def baselines_line(space: SearchSpace, num_trials: int) -> str:
    """What the baselines of a search are, and which of its settings they ignore."""
    b = space.baselines
    ignored = sorted(k for k in (*space.params, *space.fixed) if k not in family_fields("baseline"))
    return (f"Baselines: {num_trials} trials each of {', '.join(b.architectures)}, one per New-LLM trial at its "
            f"non-embedding parameter count (within 10%), each architecture searching "
            f"{', '.join(space.baselines.params) or 'nothing'} in its own study; they take the New-LLM trial's "
            f"shared settings and ignore {', '.join(ignored) or 'no setting of the space'} (New-LLM only)")


def space_from_args(args: argparse.Namespace) -> SearchSpace:
    """The space a new search runs: --space (default laptop) with the command line's options
    (``with_options``)."""
    return with_options(load_space(resolve_space(args.space or "laptop")), args)


def with_options(space: SearchSpace, args: argparse.Namespace) -> SearchSpace:
    """``space`` with the command line's data options over its data section, --seed for its
    trials unless the space sets or searches it, and --repeats and --num-trials where given."""
    data_cfg = data_config_from_args(args, base=space.data).to_dict()
    space = dataclasses.replace(space, data={k: v for k, v in data_cfg.items() if k != "cache_dir"})
    if "seed" not in space.params and "seed" not in space.fixed:
        space = dataclasses.replace(space, fixed={**space.fixed, "seed": args.seed})
    if args.repeats is not None:
        space = dataclasses.replace(space, repeats=args.repeats)
    if args.num_trials is not None:  # recorded, so that a resume runs, and says, as many
        space = dataclasses.replace(space, num_trials=args.num_trials)
    return space


def space_differences(a: SearchSpace, b: SearchSpace) -> list[str]:
    """The sections (params.x, fixed.x, data.x, objectives, repeats, num_trials) in which two spaces differ."""
    diff = [name for name in ("objectives", "repeats", "num_trials", "baselines")
            if getattr(a, name) != getattr(b, name)]
    for section in ("params", "fixed", "data"):
        x, y = getattr(a, section), getattr(b, section)
        diff += [f"{section}.{k}" for k in sorted(x.keys() | y.keys()) if x.get(k) != y.get(k)]
    return diff


def data_flags_given(args: argparse.Namespace) -> list[str]:
    """The data options given on the command line (their defaults are None)."""
    return [flag for name, flag in data_flags().items() if getattr(args, name) is not None]


if __name__ == "__main__":
    sys.exit(main())
