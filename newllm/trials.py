"""The queries a search's report and summary make of its trials and iterations tables
(``newllm.experiment.load``): pure pandas / Optuna functions, no figure drawn.

Each figure of ``newllm.figures`` and each line of ``newllm.analyze.summary`` takes its numbers
from one of these, so tests check the numbers without drawing, and the report, the search's
end-of-search summary and ``newllm.export`` agree on them (one best New-LLM trial,
``best_newllm_trial``).

A trial is New-LLM's or a baseline's (``family == "baseline"``: an LSTM, GRU or transformer
trained end to end, with no Phase 1, gate or New-LLM configuration); the queries about Phase 1,
the gate and the searched parameters read the New-LLM trials only, which leaves out the ablation
siblings (``ablation`` set: a New-LLM trial's configuration with one part removed, measurements
of it, not proposals); ``ablation_pairs`` pairs each sibling's runs with its parent's. Penalised trials (gate failed,
diverged, errored) have no perplexity: only their 1e6 / 1e7 objective. Sizes are compared on the
non-embedding parameter count (``sizes``). Optuna's importance evaluators run on a study rebuilt
from the table (``rebuild_study``) with the space's distributions, or, for an experiment that
recorded none, distributions inferred from the trials' configuration columns
(``infer_distributions``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
import optuna.distributions as od
import pandas as pd
from optuna.importance import PedAnovaImportanceEvaluator

from newllm import stats
from newllm.config import field_types
from newllm.run import GATE_PENALTY

PENALISED = ("gate_failed", "diverged", "error")
MIN_IMPORTANCE_TRIALS = 4  # fewer trials give no meaningful importance
TOP_TRIALS = 5             # PED-ANOVA's "good" trials: at least this many where the trials allow
MAX_BINS = 5               # a numeric parameter's bins in the gate map


def fmt(value) -> str:
    """A number short (4 significant digits), anything else as itself."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- which trials ------------------------------------------------------------------------


def status_is(trials: pd.DataFrame, status: str) -> pd.Series:
    """Boolean mask of the trials with ``status`` (a null status is no status)."""
    return trials["status"].eq(status).fillna(False).astype(bool)


def is_baseline(trials: pd.DataFrame) -> pd.Series:
    """Boolean mask of the baseline trials (an experiment without a ``family`` column has none)."""
    if "family" not in trials:
        return pd.Series(False, index=trials.index)
    return trials["family"].eq("baseline").fillna(False).astype(bool)


def is_sibling(trials: pd.DataFrame) -> pd.Series:
    """Boolean mask of the ablation siblings (an experiment without an ``ablation`` column has none)."""
    if "ablation" not in trials:
        return pd.Series(False, index=trials.index)
    return trials["ablation"].notna()


def newllm_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The New-LLM trials the search proposed: the only ones with New-LLM's configuration as
    sampled, a Phase 1 and a gate (ablation siblings and baselines left out)."""
    return trials[~is_baseline(trials) & ~is_sibling(trials)]


def best_newllm_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The best New-LLM trial: the passed one with the lowest objective (the first written among
    equals); None when none passed. Export's ``--best``, the search's summary and the report all
    mean this one."""
    newllm = newllm_trials(trials)
    passed = newllm[status_is(newllm, "passed")]
    return None if passed.empty else passed.sort_values("objective", kind="stable").iloc[0]


def baseline_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The baseline trials (LSTM, GRU, transformer trained end to end), New-LLM's yardstick."""
    return trials[is_baseline(trials)]


# --- families and sizes ------------------------------------------------------------------


def sizes(trials: pd.DataFrame) -> pd.Series:
    """Each trial's size as sizes are compared: ``num_params_non_embedding`` (every parameter but
    the embedding tables, nanoGPT's convention), ``num_params`` where an experiment (or a row)
    predates it."""
    if "num_params_non_embedding" not in trials:
        return trials["num_params"].astype(float)
    return trials["num_params_non_embedding"].astype(float).fillna(trials["num_params"].astype(float))


def size_label(trials: pd.DataFrame) -> str:
    """What ``sizes`` counts, as an axis title."""
    return "non-embedding parameters" if "num_params_non_embedding" in trials else "parameters"


