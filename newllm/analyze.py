"""``python -m newllm.analyze <experiment dir>``: what a search found, as one HTML report.

Reads the experiment's ``trials.parquet`` and ``iterations.parquet`` (``newllm.experiment.load``),
finished or still running (what has landed so far), and writes ``report.html`` (to ``--out``,
by default the experiment directory): the figures of ``newllm.figures``, each with a caption,
and the top trials with their configurations, their numbers from ``newllm.trials``. Baseline
trials (LSTM, GRU, transformer, in the same table with ``family == "baseline"``) are drawn beside
New-LLM's and compared with its best trial at no more non-embedding parameters
(``comparison_line``); the perplexity floors of the data (``floors.json``), where the search
recorded them, are drawn as lines. The file is self-contained: plotly.js is embedded once, so it
opens offline and can be mailed. It prints a short summary and the report's path. A directory
that holds no results is a one-line ``error:`` and exit code 2.

``write_report(directory)`` does the same from Python (a search calls it when it ends), and a
search prints its end-of-search summary with ``trials_table_text`` and ``summary``, the lines
the report opens with.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna.distributions as od
import optuna.visualization
import pandas as pd
import plotly.graph_objects as go
import pyarrow as pa
from plotly.offline import get_plotlyjs

from newllm import figures, stats
from newllm.checks import check_writable_dir, path_arg
from newllm.experiment import REPORT_FILE, load, write_file
from newllm.floors import floors_line, recorded_floors
from newllm.space import ABLATED, recorded_distributions
from newllm.trials import (
    ablation_effect,
    ablation_pairs,
    ablation_table,
    baseline_trials,
    best_newllm_trial,
    curves,
    drawn_points,
    fmt,
    gate_importance,
    gate_saving,
    infer_distributions,
    interval_text,
    is_baseline,
    is_sibling,
    newllm_front,
    newllm_trials,
    objective_importance,
    rebuild_study,
    size_label,
    sizes,
    status_is,
    top_trials,
)



class ExperimentError(ValueError):
    """A directory whose results cannot be reported; the message says why in one line."""


@dataclass
class Section:
    """A titled part of the report: a figure, or HTML (a table, or a note saying what is missing)."""

    title: str
    caption: str
    figure: go.Figure | None = None
    body: str = ""


@dataclass
class Report:
    """The report of one experiment: its summary lines and its sections, in order."""
    name: str
    directory: str
    summary: list[str]
    sections: list[Section] = field(default_factory=list)


def read_experiment(directory: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, iterations) of the experiment, or ExperimentError naming what is wrong."""
    d = str(directory)
    if "://" not in d and not Path(d).is_dir():
        raise ExperimentError(f"{d!r} is not a directory")
    try:
        trials, iterations = load(d)
    except FileNotFoundError as e:
        raise ExperimentError(str(e)) from e
    except (OSError, pa.ArrowException) as e:
        raise ExperimentError(f"cannot read the results in {d!r}: {str(e).splitlines()[0]}") from e
    if trials.empty and iterations.empty:
        raise ExperimentError(f"{d!r} holds no trial or iteration rows yet: nothing to report")
    return trials, iterations


# --- what the report says ----------------------------------------------------------------


