#!/usr/bin/env bash
# One-shot check of the Triton kernels on a CUDA machine, within a fixed budget (8 minutes
# by default, first compilations included). Every command runs under `timeout`, cut to the
# time left in the budget; a command that overruns is killed and the next phase still runs.
#
#   0. environment: GPU, driver, versions, commit                                  (~10 s)
#   1. correctness on CUDA first: tests/test_kernels_gpu.py (marker gpu) in three parallel
#      pytest processes, so that Triton compiles the kernels in parallel (shared cache) (220 s)
#   2. kernel benchmarks: benchmarks/kernels.py --only stats, then --only precond, without
#      torch.compile; the statistics rows include the aligned cuBLAS GEMM ceiling beside
#      the unaligned (d+1)² addmm, d = 2048 among them (wave quantization)     (70 s + 60 s)
#   3. whole step(): benchmarks/kernels.py --only step, steady-state steps timed under
#      torch.cuda.set_sync_debug_mode("error"), backends torch and auto           (75 s)
#
# Outputs, named gpu_check_<UTC date and time>_*, in $OUT/benchmarks/results/ when OUT is set
# (the device runner's output folder), else in benchmarks/results/:
#   _env.txt, _tests_<group>.log and .xml, _kernels.csv, _kernels.log, _step.log, _summary.txt
#
# Usage (from anywhere; PYTHON=... picks the interpreter, BUDGET=... the seconds):
#   bash benchmarks/gpu_check.sh            # on the GPU machine; exit 0 when all passed
#   bash benchmarks/gpu_check.sh --dry-run  # without CUDA, in seconds: imports, collects the
#                                           # GPU tests, parses the benchmark's arguments and
#                                           # runs phase 3 on tiny CPU shapes
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

BUDGET=${BUDGET:-480}
PY=${PYTHON:-python3}
DEST="${OUT:-.}/benchmarks/results"
if ((DRY_RUN)) && [[ -z "${OUT:-}" ]]; then
    DEST=$(mktemp -d)  # a dry run leaves benchmarks/results/ alone
fi
mkdir -p "$DEST"
PREFIX="$DEST/gpu_check_$(date -u +%Y-%m-%dT%H%M%SZ)"
SUMMARY="${PREFIX}_summary.txt"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
unset KFAC_EF_BACKEND  # the phases choose their backends themselves
STATUS=0

# seconds LIMIT: LIMIT, or what is left of the budget when that is less.
seconds() {
    local left=$((BUDGET - SECONDS))
    echo $(($1 < left ? $1 : (left > 0 ? left : 0)))
}

# run NAME LIMIT LOG CMD...: CMD under `timeout` (LIMIT cut to the budget), its output shown
# and appended to LOG, its outcome (124: killed by the timeout) appended to the summary.
run() {
    local name=$1 t log=$3 start=$SECONDS rc
    t=$(seconds "$2")
    shift 3
    if ((t < 10)); then
        echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"
        STATUS=1
        return
    fi
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $t s)" | tee -a "$SUMMARY"
    ((rc == 0)) || STATUS=1
}

# kfac_ef.kernels lives in kernels/ (package-dir mapping): without an install, map it with a
# path-based finder so that the check needs neither network nor pip.
if ! timeout 60 "$PY" -c "import kfac_ef.kernels" 2>/dev/null; then
    SHIM=$(mktemp -d)
    cat >"$SHIM/sitecustomize.py" <<PYEOF
import importlib.abc, importlib.util, sys
_KERNELS = "$PWD/kernels"
class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "kfac_ef.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, _KERNELS + "/__init__.py", submodule_search_locations=[_KERNELS])
sys.meta_path.insert(0, _KernelsFinder())
PYEOF
    export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    timeout 60 "$PY" -c "import kfac_ef.kernels" || { echo "cannot import kfac_ef.kernels"; exit 1; }
fi

# ---- 0. environment
ENV_TXT="${PREFIX}_env.txt"
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse HEAD 2>/dev/null
    git status --short 2>/dev/null | head -20
} | tee "$ENV_TXT"
if command -v nvidia-smi >/dev/null; then
    run nvidia-smi 15 "$ENV_TXT" \
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
elif ((!DRY_RUN)); then
    echo "nvidia-smi: not found" | tee -a "$ENV_TXT" "$SUMMARY"
fi
run versions 30 "$ENV_TXT" "$PY" -c "import torch, triton, numpy; print('torch', \
torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', \
torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"

# ---- 1. correctness on CUDA: three groups in parallel (-k expressions on the test names)
NAMES=(factor_stats precondition preconditioner)
EXPRS=(
    "factor_stats"
    "precondition_eigen or precondition_factored"
    "not factor_stats and not precondition_eigen and not precondition_factored"
)
T=$(seconds 220)
PIDS=()
for i in "${!NAMES[@]}"; do
    ARGS=(-m pytest tests/test_kernels_gpu.py -m gpu -k "${EXPRS[$i]}" -q -rfEs
        -p no:cacheprovider --junitxml="${PREFIX}_tests_${NAMES[$i]}.xml")
    ((DRY_RUN)) && ARGS+=(--collect-only)
    timeout --kill-after=10 "$T" "$PY" "${ARGS[@]}" >"${PREFIX}_tests_${NAMES[$i]}.log" 2>&1 &
    PIDS+=($!)
done
for i in "${!NAMES[@]}"; do
    wait "${PIDS[$i]}"
    RC=$?
    tail -n 5 "${PREFIX}_tests_${NAMES[$i]}.log"
    echo "tests ${NAMES[$i]}: exit $RC (limit $T s; 124: timeout)" | tee -a "$SUMMARY"
    ((RC == 0)) || STATUS=1
done

# ---- 2. kernel benchmarks (no torch.compile variants: their compilation takes minutes)
KERNELS_CSV="${PREFIX}_kernels.csv"
if ((DRY_RUN)); then
    run kernels-args 60 "${PREFIX}_kernels.log" "$PY" benchmarks/kernels.py --help
else
    run kernels-stats 70 "${PREFIX}_kernels.log" \
        "$PY" benchmarks/kernels.py --only stats --no-compile --out "$KERNELS_CSV"
    run kernels-precond 60 "${PREFIX}_kernels.log" \
        "$PY" benchmarks/kernels.py --only precond --no-compile --out "$KERNELS_CSV"
fi

# ---- 3. whole step() under sync debug mode "error" (the first-use checks in its warm-up)
SMOKE=()
((DRY_RUN)) && SMOKE=(--smoke)
run step 75 "${PREFIX}_step.log" \
    "$PY" benchmarks/kernels.py --only step "${SMOKE[@]}" --out "$KERNELS_CSV"

echo "total: $SECONDS s of $BUDGET s; exit $STATUS; outputs: ${PREFIX}_*" | tee -a "$SUMMARY"
exit $STATUS
