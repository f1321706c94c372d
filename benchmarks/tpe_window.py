"""TPE's window: what the studies' sampler loses in proposals by reading the best and the latest
trials only (``WindowedTPESampler``), against plain TPE reading all of them.

Each search runs ``--trials`` trials, 2 at once (each trial asked while the other runs, as two
slots do: the constant liar counts the running one), told in the order asked, with the sampler a
study of ``newllm.search`` gets (``study_sampler``: seeded multivariate TPE, constant liar, the
constraints each trial records) at each window size of ``--windows`` and with none (plain TPE).
Every sampler searches the same objectives with the same seeds:

- **valley**: a space shaped like the default one (a categorical, an int, log-scale learning
  rates, floats) whose minimum lies in narrow valleys, with a gate: trials of little dist-reg
  and a fast Phase 1 are infeasible and told the worst value, as a failed gate is;
- **hartmann6**: the Hartmann function on [0, 1]^6, a standard test of Bayesian optimisation
  with several local minima.

Values are told with Gaussian noise (standard deviation 0.1), as val perplexities have. Reported,
for each sampler and objective, means over the seeds of:

- the regret of the best feasible trial (its noiseless value minus the objective's minimum)
  after 325 trials (the window's first fill: before it, a window of 300 is plain TPE) and at
  the end;
- the mean noiseless value of the last 200 proposals (infeasible ones count as the worst value):
  how good what the sampler proposes late is, not only its luckiest trial;
- the CPU time of a suggestion over the last 10% of trials;

and, against plain TPE, on how many seeds the window's final regret is no worse. Searches run in
as many processes as there are CPUs.

    .venv/bin/python benchmarks/tpe_window.py [--trials 1000] [--seeds 8] [--windows 100,150,300]

Prints a table and a JSON line last. No goal: it measures the trade ``TPE_WINDOW`` makes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from newllm.search.algorithms import TPE_BEST, TPE_WINDOW, study_sampler

AT_ONCE = 2
NOISE = 0.1
WORST = 10.0  # the value an infeasible trial is told (a failed gate's learned-nothing perplexity)
LATE = 200    # the last proposals whose mean value is reported

VALLEY_SPACE = {
    "context_dim": CategoricalDistribution([16, 32, 64]), "num_layers": IntDistribution(1, 4),
    "dist_reg_weight": FloatDistribution(0.0, 0.8), "phase1_lr": FloatDistribution(1e-4, 1e-2, log=True),
    "phase2_lr": FloatDistribution(1e-4, 1e-1, log=True), "dropout": FloatDistribution(0.0, 0.5),
    "x": FloatDistribution(-2.0, 2.0), "y": FloatDistribution(-2.0, 2.0),
}


def valley(p: dict) -> float:
    """A best Phase 2 learning rate that moves with depth, a best Phase 1 one, a best dist-reg, a
    best width whose advantage depends on depth, a wavy dropout term and a narrow rotated valley
    in (x, y)."""
    lr2 = (math.log10(p["phase2_lr"]) + 2.3 + 0.15 * (p["num_layers"] - 2)) ** 2
    lr1 = 0.5 * (math.log10(p["phase1_lr"]) + 3.1) ** 2
    reg = 2.0 * (p["dist_reg_weight"] - 0.3) ** 2
    width = {16: 0.3, 32: 0.0, 64: 0.15}[p["context_dim"]] * (1 + 0.3 * abs(p["num_layers"] - 3))
    u, v = p["x"] + p["y"] - 0.5, p["x"] - p["y"] - 0.3
    return 4.0 + 5 * lr2 + 5 * lr1 + reg + width + dropout_term(p["dropout"]) + 3.0 * u ** 2 + 0.1 * v ** 2


def dropout_term(d: float) -> float:
    return 0.8 * (d - 0.1) ** 2 + 0.2 * math.sin(8 * d)


def valley_feasible(p: dict) -> bool:
    return not (p["dist_reg_weight"] < 0.08 and p["phase1_lr"] > 3e-3)


HARTMANN_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
                       [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
HARTMANN_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                              [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])
HARTMANN_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
HARTMANN_SPACE = {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(6)}


def hartmann6(p: dict) -> float:
    """The Hartmann function (minimum -3.32237), shifted up by 4 to stay positive."""
    x = np.array([p[f"x{i}"] for i in range(6)])
    return 4.0 - float(HARTMANN_ALPHA @ np.exp(-(HARTMANN_A * (x - HARTMANN_P) ** 2).sum(axis=1)))


# name -> (space, noiseless value, feasibility, minimum). The valley's minimum: every squared
# term 0, the width term 0 (32), the dropout term at its least over [0, 0.5].
OBJECTIVES = {
    "valley": (VALLEY_SPACE, valley, valley_feasible,
               4.0 + min(dropout_term(d) for d in np.linspace(0.0, 0.5, 500_001))),
    "hartmann6": (HARTMANN_SPACE, hartmann6, lambda p: True, 4.0 - 3.32237),
}


def search(objective: str, window_size: int | None, seed: int, trials: int) -> dict:
    """One search of ``trials`` trials, ``AT_ONCE`` at a time; its regrets, late mean and CPU."""
    space, value, feasible, minimum = OBJECTIVES[objective]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=study_sampler(seed, window_size))
    noise = np.random.default_rng(seed)
    running, proposed, best, regret_at, suggest_cpu = [], [], math.inf, {}, []

    def ask() -> None:
        t0 = time.process_time()
        running.append(study.ask(space))
        suggest_cpu.append(time.process_time() - t0)

    for _ in range(AT_ONCE):
        ask()
    for n in range(1, trials + 1):
        trial = running.pop(0)
        true = value(trial.params) if feasible(trial.params) else None
        # the constraints StudySearch records: positive is violated (recorded_constraints reads them)
        trial.set_user_attr("constraints", {"gate": -1.0 if true is not None else 1.0})
        study.tell(trial, WORST if true is None else true + noise.normal(0.0, NOISE))
        proposed.append(WORST if true is None else true)
        best = min(best, math.inf if true is None else true)
        if n in (TPE_WINDOW + TPE_BEST, trials):
            regret_at[n] = best - minimum
        if n + len(running) < trials:
            ask()
    return {"objective": objective, "window_size": window_size, "seed": seed, "regret_at": regret_at,
            "late_mean": statistics.fmean(proposed[-LATE:]),
            "suggest_ms_last_tenth": 1e3 * statistics.fmean(suggest_cpu[-max(1, trials // 10):])}


def summarise(runs: list[dict], trials: int) -> dict:
    """Per objective and sampler: means over the seeds, and the seeds where a window's final
    regret is no worse than plain TPE's."""
    out: dict = {}
    for objective in OBJECTIVES:
        mine = [r for r in runs if r["objective"] == objective]
        plain = {r["seed"]: r["regret_at"][trials] for r in mine if r["window_size"] is None}
        for size in sorted({r["window_size"] for r in mine}, key=lambda s: math.inf if s is None else s):
            these = [r for r in mine if r["window_size"] == size]
            entry = {f"regret_at_{n}": statistics.fmean(r["regret_at"][n] for r in these)
                     for n in sorted(these[0]["regret_at"])}
            entry["late_mean"] = statistics.fmean(r["late_mean"] for r in these)
            entry["suggest_ms_last_tenth"] = statistics.fmean(r["suggest_ms_last_tenth"] for r in these)
            if size is not None:
                entry["seeds_no_worse_than_plain"] = sum(bool(r["regret_at"][trials] <= plain[r["seed"]]) for r in these)
            out.setdefault(objective, {})["plain" if size is None else f"window_{size}"] = entry
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--windows", default=f"100,150,{TPE_WINDOW}", help="window sizes, comma-separated")
    args = p.parse_args()
    if args.trials <= TPE_WINDOW + TPE_BEST:
        p.error(f"--trials must exceed {TPE_WINDOW + TPE_BEST} (the default window's first fill)")
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, not {args.seeds}")
    try:
        sizes = [int(s) for s in args.windows.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        p.error(f"--windows takes positive window sizes separated by commas, such as 100,300, not {args.windows!r}")
    sizes.append(None)  # plain TPE
    jobs = [(o, s, seed, args.trials) for o in OBJECTIVES for s in sizes for seed in range(args.seeds)]
    t0 = time.time()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        runs = list(pool.map(search, *zip(*jobs)))
    summary = summarise(runs, args.trials)
    first = TPE_WINDOW + TPE_BEST
    print(f"{args.seeds} seeds x {args.trials} trials, {AT_ONCE} at once, in {time.time() - t0:.0f} s")
    print(f"{'objective':10} {'sampler':11} {f'regret@{first}':>11} {f'regret@{args.trials}':>12} "
          f"{f'last {LATE} mean':>13} {'suggest ms':>10}  no worse than plain")
    for objective, samplers in summary.items():
        for name, e in samplers.items():
            print(f"{objective:10} {name:11} {e[f'regret_at_{first}']:11.4f} {e[f'regret_at_{args.trials}']:12.4f} "
                  f"{e['late_mean']:13.4f} {e['suggest_ms_last_tenth']:10.2f}  "
                  f"{e.get('seeds_no_worse_than_plain', '-')}{'' if name == 'plain' else f'/{args.seeds}'}")
    print(json.dumps({"benchmark": "tpe_window", "trials": args.trials, "seeds": args.seeds, "at_once": AT_ONCE,
                      "noise": NOISE, "summary": summary, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
