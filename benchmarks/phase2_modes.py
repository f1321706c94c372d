"""Phase 2's two modes on the laptop search: reported against real val perplexity, and time.

Runs the laptop search once per Phase 2 mode (default: the context layers train through the
recurrence; ``freeze_context``: the head alone) with the same seed, so both modes get the same
sampled configurations (8 trials are all within the TPE sampler's random start-up). Then every
passed trial's final checkpoint is read back and measured on the val stream with the one
definition, read one token at a time (``phase2.sequential_stream_metrics``, the oracle of the
parallel read the search reports): the model reading the stream from zero context.

    .venv/bin/python benchmarks/phase2_modes.py [--space laptop] [--seed 0] [--out DIR]

Prints one table row per trial and mode, and a JSON line last: per mode the best real val
perplexity, the largest |reported - real| / real, and the total Phase 2 seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import ray
import yaml

from newllm import experiment
from newllm.checkpoint import load_model
from newllm.data import DataConfig, prepare_data
from newllm.phase2 import sequential_stream_metrics
from newllm.search import cli
from newllm.space import load_space, resolve_space


def run_mode(space_file: str, freeze: bool, seed: int, out: Path) -> tuple[str, str]:
    """Run the search with ``freeze_context`` fixed to ``freeze``; (experiment dir, space file)."""
    raw = yaml.safe_load(Path(space_file).read_text())
    raw.setdefault("fixed", {})["freeze_context"] = freeze
    name = "frozen" if freeze else "default"
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        assert cli.main(["--local", "--space", str(path), "--name", name, "--storage-path", str(out / "res"),
                            "--seed", str(seed), "--scheduler", "none"]) == 0  # every trial to its own end
    finally:
        ray.shutdown()
    return str(out / "res" / name), str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="laptop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where the two experiments go (default: a temporary directory)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="phase2_modes-"))
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    rows = []
    for freeze in (False, True):
        mode = "freeze_context" if freeze else "default"
        directory, space_file = run_mode(resolve_space(args.space), freeze, args.seed, out)
        data = prepare_data(DataConfig(**load_space(space_file).data))
        trials, _ = experiment.load(directory)
        errors, reals = [], []
        for row in trials.sort_values("trial_id").itertuples():
            real = None
            if row.status == "passed":
                model, _ = load_model(row.checkpoint_path)
                real = math.exp(sequential_stream_metrics(model, data.val_ids)[0])
                errors.append(abs(row.val_ppl - real) / real)
                reals.append(real)
            rows.append((mode, row.trial_id, row.architecture, row.context_dim, row.num_layers, row.status,
                         row.val_ppl, real, row.phase2_seconds))
        summary[mode] = {"passed": len(reals), "trials": len(trials),
                         "best_real_val_ppl": min(reals) if reals else None,
                         "max_relative_error": max(errors) if errors else None,
                         "phase2_seconds": float(trials.phase2_seconds.sum())}
    print(f"\n{'mode':15} {'trial':14} {'arch':9} {'C':>3} {'L':>2} {'status':12} {'reported':>9} {'real':>9} "
          f"{'phase2 s':>8}")
    for mode, tid, arch, c, layers, status, reported, real, seconds in rows:
        fmt = lambda v: f"{v:9.2f}" if v is not None and not math.isnan(v) else f"{'-':>9}"  # noqa: E731
        print(f"{mode:15} {tid:14} {arch:9} {c:3d} {layers:2d} {status:12} {fmt(reported)} {fmt(real)} {fmt(seconds)}")
    print(json.dumps({"benchmark": "phase2_modes", "space": args.space, "seed": args.seed, **summary}))


if __name__ == "__main__":
    main()
