#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU and this source tree, run the `cuda` tests and a
# short benchmark of torch_matgrad against F.linear + activation (cuBLAS), bf16, forward and
# backward without activation and full steps with gelu_tanh and silu, and write into OUTDIR:
#
#   setup.log    card, versions, install, the card's two measured ceilings (copy GB/s, cuBLAS TFLOP/s)
#   pytest.log   pytest -m cuda
#   bench.log    progress and table           bench.csv, bench.md, tflops_<set>.png
#
# Without a GPU it is a dry run of the same stages: the cuda tests skip and the benchmark
# runs on the CPU on tiny shapes (seconds; its figures say nothing about any GPU).
# Each stage has a timeout (45+30+160+190 s, plus 10 s grace each: 7.75 min at most); the
# benchmark runs even when a test fails. Prints the results table last. Exit status 1 if
# any stage failed.
#
# Usage: benchmarks/gpu_check.sh OUTDIR
#   PYTHON=...                the interpreter (default python3)
#   TORCH_MATGRAD_COMMIT=...  the commit to record where the tree has no .git
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
FAILED=()

# stage NAME SECONDS LOG COMMAND...: run with a time limit, append to LOG, record failure.
stage() {
    local name=$1 limit=$2 log=$3 rc
    shift 3
    echo "== $name (at most ${limit}s; log $log)"
    echo "\$ $*" >>"$OUT/$log"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
    rc=$?
    case $rc in
        0) echo "   ok" ;;
        124 | 137) echo "   TIMED OUT"; FAILED+=("$name: timed out after ${limit}s") ;;
        *) echo "   failed (exit $rc)"; FAILED+=("$name: exit $rc") ;;
    esac
    return $rc
}

# The package must import from this tree with its kernels subpackage mapped
# (triton_kernels/ -> torch_matgrad.triton_kernels), which an editable install does.
importable() {
    "$PY" - <<'EOF'
import os, sys
import torch_matgrad.triton_kernels as k
sys.exit(0 if os.path.samefile(os.path.dirname(k.__file__), "triton_kernels") else 1)
EOF
}

setup() {
    nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton does not import"
    echo "commit: ${TORCH_MATGRAD_COMMIT:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null \
|| echo "unknown: not a git checkout; set TORCH_MATGRAD_COMMIT")}"
    importable 2>/dev/null && return 0
    "$PY" -m pip install --no-deps --no-build-isolation -e "$ROOT" && importable && return 0
    # No editable install (e.g. no setuptools offline): map the kernels by a symlink in
    # the tree, removed again when this script exits; runs from $ROOT then import it.
    echo "editable install failed: linking torch_matgrad/triton_kernels -> ../triton_kernels"
    ln -s ../triton_kernels "$ROOT/torch_matgrad/triton_kernels" && importable
}

# The card's two ceilings, measured once: a 512 MiB device-to-device copy (bytes read plus
# written) and a cuBLAS bf16 8192^3 product; benchmarks/NOTES.md compares kernels with them.
ceilings() {
    "$PY" - <<'EOF'
import torch
from triton.testing import do_bench

a = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
b = torch.empty_like(a)
ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, quantiles=[0.5])
print(f"ceiling copy: {2 * a.nbytes / ms / 1e6:.0f} GB/s (read + write, median {ms:.3f} ms)")
x, y = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
ms = do_bench(lambda: x @ y, warmup=25, rep=200, quantiles=[0.5])
print(f"ceiling cuBLAS bf16 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s (median {ms:.3f} ms)")
EOF
}

if [ ! -e torch_matgrad/triton_kernels ]; then
    trap '[ -L "$ROOT/torch_matgrad/triton_kernels" ] && rm "$ROOT/torch_matgrad/triton_kernels"' EXIT
fi
export -f setup importable
export PY ROOT
stage setup 45 setup.log bash -c setup
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPU=1
    export -f ceilings
    stage ceilings 30 setup.log bash -c ceilings
    BENCH=(--quick --providers torch_matgrad,eager)
else
    GPU=0
    echo "No CUDA GPU: DRY RUN (cuda tests skip; CPU benchmark on tiny shapes, no GPU figures)"
    BENCH=(--quick --device cpu --shapes tiny --rep-ms 50)
fi

stage tests 160 pytest.log "$PY" -m pytest -m cuda -q -p no:cacheprovider "$ROOT/tests"
rc=$?
if [ $rc -eq 5 ] && [ $GPU -eq 0 ]; then
    # pytest's "no tests collected": acceptable for a dry run on a tree without cuda tests.
    unset 'FAILED[-1]'
    echo "   (dry run: no cuda tests collected)"
fi

stage bench 190 bench.log "$PY" -m torch_matgrad bench "${BENCH[@]}" --out "$OUT"

echo
if [ -f "$OUT/bench.md" ]; then
    cat "$OUT/bench.md"
elif [ -f "$OUT/bench.csv" ]; then
    echo "bench did not finish; the rows it measured:"
    cat "$OUT/bench.csv"
fi
echo
grep -h "^ceiling" "$OUT/setup.log"
[ $GPU -eq 0 ] && echo "DRY RUN without a GPU: the figures above are CPU figures."
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu_check: all stages passed"
