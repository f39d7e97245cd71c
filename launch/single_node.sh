#!/usr/bin/env bash
# One node, N processes: bash launch/single_node.sh N SCRIPT [ARGS...]
#   bash launch/single_node.sh 8 finetune/lora.py --config finetune/configs/lora.yaml model.name_or_path=Qwen/Qwen2.5-0.5B
# Set DRY_RUN=1 to print the deepspeed command instead of running it.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_GPUS SCRIPT [ARGS...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
n="$1"; shift
exec "$PY" -m launch.run ${DRY_RUN:+--dry-run} --num_gpus "$n" "$@"
