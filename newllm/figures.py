"""The figures of a search's report: pure functions from its trials and iterations tables
(``newllm.experiment.load``) to plotly figures.

The numbers a figure shows come from a small pure function beside it (``history``,
``pareto_front``, ``gate_table``, ``curves``, ``gate_saving``, ...), so tests check them without
drawing. Optuna's own plots and importance evaluators run on a study rebuilt from the trials
table (``rebuild_study``) with the space's distributions, or, where the caller has none,
distributions inferred from the trials' configuration columns (``infer_distributions``).

Penalised trials (gate failed, diverged, errored) have no perplexity: they are drawn apart
from the passed ones, never as their 1e6 / 1e7 objective.

Baseline trials (``family == "baseline"``: an LSTM, GRU or transformer trained end to end) have
no Phase 1, gate or New-LLM configuration: the figures of those (importance, gate map, Phase 1,
time, the gate's saving) read the New-LLM trials only, and the others draw the baselines apart,
one marker per architecture. Sizes are compared on the non-embedding parameter count
(``sizes``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
import optuna.distributions as od
import pandas as pd
import plotly.graph_objects as go
from optuna.importance import PedAnovaImportanceEvaluator
from plotly.subplots import make_subplots

from newllm.config import field_types
from newllm.experiment import baseline_trials, best_newllm_trial, is_baseline, newllm_trials, status_is

STATUS_COLORS = {"passed": "#2ca02c", "gate_failed": "#ff7f0e", "diverged": "#d62728", "error": "#7f7f7f",
                 "running": "#1f77b4"}
PENALISED = ("gate_failed", "diverged", "error")
MIN_IMPORTANCE_TRIALS = 4  # fewer trials give no meaningful importance
TOP_TRIALS = 5             # PED-ANOVA's "good" trials: at least this many where the trials allow
MAX_BINS = 5               # a numeric parameter's bins in the gate map
HEIGHT = 420
# colour and marker symbol of each baseline architecture (any other: BASELINE_OTHER)
BASELINE_STYLES = {"lstm": ("#9467bd", "triangle-up"), "gru": ("#8c564b", "square"),
                   "transformer": ("#17becf", "diamond")}
BASELINE_OTHER = ("#333333", "star")
FLOOR_STYLES = {"unigram_ppl": ("unigram floor", "#7f7f7f"), "bigram_ppl": ("bigram floor", "#404040")}


def fmt(value) -> str:
    """A number short (4 significant digits), anything else as itself."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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


def baseline_style(architecture: str) -> tuple[str, str]:
    """(colour, marker symbol) of a baseline architecture, the same in every figure."""
    return BASELINE_STYLES.get(architecture, BASELINE_OTHER)


def add_floors(fig: go.Figure, floors: dict | None, **where) -> None:
    """The perplexity floors (``newllm.floors.recorded_floors``; None: not known) as labelled
    dashed horizontal lines, in the subplot ``where`` (row=, col=) names."""
    for key, (label, color) in FLOOR_STYLES.items():
        if floors and floors.get(key) is not None:
            fig.add_hline(y=float(floors[key]), line_dash="dash", line_color=color, line_width=1,
                          annotation_text=f"{label} {floors[key]:.4g}", annotation_position="top left",
                          annotation_font_color=color, **where)


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
    frozen = []
    for (_, row), value in zip(trials.iterrows(), values):
        if pd.isna(value) or not math.isfinite(value):
            continue
        params = {name: _python(row[name]) for name in distributions if name in row and pd.notna(row[name])}
        frozen.append(optuna.trial.create_trial(value=float(value), params=params,
                                                distributions={k: distributions[k] for k in params}))
    study.add_trials(frozen)
    return study


def _python(value):
    """A table cell as the plain Python value Optuna's distributions hold."""
    return value.item() if isinstance(value, np.generic) else value


# --- optimisation history ---------------------------------------------------------------


