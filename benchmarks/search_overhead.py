"""Search overhead: the wall time of ``newllm.search``'s Tuner against the same trials run by a
persistent process pool, the least a search could cost.

Both sides run the same N configurations (drawn once from the space by a seeded random sampler;
the study gets them enqueued, so no sampler chooses) with the same data, on as
many slots as cores, one torch thread each:

- **search**: ``newllm.search.algorithms.run_search`` on a local Ray, as the command runs it (the Optuna
  study in its journal file, the checkpoints pruned at the end), without a scheduler; only
  ``run_search`` is timed (Ray's start and stop are reported apart), the end-of-search summary
  and report are not run;
- **pool**: ``slots`` worker processes started (and torch imported) before the clock starts,
  the data sent once to each, running ``newllm.run.train_run`` and saving the model as a trial does.

Rounds alternate the two sides; the ratio reported is the median over rounds of search / pool.

    .venv/bin/python benchmarks/search_overhead.py [--space laptop] [--trials 8] [--rounds 3]

Prints per round the two wall times and a JSON line last. Goal: ratio <= 1.10 for 8 trials on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import optuna
import ray
import torch

from newllm.checkpoint import save_model
from newllm.data import DataConfig, TokenData, prepare_data
from newllm.run import build_model, train_run
from newllm.search.algorithms import SearchRun, run_search
from newllm.search.storage import optuna_storage
from newllm.space import SearchSpace, load_space, resolve_space

_worker: dict = {}


def configurations(space: SearchSpace, n: int, seed: int) -> list[dict]:
    """``n`` configurations of ``space``, drawn by Optuna's seeded random sampler."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask(space.params).params for _ in range(n)]


def _init(space: SearchSpace, data: TokenData) -> None:
    torch.set_num_threads(1)
    _worker.update(space=space, data=data)


def _trial(config: dict) -> float:
    """One trial as the trainable runs it, without Tune: train, then save the model."""
    space, data = _worker["space"], _worker["data"]
    cfg = space.trial_config(config)
    model = build_model(cfg, data.vocab_size)
    result = train_run(cfg, data, model)
    with tempfile.TemporaryDirectory() as d:
        save_model(d, model, data.tokenizer_json, train_config=cfg.to_dict(), summary=result.summary())
    return result.objective


def run_pool(pool: ProcessPoolExecutor, configs: list[dict]) -> float:
    t0 = time.perf_counter()
    list(pool.map(_trial, configs))
    return time.perf_counter() - t0


def run_tuner(args, space: SearchSpace, data: TokenData, configs: list[dict], slots: int,
              root: str, round_: int) -> tuple[float, float, float]:
    """(Ray start, Tuner.fit, Ray stop) seconds of one search over ``configs``."""
    # no scheduler: both sides run every trial to its own end
    name = f"round{round_}"
    # as the command runs it: the Optuna study in its journal, the checkpoints pruned at the end
    run = SearchRun(name=name, storage_root=root, space=space, data=data, num_trials=len(configs), concurrency=slots,
                    scheduler="none", optuna_storage=optuna_storage(None, name, f"{root}/{name}"),
                    points=tuple(configs))
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=slots, include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()
    run_search(run)
    t2 = time.perf_counter()
    ray.shutdown()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="laptop")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--slots", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, help="documents (default: the space's)")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    space = load_space(resolve_space(args.space))
    data = prepare_data(DataConfig(**{**space.data, **({"num_samples": args.num_samples} if args.num_samples else {})}))
    configs = configurations(space, args.trials, args.seed)
    print(f"{args.trials} configurations of {space.path} on {args.slots} slots, "
          f"{len(data.train_ids):,} train tokens; {args.rounds} rounds", flush=True)

    rows = []
    with ProcessPoolExecutor(args.slots, mp_context=get_context("spawn"), initializer=_init,
                             initargs=(space, data)) as pool, tempfile.TemporaryDirectory() as root:
        list(pool.map(abs, range(args.slots * 4)))  # every worker started before the clock
        for r in range(args.rounds):
            pool_s = run_pool(pool, configs)
            start_s, fit_s, stop_s = run_tuner(args, space, data, configs, args.slots, root, r)
            rows.append({"pool_s": pool_s, "fit_s": fit_s, "ray_start_s": start_s, "ray_stop_s": stop_s,
                         "ratio": fit_s / pool_s})
            print(f"round {r + 1}: pool {pool_s:.1f} s, Tuner.fit {fit_s:.1f} s (ratio {fit_s / pool_s:.3f}); "
                  f"Ray start {start_s:.1f} s, stop {stop_s:.1f} s", flush=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"search overhead: median ratio {ratio:.3f} (goal <= 1.10)")
    print(json.dumps({"benchmark": "search_overhead", "trials": args.trials, "slots": args.slots,
                      "space": space.path, "train_tokens": len(data.train_ids), "ratio_median": round(ratio, 4),
                      "goal": 1.10, "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rows]}))


if __name__ == "__main__":
    main()
