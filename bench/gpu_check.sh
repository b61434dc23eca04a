#!/usr/bin/env bash
# The GPU check, ready to run on any machine with an NVIDIA GPU: installs hawq-ray where it is missing, then
# runs bench/gpu_check.py (CUDA modules of resnet18 under uniform8 / uniform4 / mixed against the integer
# executor, their latency beside torch fp32 and fp16, a Hessian-trace actor and a Ray Tune trial on the GPU)
# within 8 minutes, and prints one table. Exit status 0 only when every check passed.
#
#   bash bench/gpu_check.sh [gpu_check.py options]
#
# PYTHON picks the interpreter (default python3: the one that holds a CUDA build of torch). On a machine that
# reaches no package registry, HAWQ_WHEELS=DIR installs the missing packages from a folder of wheels (the
# build uses the setuptools already installed).
# GPU_CHECK_LIMIT (seconds, default 480) bounds the whole check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${GPU_CHECK_LIMIT:-480}
start=$(date +%s)

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none); a dry run on the CPU: python bench/gpu_check.py --device cpu" >&2
    exit 2
fi
if ! "$PY" -c "import hawq_ray, actors, tvm, ray, pulp, pytorchcv, pyhessian, pandas" 2>/dev/null; then
    echo "gpu_check: installing hawq-ray into $("$PY" -c 'import sys; print(sys.prefix)')"
    if [ -n "${HAWQ_WHEELS:-}" ]; then
        "$PY" -m pip install -q --no-index --no-build-isolation --find-links "$HAWQ_WHEELS" -e .
    else
        "$PY" -m pip install -q -e .
    fi
fi
left=$(( LIMIT - ($(date +%s) - start) ))
if [ "$left" -le 60 ]; then
    echo "gpu_check: the install took $(( LIMIT - left )) s of the ${LIMIT} s limit; run again to check" >&2
    exit 3
fi
export PYTHONUNBUFFERED=1
timeout --signal=INT --kill-after=20 "$left" "$PY" bench/gpu_check.py "$@"
