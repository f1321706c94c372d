"""ASHA on Phase 2: the Phase 2 compute it saves and what it costs in the best val perplexity.

For each seed, N configurations are drawn once from the space by Optuna's seeded random sampler
and searched twice through ``newllm.search.algorithms.run_search`` (enqueued in the study, so no sampler
chooses), on the same local Ray of as many slots as cores: ``--scheduler none``, where every
trial runs Phase 2 to its own end, and ``--scheduler asha``. From each search's trials table:
the total Phase 2 seconds (``phase2_seconds``, a stopped trial's up to its last epoch), the best
val perplexity, the trials ASHA stopped; and the search's wall time (``Tuner.fit``).

    .venv/bin/python benchmarks/asha_phase2.py [--space laptop] [--trials 8] [--seeds 0 1 2]

Prints a line per search and a JSON line last. Goal: at least 40% less Phase 2 compute in total,
with every seed's best val perplexity within 5% of the search without the scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import ray
from search_overhead import configurations  # same directory: the same seeded draws

from newllm import experiment
from newllm.data import DataConfig, prepare_data
from newllm.search import algorithms
from newllm.space import load_space, resolve_space


def run(space_name: str, space, data, configs: list[dict], scheduler: str, slots: int, root: str) -> dict:
    name = f"{scheduler}-{time.monotonic_ns()}"
    run_ = algorithms.SearchRun(name=name, storage_root=root, space=space, data=data, num_trials=len(configs),
                                concurrency=slots, scheduler=scheduler, points=tuple(configs))
    ray.init(address="local", num_cpus=slots, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    algorithms.run_search(run_)
    fit_s = time.perf_counter() - t0
    ray.shutdown()
    trials, _ = experiment.load(f"{root}/{name}")
    passed = trials[trials.status == "passed"]
    return {"phase2_s": float(trials.phase2_seconds.sum()), "best_val_ppl": float(passed.val_ppl.min()),
            "passed": len(passed), "stopped": int((trials.phase2_stop_reason == "scheduler").sum()),
            "phase2_epochs": int(trials.phase2_epochs_run.sum()), "fit_s": fit_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="laptop")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--slots", type=int, default=os.cpu_count())
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    space = load_space(resolve_space(args.space))
    data = prepare_data(DataConfig(**space.data))
    print(f"{args.trials} configurations of {space.path} per seed, seeds {args.seeds}, {args.slots} slots; "
          f"ASHA: grace {algorithms.ASHA_GRACE_EPOCHS} epoch, reduction factor {algorithms.ASHA_REDUCTION}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            configs = configurations(space, args.trials, seed)
            for scheduler in ("none", "asha"):
                r = {"seed": seed, "scheduler": scheduler, **run(args.space, space, data, configs, scheduler,
                                                                  args.slots, root)}
                rows.append(r)
                print(f"seed {seed} {scheduler:4}: Phase 2 {r['phase2_s']:6.1f} s over {r['phase2_epochs']} epochs, "
                      f"best val_ppl {r['best_val_ppl']:.2f}, {r['stopped']} of {r['passed']} passed trials "
                      f"stopped, search {r['fit_s']:.1f} s", flush=True)

    def total(scheduler: str, key: str) -> float:
        return sum(r[key] for r in rows if r["scheduler"] == scheduler)

    saving = 1 - total("asha", "phase2_s") / total("none", "phase2_s")
    ppl_ratios = [a["best_val_ppl"] / n["best_val_ppl"] for n, a in zip(rows[::2], rows[1::2])]
    wall = total("asha", "fit_s") / total("none", "fit_s")
    print(f"Phase 2 compute saved: {saving:.1%} (goal >= 40%); best val_ppl with/without ASHA: "
          f"{', '.join(f'{x:.3f}' for x in ppl_ratios)} (goal <= 1.05 each); search wall time ratio {wall:.3f}")
    print(json.dumps({"benchmark": "asha_phase2", "space": space.path, "trials": args.trials, "seeds": args.seeds,
                      "phase2_saving": round(saving, 4), "goal_saving": 0.40,
                      "best_ppl_ratio_max": round(max(ppl_ratios), 4), "goal_ppl_ratio": 1.05,
                      "wall_ratio": round(wall, 4), "runs": [{k: round(v, 3) if isinstance(v, float) else v
                                                               for k, v in r.items()} for r in rows]}))


if __name__ == "__main__":
    main()
