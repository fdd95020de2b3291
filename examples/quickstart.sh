#!/usr/bin/env bash
# Quick start: create/refresh .venv, then pretrain a tiny Llama on Python's standard-library
# sources (a real corpus present on every machine). Extra flags go to tools/pretrain.py.
# Runs on CPU in a few minutes; on a GPU node the same command uses NCCL and CUDA.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/tools/bootstrap_venv.sh"
cd "$root"
exec "$root/.venv/bin/python" tools/pretrain.py --config examples/quickstart.yaml "$@"