def summary(trials: pd.DataFrame, iterations: pd.DataFrame, distributions: dict[str, od.BaseDistribution],
            floors: dict | None = None) -> list[str]:
    """What a search found, in a few lines (the report's head, and what the CLI and the search
    print at the end): trials by status, the best New-LLM trial and configuration (with its
    replicates' spread where it has several), how it compares with the baselines, the trials
    whose Phase 2 ASHA stopped early, the gate's saving, what each ablation changes
    (``ablation_lines``) and the floors (``newllm.floors.recorded_floors``)."""
    reported = set(iterations["trial_id"]) if "trial_id" in iterations else set()
    finished = set(trials["trial_id"]) if len(trials) else set()
    lines = []
    if trials.empty:
        lines.append("No trial has finished yet.")
    else:
        counts = trials["status"].fillna("error").value_counts()
        lines.append(f"{len(trials)} trials finished: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        baselines = baseline_trials(trials)
        if len(baselines):
            kinds = baselines["architecture"].fillna("?").value_counts()
            passed = int(status_is(baselines, "passed").sum())
            lines.append(f"Of them {len(baselines)} baselines ({', '.join(f'{n} {a}' for a, n in kinds.items())}), "
                         f"{passed} passed.")
    if reported - finished:
        lines.append(f"{len(reported - finished)} more trials have reported rows but no result (running, or the "
                     f"search stopped).")
    if trials.empty:
        return lines
    which = "New-LLM trial" if is_baseline(trials).any() else "trial"
    best = best_newllm_trial(trials)
    if best is not None:
        non_embedding = best.get("num_params_non_embedding")
        size = f"{int(best.num_params):,} parameters" + (f" ({int(non_embedding):,} non-embedding)"
                                                         if pd.notna(non_embedding) else "")
        lines.append(f"Best {which} {best.trial_id}: val_ppl {best.val_ppl:.2f}, val_acc {best.val_acc:.1%}, "
                     f"{size}; " + ", ".join(f"{k}={fmt(best[k])}" for k in distributions))
        if (replicates := replicates_line(best)) is not None:
            lines.append(replicates)
    else:
        lines.append(f"No {which} passed: no best configuration.")
    comparison = comparison_line(trials)
    if comparison is not None:
        lines.append(comparison)
    if (stopped := asha_stopped_line(trials)) is not None:
        lines.append(stopped)
    lines.append(gate_saving_line(trials))
    lines.extend(ablation_lines(trials, iterations))
    if floors is not None:
        lines.append(floors_line(floors))
    return lines


def replicates_line(best: pd.Series) -> str | None:
    """A trial's val_ppl over its replicates (seeds), in one line, where it has more than one:
    its objective is their mean, while the best-trial line shows replicate 0's (the saved model's)."""
    replicates = best.get("replicates")
    if pd.isna(replicates) or replicates <= 1:
        return None
    spread = f" ± {best.val_ppl_std:.2f}" if pd.notna(best.val_ppl_std) else ""
    return (f"  over its {int(replicates)} replicates (seeds): objective {best.objective:.2f}, val_ppl "
            f"{best.val_ppl_mean:.2f}{spread} over the {int(best.replicates_passed)} that passed; the figures "
            f"above are replicate 0's, the saved model's")


def asha_stopped_line(trials: pd.DataFrame) -> str | None:
    """The trials whose Phase 2 ASHA stopped early, in one line (counted per family where the
    table holds baselines): their val_ppl is from fewer epochs. None when it stopped none."""
    if "phase2_stop_reason" not in trials:
        return None
    stopped = trials[trials["phase2_stop_reason"].eq("scheduler").fillna(False).astype(bool)]
    if stopped.empty:
        return None
    of = ""
    if is_baseline(trials).any():
        families = stopped["family"].fillna("newllm").value_counts()
        of = f" ({', '.join(f'{n} {f}' for f, n in families.items())})"
    return (f"ASHA stopped Phase 2 of {len(stopped)} passed trials early{of}, after "
            f"{int(stopped.phase2_epochs_run.sum())} epochs in all; their val_ppl is their best epoch's, which "
            f"their checkpoints hold")


def trials_table_text(trials: pd.DataFrame, searched: list[str], baseline_params: list[str] | None) -> str:
    """The trials as a text table, by objective, for the search to print at its end: id, status,
    the ``searched`` parameters, Phase 1, Phase 2 and the objective; with ``baseline_params`` (the
    baselines' searched parameters; None: the search had no baselines) also each trial's
    architecture, non-embedding size and those parameters; with ablation siblings, each one's
    ablation and parent. Columns the table lacks are left out."""
    columns = ["trial_id", "status", *searched, "phase1_passes", "train_effective_rank_fraction",
               "phase2_epochs_run", "val_ppl", "objective"]
    if baseline_params is not None:  # the baselines' own columns, after their architecture
        columns = [*columns[:2], "architecture", *columns[2:], "num_params_non_embedding", *baseline_params]
        columns = list(dict.fromkeys(columns))
    if is_sibling(trials).any():  # which ablation a sibling is, and its parent
        columns = list(dict.fromkeys([*columns[:2], "ablation", "matched_trial_id", *columns[2:]]))
    table = trials.sort_values("objective")[[c for c in columns if c in trials]]
    with pd.option_context("display.max_columns", 50, "display.width", 200, "display.float_format", "{:.4g}".format):
        return table.to_string(index=False)


def comparison_line(trials: pd.DataFrame) -> str | None:
    """Is New-LLM competitive at its size, in one sentence (the search's summary and the report
    both print it): its best passed trial (lowest objective) against the best passed baseline
    (lowest val_ppl) with no more non-embedding parameters (``sizes``). None when the
    table holds no baseline trial."""
    trials = trials.reset_index(drop=True)  # sizes are looked up by index
    baseline = is_baseline(trials)
    if not baseline.any():
        return None
    size, word = sizes(trials), size_label(trials)
    known = status_is(trials, "passed") & trials["val_ppl"].notna() & size.notna()
    ok = trials[known & baseline].sort_values("val_ppl", kind="stable")
    best = best_newllm_trial(trials)

    def described(row: pd.Series) -> str:
        return f"{row.architecture} {row.trial_id} (val_ppl {row.val_ppl:.2f}, {int(size[row.name]):,} {word})"

    if best is None or not known[best.name]:
        if ok.empty:
            return "Neither a New-LLM nor a baseline trial passed: nothing to compare."
        return f"No New-LLM trial passed, so there is nothing to compare; the best baseline is {described(ok.iloc[0])}."
    head = f"Best New-LLM trial {best.trial_id} (val_ppl {best.val_ppl:.2f}, {int(size[best.name]):,} {word})"
    if ok.empty:
        tally = ", ".join(f"{n} {s}" for s, n in trials.status[baseline].fillna("error").value_counts().items())
        return f"{head}: no baseline trial passed ({tally}), so there is nothing to compare it with."
    fits = ok[size[ok.index] <= size[best.name]]
    if fits.empty:
        return (f"{head}: no passed baseline has as few {word} or fewer; the best baseline overall is "
                f"{described(ok.iloc[0])}.")
    rival = fits.iloc[0]
    ratio = best.val_ppl / rival.val_ppl
    if ratio > 1:
        verdict = f"{rival.architecture} is better, New-LLM's val_ppl {ratio - 1:.1%} higher ({ratio:.2f}x)"
    elif ratio < 1:
        verdict = f"New-LLM is better, its val_ppl {1 - ratio:.1%} lower ({ratio:.2f}x)"
    else:
        verdict = "they tie"
    return f"{head} against the best baseline with no more {word}, {described(rival)}: {verdict}."


def ablation_lines(trials: pd.DataFrame, iterations: pd.DataFrame) -> list[str]:
    """One line per ablation the trials hold, e.g. "Phase 1 changes val_ppl by +9.4% (95% CI [+4%,
    +15%], 6 pairs): removing it helps": the mean relative change of val perplexity that the part
    makes, over the pairs of a New-LLM run and its sibling's at the same configuration and seed
    (``ablation_pairs``), with its paired t-interval, and each arm's mean val perplexity with its
    interval. The verdict is the interval's: it helps, removing it helps, or no clear effect. Runs
    that did not pass (the gate, or diverged) form no pair; the line counts them in each arm, as
    a part whose removal fails the gate helps in a way no perplexity shows."""
    siblings = trials[is_sibling(trials)]
    pairs = ablation_pairs(trials, iterations)
    lines = []
    for ablation in dict.fromkeys(siblings["ablation"]) if len(siblings) else []:
        part, of = ABLATED.get(ablation, ablation), pairs[pairs.ablation == ablation]
        mine = siblings[siblings.ablation == ablation]
        failed = failed_runs_text(trials[trials.trial_id.isin(mine.matched_trial_id)], mine)
        if of.empty:
            lines.append(f"{part}: no pair of a New-LLM run and its {ablation} sibling's at the same seed has both "
                         f"passed: no comparison{failed}.")
            continue
        change = ablation_effect(of)
        n = f"{len(of)} pair{'s' if len(of) != 1 else ''}"
        if len(of) < 2:
            lines.append(f"{part} changes val_ppl by {change.mean:+.1f}% ({n}: too few for an interval){failed}.")
            continue
        verdict = ("removing it helps" if change.low > 0 else "it helps" if change.high < 0 else
                   "no clear effect at this number of pairs")
        full, without = (stats.mean_interval(of.val_ppl.tolist()), stats.mean_interval(of.val_ppl_without.tolist()))
        lines.append(f"{part} changes val_ppl by {change.mean:+.1f}% ({change.level:.0%} CI [{change.low:+.0f}%, "
                     f"{change.high:+.0f}%], {n}): {verdict}; val_ppl with it {interval_text(full, '{:.2f}')}, "
                     f"without {interval_text(without, '{:.2f}')} (means, {full.level:.0%} CI){failed}.")
    return lines


def failed_runs_text(parents: pd.DataFrame, siblings: pd.DataFrame) -> str:
    """", runs that did not pass: a of n with it, b of m without" (the gate, or diverged: they form
    no pair), or "" when every run of both arms passed."""
    def counts(arm: pd.DataFrame) -> tuple[int, int]:  # (runs that did not pass, runs); an errored trial: 1 run
        runs = int(arm["replicates"].fillna(1).sum())
        return runs - int(arm["replicates_passed"].fillna(0).sum()), runs

    (a, n), (b, m) = counts(parents), counts(siblings)
    return "" if a == b == 0 else f"; runs that did not pass (no pair): {a} of {n} with it, {b} of {m} without"


def gate_saving_line(trials: pd.DataFrame) -> str:
    """What the gate saved, in one sentence (the search's summary and the report both print it)."""
    failed, mean_p2, saved = gate_saving(trials)
    if not failed:
        return "The gate skipped no Phase 2."
    trials_ = f"{failed} trial{'s' if failed != 1 else ''}"
    if math.isnan(saved):
        return f"The gate skipped Phase 2 for {trials_} (no passed trial to estimate the time saved)."
    return (f"The gate skipped Phase 2 for {trials_}: about {saved:.0f}s of Phase 2 compute saved "
            f"({failed} x {mean_p2:.1f}s, the mean Phase 2 time of passed trials).")


def sections(trials: pd.DataFrame, iterations: pd.DataFrame, distributions: dict[str, od.BaseDistribution],
             floors: dict | None = None) -> list[Section]:
    """Every part of the report, in reading order; a part the data cannot support yet says so.
    The parts about Phase 1, the gate and the searched parameters read the New-LLM trials only."""
    curve_parts = [phase1_section(trials, iterations), phase2_section(trials, iterations)]
    if trials.empty:
        return [Section("Trials", "", body=_note("No trial has finished yet: the figures below come from the rows "
                                                 "the running trials have reported.")), *curve_parts]
    parts = [history_section(trials, floors), importance_section(trials, distributions)]
    if status_is(trials, "passed").any():
        if distributions and status_is(newllm_trials(trials), "passed").any():
            parts.append(slice_section(trials, distributions))
        parts.append(pareto_section(trials, floors))
    parts.append(Section("Gate map", "Per bin of each searched parameter: the share of trials whose Phase 1 passed "
                         "the gate (bars, passed/trials) and their mean train and val effective-rank fractions; "
                         "dashed and dotted lines: the gate's train and val thresholds.",
                         figures.gate_map_figure(trials, distributions))
                 if distributions else Section("Gate map", "", body=_note(NO_PARAMS)))
    if is_sibling(trials).any():
        parts.append(ablations_section(trials, iterations))
    return [*parts, *curve_parts, time_section(trials), top_section(trials, distributions)]


def ablations_section(trials: pd.DataFrame, iterations: pd.DataFrame) -> Section:
    """Per ablation and configuration, the paired runs with and without the part it removes."""
    table = ablation_table(ablation_pairs(trials, iterations))
    if table.empty:
        return Section("Ablations", "", body=_note("No New-LLM run and its sibling's at the same seed have both "
                                                     "passed yet: nothing to compare."))
    body = table.to_html(index=False, border=0, na_rep="", classes="trials")
    return Section("Ablations", "Each New-LLM trial against its siblings, the same configuration and seeds with one "
                   "part removed (no_phase1: no Phase 1; no_dist_reg: Phase 1 without dist-reg). Per configuration "
                   "(parent trial) and over all of them: the pairs (runs at the same seed where both passed), each "
                   "arm's mean val_ppl and the mean relative change of val_ppl that the part makes (with it against "
                   "without it; positive: removing it helps), each with its 95% Student t-interval (none with one "
                   "pair).", body=f'<div class="wide">{body}</div>')


NO_PARAMS = "No searched parameter varies across the trials, so there is nothing to compare."


def extras(trials: pd.DataFrame, floors: dict | None, baselines: str) -> str:
    """The end of a caption: what ``baselines`` says where the trials hold baselines, and the
    floors' lines where they are known."""
    parts = [baselines] if is_baseline(trials).any() else []
    if floors is not None:
        parts.append("Dashed lines: the unigram and bigram perplexity floors of the val tokens (no training).")
    return "".join(" " + p for p in parts)


def drawn_text(drawn: int, of: int) -> str:
    """How many markers a scatter draws of how many (``trials.drawn_points``)."""
    return (f"{drawn:,} of the {of:,} (the {figures.MAX_POINTS // 10:,} of lowest val perplexity and a seeded "
            "random draw of the others)")


def markers_drawn(n: int, which: str) -> str:
    """The end of the caption of a scatter of ``n`` ``which``, beyond ``figures.MAX_POINTS``: which it draws."""
    if n <= figures.MAX_POINTS:
        return ""
    return f" Markers: {drawn_text(figures.MAX_POINTS, n)} {which}; a browser draws tens of thousands slowly."


def history_section(trials: pd.DataFrame, floors: dict | None = None) -> Section:
    """The objective of each trial in the order finished, and the best so far."""
    return Section("Optimisation history", "Val perplexity of each passed trial in the order trials finished, and "
                   "the best so far; gate-failed, diverged and errored trials (penalised objective, no perplexity) "
                   "in the lower panel." + extras(trials, floors, "Baselines (trained end to end, no gate): one "
                                                  "marker per architecture; the best so far is New-LLM's.")
                   + (" Ablation siblings (open circles) are measurements, not proposals: the best so far leaves "
                      "them out." if is_sibling(trials).any() else "")
                   + markers_drawn(len(trials), "trials; the best so far is of all of them"),
                   figures.history_figure(trials, floors))


def pareto_section(trials: pd.DataFrame, floors: dict | None = None) -> Section:
    """Val perplexity against size: is a larger model worth it."""
    dominated = int((~newllm_front(trials).front).sum())
    counted = ("non-embedding parameter count (every parameter but the embedding tables, nanoGPT's convention)"
               if size_label(trials) == "non-embedding parameters" else "parameter count")
    return Section("Perplexity against size", f"Val perplexity against {counted} of the passed trials; the "
                   "Pareto front (no other trial is both smaller and better) is joined." +
                   extras(trials, floors, "Baselines: one marker per architecture, its own front dotted; the "
                          "front joined in green is New-LLM's.") + markers_drawn(dominated, "dominated trials; "
                                                                                 "the front is drawn whole"),
                   figures.pareto_figure(trials, floors))


def importance_section(trials: pd.DataFrame, distributions: dict[str, od.BaseDistribution]) -> Section:
    """Which searched parameters decide val perplexity and passing the gate."""
    objective, why_objective = objective_importance(trials, distributions)
    gate, why_gate = gate_importance(trials, distributions)
    caption = (f"PED-ANOVA importance of each searched parameter for a low val perplexity ({why_objective}) and "
               f"for passing the gate and Phase 2 ({why_gate}).")
    if objective is None and gate is None:
        return Section("Parameter importance", caption,
                       body=_note("Not computed: " + ("too few trials." if distributions else NO_PARAMS)))
    return Section("Parameter importance", caption, figures.importance_figure(objective, gate))


def slice_section(trials: pd.DataFrame, distributions: dict[str, od.BaseDistribution]) -> Section:
    """Optuna's slice plot of the passed New-LLM trials' val perplexity."""
    newllm = newllm_trials(trials)
    passed = newllm[status_is(newllm, "passed")]
    drawn = passed[drawn_points(passed["val_ppl"], figures.MAX_POINTS)]
    fig = optuna.visualization.plot_slice(rebuild_study(drawn, drawn["val_ppl"], distributions),
                                          target_name="val perplexity")
    fig.update_layout(title=None, margin=dict(t=30))
    fig.update_traces(marker=dict(size=9, line=dict(width=1, color="#555555")))  # the first trials are near white
    which = "the passed trials" if len(drawn) == len(passed) else f"{drawn_text(len(drawn), len(passed))} passed trials"
    return Section("Val perplexity against each parameter", f"Optuna's slice plot of {which}: each "
                   "parameter's value against the trial's val perplexity, darker = later trial.", fig)


def drawn_line(iterations: pd.DataFrame, phase: str) -> str:
    """What a curves figure draws when it has more trials than lines (``figures.curves_figure``)."""
    n = curves(iterations, phase, [])["trial_id"].nunique()
    if n <= figures.MAX_CURVES:
        return ""
    return (f" Lines: the {figures.MAX_CURVES} trials of lowest objective; grey shading: where the curves of all "
            f"{n:,} trials lie (darker: more trials; values above the 99th percentile in the top bin).")


def phase1_section(trials: pd.DataFrame, iterations: pd.DataFrame) -> Section:
    """How Phase 1 converged in each trial, pass by pass."""
    if curves(iterations, "phase1", []).empty:
        return Section("Phase 1 (CVFP)", "", body=_note("No Phase 1 pass has been reported."))
    return Section("Phase 1 (CVFP)", "Each trial's converged ratio and effective rank (fraction of C) per Phase 1 "
                   "pass, coloured by the trial's status." + drawn_line(iterations, "phase1"),
                   figures.phase1_figure(iterations, trials))


def phase2_section(trials: pd.DataFrame, iterations: pd.DataFrame) -> Section:
    """How val perplexity fell in each trial, epoch by epoch."""
    if curves(iterations, "phase2", []).empty:
        return Section("Phase 2", "", body=_note("No trial has reached Phase 2."))
    return Section("Phase 2", "Val perplexity per Phase 2 epoch of each trial that passed the gate, coloured by the "
                   "trial's status." + extras(trials, None, "Baselines (trained end to end, every epoch a Phase 2 "
                                              "epoch): dashed, coloured by architecture.")
                   + drawn_line(iterations, "phase2"), figures.phase2_figure(iterations, trials))


def time_section(trials: pd.DataFrame) -> Section:
    """Where each trial's time went, and what the gate saved."""
    which = "New-LLM trial (baselines have no Phase 1)" if is_baseline(trials).any() else "trial"
    n = len(newllm_trials(trials))
    drawn = (f"Seconds of Phase 1, fixed-point analysis and Phase 2 per {which}. " if n <= figures.MAX_BARS else
             f"How many of the {n:,} New-LLM trials took how many seconds in Phase 1, the fixed-point analysis and "
             "Phase 2 (one histogram per phase). ")
    return Section("Time per phase", drawn + gate_saving_line(trials), figures.time_figure(trials))


SHORT_NAMES = {"train_effective_rank_fraction": "train ER / C", "val_effective_rank_fraction": "val ER / C",
               "num_params_non_embedding": "non-embedding params"}


def top_section(trials: pd.DataFrame, distributions: dict[str, od.BaseDistribution]) -> Section:
    """The best trials with their results and configurations, as a table."""
    table = top_trials(trials, distributions).rename(columns=SHORT_NAMES)
    body = table.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.4g}", classes="trials")
    baselines = is_baseline(trials).any()
    which = (f"The {int((table.family != 'baseline').sum())} New-LLM trials of lowest objective, then the best trial "
             "of each baseline architecture," if baselines else f"The {len(table)} trials of lowest objective")
    return Section("Top trials", f"{which} with their results and searched parameters.",
                   body=f'<div class="wide">{body}</div>')


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


