#!/usr/bin/env bash
# Create or refresh .venv with megatron_longctx installed (editable). Sourced by
# examples/quickstart.sh and tests/run.sh. Usage: bootstrap_venv.sh [extras, e.g. "dev"]
#
# TORCH_SPEC picks the torch build (default torch==2.13.0: on the CPU machines this project is
# developed on, that wheel is on local disk; any other spec downloads a multi-GB CUDA build).
# It is split into pip arguments, so it may carry options:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
venv="$root/.venv"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[bootstrap] creating $venv with $python"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
# Reinstall only when the dependency declaration (or the extras asked for) changed.
stamp="$venv/.installed-$(cat "$root/setup.py" "$0" | sha1sum | cut -c1-12)-${extras:-base}"
if [[ ! -f "$stamp" ]]; then
  echo "[bootstrap] installing $torch_spec and megatron_longctx${extras:+[$extras]}"
  read -r -a torch_args <<< "$torch_spec"  # one word per requirement or option
  "$venv/bin/pip" install -q "${torch_args[@]}"
  "$venv/bin/pip" install -q -e "$root${extras:+[$extras]}"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
