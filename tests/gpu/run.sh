#!/usr/bin/env bash
# One command for the GPU checks, on a machine with Python 3.12, PyTorch with CUDA and
# transformers but no network: install this package and megatron-core from prepared wheels
# into a virtual environment that reuses the system's torch, run tests/gpu, then the
# single-GPU step benchmark (benchmarks/gpu_step.py).
#
#   tests/gpu/run.sh [--wheels DIR] [--venv DIR] [--results DIR] [--install-only]
#                    [--skip-benchmark] [--benchmark-args "ARGS"] [-- PYTEST_ARGS...]
#
#   --wheels DIR   the wheel folder written by tests/gpu/prepare_wheels.sh on a machine with
#                  a package index (default: $MEGATRON_LONGCTX_WHEELS, else .wheels/ at the
#                  repository root). Installed with pip --no-index --find-links DIR; what the
#                  system already has in a fitting version (numpy, pytest...) is kept.
#   --venv DIR     where the virtual environment goes (default: /tmp/megatron_longctx_gpu)
#   --results DIR  copy the test log and benchmarks/results/gpu_step.md there
#   --install-only prepare the environment and stop (no GPU needed)
#   --skip-benchmark, --benchmark-args "ARGS"  (e.g. "--seqs 8192 --impls ours stock")
#   PYTEST_ARGS    after --, e.g. -- -k attention
#
# Exit status: pytest's, or the benchmark's when the tests passed.
set -euo pipefail

usage() {  # the comment block at the top
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WHEELS=${MEGATRON_LONGCTX_WHEELS:-$ROOT/.wheels}
VENV=${MEGATRON_LONGCTX_GPU_VENV:-/tmp/megatron_longctx_gpu}
RESULTS=""
BENCHMARK=1
INSTALL_ONLY=0
BENCHMARK_ARGS=""
PYTEST_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --venv) VENV=$2; shift 2 ;;
        --results) RESULTS=$2; shift 2 ;;
        --install-only) INSTALL_ONLY=1; shift ;;
        --skip-benchmark) BENCHMARK=0; shift ;;
        --benchmark-args) BENCHMARK_ARGS=$2; shift 2 ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ ! -d $WHEELS ]]; then
    echo "error: no wheel folder at $WHEELS: run tests/gpu/prepare_wheels.sh on a machine with" \
        "a package index and bring the folder (--wheels DIR or MEGATRON_LONGCTX_WHEELS)" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}

# The environment sees the system's packages (torch, transformers, triton). Where python3 is
# itself a virtual environment (the torch images' /opt/.../.venv), --system-site-packages
# would reach the base interpreter's instead: every package folder python3 imports from is
# linked in with a .pth file (after the environment's own, which win).
if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PYTHON" -c "import sys
print('\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))" \
        > "$site/_system_python.pth"
fi
PY=$VENV/bin/python
if ! "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m ensurepip --default-pip > /dev/null
fi
# offline: this package (editable, its setup.py through the system's setuptools), its
# dependencies and pytest, from the wheel folder or already installed
"$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation --quiet \
    -e "$ROOT" "pytest>=8"
"$PY" -c "import megatron.core, megatron_longctx, torch
print('megatron-core', megatron.core.__version__, '| torch', torch.__version__, '|',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
[[ $INSTALL_ONLY == 0 ]] || exit 0
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || {
    echo "error: $PY has no torch with a CUDA device; tests/gpu needs one" >&2
    exit 2
}
if ! command -v cc > /dev/null && ! command -v gcc > /dev/null; then
    echo "warning: no C compiler: Triton (FlexAttention's compiled kernels) builds its" \
        "launcher with one" >&2
fi

cd "$ROOT"
LOG=$(mktemp -t gpu_tests.XXXXXX.log)
status=0
PYTHONUNBUFFERED=1 "$PY" -m pytest tests/gpu -ra -v "${PYTEST_ARGS[@]}" 2>&1 | tee "$LOG" ||
    status=$?
if [[ $BENCHMARK == 1 ]]; then
    # shellcheck disable=SC2086  # the arguments are words on purpose
    PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_step.py $BENCHMARK_ARGS || {
        bench=$?
        [[ $status != 0 ]] || status=$bench
    }
fi
if [[ -n $RESULTS ]]; then
    mkdir -p "$RESULTS"
    cp "$LOG" "$RESULTS/gpu_tests.log"
    [[ ! -f benchmarks/results/gpu_step.md ]] || cp benchmarks/results/gpu_step.md "$RESULTS/"
fi
exit "$status"
