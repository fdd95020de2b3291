#!/usr/bin/env bash
# Create/refresh .venv with the dev extras and run the whole test suite (CPU, gloo).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/tools/bootstrap_venv.sh" dev
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$root/.venv/bin/python" -m pytest -q "$@"
