#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels tests/gpu/run.sh installs offline on a
# GPU machine that has only Python 3.12, PyTorch with CUDA and transformers: megatron-core and
# this package's other runtime dependencies (setup.py install_requires) with theirs, plus
# pytest and the build backend, as CPython 3.12 x86-64 manylinux wheels. Not fetched: torch,
# transformers and tokenizers (transformers brings it), nvidia-* (the GPU machine's own).
#
#   tests/gpu/prepare_wheels.sh [DIR]     # DIR: $MEGATRON_LONGCTX_WHEELS, else .wheels/
#
# Run by hand, not in CI. Prints the folder's total size (the issue's budget: 64 MiB).
set -euo pipefail

usage() {  # the comment block at the top
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${1:-${MEGATRON_LONGCTX_WHEELS:-$ROOT/.wheels}}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"

# install_requires of setup.py, without what the GPU machine brings
mapfile -t REQS < <("$PYTHON" - "$ROOT/setup.py" <<'EOF'
import ast
import re
import sys

tree = ast.parse(open(sys.argv[1]).read())
call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", "") == "setup")
reqs = next(k.value for k in call.keywords if k.arg == "install_requires")
for req in ast.literal_eval(reqs):
    name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()
    if name not in ("torch", "transformers", "tokenizers") and not name.startswith("nvidia-"):
        print(req)
EOF
)
MEGATRON=()
OTHERS=()
for req in "${REQS[@]}"; do
    if [[ $req == megatron-core* ]]; then MEGATRON+=("$req"); else OTHERS+=("$req"); fi
done
if [[ ${#MEGATRON[@]} -ne 1 ]]; then
    echo "error: setup.py's install_requires names no megatron-core" >&2
    exit 1
fi

TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --dest "$DEST")
# megatron-core alone: its dependency on torch would pull torch and the nvidia-* wheels
"$PYTHON" -m pip download --no-deps "${TARGET[@]}" "${MEGATRON[@]}"
# megatron-core's own needs (numpy, packaging) with ours; none of these depends on torch
"$PYTHON" -m pip download "${TARGET[@]}" "${OTHERS[@]}" "packaging>=24.2" \
    "pytest>=8" "setuptools>=64" wheel

echo "wheels in $DEST:"
ls -1 "$DEST"
bytes=$(du -sb "$DEST" | cut -f1)
echo "total: $((bytes / 1048576)) MiB ($bytes bytes)"
if ((bytes > 64 * 1048576)); then
    echo "warning: over the 64 MiB the GPU machine's transfer allows" >&2
fi
