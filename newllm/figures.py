"""The figures of a search's report: plotly figures of its trials and iterations tables
(``newllm.experiment.load``), one function a figure.

The numbers a figure shows come from ``newllm.trials`` (``history``, ``pareto_front``,
``gate_table``, ``curves``, ...), so tests check them without drawing; this module only draws
them, and keeps the styles every figure shares (a status's colour, a baseline architecture's
colour and marker, the floors' lines).

Penalised trials (gate failed, diverged, errored) have no perplexity: they are drawn apart
from the passed ones, never as their 1e6 / 1e7 objective.

Baseline trials (``family == "baseline"``: an LSTM, GRU or transformer trained end to end) have
no Phase 1, gate or New-LLM configuration: the figures of those (gate map, Phase 1, time) draw the
New-LLM trials only, and the others draw the baselines apart, one marker per architecture, sizes
on the non-embedding parameter count.
"""

from __future__ import annotations

import math

import numpy as np
import optuna.distributions as od
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from newllm.trials import (
    PENALISED,
    baseline_trials,
    by_architecture,
    curve_density,
    curves,
    drawn_curves,
    drawn_points,
    gate_table,
    history,
    is_baseline,
    newllm_front,
    newllm_trials,
    pareto_front,
    size_label,
    sizes,
    status_is,
    trial_status,
)

STATUS_COLORS = {"passed": "#2ca02c", "gate_failed": "#ff7f0e", "diverged": "#d62728", "error": "#7f7f7f",
                 "running": "#1f77b4"}
HEIGHT = 420
MAX_CURVES = 40  # training curves drawn as lines; beyond, the best ones over a density of all
MAX_BARS = 60    # trials drawn as bars of seconds; beyond, a histogram of the seconds per phase
MAX_POINTS = 1000  # trials drawn as markers in a scatter; beyond, the best tenth and a random draw (drawn_points)
# colour and marker symbol of each baseline architecture (any other: BASELINE_OTHER)
BASELINE_STYLES = {"lstm": ("#9467bd", "triangle-up"), "gru": ("#8c564b", "square"),
                   "transformer": ("#17becf", "diamond")}
BASELINE_OTHER = ("#333333", "star")
FLOOR_STYLES = {"unigram_ppl": ("unigram floor", "#7f7f7f"), "bigram_ppl": ("bigram floor", "#404040")}


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


# --- optimisation history ---------------------------------------------------------------


def hover_names(h: pd.DataFrame) -> pd.Series:
    """Each trial's id as hovers name it, a baseline's with its architecture."""
    return h.trial_id.where(~h.baseline, h.trial_id + ", " + h.architecture.astype(str) + " baseline")


def history_figure(trials: pd.DataFrame, floors: dict | None = None) -> go.Figure:
    """Objective of each passed trial, the New-LLM best so far (of the trials the search
    proposed), each ablation's siblings and each baseline architecture's passed trials as their
    own markers and the floors (when known) as dashed lines; below, in their own panel, the
    gate-failed, diverged and errored trials at the moment they finished. Beyond MAX_POINTS
    trials, markers for those ``drawn_points`` draws; the best so far is of every trial."""
    h = history(trials)
    n, rows = len(h), 2 if h.status.isin(PENALISED).any() else 1
    # the best so far is a step line: the trials where it moves and the last one draw all of it
    steps = h[(h.best.ne(h.best.shift()) & h.best.notna()) | (h.number == n)]
    h = h[drawn_points(h.value, MAX_POINTS)]
    penalised = h[h.status.isin(PENALISED)]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, row_heights=[0.78, 0.22][:rows], vertical_spacing=0.05)
    ok = h[(h.status == "passed") & ~h.baseline & h.ablation.isna()]
    newllm = "New-LLM " if h.baseline.any() else ""
    fig.add_trace(go.Scatter(x=ok.number, y=ok.value, mode="markers", name=f"{newllm}passed trial",
                             marker=dict(color=STATUS_COLORS["passed"], size=9), text=ok.trial_id,
                             hovertemplate="trial %{x} (%{text})<br>val_ppl %{y:.4g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=steps.number, y=steps.best, mode="lines", line_shape="hv", name=f"{newllm}best so far",
                             line=dict(color="black", width=1.5)), row=1, col=1)
    for ablation, siblings in h[(h.status == "passed") & h.ablation.notna()].groupby("ablation", sort=False):
        fig.add_trace(go.Scatter(x=siblings.number, y=siblings.value, mode="markers", name=f"{ablation} sibling",
                                 marker=dict(color=STATUS_COLORS["passed"], size=9, symbol="circle-open"),
                                 text=siblings.trial_id,
                                 hovertemplate="trial %{x} (%{text})<br>val_ppl %{y:.4g}<extra></extra>"),
                      row=1, col=1)
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
    fig.update_xaxes(title_text="trial (in the order finished)", dtick=max(1, math.ceil(n / 10)), row=rows, col=1)
    fig.update_layout(height=HEIGHT + 60 * (rows - 1), margin=dict(t=30))
    return fig


