#!/usr/bin/env bash
# One-shot check of the Triton kernels on a CUDA machine (a few minutes on an H100):
#   1. the GPU tests (compiled kernels against float64 ground truth, the whole preconditioner
#      against the CPU reference, no host synchronization in steady-state steps);
#   2. benchmarks/kernels.py (Triton vs torch eager vs torch.compile, CSV).
# Outputs go to $OUT when set, else to benchmarks/results/:
#   gpu_env.txt, gpu_tests.log, gpu_tests.xml, kernels_bench.log, kernels.csv
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; PYTHON=... to pick python)
set -u -o pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

# kfac_ef.kernels lives in kernels/ (package-dir mapping): without an install, map it with a
# path-based finder so that the check needs neither network nor pip.
if ! "$PY" -c "import kfac_ef.kernels" 2>/dev/null; then
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
    "$PY" -c "import kfac_ef.kernels" || { echo "cannot import kfac_ef.kernels"; exit 1; }
fi

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.version.cuda)"
    git rev-parse HEAD 2>/dev/null
} | tee "$DEST/gpu_env.txt"

status=0
"$PY" -m pytest tests/test_kernels_gpu.py -m gpu -q -rfEs -p no:cacheprovider \
    --junitxml="$DEST/gpu_tests.xml" 2>&1 | tee "$DEST/gpu_tests.log" || status=1

"$PY" benchmarks/kernels.py --out "$DEST/kernels.csv" 2>&1 | tee "$DEST/kernels_bench.log" || status=1
exit $status