# --- HTML --------------------------------------------------------------------------------


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
p.caption { color: #444; margin: 0.3em 0 0.6em; } p.note { color: #8a4b00; font-style: italic; }
ul.summary li { margin: 0.2em 0; } .meta { color: #777; font-size: 0.9em; }
div.wide { overflow-x: auto; } table.trials { border-collapse: collapse; font-size: 0.9em; }
table.trials th, table.trials td { padding: 0.25em 0.6em; border-bottom: 1px solid #eee; text-align: right; }
"""


def render(report: Report) -> str:
    """The report as one HTML page, plotly.js embedded once in its head."""
    parts = []
    for i, s in enumerate(report.sections):
        body = s.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{i}",
                                config={"displaylogo": False}) if s.figure is not None else s.body
        caption = f'<p class="caption">{html.escape(s.caption)}</p>' if s.caption else ""
        parts.append(f'<section>\n<h2>{html.escape(s.title)}</h2>\n{caption}\n{body}\n</section>')
    items = "".join(f"<li>{html.escape(line)}</li>" for line in report.summary)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>newllm search {html.escape(report.name)}</title>\n<style>{STYLE}</style>\n"
            f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n'
            f"<h1>newllm search {html.escape(report.name)}</h1>\n"
            f'<p class="meta">{html.escape(report.directory)} &middot; report written {stamp}</p>\n'
            f'<ul class="summary">{items}</ul>\n' + "\n".join(parts) + "\n</body>\n</html>\n")


def build_report(directory: str | os.PathLike,
                 distributions: dict[str, od.BaseDistribution] | None = None) -> Report:
    """The report of the experiment at ``directory``. ``distributions``: the space's searched
    parameters (``SearchSpace.params``); by default those the experiment recorded, else inferred
    from the New-LLM trials. The floors are those the experiment recorded, if any."""
    trials, iterations = read_experiment(directory)
    if distributions is None:
        distributions = recorded_distributions(str(directory))
    if distributions is None:  # none recorded (deleted, or a table made by hand): from the trials
        distributions = infer_distributions(trials) if len(trials) else {}
    floors = recorded_floors(str(directory))
    d = str(directory).rstrip("/")
    return Report(d.rsplit("/", 1)[-1], d, summary(trials, iterations, distributions, floors),
                  sections(trials, iterations, distributions, floors))


def save(report: Report, out: str | os.PathLike) -> Path:
    """Write the report as ``report.html`` in the local directory ``out``; return its path."""
    if "://" in str(out):
        raise ExperimentError(f"the report is written to a local directory, not {str(out)!r}: give --out")
    path = Path(out) / REPORT_FILE
    write_file(str(path), render(report).encode())  # atomically: never a report cut off
    return path


def write_report(directory: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 distributions: dict[str, od.BaseDistribution] | None = None) -> Path:
    """Write the report of the experiment at ``directory`` to ``out`` (default: the experiment
    directory) and return the path of ``report.html``."""
    return save(build_report(directory, distributions), directory if out is None else out)


def main(argv: list[str] | None = None) -> int:
    """The command: check the directory and --out, build the report, write it, print its summary."""
    p = argparse.ArgumentParser(prog="python -m newllm.analyze",
                                description="Write report.html, the figures of what a newllm search found.")
    p.add_argument("directory", help="the experiment directory (holding trials.parquet, iterations.parquet)")
    p.add_argument("--out", help="directory for report.html (default: the experiment directory)")
    args = p.parse_args(argv)
    out = args.directory if args.out is None else args.out
    try:
        path_arg(args.directory, "the experiment directory")
        report = build_report(args.directory)  # reads only: every input is checked before report.html is written
        if "://" not in out:
            check_writable_dir(path_arg(out, "--out"), f"--out {out!r}" if args.out is not None else
                               f"the experiment directory {out!r} (where report.html goes without --out)")
        path = save(report, out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.summary))
    print(f"Report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
