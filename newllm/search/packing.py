"""How a trial's row travels to Tune and back, without torch (a stand-in trainable, such as
``benchmarks/many_trials.py``'s replay, runs it in a worker that never imports torch).

What Tune is given of each row (``packed``): as numbers, only what its scheduler and searcher
read, where the row has them: ``phase2_epoch`` and ``objective`` (ASHA's time and metric),
``phase2_last_epoch`` (``KindScheduler``) and the metrics the study minimises (``objective``,
and ``num_params`` in a two-objective space; Tune checks them in every report); and the whole
row as one string, its compressed JSON under ``row``. Tune tracks every number of a report, key
by key, in its experiment state, which it rewrites whole every few seconds; a string it only
keeps with the trial's last result. The driver reads the row back with ``reported_row`` (the
Parquet tables, the studies, the progress line).
"""

from __future__ import annotations

import base64
import json
import zlib

# the key of a report's packed row, and the keys a report also carries as numbers where its row
# has them: ASHA's time and metric and the trial's last epoch (``KindScheduler``), and each
# metric Optuna minimises (``SearchSpace.metrics``)
ROW = "row"
SCHEDULER_KEYS = ("phase2_epoch", "objective", "phase2_last_epoch")


def packed(row: dict, metrics: list[str]) -> dict:
    """What a trial reports to Tune for ``row``: the scheduler's keys and the searcher's
    ``metrics`` it has, as numbers, and the whole row under ``ROW`` as one string (its JSON,
    compressed: about half the size), which Tune keeps with the trial's last result but does not
    track key by key. ``reported_row`` gives the row back."""
    text = base64.b64encode(zlib.compress(json.dumps(row, separators=(",", ":")).encode(), 9))
    return {**{k: row[k] for k in dict.fromkeys((*SCHEDULER_KEYS, *metrics)) if k in row}, ROW: text.decode()}


def reported_row(result: dict) -> dict:
    """The row a reported ``result`` packs, then the keys Tune added to the report (``trial_id``,
    ``training_iteration``, ``hostname``, ...) and the driver's own (``attempts``). A result
    without a packed row (none reported yet, a trials-table row) gives its own keys."""
    rest = {k: v for k, v in result.items() if k != ROW}
    return {**json.loads(zlib.decompress(base64.b64decode(result[ROW]))), **rest} if ROW in result else rest