def by_architecture(baselines: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Baseline rows per architecture, by name (none without rows: an old table has no
    ``architecture`` to group by)."""
    return list(baselines.groupby("architecture", sort=True)) if len(baselines) else []


# --- the study, rebuilt ------------------------------------------------------------------


def infer_distributions(trials: pd.DataFrame) -> dict[str, od.BaseDistribution]:
    """The searched parameters as far as the trials show them: every TrainConfig column whose
    value varies across trials, numeric over its observed min..max, strings and booleans as
    categories. ``hidden_dim`` is left out where it is ``context_dim + embed_dim`` in every
    trial: the space's rule when it is not searched, so it follows the searched dimensions.
    New-LLM trials only: a baseline's architecture and null configuration are no searched value."""
    trials = newllm_trials(trials)
    derived_hidden = {"hidden_dim", "context_dim", "embed_dim"} <= set(trials) and \
        (trials.hidden_dim == trials.context_dim + trials.embed_dim).all()
    distributions: dict[str, od.BaseDistribution] = {}
    for name, kind in field_types().items():
        if name not in trials or (name == "hidden_dim" and derived_hidden):
            continue
        values = trials[name].dropna()
        if values.nunique() < 2:
            continue
        if kind in (bool, str):
            distributions[name] = od.CategoricalDistribution(sorted(values.unique().tolist(), key=str))
        elif kind is int:
            distributions[name] = od.IntDistribution(int(values.min()), int(values.max()))
        else:
            distributions[name] = od.FloatDistribution(float(values.min()), float(values.max()))
    return distributions


def rebuild_study(trials: pd.DataFrame, values: pd.Series,
                  distributions: dict[str, od.BaseDistribution]) -> optuna.Study:
    """A minimising in-memory study with one completed trial per row of ``trials`` whose value
    (``values``, aligned with ``trials``) is finite, its parameters read from the columns."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        study = optuna.create_study(direction="minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    columns = [name for name in distributions if name in trials]
    frozen = []
    # records, not iterrows: a Series per row costs seconds at ten thousand trials
    for row, value in zip(trials[columns].to_dict("records"), values.astype(float)):
        if not math.isfinite(value):
            continue
        params = {name: _python(v) for name, v in row.items() if pd.notna(v)}
        frozen.append(optuna.trial.create_trial(value=value, params=params,
                                                distributions={k: distributions[k] for k in params}))
    study.add_trials(frozen)
    return study


def _python(value):
    """A table cell as the plain Python value Optuna's distributions hold."""
    return value.item() if isinstance(value, np.generic) else value


# --- optimisation history ---------------------------------------------------------------


def history(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial, in the order they finished (``number`` from 1): ``trial_id``,
    ``status``, ``baseline`` (bool), ``ablation`` (a sibling's, else None), ``architecture``,
    ``objective``, ``value`` (the objective of a passed trial, NaN for a penalised one) and
    ``best``, the lowest value so far of the New-LLM trials the search proposed (NaN before the
    first passed one)."""
    objective = trials["objective"].astype(float).reset_index(drop=True)
    value = objective.where(status_is(trials, "passed").to_numpy())
    baseline, sibling = is_baseline(trials).to_numpy(), is_sibling(trials).to_numpy()
    architecture = trials["architecture"].to_numpy() if "architecture" in trials else [None] * len(trials)
    ablation = trials["ablation"].to_numpy() if "ablation" in trials else [None] * len(trials)
    return pd.DataFrame({"number": np.arange(1, len(trials) + 1), "trial_id": trials["trial_id"].to_numpy(),
                         "status": trials["status"].fillna("error").to_numpy(), "baseline": baseline,
                         "ablation": ablation, "architecture": architecture, "objective": objective, "value": value,
                         "best": value.where(~baseline & ~sibling).cummin().ffill()})


# --- parameter importance ----------------------------------------------------------------


def importances(study: optuna.Study, target_quantile: float) -> dict[str, float]:
    """PED-ANOVA importance (normalised to sum 1) of each parameter for reaching the lowest
    ``target_quantile`` of the study's values; no scikit-learn needed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes about few trials: the captions say so
        evaluator = PedAnovaImportanceEvaluator(target_quantile=target_quantile)
        return optuna.importance.get_param_importances(study, evaluator=evaluator)


def objective_importance(trials: pd.DataFrame, distributions: dict[str, od.BaseDistribution]
                         ) -> tuple[dict[str, float] | None, str]:
    """Importance of each parameter for a low val perplexity among the passed trials (the good
    ones: the best TOP_TRIALS, at least a tenth and at most half), or None and why it cannot be
    computed. New-LLM trials only."""
    trials = newllm_trials(trials)
    passed = trials[status_is(trials, "passed")]
    if not distributions:
        return None, "no searched parameter varies across the trials"
    if len(passed) < MIN_IMPORTANCE_TRIALS:
        return None, f"needs at least {MIN_IMPORTANCE_TRIALS} passed trials, has {len(passed)}"
    study = rebuild_study(passed, passed["val_ppl"], distributions)
    return importances(study, min(0.5, max(0.1, TOP_TRIALS / len(passed)))), f"{len(passed)} passed trials"


def gate_importance(trials: pd.DataFrame, distributions: dict[str, od.BaseDistribution]
                    ) -> tuple[dict[str, float] | None, str]:
    """Importance of each parameter for passing (status ``passed``) over all trials, or None and
    why it cannot be computed. The target is 0 for a passed trial and 1 otherwise, and the
    quantile selects exactly the passed trials. New-LLM trials only (a baseline has no gate)."""
    trials = newllm_trials(trials)
    passed = status_is(trials, "passed")
    k, n = int(passed.sum()), len(trials)
    if not distributions:
        return None, "no searched parameter varies across the trials"
    if n < MIN_IMPORTANCE_TRIALS:
        return None, f"needs at least {MIN_IMPORTANCE_TRIALS} trials, has {n}"
    if k in (0, n):
        return None, f"{'no' if k == 0 else 'every'} trial passed, so nothing separates passing from failing"
    study = rebuild_study(trials, (~passed).astype(float), distributions)
    return importances(study, (k - 0.5) / n), f"{k} of {n} trials passed"


# --- Pareto front ------------------------------------------------------------------------


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (n x 2, both columns minimised): a row
    is dominated when another is <= in both columns and < in at least one. A sweep in x order,
    n log n: the pairwise comparison took seconds and gigabytes at ten thousand trials."""
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    order = np.lexsort((y, x))                    # by x, then y
    xs, ys = x[order], y[order]
    new_x = np.r_[True, xs[1:] != xs[:-1]]        # the first row of each run of equal x
    start = np.maximum.accumulate(np.where(new_x, np.arange(len(xs)), 0))
    lowest_here = ys[start]                       # the lowest y at this x (sorted by y within x)
    lowest_before = np.r_[np.inf, np.minimum.accumulate(ys)[:-1]][start]  # at any smaller x
    # dominated: a smaller x with y <= this one, or this x with a smaller y
    dominated = (lowest_before <= ys) | (lowest_here < ys)
    front = np.empty(len(p), dtype=bool)
    front[order] = ~dominated
    return front


def newllm_front(trials: pd.DataFrame) -> pd.DataFrame:
    """The passed New-LLM trials with a val perplexity and a size, with columns ``size``
    (``sizes``) and ``front`` (on the Pareto front of val perplexity against size)."""
    newllm = newllm_trials(trials)
    passed = newllm.assign(size=sizes(newllm))[status_is(newllm, "passed")].dropna(subset=["val_ppl", "size"])
    return passed.assign(front=pareto_front(passed[["size", "val_ppl"]].to_numpy()))


# --- gate map ----------------------------------------------------------------------------


def bins(values: pd.Series, distribution: od.BaseDistribution) -> pd.Categorical:
    """Each value's bin, in order: categories as themselves, numbers taking at most MAX_BINS
    distinct values each as its own, other numbers in MAX_BINS equal bins of the distribution's
    range (equal in log for a log distribution)."""
    if isinstance(distribution, od.CategoricalDistribution):
        return pd.Categorical(values.map(str), categories=[str(c) for c in distribution.choices], ordered=True)
    distinct = sorted(values.dropna().unique().tolist())
    if len(distinct) <= MAX_BINS:
        return pd.Categorical(values.map(fmt), categories=[fmt(v) for v in distinct], ordered=True)
    low, high = distribution.low, distribution.high
    edges = np.geomspace(low, high, MAX_BINS + 1) if distribution.log else np.linspace(low, high, MAX_BINS + 1)
    labels = [f"{a:.3g}–{b:.3g}" for a, b in zip(edges[:-1], edges[1:])]
    return pd.cut(values.astype(float), edges, labels=labels, include_lowest=True)


def gate_table(trials: pd.DataFrame, name: str, distribution: od.BaseDistribution) -> pd.DataFrame:
    """Per bin of parameter ``name`` that holds trials: ``trials``, ``passed`` (trials whose
    Phase 1 passed the gate), ``pass_rate`` and the mean train / val effective-rank fractions
    (``train_er``, ``val_er``, over the trials that reached the analysis). New-LLM trials only."""
    trials = newllm_trials(trials)
    frame = pd.DataFrame({"bin": bins(trials[name], distribution),
                          "gate": trials["gate_passed"].fillna(False).astype(bool).to_numpy(),
                          "train_er": trials["train_effective_rank_fraction"].astype(float).to_numpy(),
                          "val_er": trials["val_effective_rank_fraction"].astype(float).to_numpy()})
    table = frame.groupby("bin", observed=True).agg(trials=("gate", "size"), passed=("gate", "sum"),
                                                    train_er=("train_er", "mean"), val_er=("val_er", "mean"))
    table["pass_rate"] = table.passed / table.trials
    return table


# --- training curves ---------------------------------------------------------------------


def curves(iterations: pd.DataFrame, phase: str, columns: list[str]) -> pd.DataFrame:
    """The rows of ``phase``, per trial from its latest attempt that reported that phase (a
    retried trial does not draw its lost attempt), sorted by trial and step: ``trial_id``,
    ``step`` and ``columns``."""
    if iterations.empty or "phase" not in iterations:
        return pd.DataFrame(columns=["trial_id", "step", *columns])
    rows = iterations[iterations["phase"] == phase]
    if "attempt" in rows:
        rows = rows[rows["attempt"] == rows.groupby("trial_id")["attempt"].transform("max")]
    keep = ["trial_id", "step", *[c for c in columns if c in rows]]
    return rows[keep].sort_values(["trial_id", "step"], kind="stable").reset_index(drop=True)


def trial_status(trials: pd.DataFrame, trial_ids) -> list[str]:
    """Each trial's final status, ``running`` for one with no row in ``trials`` yet."""
    known = dict(zip(trials["trial_id"], trials["status"].fillna("error"))) if len(trials) else {}
    return [known.get(t, "running") for t in trial_ids]


def drawn_curves(trials: pd.DataFrame, trial_ids: list[str], most: int) -> list[str]:
    """The trials of ``trial_ids`` whose curves a figure draws as lines: all of them up to
    ``most``; beyond, the ``most`` of lowest objective (still running ones last), in their order."""
    if len(trial_ids) <= most:
        return list(trial_ids)
    objective = dict(zip(trials["trial_id"], trials["objective"].astype(float))) if len(trials) else {}
    ranked = sorted(trial_ids, key=lambda t: (objective.get(t, math.inf), t))[:most]
    kept = set(ranked)
    return [t for t in trial_ids if t in kept]


def drawn_points(values: pd.Series, most: int, seed: int = 0) -> np.ndarray:
    """Which of ``values``' rows a figure draws as markers: all of them up to ``most``; beyond, the
    tenth of ``most`` of lowest value and a seeded random draw of the others (NaN among them): the
    low end exactly, the rest as a fair sample. Tens of thousands of markers take a browser longer
    to draw than the whole rest of a report."""
    drawn = np.ones(len(values), dtype=bool)
    if len(values) <= most:
        return drawn
    v = values.astype(float).reset_index(drop=True)
    best = v.nsmallest(most // 10).index.to_numpy()
    others = np.setdiff1d(np.arange(len(v)), best)
    rest = np.random.default_rng(seed).choice(others, size=most - len(best), replace=False)
    drawn[:] = False
    drawn[best], drawn[rest] = True, True
    return drawn


def curve_density(data: pd.DataFrame, column: str, bins: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the curves of ``data`` (``curves``' rows) lie: (steps, value bin centres, counts
    [bins, steps]) of the finite values of ``column``, in equal bins from the lowest value to
    the 99th percentile (a few diverging curves would otherwise squeeze the rest into one bin)."""
    y = data[column].astype(float).to_numpy()
    step = data["step"].to_numpy()
    finite = np.isfinite(y)
    y, step = y[finite], step[finite]
    steps = np.arange(int(step.min()), int(step.max()) + 1) if len(step) else np.arange(0)
    if not len(y):
        return steps, np.zeros(0), np.zeros((0, len(steps)))
    low, high = float(y.min()), float(np.quantile(y, 0.99))
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    counts, _, _ = np.histogram2d(np.clip(y, low, edges[-1]), step, bins=[edges, np.append(steps, steps[-1] + 1) - 0.5])
    return steps, (edges[:-1] + edges[1:]) / 2, counts


# --- the gate's saving -------------------------------------------------------------------


def gate_saving(trials: pd.DataFrame) -> tuple[int, float, float]:
    """The Phase 2 compute the gate saved, estimated as (gate-failed trials, mean Phase 2 seconds
    of the passed trials, their product; NaN without a passed trial). New-LLM trials only: a
    baseline has no gate, and its Phase 2 time is another model's."""
    trials = newllm_trials(trials)
    failed = int(status_is(trials, "gate_failed").sum())
    mean_p2 = float(trials.loc[status_is(trials, "passed"), "phase2_seconds"].astype(float).mean())
    return failed, mean_p2, failed * mean_p2


# --- top trials --------------------------------------------------------------------------


RESULT_COLUMNS = ["trial_id", "status", "val_ppl", "val_acc", "num_params", "num_params_non_embedding",
                  "train_effective_rank_fraction", "val_effective_rank_fraction", "phase1_passes"]


def top_trials(trials: pd.DataFrame, distributions: dict[str, od.BaseDistribution], n: int = 10) -> pd.DataFrame:
    """The ``n`` trials of lowest objective (penalised ones last), with results and the searched
    parameters; with baselines among the trials, the ``n`` best New-LLM trials (the configurations
    the search is about) and then the best trial of each baseline architecture, with their family
    and architecture."""
    baseline = is_baseline(trials)
    family = ["family", "architecture"] if baseline.any() else []
    columns = [c for c in dict.fromkeys([*RESULT_COLUMNS[:2], *family, *RESULT_COLUMNS[2:], *distributions])
               if c in trials]
    ranked = trials.sort_values("objective", kind="stable", na_position="last")
    top = ranked[~baseline[ranked.index]].head(n)
    if baseline.any():
        top = pd.concat([top, ranked[baseline[ranked.index]].drop_duplicates("architecture")])
    table = top[columns].reset_index(drop=True)
    if "replicates" in trials and trials.replicates.gt(1).any():
        # replicates: the objective is their mean; val_ppl is replicate 0's (the saved model's)
        spread = [_spread(m, sd, k, r) for m, sd, k, r in
                  zip(top.val_ppl_mean, top.val_ppl_std, top.replicates_passed, top.replicates)]
        table.insert(table.columns.get_loc("val_ppl") + 1, "val_ppl mean ± std", spread)
    return table


def _spread(mean, std, passed, replicates) -> str:
    """A trial's val_ppl over its replicates; empty for a trial without them (one that errored)."""
    if pd.isna(replicates):
        return ""
    if pd.isna(mean):
        return f"0/{int(replicates)} passed"
    std = f" ± {std:.2f}" if pd.notna(std) else ""
    return f"{mean:.2f}{std} ({int(passed)}/{int(replicates)} passed)"


# --- ablations ------------------------------------------------------------------------------


def run_val_ppl(trials: pd.DataFrame, iterations: pd.DataFrame) -> pd.DataFrame:
    """Each run (trial and replicate: one seed) of the finished ``trials`` that passed, with its
    val perplexity: its best Phase 2 epoch's, which is the model it ends with (for replicate 0,
    the trials table's ``val_ppl``). A run without Phase 2 rows (it failed the gate), with a
    non-finite epoch or one at the diverged penalty (it diverged), or of a trial that did not pass
    in the table's replicate 0, has none. Columns ``trial_id``, ``replicate``, ``val_ppl``."""
    columns = ["trial_id", "replicate", "val_ppl"]
    if iterations.empty or "phase" not in iterations or trials.empty:
        return pd.DataFrame(columns=columns)
    rows = iterations[(iterations["phase"] == "phase2") & iterations["trial_id"].isin(trials["trial_id"])]
    rows = rows.assign(replicate=rows["replicate"].fillna(0).astype(int) if "replicate" in rows else 0,
                       val_ppl=rows["val_ppl"].astype(float))
    runs = rows.groupby(["trial_id", "replicate"])["val_ppl"].agg(["min", "max"]).reset_index()
    runs = runs[runs["max"].map(math.isfinite) & (runs["max"] < GATE_PENALTY)]
    failed = set(trials.loc[~status_is(trials, "passed"), "trial_id"])
    runs = runs[~((runs["replicate"] == 0) & runs["trial_id"].isin(failed))]
    return runs.rename(columns={"min": "val_ppl"})[columns].reset_index(drop=True)


def ablation_pairs(trials: pd.DataFrame, iterations: pd.DataFrame) -> pd.DataFrame:
    """Every pair of runs at the same configuration and seed, one with everything (the parent
    New-LLM trial) and one without the part its sibling's ablation removes, where both passed.
    Columns ``ablation``, ``parent_id``, ``sibling_id``, ``replicate``, ``seed``, ``configuration``
    (the parent's architecture and C), ``val_ppl`` (with the part) and ``val_ppl_without``."""
    columns = ["ablation", "parent_id", "sibling_id", "replicate", "seed", "configuration", "val_ppl",
               "val_ppl_without"]
    siblings = trials[is_sibling(trials)]
    if siblings.empty:
        return pd.DataFrame(columns=columns)
    runs = run_val_ppl(trials, iterations)
    # each sibling's runs beside its parent's run of the same replicate (seed): one join, not a scan
    without = runs.merge(siblings[["trial_id", "ablation", "matched_trial_id"]], on="trial_id").rename(
        columns={"trial_id": "sibling_id", "matched_trial_id": "parent_id", "val_ppl": "val_ppl_without"})
    with_part = runs.rename(columns={"trial_id": "parent_id"})
    parents = trials[["trial_id", "seed", "architecture", "context_dim"]].rename(columns={"trial_id": "parent_id"})
    pairs = without.merge(with_part, on=["parent_id", "replicate"]).merge(parents, on="parent_id")
    pairs = pairs.assign(seed=pairs["seed"].astype(int) + pairs["replicate"],
                         configuration=pairs["architecture"] + ", C = " + pairs["context_dim"].astype(int).astype(str))
    return pairs[columns].sort_values(["ablation", "parent_id", "replicate"], kind="stable").reset_index(drop=True)


def ablation_effect(pairs: pd.DataFrame) -> stats.Interval:
    """How much the part an ablation removes changes val perplexity, over ``pairs`` of that
    ablation: the mean relative change (percent) of the run with it from the run without it, with
    its paired t-interval (``newllm.stats.paired_interval``). Positive: the part makes val
    perplexity worse, and removing it helps."""
    return stats.paired_interval(pairs["val_ppl"].tolist(), pairs["val_ppl_without"].tolist())


def ablation_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per ablation and configuration (parent trial), over its pairs (its seeds): each arm's mean
    val perplexity with its 95% t-interval (``newllm.stats.mean_interval``), and the paired
    change with its interval (``ablation_effect``); then per ablation, every configuration's pairs
    together. The intervals are NaN with one pair."""
    rows = []
    groups = [*pairs.groupby(["ablation", "parent_id"], sort=False),
              *((("all configurations", a), g) for a, g in pairs.groupby("ablation", sort=False) if g.parent_id.nunique() > 1)]
    for (first, second), group in groups:
        ablation, where = (first, second) if first != "all configurations" else (second, first)
        configuration = group.configuration.iloc[0] if where != "all configurations" else where
        full, ablated, change = (stats.mean_interval(group.val_ppl.tolist()),
                                 stats.mean_interval(group.val_ppl_without.tolist()), ablation_effect(group))
        rows.append({"ablation": ablation, "configuration": configuration,
                     "parent": where if where != "all configurations" else "", "pairs": len(group),
                     "val_ppl with": interval_text(full, "{:.2f}"), "val_ppl without": interval_text(ablated, "{:.2f}"),
                     "change": interval_text(change, "{:+.1f}%")})
    return pd.DataFrame(rows, columns=["ablation", "configuration", "parent", "pairs", "val_ppl with",
                                       "val_ppl without", "change"])


def interval_text(interval: stats.Interval, number: str) -> str:
    """``mean [low, high]`` in the ``number`` format, the mean alone where there is no interval."""
    mean = number.format(interval.mean)
    if math.isnan(interval.low):
        return mean
    return f"{mean} [{number.format(interval.low)}, {number.format(interval.high)}]"
