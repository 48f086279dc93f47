#!/usr/bin/env bash
# One prepared GPU session: the CUDA tests, the GPU benchmarks on a quiet card, then every
# `--device cuda` command path (bf16 autocast) and the G2P budget runs side by side.
#
#   bash benchmarks/gpu_session.sh OUTDIR            # on a machine with a CUDA device
#   DEVICE=cpu SMOKE=1 bash benchmarks/gpu_session.sh runs/gpu-smoke   # a CPU dry run
#
# Python packages the GPU image lacks are installed from wheels in .whl/ (gpu_env.sh).
# Every step has its own time limit and writes its log under OUTDIR; a failing step does not
# stop the others.
set -u
OUTDIR=${1:?usage: gpu_session.sh OUTDIR}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR/logs" "$OUTDIR/runs"
source "$(dirname "$0")/gpu_env.sh"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
step() {  # step SECONDS NAME command...: run with a limit, log to logs/NAME.log
    local limit=$1 name=$2
    shift 2
    log "start $name (limit ${limit}s)"
    local begin=$SECONDS
    timeout "$limit" "$@" >"$OUTDIR/logs/$name.log" 2>&1
    log "end $name: exit $? after $((SECONDS - begin)) s"
}

log "session on $(hostname), $(date -u)"
nvidia-smi 2>&1 | head -15 || true
$PY -c "import torch, pyro, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

if [ "$SMOKE" = 1 ]; then
    BENCH="--quick"; BIG=40; EVAL=20; LIMIT=400
    CMPX="--steps 20 --eval-size 20 --dev-size 20 --dev-every 10 --resamples 50"
else
    BENCH=""; BIG=4000; EVAL=2000; LIMIT=280; CMPX=""
fi

# 1. Benchmarks first, alone on the card, so their ratios are not disturbed.
step 120 bench_simplex $PY benchmarks/simplex_bandwidth.py --device "$DEVICE" $BENCH
step 50 bench_attention $PY benchmarks/attention.py --device "$DEVICE" $BENCH
step 45 bench_seq2seq $PY benchmarks/seq2seq.py --device "$DEVICE" --quick

# 2. Tests, the CLI's cuda paths and the G2P budget runs, side by side.
step "$LIMIT" tests $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_gpu_transformer.py tests/test_gpu_structured.py &
step "$LIMIT" compare_rnn $PY -m structattn.app.cli compare --task g2p --quick \
    --device "$DEVICE" --threads 2 $CMPX --out "$OUTDIR/runs/compare_rnn" &
step "$LIMIT" compare_transformer $PY -m structattn.app.cli compare --task g2p --quick \
    --arch transformer --modes soft,entmax-learned,marginal --device "$DEVICE" --threads 2 $CMPX \
    --out "$OUTDIR/runs/compare_transformer" &
for spec in "soft 256 128" "marginal 256 128" "soft 512 256"; do
    set -- $spec
    step "$LIMIT" "budget_$1_h$2_b$3" $PY -m structattn.app.cli train --task g2p --mode "$1" \
        --hidden "$2" --embed-dim $(($2 / 2)) --batch-size "$3" --steps "$BIG" \
        --dev-every $((BIG / 10)) --eval-size "$EVAL" --beam-size 5 --device "$DEVICE" --threads 2 \
        --out "$OUTDIR/runs/budget_$1_h$2_b$3" &
done
wait
log "all steps done"
