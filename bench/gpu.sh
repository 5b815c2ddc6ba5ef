#!/usr/bin/env bash
# The GPU measurements of issue 14 in one run (< 8 min, no downloads): see bench/gpu_bench.py.
#
#   bench/gpu.sh              # on an NVIDIA machine; writes bench/results/<date>-<card>.json
#   bench/gpu.sh --dry-run    # tiny shapes on the CPU: checks every code path (~1 min)
#
# Python: $PYTHON, else .venv/bin/python, else python3; it needs a CUDA build of torch with
# diffusers, transformers, peft, safetensors and pyarrow (the project's dependencies).
# Commit the JSON it writes: the README's GPU-hour estimates are computed from it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import torch, diffusers, transformers, peft, safetensors, pyarrow' 2>/dev/null; then
  echo "gpu.sh: $PY lacks torch/diffusers/transformers/peft/safetensors/pyarrow;" \
       "set PYTHON to an interpreter that has them (a CUDA torch build)" >&2
  exit 2
fi
if [[ "${1:-}" == "--dry-run" ]]; then
  out=bench/results/$(date -u +%F)-gpu-dry-run.json
  exec timeout 900 "$PY" bench/gpu_bench.py --dry-run --out "$out"
fi
card=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' \
       | tr -c 'A-Za-z0-9.\n' '-')
if [[ "$card" == "none" ]]; then
  echo "gpu.sh: no CUDA device visible to $PY; bench/gpu.sh --dry-run checks the script on a CPU" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
out=bench/results/$(date -u +%F)-${card}.json
timeout 480 "$PY" bench/gpu_bench.py --out "$out"
echo "gpu.sh: wrote $out"
