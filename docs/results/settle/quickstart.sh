#!/usr/bin/env bash
# The settle study's second problem, the CPU quickstart (experiment=quickstart: gpt2-micro on the
# byte-tokenized standard library): AdamW, SophiaG, Lion and Muon at their tuned lrs (docs/results.md),
# WSD with four horizons (100, 200, 400, 800 steps) from one parent per seed, 3 seeds.
#   bash docs/results/settle/quickstart.sh OUT [JOBS]    (run from the repository)
set -euo pipefail
OUT=$(realpath -m "${1:?usage: quickstart.sh OUT [JOBS]}"); JOBS=${2:-2}
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
mkdir -p "$OUT/logs"; cd "$OUT"
export OMP_NUM_THREADS=1
declare -A OPT=([adamw]="optimizer=adamw optimizer.lr=6e-3" [sophia]="optimizer=sophia optimizer.lr=2e-4"
                [lion]="optimizer=lion optimizer.lr=1e-3" [muon]="optimizer=muon optimizer.lr=0.02")
WSD="schedule=wsd schedule.decay_fraction=0.2 schedule.decay_shape=1-sqrt"
python "$REPO/train.py" experiment=quickstart train.max_steps=1 train.eval_interval=0 hydra.run.dir=prepare >/dev/null  # data once
for o in adamw sophia lion muon; do
  for seed in 1337 2 3; do  # one job file each: the parent, then its branches
    P="$OUT/wsd/$o-s$seed"
    cat > "logs/$o-s$seed.sh" <<JOB
python $REPO/train.py experiment=quickstart ${OPT[$o]} seed=$seed $WSD train.max_steps=800 'schedule.horizons=[100,200,400,800]' hydra.run.dir=$P
python $REPO/train.py -m checkpoint.branch_from=$P train.max_steps=100,200,400 hydra.sweep.dir=$P-branches
JOB
  done
done
ls logs/*.sh | xargs -P "$JOBS" -I{} bash -c 'bash -e {} > {}.log 2>&1 || echo "failed: {} (see {}.log)"'
echo done
