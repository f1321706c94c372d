#!/usr/bin/env bash
# The speed benchmarks on one GPU in about 5 minutes, then one JSON line (the last printed):
#   ops_per_token.py  ops per token, tokens/s and share of GEMM of every phase at the laptop and
#                     default sizes, val measured on 1M tokens (the sequential read on 20k: its
#                     cost per token is constant)
#   phase2_step.py    newllm's Phase 2 steps against a plain PyTorch loop, at the default size
#
#   bash benchmarks/gpu_check.sh [DEVICE]        (DEVICE: cuda, the default, or cpu to try it out)
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
device=${1:-cuda}
out=$(mktemp -d)
timeout 210 "$python" benchmarks/ops_per_token.py --device "$device" --sizes laptop,default \
    --val-tokens 1000000 --sequential-tokens 20000 >"$out/ops_per_token.txt" 2>&1
echo "ops_per_token exit $?" >&2
timeout 90 "$python" benchmarks/phase2_step.py --device "$device" --size default --steps 50 --rounds 3 \
    >"$out/phase2_step.txt" 2>&1
echo "phase2_step exit $?" >&2
"$python" - "$out" <<'PY'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
combined = {"benchmark": "gpu_check"}
for name in ("ops_per_token", "phase2_step"):
    lines = (out / f"{name}.txt").read_text().splitlines()
    try:
        combined[name] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):  # timed out or failed: keep its last lines
        combined[name] = {"error": lines[-5:]}
print(json.dumps(combined))
PY
