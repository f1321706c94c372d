"""``python -m newllm.train``: the seed's single-run command, one ``newllm.run.train`` run.

Prints the seed's report (configuration, Phase 1 passes, fixed-point analysis, gate, Phase 2
epochs), then writes ``summary.json`` and the checkpoint (``model.pt`` + ``tokenizer.json``)
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from newllm import report
from newllm.checkpoint import save_model
from newllm.config import add_data_arguments, add_train_arguments, data_config_from_args, train_config_from_args
from newllm.data import prepare_data
from newllm.run import build_model, set_threads, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m newllm.train", description="One New-LLM run: Phase 1 (CVFP), gate, Phase 2.")
    add_train_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = all cores (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output directory (default: results/runs/<time>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = train_config_from_args(args)
        data_cfg = data_config_from_args(args)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        out = Path(args.out or Path("results") / "runs" / time.strftime("%Y%m%d-%H%M%S"))
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a file, not a directory")
        threads = set_threads(args.threads)
        data = prepare_data(data_cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.print_configuration(cfg, data_cfg, data, args.device, threads)
    if cfg.family == "newllm":
        report.print_phase1_header()
    model = build_model(cfg, data.vocab_size, args.device)
    result = train(cfg, data, model, on_pass=report.print_pass, on_gate=report.print_gate,
                   on_epoch=lambda epoch: report.print_epoch(epoch.record))
    report.print_result(result)
    summary = {"config": cfg.to_dict(), "data": {**data_cfg.to_dict(), **data.summary()},
               **result.summary(),
               "phase1_history": [r.to_dict() for r in result.phase1.history] if result.phase1 else None,
               "phase2_history": [r.to_dict() for r in result.phase2.history] if result.phase2 else None,
               "train_analysis": result.train_analysis.to_dict() if result.train_analysis else None,
               "val_analysis": result.val_analysis.to_dict() if result.val_analysis else None,
               "final_analysis": result.final_analysis.to_dict() if result.final_analysis else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    save_model(out, model, data.tokenizer_json, train_config=cfg.to_dict())
    print(f"\nWrote {out / 'summary.json'} and the checkpoint {out / 'model.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
