#!/usr/bin/env bash
# Many nodes from a hostfile: bash launch/multi_node.sh HOSTFILE MASTER_ADDR SCRIPT [ARGS...]
#   bash launch/multi_node.sh launch/hostfile.example 10.0.0.1 finetune/full.py --config finetune/configs/full.yaml
# Uses the NCCL preset (launch/nccl_env.sh) and the pdsh launcher (passwordless ssh to every host). Without ssh set
# NODE_RANK=<line index> and run the same command on every node. LAUNCHER=openmpi|slurm picks another backend,
# MASTER_PORT another port, DRY_RUN=1 prints the command.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 HOSTFILE MASTER_ADDR SCRIPT [ARGS...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
# shellcheck source=launch/nccl_env.sh
source launch/nccl_env.sh
hostfile="$1"; master="$2"; shift 2
flags=(--hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}")
[[ -n "${LAUNCHER:-}" ]] && flags+=(--launcher "$LAUNCHER")
[[ -n "${NODE_RANK:-}" ]] && flags+=(--no_ssh --node_rank "$NODE_RANK")
exec "$PY" -m launch.run ${DRY_RUN:+--dry-run} "${flags[@]}" "$@"
