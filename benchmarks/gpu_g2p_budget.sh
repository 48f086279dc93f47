#!/usr/bin/env bash
# The G2P budget on a GPU: how far a larger model and a longer run take the comparison's WER
# (whole test split, beam 5) towards the literature's 20-24%.  One `compare` process per mode,
# side by side on one card; each prints its table with intervals and writes results.json.
#
#   bash benchmarks/gpu_g2p_budget.sh OUTDIR [STEPS]        # default 12000 steps
#   DEVICE=cpu bash benchmarks/gpu_g2p_budget.sh runs/budget-smoke 20   # a CPU dry run
set -u
OUTDIR=${1:?usage: gpu_g2p_budget.sh OUTDIR [STEPS]}
STEPS=${2:-12000}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-400}
mkdir -p "$OUTDIR/logs" "$OUTDIR/runs"
source "$(dirname "$0")/gpu_env.sh"
EXTRA=""
[ "$DEVICE" = cpu ] && EXTRA="--eval-size 20 --dev-size 20"
run() {  # run NAME ARGS...: one compare process, logged
    local name=$1
    shift
    echo "[$(date -u +%H:%M:%S)] start $name"
    timeout "$LIMIT" $PY -m structattn.app.cli compare --task g2p --steps "$STEPS" \
        --dev-every $((STEPS / 12)) --device "$DEVICE" --threads 2 $EXTRA "$@" \
        --out "$OUTDIR/runs/$name" >"$OUTDIR/logs/$name.log" 2>&1
    echo "[$(date -u +%H:%M:%S)] end $name: exit $?"
}
for mode in soft marginal; do
    run "rnn_${mode}_h512_b256" --modes "$mode" --hidden 512 --embed-dim 256 \
        --batch-size 256 &
done
run transformer_marginal_d256_b256 --arch transformer --modes marginal --hidden 256 \
    --batch-size 256 &
wait
