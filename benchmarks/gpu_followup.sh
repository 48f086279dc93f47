#!/usr/bin/env bash
# The session's second GPU run: the simplex maps with the fused Triton kernel on and off, the
# multi-head layer, then the CUDA tests beside the long G2P budget runs.
#
#   bash benchmarks/gpu_followup.sh OUTDIR [STEPS]     # default 10000 budget steps
set -u
OUTDIR=${1:?usage: gpu_followup.sh OUTDIR [STEPS]}
STEPS=${2:-10000}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
source "$(dirname "$0")/gpu_env.sh"
SHAPES=4096x64,1024x512,256x4096,16384x4096
{
    echo "== simplex maps, Triton kernel on (default)"
    timeout 70 $PY benchmarks/simplex_bandwidth.py --shapes "$SHAPES"
    echo "== simplex maps, STRUCTATTN_TRITON=0"
    STRUCTATTN_TRITON=0 timeout 70 $PY benchmarks/simplex_bandwidth.py --shapes "$SHAPES" \
        --repeats 10
    echo "== multi-head attention"
    timeout 50 $PY benchmarks/attention.py --device cuda
} >"$OUTDIR/bench.log" 2>&1
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_transformer.py \
    tests/test_gpu_structured.py >"$OUTDIR/tests.log" 2>&1 &
LIMIT=${LIMIT:-330} bash benchmarks/gpu_g2p_budget.sh "$OUTDIR/budget" "$STEPS"
wait
echo "done"
