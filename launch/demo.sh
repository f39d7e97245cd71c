#!/usr/bin/env bash
# What `make demo` runs (after the Makefile has created .venv and installed dsft): the whole demo pipeline in
# launch/demo.py. Arguments pass through, e.g. `bash launch/demo.sh train.max_steps=300 --n-eval 50 --min-accuracy-gain 0`
# (a shortened run does not reach the 80-point accuracy rise the demo otherwise requires: exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
# Offline by design: the demo builds its model locally and must never wait on the hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m launch.demo "$@"