def history(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial, in the order they finished (``number`` from 1): ``trial_id``,
    ``status``, ``baseline`` (bool), ``architecture``, ``objective``, ``value`` (the objective of a
    passed trial, NaN for a penalised one) and ``best``, the lowest value so far of the New-LLM
    trials (NaN before the first passed one)."""
    objective = trials["objective"].astype(float).reset_index(drop=True)
    value = objective.where(status_is(trials, "passed").to_numpy())
    baseline = is_baseline(trials).to_numpy()
    architecture = trials["architecture"].to_numpy() if "architecture" in trials else [None] * len(trials)
    return pd.DataFrame({"number": np.arange(1, len(trials) + 1), "trial_id": trials["trial_id"].to_numpy(),
                         "status": trials["status"].fillna("error").to_numpy(), "baseline": baseline,
                         "architecture": architecture, "objective": objective, "value": value,
                         "best": value.where(~baseline).cummin().ffill()})


def hover_names(h: pd.DataFrame) -> pd.Series:
    """Each trial's id as hovers name it, a baseline's with its architecture."""
    return h.trial_id.where(~h.baseline, h.trial_id + ", " + h.architecture.astype(str) + " baseline")


def history_figure(trials: pd.DataFrame, floors: dict | None = None) -> go.Figure:
    """Objective of each passed trial, the New-LLM best so far, each baseline architecture's
    passed trials as its own markers and the floors (when known) as dashed lines; below, in
    their own panel, the gate-failed, diverged and errored trials at the moment they finished."""
    h = history(trials)
    penalised = h[h.status.isin(PENALISED)]
    rows = 2 if len(penalised) else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, row_heights=[0.78, 0.22][:rows], vertical_spacing=0.05)
    ok = h[(h.status == "passed") & ~h.baseline]
    newllm = "New-LLM " if h.baseline.any() else ""
    fig.add_trace(go.Scatter(x=ok.number, y=ok.value, mode="markers", name=f"{newllm}passed trial",
                             marker=dict(color=STATUS_COLORS["passed"], size=9), text=ok.trial_id,
                             hovertemplate="trial %{x} (%{text})<br>val_ppl %{y:.4g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=h.number, y=h.best, mode="lines", line_shape="hv", name=f"{newllm}best so far",
                             line=dict(color="black", width=1.5)), row=1, col=1)
    for architecture, base in by_architecture(h[(h.status == "passed") & h.baseline]):
        color, symbol = baseline_style(architecture)
        fig.add_trace(go.Scatter(x=base.number, y=base.value, mode="markers", name=f"{architecture} (baseline)",
                                 legendgroup=architecture, text=hover_names(base),
                                 marker=dict(color=color, symbol=symbol, size=10, line=dict(width=1, color="white")),
                                 hovertemplate="trial %{x} (%{text})<br>val_ppl %{y:.4g}<extra></extra>"),
                      row=1, col=1)
    add_floors(fig, floors, row=1, col=1)
    for status, bad in penalised.groupby("status", sort=False):
        label = status.replace("_", " ")
        fig.add_trace(go.Scatter(x=bad.number, y=[label] * len(bad), mode="markers", name=label,
                                 text=hover_names(bad), customdata=bad.objective,
                                 marker=dict(color=STATUS_COLORS.get(status, "black"), size=10, symbol="x"),
                                 hovertemplate="trial %{x} (%{text})<br>objective %{customdata:.4g}<extra></extra>"),
                      row=2, col=1)
    if rows == 2:
        fig.update_yaxes(title_text="penalised", type="category", row=2, col=1)
    else:
        fig.add_annotation(text="no gate-failed, diverged or errored trial", showarrow=False, xref="x domain",
                           yref="y domain", x=0, y=1.01, xanchor="left", yanchor="bottom")
    fig.update_yaxes(title_text="val perplexity", row=1, col=1)
    fig.update_xaxes(title_text="trial (in the order finished)", dtick=max(1, math.ceil(len(h) / 10)), row=rows, col=1)
    fig.update_layout(height=HEIGHT + 60 * (rows - 1), margin=dict(t=30))
    return fig


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


def importance_figure(objective: dict[str, float] | None, gate: dict[str, float] | None) -> go.Figure:
    """Horizontal bars: each parameter's importance for val perplexity and for passing."""
    names = list(objective or gate)[::-1]  # most important on top
    fig = go.Figure()
    for label, values, color in (("val perplexity (passed trials)", objective, "#1f77b4"),
                                 ("passing (all trials)", gate, STATUS_COLORS["gate_failed"])):
        if values is not None:
            fig.add_trace(go.Bar(y=names, x=[values.get(n, 0.0) for n in names], orientation="h", name=label,
                                 marker_color=color, hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(barmode="group", height=max(250, 60 + 45 * len(names)), margin=dict(t=30),
                      xaxis_title="PED-ANOVA importance (sums to 1)")
    return fig


# --- Pareto front ------------------------------------------------------------------------


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (n x k, every column minimised): a
    row is dominated when another is <= in every column and < in at least one."""
    p = np.asarray(points, dtype=float)
    no_worse = (p[None, :, :] <= p[:, None, :]).all(axis=2)   # [i, j]: j no worse than i everywhere
    better = (p[None, :, :] < p[:, None, :]).any(axis=2)       # [i, j]: j better than i somewhere
    return ~(no_worse & better).any(axis=1)


def pareto_figure(trials: pd.DataFrame, floors: dict | None = None) -> go.Figure:
    """Val perplexity against size (``sizes``) for the passed New-LLM trials, the non-dominated
    ones joined as the front; each baseline architecture's passed trials as its own markers, its
    front dotted; the floors (when known) as dashed lines."""
    passed = trials.assign(size=sizes(trials))[status_is(trials, "passed")].dropna(subset=["val_ppl", "size"])
    word = size_label(trials)
    hover = f"%{{text}}<br>%{{x:,}} {word}<br>val_ppl %{{y:.4g}}<extra></extra>"
    newllm = passed[~is_baseline(passed)]
    front = pareto_front(newllm[["size", "val_ppl"]].to_numpy()) if len(newllm) else np.zeros(0, dtype=bool)
    fig = go.Figure()
    for mask, name, color in ((~front, "dominated", "#aaaaaa"), (front, "Pareto front", STATUS_COLORS["passed"])):
        sel = newllm[mask].sort_values("size")
        fig.add_trace(go.Scatter(x=sel["size"], y=sel.val_ppl, mode="markers+lines" if name != "dominated"
                                 else "markers", name=name, text=sel.trial_id, line_shape="hv",
                                 marker=dict(color=color, size=9), hovertemplate=hover))
    for architecture, base in by_architecture(passed[is_baseline(passed)]):
        color, symbol = baseline_style(architecture)
        base = base.sort_values("size")
        fig.add_trace(go.Scatter(x=base["size"], y=base.val_ppl, mode="markers", name=f"{architecture} (baseline)",
                                 legendgroup=architecture, text=base.trial_id, hovertemplate=hover,
                                 marker=dict(color=color, symbol=symbol, size=10, line=dict(width=1, color="white"))))
        own = base[pareto_front(base[["size", "val_ppl"]].to_numpy())]
        fig.add_trace(go.Scatter(x=own["size"], y=own.val_ppl, mode="lines", line_shape="hv", legendgroup=architecture,
                                 name=f"{architecture} front", showlegend=False, hoverinfo="skip",
                                 line=dict(color=color, dash="dot", width=1.5)))
    add_floors(fig, floors)
    fig.update_layout(height=HEIGHT, margin=dict(t=30), xaxis_title=word, yaxis_title="val perplexity")
    return fig


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


def gate_map_figure(trials: pd.DataFrame, distributions: dict[str, od.BaseDistribution]) -> go.Figure:
    """One panel per searched parameter: the gate pass rate (bars) and the mean train and val
    effective-rank fractions (markers) per bin, with the gate's thresholds where they are fixed.
    New-LLM trials only."""
    trials = newllm_trials(trials)
    names = list(distributions)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, vertical_spacing=0.6 / rows)
    thresholds = [(c, dash) for c, dash in (("gate_train_er", "dash"), ("gate_val_er", "dot"))
                  if c in trials and trials[c].nunique() == 1]
    for i, name in enumerate(names):
        row, col = i // cols + 1, i % cols + 1
        table = gate_table(trials, name, distributions[name])
        x = table.index.astype(str)
        fig.add_trace(go.Bar(x=x, y=table.pass_rate, name="gate pass rate", legendgroup="rate", showlegend=i == 0,
                             marker_color="#9ecae1", text=[f"{p}/{n}" for p, n in zip(table.passed, table.trials)],
                             textposition="inside", hovertemplate="%{x}: %{y:.0%} passed (%{text})<extra></extra>"),
                      row=row, col=col)
        for column, label, color in (("train_er", "train ER fraction", "#08519c"),
                                     ("val_er", "val ER fraction", STATUS_COLORS["gate_failed"])):
            fig.add_trace(go.Scatter(x=x, y=table[column], mode="markers+lines", name=label, legendgroup=column,
                                     showlegend=i == 0, marker=dict(color=color, size=8),
                                     hovertemplate="%{x}: %{y:.1%}<extra>" + label + "</extra>"), row=row, col=col)
        for column, dash in thresholds:
            fig.add_hline(y=float(trials[column].iloc[0]), line_dash=dash, line_color="#555555", line_width=1,
                          row=row, col=col)
        fig.update_yaxes(range=[0, 1.05], tickformat=".0%", row=row, col=col)
    fig.update_layout(height=330 * rows, margin=dict(t=40), legend=dict(orientation="h", y=-0.12))
    return fig


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


def curve_style(trial_id: str, status: str, architecture: str | None) -> tuple[str, str, str, str, str]:
    """(legend group, legend name, colour, dash, hover name) of a trial's curve: by its status, a
    baseline's (``architecture`` given) dashed, by its architecture."""
    if architecture is None:
        return status, status.replace("_", " "), STATUS_COLORS.get(status, "black"), "solid", trial_id
    return (architecture, f"{architecture} (baseline)", baseline_style(architecture)[0], "dash",
            f"{trial_id}, {architecture} baseline, {status.replace('_', ' ')}")


def curves_figure(iterations: pd.DataFrame, trials: pd.DataFrame, phase: str, columns: dict[str, str],
                  step_label: str) -> go.Figure:
    """One panel per column of ``columns`` (name -> axis title), one line per trial over the
    steps of ``phase``, coloured by the trial's status; a baseline's dashed, coloured by its
    architecture."""
    data = curves(iterations, phase, list(columns))
    fig = make_subplots(rows=1, cols=len(columns), horizontal_spacing=0.1)
    trial_ids = list(dict.fromkeys(data.trial_id))
    # a baseline's architecture: from its trials row, or (still running) from its reported rows
    reported = iterations[is_baseline(iterations)] if "architecture" in iterations else iterations.iloc[:0]
    base = baseline_trials(trials)
    architectures = {**dict(zip(reported["trial_id"], reported.get("architecture", []))),
                     **(dict(zip(base["trial_id"], base["architecture"])) if "architecture" in base else {})}
    shown: set[str] = set()
    for trial_id, status in zip(trial_ids, trial_status(trials, trial_ids)):
        rows = data[data.trial_id == trial_id]
        group, name, color, dash, who = curve_style(trial_id, status, architectures.get(trial_id))
        for col, column in enumerate(columns, start=1):
            y = rows[column].astype(float).where(np.isfinite(rows[column].astype(float)))
            fig.add_trace(go.Scatter(x=rows.step, y=y, mode="lines+markers", name=name, legendgroup=group,
                                     showlegend=group not in shown, line=dict(color=color, width=1.5, dash=dash),
                                     marker=dict(size=5),
                                     hovertemplate=f"{who}<br>{step_label} %{{x}}: %{{y:.4g}}<extra></extra>"),
                          row=1, col=col)
            shown.add(group)
    last = int(data.step.max()) if len(data) else 1
    for col, title in enumerate(columns.values(), start=1):
        fig.update_yaxes(title_text=title, row=1, col=col)
        fig.update_xaxes(title_text=step_label, dtick=max(1, math.ceil(last / 10)), row=1, col=col)
    fig.update_layout(height=HEIGHT, margin=dict(t=30))
    return fig


def phase1_figure(iterations: pd.DataFrame, trials: pd.DataFrame) -> go.Figure:
    """Phase 1 (CVFP) per pass: converged ratio and effective-rank fraction of each trial."""
    return curves_figure(iterations, trials, "phase1", {"converged_ratio": "converged ratio",
                                                        "effective_rank_fraction": "effective rank / C"}, "pass")


def phase2_figure(iterations: pd.DataFrame, trials: pd.DataFrame) -> go.Figure:
    """Phase 2 per epoch: val perplexity of each trial that reached it."""
    return curves_figure(iterations, trials, "phase2", {"val_ppl": "val perplexity"}, "epoch")


# --- time --------------------------------------------------------------------------------


PHASE_SECONDS = {"phase1_seconds": "Phase 1", "analysis_seconds": "analysis", "phase2_seconds": "Phase 2"}


def gate_saving(trials: pd.DataFrame) -> tuple[int, float, float]:
    """The Phase 2 compute the gate saved, estimated as (gate-failed trials, mean Phase 2 seconds
    of the passed trials, their product; NaN without a passed trial). New-LLM trials only: a
    baseline has no gate, and its Phase 2 time is another model's."""
    trials = newllm_trials(trials)
    failed = int(status_is(trials, "gate_failed").sum())
    mean_p2 = float(trials.loc[status_is(trials, "passed"), "phase2_seconds"].astype(float).mean())
    return failed, mean_p2, failed * mean_p2


def time_figure(trials: pd.DataFrame) -> go.Figure:
    """Seconds per phase of each New-LLM trial, stacked, in the order they finished."""
    trials = newllm_trials(trials)
    fig = go.Figure()
    for column, label in PHASE_SECONDS.items():
        fig.add_trace(go.Bar(y=trials["trial_id"], x=trials[column].astype(float).fillna(0.0), name=label,
                             orientation="h", hovertemplate="%{y}: %{x:.1f}s<extra>" + label + "</extra>"))
    fig.update_layout(barmode="stack", height=max(250, 80 + 22 * len(trials)), margin=dict(t=30),
                      xaxis_title="seconds", yaxis=dict(autorange="reversed", type="category"))
    return fig


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
