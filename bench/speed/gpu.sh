#!/usr/bin/env bash
# One command on a GPU machine (no downloads, about 2-4 minutes on one GPU):
#   bash bench/speed/gpu.sh [extra bench.speed.gpu flags, e.g. --dtype float16]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec timeout 300 "$PYTHON" -m bench.speed.gpu --device cuda --models sd15,sdxl "$@"
