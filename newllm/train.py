"""``python -m newllm.train``: the seed's single-run command, one ``newllm.run.train`` run.

Prints the seed's report (configuration, Phase 1 passes, fixed-point analysis, gate, Phase 2
epochs), then writes ``summary.json`` and the checkpoint (``model.pt`` + ``tokenizer.json``)
to ``--out``, each file under a temporary name renamed into place. Every flag and file is checked
before anything is written or trained: a bad one is one ``error:`` line and exit code 2. ``--out``
must be new or empty (``--force`` writes into a non-empty one).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from newllm import report
from newllm.checkpoint import save_model, write_atomic
from newllm.checks import check_new_out, path_arg
from newllm.config import add_data_arguments, add_train_arguments, data_config_from_args, train_config_from_args
from newllm.data import prepare_data
from newllm.run import build_model, set_threads, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m newllm.train", description="One New-LLM run: Phase 1 (CVFP), gate, Phase 2.")
    add_train_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = all cores (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output directory, new or empty (default: results/runs/<time>)")
    parser.add_argument("--force", action="store_true",
                        help="write into an --out that is not empty, replacing its files of the same names")
    return parser.parse_args(argv)


def check_device(device: str) -> None:
    """ValueError unless ``device`` is cpu, or cuda[:N] with such a CUDA device present."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"--device {device!r} is not a device: give cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but torch sees no CUDA device: give --device cpu")
        count = torch.cuda.device_count()
        if match[1] is not None and int(match[1]) >= count:
            raise ValueError(f"--device {device}: torch sees {count} CUDA devices, cuda:0 to cuda:{count - 1}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = train_config_from_args(args)
        data_cfg = data_config_from_args(args)
        check_device(args.device)
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = all cores), got {args.threads}")
        out = Path("results") / "runs" / time.strftime("%Y%m%d-%H%M%S") if args.out is None \
            else path_arg(args.out, "--out")
        check_new_out(out, args.force)
        data = prepare_data(data_cfg)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = set_threads(args.threads)
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
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "summary.json",
                     lambda tmp: tmp.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n"))
        save_model(out, model, data.tokenizer_json, train_config=cfg.to_dict())
    except OSError as e:  # checked before training, but the disk may fill or the directory go
        print(f"error: cannot write the results to --out {str(out)!r}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"\nWrote {out / 'summary.json'} and the checkpoint {out / 'model.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
