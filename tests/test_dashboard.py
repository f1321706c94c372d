"""optuna-dashboard on a finished search's journal, as a user runs it (``optuna-dashboard
<experiment>/optuna.journal``), opened in headless Chromium: its history plot keeps a val
perplexity's scale (no penalty), and the trials that ASHA stopped are PRUNED."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from test_analyze import chromium

from newllm import experiment

# the history plot (optuna-dashboard 0.21's element id) once plotly has drawn it: its y range and traces
# the history plot's y range and traces, once it has drawn a trial (it is drawn empty first, on the
# default range [-1, 6], while the trials load)
HISTORY = ("const p = document.getElementById('plot-history');"
           "return p && p._fullLayout && p.data && p.data.some(t => t.y && t.y.length)"
           " ? [p._fullLayout.yaxis.range, p.data.map(t => [t.name, t.y])] : null;")


def dashboard_command() -> str:
    """The optuna-dashboard command of this environment (skip if it is not installed)."""
    pytest.importorskip("optuna_dashboard", reason="needs optuna-dashboard (pip install -e '.[dashboard]')")
    command = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which("optuna-dashboard")
    if command is None:
        pytest.skip("optuna_dashboard is importable but its optuna-dashboard command is not on the PATH")
    return command


def get_json(url: str, within: float = 60):
    """``url``'s JSON, polling until the server answers (at most ``within`` seconds)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_the_dashboard_shows_perplexities_and_pruned_trials(tiny_search):
    command = dashboard_command()
    driver = chromium()
    port = free_port()
    server = subprocess.Popen([command, str(tiny_search.directory / experiment.OPTUNA_JOURNAL),
                               "--port", str(port), "--host", "127.0.0.1", "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        study_id = get_json(f"{base}/api/studies")["study_summaries"][0]["study_id"]
        # what the dashboard serves: one finished trial per row, ASHA's stops PRUNED, every value a perplexity
        served = get_json(f"{base}/api/studies/{study_id}?after=0")["trials"]
        trials, _ = experiment.load(tiny_search.directory)
        served_ids = [a["value"] for t in served for a in t["user_attrs"] if a["key"] == "trial_id"]
        assert sorted(served_ids) == sorted(trials.trial_id)
        stopped = int((trials.phase2_stop_reason == "scheduler").sum())
        assert sum(t["state"] == "Pruned" for t in served) == stopped
        assert all(t["state"] in ("Complete", "Pruned") and t["values"][0] < 1000 for t in served)
        driver.get(f"{base}/dashboard/studies/{study_id}")
        deadline = time.monotonic() + 60
        while (history := driver.execute_script(HISTORY)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert history is not None, "the dashboard drew no history plot"
        (low, high), traces = history
        assert 0 < low < high < 1000  # no penalty stretches the axis: the passed trials are not flat on zero
        # every trial, the pruned ones included (the dashboard's default), a gate-failed one as infeasible
        plotted = {name.split(" of ")[0]: y for name, y in traces}
        assert len(plotted["Objective 0"]) + len(plotted["Infeasible Trial"]) == len(trials)
        assert len(plotted["Infeasible Trial"]) == int((trials.status != "passed").sum())
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