# --- parameter importance ----------------------------------------------------------------


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


def pareto_figure(trials: pd.DataFrame, floors: dict | None = None) -> go.Figure:
    """Val perplexity against size (``sizes``) for the passed New-LLM trials, the non-dominated
    ones joined as the front; each baseline architecture's passed trials as its own markers, its
    front dotted; the floors (when known) as dashed lines."""
    passed = trials.assign(size=sizes(trials))[status_is(trials, "passed")].dropna(subset=["val_ppl", "size"])
    word = size_label(trials)
    hover = f"%{{text}}<br>%{{x:,}} {word}<br>val_ppl %{{y:.4g}}<extra></extra>"
    newllm = newllm_front(trials)
    dominated = newllm[~newllm.front]
    fig = go.Figure()
    for sel, name, color in ((dominated[drawn_points(dominated.val_ppl, MAX_POINTS)], "dominated", "#aaaaaa"),
                             (newllm[newllm.front], "Pareto front", STATUS_COLORS["passed"])):
        sel = sel.sort_values("size")
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
    architecture. Beyond MAX_CURVES trials, lines for the MAX_CURVES of lowest objective
    (``drawn_curves``) over a shading of where all the trials' curves lie (``curve_density``):
    ten thousand lines would make a file no browser opens and a picture nobody can read."""
    data = curves(iterations, phase, list(columns))
    fig = make_subplots(rows=1, cols=len(columns), horizontal_spacing=0.1)
    trial_ids = list(dict.fromkeys(data.trial_id))
    drawn = drawn_curves(trials, trial_ids, MAX_CURVES)
    if len(drawn) < len(trial_ids):
        for col, column in enumerate(columns, start=1):
            steps, centres, counts = curve_density(data, column)
            fig.add_trace(go.Heatmap(x=steps, y=centres, z=np.where(counts > 0, counts, np.nan), colorscale="Greys",
                                     zmin=0, showscale=False, name="all trials",
                                     hovertemplate=f"{step_label} %{{x}}, about %{{y:.4g}}: %{{z}} trials<extra></extra>"),
                          row=1, col=col)
    # a baseline's architecture: from its trials row, or (still running) from its reported rows
    reported = iterations[is_baseline(iterations)] if "architecture" in iterations else iterations.iloc[:0]
    base = baseline_trials(trials)
    architectures = {**dict(zip(reported["trial_id"], reported.get("architecture", []))),
                     **(dict(zip(base["trial_id"], base["architecture"])) if "architecture" in base else {})}
    shown: set[str] = set()
    by_trial = dict(tuple(data[data.trial_id.isin(drawn)].groupby("trial_id", sort=False)))
    for trial_id, status in zip(drawn, trial_status(trials, drawn)):
        rows = by_trial[trial_id]
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


def time_figure(trials: pd.DataFrame) -> go.Figure:
    """Seconds per phase of each New-LLM trial, stacked, in the order they finished; beyond
    MAX_BARS trials, how many trials took how long in each phase (a histogram per phase)."""
    trials = newllm_trials(trials)
    fig = go.Figure()
    if len(trials) > MAX_BARS:
        for column, label in PHASE_SECONDS.items():
            fig.add_trace(go.Histogram(x=trials[column].astype(float).dropna(), name=label, opacity=0.6,
                                       hovertemplate="%{x}s: %{y} trials<extra>" + label + "</extra>"))
        fig.update_layout(barmode="overlay", height=HEIGHT, margin=dict(t=30), xaxis_title="seconds",
                          yaxis_title="trials")
        return fig
    for column, label in PHASE_SECONDS.items():
        fig.add_trace(go.Bar(y=trials["trial_id"], x=trials[column].astype(float).fillna(0.0), name=label,
                             orientation="h", hovertemplate="%{y}: %{x:.1f}s<extra>" + label + "</extra>"))
    fig.update_layout(barmode="stack", height=max(250, 80 + 22 * len(trials)), margin=dict(t=30),
                      xaxis_title="seconds", yaxis=dict(autorange="reversed", type="category"))
    return fig
