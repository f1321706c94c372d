"""The search report: its numbers on constructed data with known answers, the report of a real
search (finished, running, one trial), the CLI's errors, and a real headless browser drawing it."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna.distributions as od
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from newllm import analyze, figures
from newllm.results import load

PENALTY = {"gate_failed": 1.5e6, "diverged": 1e7}


def make_trials(**columns) -> pd.DataFrame:
    """A trials table with the columns the figures read; ``columns`` override or add."""
    n = len(next(iter(columns.values())))
    status = pd.Series(columns.pop("status", ["passed"] * n), dtype="string")
    val_ppl = pd.Series(columns.pop("val_ppl", np.linspace(50, 100, n)), dtype="float64").where(status == "passed")
    passed = (status == "passed").to_numpy()
    base = {
        "trial_id": [f"t{i:03d}" for i in range(n)], "status": status,
        "objective": np.where(passed, val_ppl, [PENALTY.get(s, np.nan) for s in status]),
        "val_ppl": val_ppl, "val_acc": np.where(passed, 0.1, np.nan), "num_params": np.arange(1000, 1000 + n),
        "gate_passed": pd.array(status != "gate_failed", dtype="boolean"),
        "train_effective_rank_fraction": np.full(n, 0.3), "val_effective_rank_fraction": np.full(n, 0.2),
        "phase1_passes": np.full(n, 3), "phase1_seconds": np.full(n, 2.0), "analysis_seconds": np.full(n, 0.5),
        "phase2_seconds": np.where(passed, 4.0, np.nan), "gate_train_er": np.full(n, 0.2),
        "gate_val_er": np.full(n, 0.08),
    }
    return pd.DataFrame({**base, **columns})


def write_experiment(directory: Path, trials: pd.DataFrame, iterations: pd.DataFrame) -> Path:
    """An experiment directory holding ``trials`` and ``iterations`` as one part each (a table
    with no rows is not written, as before its first write)."""
    for name, table in (("trials.parquet", trials), ("iterations.parquet", iterations)):
        if len(table):
            (directory / name).mkdir(parents=True)
            table.to_parquet(directory / name / "part-000001.parquet", index=False)
    return directory


# --- numbers on constructed data ------------------------------------------------------------


def test_infer_distributions_from_config_columns():
    trials = make_trials(context_dim=[8, 16, 16], embed_dim=[8, 8, 8], hidden_dim=[16, 24, 24],
                         num_layers=[1, 3, 2], dist_reg_weight=[0.1, 0.5, 0.3], architecture=["gated", "residual",
                         "gated"], freeze_context=[True, False, True], phase2_lr=[1e-3] * 3)
    d = figures.infer_distributions(trials)
    # varying columns only; hidden_dim follows context_dim + embed_dim, so it was not searched
    assert set(d) == {"context_dim", "num_layers", "dist_reg_weight", "architecture", "freeze_context"}
    assert d["num_layers"] == od.IntDistribution(1, 3)
    assert d["dist_reg_weight"] == od.FloatDistribution(0.1, 0.5)
    assert d["architecture"] == od.CategoricalDistribution(["gated", "residual"])
    assert d["freeze_context"] == od.CategoricalDistribution([False, True])
    # a searched hidden_dim is a parameter
    assert "hidden_dim" in figures.infer_distributions(trials.assign(hidden_dim=[16, 32, 20]))


def test_one_deciding_parameter_ranks_first_in_importance():
    rng = np.random.default_rng(0)
    n = 40
    dist_reg = rng.uniform(0, 1, n)
    layers = rng.integers(1, 5, n)
    arch = rng.choice(["gated", "residual"], n)
    context = rng.choice([8, 16, 32], n)
    # val perplexity depends on dist_reg_weight alone; passing on context_dim alone
    status = np.where(context == 32, "gate_failed", "passed")
    trials = make_trials(status=status, val_ppl=50 + 100 * dist_reg, dist_reg_weight=dist_reg, num_layers=layers,
                         architecture=arch, context_dim=context)
    space = {"dist_reg_weight": od.FloatDistribution(0, 1), "num_layers": od.IntDistribution(1, 4),
             "architecture": od.CategoricalDistribution(["gated", "residual"]),
             "context_dim": od.CategoricalDistribution([8, 16, 32])}
    objective, why = figures.objective_importance(trials, space)
    assert list(objective)[0] == "dist_reg_weight" and objective["dist_reg_weight"] > 0.5, objective
    assert why == f"{(status == 'passed').sum()} passed trials"
    gate, _ = figures.gate_importance(trials, space)
    assert list(gate)[0] == "context_dim" and gate["context_dim"] > 0.5, gate
    # the same from distributions inferred from the columns
    assert list(figures.objective_importance(trials, figures.infer_distributions(trials))[0])[0] == "dist_reg_weight"
    fig = figures.importance_figure(objective, gate)
    assert [t.name for t in fig.data] == ["val perplexity (passed trials)", "passing (all trials)"]
    assert fig.data[0].y[-1] == "dist_reg_weight"  # most important drawn on top


def test_importance_with_too_few_trials_says_why():
    space = {"dist_reg_weight": od.FloatDistribution(0, 1)}
    trials = make_trials(status=["passed", "gate_failed", "passed"], dist_reg_weight=[0.1, 0.2, 0.3])
    assert figures.objective_importance(trials, space) == (None, "needs at least 4 passed trials, has 2")
    assert figures.gate_importance(trials, space) == (None, "needs at least 4 trials, has 3")
    all_passed = make_trials(dist_reg_weight=[0.1, 0.2, 0.3, 0.4, 0.5])
    values, why = figures.gate_importance(all_passed, space)
    assert values is None and "every trial passed" in why
    assert figures.objective_importance(all_passed, {})[0] is None


def test_pareto_front_is_the_non_dominated_points():
    points = np.array([[1, 9], [2, 5], [3, 5], [4, 1], [5, 4], [2, 5], [6, 1], [1, 10], [3, 3]])
    # [3,5] is dominated by [2,5] (equal in one, better in the other); [2,5] twice: neither dominates
    # the other; [6,1] by [4,1]; [1,10] by [1,9]; [5,4] by [4,1]
    assert figures.pareto_front(points).tolist() == [True, True, False, True, False, True, False, False, True]
    by_brute_force = [not any((q <= p).all() and (q < p).any() for q in points) for p in points]
    assert figures.pareto_front(points).tolist() == by_brute_force
    trials = make_trials(status=["passed", "passed", "passed", "gate_failed"], val_ppl=[60, 50, 70, 10],
                         num_params=[100, 200, 300, 50])
    fig = figures.pareto_figure(trials)
    dominated, front = fig.data
    assert list(front.x) == [100, 200] and list(dominated.x) == [300]  # the gate-failed trial is not drawn


def test_gate_map_reproduces_pass_rates_counted_by_hand():
    # context_dim 8: 1 of 4 passed, 16: 2 of 2, 32: 0 of 3
    context = [8, 8, 8, 8, 16, 16, 32, 32, 32]
    status = ["passed", "gate_failed", "gate_failed", "gate_failed", "passed", "passed",
              "gate_failed", "gate_failed", "gate_failed"]
    er = [0.5, 0.1, 0.1, 0.1, 0.4, 0.6, 0.0, 0.1, 0.2]
    weight = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.95]
    trials = make_trials(status=status, context_dim=context, train_effective_rank_fraction=er,
                         dist_reg_weight=weight)
    space = {"context_dim": od.CategoricalDistribution([8, 16, 32]), "dist_reg_weight": od.FloatDistribution(0, 1)}
    table = figures.gate_table(trials, "context_dim", space["context_dim"])
    assert list(table.index) == ["8", "16", "32"]
    assert table.trials.tolist() == [4, 2, 3] and table.passed.tolist() == [1, 2, 0]
    assert table.pass_rate.tolist() == [0.25, 1.0, 0.0]
    assert table.train_er.tolist() == pytest.approx([0.2, 0.5, 0.1])
    # 0..1 in five bins: 0-0.2 holds 0.05, 0.15 (1 of 2 passed), 0.2-0.4: 0.25, 0.35 (0 of 2), 0.4-0.6: 0.45, 0.55
    # (2 of 2), 0.6-0.8: 0.65, 0.75 (0 of 2), 0.8-1: 0.95 (0 of 1)
    table = figures.gate_table(trials, "dist_reg_weight", space["dist_reg_weight"])
    assert table.trials.tolist() == [2, 2, 2, 2, 1] and table.pass_rate.tolist() == [0.5, 0.0, 1.0, 0.0, 0.0]
    fig = figures.gate_map_figure(trials, space)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [list(b.y) for b in bars] == [[0.25, 1.0, 0.0], [0.5, 0.0, 1.0, 0.0, 0.0]]


def test_history_has_one_point_per_trial_with_penalised_ones_apart():
    status = ["passed", "gate_failed", "passed", "diverged", "passed", "gate_failed"]
    trials = make_trials(status=status, val_ppl=[80, 0, 60, 0, 70, 0])
    h = figures.history(trials)
    assert h.number.tolist() == [1, 2, 3, 4, 5, 6]
    assert h.value.isna().tolist() == [s != "passed" for s in status]
    assert h.best.tolist() == [80, 80, 60, 60, 60, 60]
    fig = figures.history_figure(trials)
    points = [(t.name, t.yaxis, list(t.x), list(t.y)) for t in fig.data if t.mode == "markers"]
    assert sum(len(x) for _, _, x, _ in points) == len(trials)
    top = [p for p in points if p[1] == "y"]
    assert top == [("passed trial", "y", [1, 3, 5], [80, 60, 70])]  # no penalty squashes the axis
    assert {(name, tuple(x)) for name, axis, x, _ in points if axis == "y2"} == {("gate failed", (2, 6)),
                                                                                 ("diverged", (4,))}


def test_curves_keep_each_trials_latest_attempt():
    rows = [("a", 1, "phase1", 1, 0.5), ("a", 1, "phase1", 2, 0.6),   # attempt 1, lost
            ("a", 2, "phase1", 1, 0.7), ("a", 2, "phase2", 1, 0.0),
            ("b", 1, "phase1", 2, 0.9), ("b", 1, "phase1", 1, 0.8)]
    iterations = pd.DataFrame(rows, columns=["trial_id", "attempt", "phase", "step", "converged_ratio"])
    c = figures.curves(iterations, "phase1", ["converged_ratio"])
    assert c.values.tolist() == [["a", 1, 0.7], ["b", 1, 0.8], ["b", 2, 0.9]]
    trials = make_trials(status=["gate_failed"]).assign(trial_id=["b"])
    assert figures.trial_status(trials, ["a", "b"]) == ["running", "gate_failed"]


def test_gate_saving_as_print_summary_estimates_it():
    trials = make_trials(status=["passed", "gate_failed", "passed", "gate_failed", "gate_failed"],
                         phase2_seconds=[3.0, np.nan, 5.0, np.nan, np.nan])
    assert figures.gate_saving(trials) == (3, 4.0, 12.0)
    failed, mean, saved = figures.gate_saving(make_trials(status=["gate_failed"]))
    assert failed == 1 and math.isnan(mean) and math.isnan(saved)


# --- the report of a real search ------------------------------------------------------------


def section_titles(html: str) -> list[str]:
    return [part.split("</h2>")[0] for part in html.split("<h2>")[1:]]


@pytest.mark.slow
def test_report_of_a_real_search(tiny_search, tmp_path, capsys):
    before = sorted(p.name for p in tiny_search.directory.iterdir())
    assert analyze.main([str(tiny_search.directory), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("3 trials finished") and f"Report: {tmp_path / 'report.html'}" in out
    assert sorted(p.name for p in tiny_search.directory.iterdir()) == before  # --out: nothing written there
    html = (tmp_path / "report.html").read_text()
    assert html.count(get_plotlyjs()[:200]) == 1 and "<script src=" not in html  # embedded once: opens offline
    assert section_titles(html) == ["Optimisation history", "Parameter importance",
                                    "Val perplexity against each parameter", "Perplexity against size", "Gate map",
                                    "Phase 1 (CVFP)", "Phase 2", "Time per phase", "Top trials"]
    assert "needs at least 4 passed trials, has 3" in html  # importance explains why it is missing
    trials, _ = load(tiny_search.directory)
    assert all(t in html for t in trials.trial_id)
    # from Python, into the experiment directory by default (a copy: the fixture is shared)
    copy = shutil.copytree(tiny_search.directory, tmp_path / "copy")
    assert analyze.write_report(copy) == copy / "report.html" and (copy / "report.html").stat().st_size > 1e6


@pytest.mark.slow
def test_report_of_a_running_search_and_of_one_trial(tiny_search, tmp_path, capsys):
    trials, iterations = load(tiny_search.directory)
    running = write_experiment(tmp_path / "running", trials.iloc[:0], iterations)
    assert analyze.main([str(running)]) == 0
    out = capsys.readouterr().out
    assert "No trial has finished yet." in out and "3 more trials have reported rows" in out
    html = (running / "report.html").read_text()
    assert section_titles(html) == ["Trials", "Phase 1 (CVFP)", "Phase 2"]
    assert '"name":"running"' in html  # the curves of unfinished trials are drawn as running

    one = write_experiment(tmp_path / "one", trials.iloc[:1], iterations[iterations.trial_id == trials.trial_id[0]])
    assert analyze.main([str(one)]) == 0
    html = (one / "report.html").read_text()
    assert "No searched parameter varies across the trials" in html
    assert "Optimisation history" in html and "Top trials" in html


def test_report_when_no_trial_passed(tmp_path, capsys):
    trials = make_trials(status=["gate_failed", "diverged", "gate_failed", "error"], dist_reg_weight=[.1, .2, .3, .4])
    directory = write_experiment(tmp_path / "failed", trials, pd.DataFrame())
    assert analyze.main([str(directory)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["4 trials finished: 2 gate_failed, 1 diverged, 1 error", "No trial passed: no best configuration.",
                       "The gate skipped Phase 2 for 2 trials (no passed trial to estimate the time saved)."]
    html = (directory / "report.html").read_text()
    assert section_titles(html) == ["Optimisation history", "Parameter importance", "Gate map", "Phase 1 (CVFP)",
                                    "Phase 2", "Time per phase", "Top trials"]
    assert "no trial passed, so nothing separates passing from failing" in html


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "trials.parquet").mkdir()  # an experiment before its first write
    cases = {tmp_path / "nothing": "is not a directory", tmp_path: "not a newllm experiment directory"}
    for directory, message in cases.items():
        assert analyze.main([str(directory)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    (tmp_path / "trials.parquet" / "part-000001.parquet").write_text("not parquet")
    assert analyze.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read the results") and err.count("\n") == 1, err
    (tmp_path / "empty").mkdir()
    with pytest.raises(analyze.ExperimentError, match="not a newllm experiment directory"):
        analyze.write_report(tmp_path / "empty")


@pytest.mark.slow
def test_cli_in_a_subprocess(tmp_path):
    run = subprocess.run([sys.executable, "-m", "newllm.analyze", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


# --- a real browser ---------------------------------------------------------------------------

MARKS = "path.point, .scatterlayer .trace path.js-line, .barlayer .point"
# per plot div: how many data marks its SVG holds
COUNT_MARKS = ("return Array.from(document.querySelectorAll('div.plotly-graph-div'))"
               f".map(d => [d.id, d.querySelectorAll('{MARKS}').length]);")


def chromium():
    """A headless Chromium driven by selenium, logging the page's console (skip if not installed)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingOptions", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.mark.slow
def test_a_browser_draws_every_figure(tiny_search, tmp_path):
    path = analyze.write_report(tiny_search.directory, tmp_path)
    driver = chromium()
    try:
        driver.get(path.as_uri())
        deadline = time.monotonic() + 30
        while True:
            marks = driver.execute_script(COUNT_MARKS)
            if (marks and all(n > 0 for _, n in marks)) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        figures_in_file = path.read_text().count('class="plotly-graph-div"')
        assert len(marks) == figures_in_file >= 7 and all(n > 0 for _, n in marks), marks  # every figure, drawn
        page = "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"
        driver.set_window_size(1300, driver.execute_script(page))  # the whole page in one screenshot
        assert driver.save_screenshot(str(tmp_path / "report.png"))  # results/report.png is one of these
    finally:
        driver.quit()
