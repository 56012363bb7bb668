#!/usr/bin/env bash
# The "settle a comparison" study on nanoGPT's Shakespeare (experiment=shakespeare-char): AdamW,
# SophiaG, Lion and Muon at their tuned cosine lrs, WSD with four horizons from one parent per
# seed, 3 seeds; the equality of a branch and a fresh run; WSD against cosine; an lr grid with and
# without scale_attn_by_inverse_layer_idx. Then compare.py over each group of runs.
#   bash docs/results/settle/study.sh OUT [JOBS]    (run from the repository; JOBS in parallel)
# OUT collects the run directories; it needs tiny Shakespeare at tests/fixtures/tinyshakespeare.txt.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: study.sh OUT [JOBS]}"); JOBS=${2:-2}
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
mkdir -p "$OUT"; cd "$OUT"
export OMP_NUM_THREADS=1
BASE="experiment=shakespeare-char data.source=$REPO/tests/fixtures/tinyshakespeare.txt"
# each optimizer at its tuned lr of the cosine study (docs/results.md), nanoGPT's decay rule
declare -A OPT=(
  [adamw]="optimizer=adamw-nanogpt"
  [sophia]="optimizer=sophia optimizer.decay_rule=matrices"
  [lion]="optimizer=lion optimizer.decay_rule=matrices"
  [muon]="optimizer=muon optimizer.adamw_lr=1e-3 'optimizer.adamw_betas=[0.9,0.99]' optimizer.decay_rule=matrices"
)
declare -A LR=([adamw]=3e-3 [sophia]=3e-4 [lion]=1e-3 [muon]=0.02)
WSD="schedule=wsd schedule.decay_fraction=0.2 schedule.decay_shape=1-sqrt"
python "$REPO/train.py" $BASE train.max_steps=1 train.eval_interval=0 hydra.run.dir=prepare >/dev/null  # data once

jobs_file=$(mktemp)
for o in adamw sophia lion muon; do
  for seed in 1337 2 3; do  # the parent (2000 steps) and its branches into 250, 500 and 1000 steps
    P="$OUT/wsd/$o-s$seed"
    echo "python $REPO/train.py $BASE ${OPT[$o]} optimizer.lr=${LR[$o]} seed=$seed $WSD train.max_steps=2000 'schedule.horizons=[250,500,1000,2000]' hydra.run.dir=$P && python $REPO/train.py -m checkpoint.branch_from=$P train.max_steps=250,500,1000 hydra.sweep.dir=$P-branches" >> "$jobs_file"
  done
done
for o in adamw sophia lion muon; do
  echo "python $REPO/train.py $BASE ${OPT[$o]} optimizer.lr=${LR[$o]} $WSD train.max_steps=500 hydra.run.dir=$OUT/fresh/$o-500" >> "$jobs_file"
  for T in 500 1000 2000; do
    echo "python $REPO/train.py $BASE ${OPT[$o]} optimizer.lr=${LR[$o]} train.max_steps=$T hydra.run.dir=$OUT/cosine/$o-$T" >> "$jobs_file"
  done
  for x in 0.333 3 10; do  # the lr grid at horizon 1000 (1x is the seed-1337 branch)
    lr=$(python -c "print(f'{${LR[$o]}*$x:.3g}')")
    echo "python $REPO/train.py $BASE ${OPT[$o]} optimizer.lr=$lr $WSD train.max_steps=1000 hydra.run.dir=$OUT/grid/$o-x$x" >> "$jobs_file"
  done
  for x in 1 3 10; do  # the same with scale_attn_by_inverse_layer_idx
    lr=$(python -c "print(f'{${LR[$o]}*$x:.3g}')")
    echo "python $REPO/train.py $BASE ${OPT[$o]} optimizer.lr=$lr $WSD train.max_steps=1000 model.scale_attn_by_inverse_layer_idx=true hydra.run.dir=$OUT/grid-scaled/$o-x$x" >> "$jobs_file"
  done
done
mkdir -p logs
n=0; while IFS= read -r cmd; do n=$((n+1)); printf '%s\t%s\n' "$n" "$cmd"; done < "$jobs_file" > logs/jobs.tsv
# a job's output goes to logs/<n>.log; a failed job is reported and the others go on
cut -f1 logs/jobs.tsv | xargs -P "$JOBS" -I{} bash -c \
  'cmd=$(awk -F"\t" -v n={} "\$1==n {print \$2}" logs/jobs.tsv); eval "$cmd" > logs/{}.log 2>&1 || echo "job {} failed: see logs/{}.log"'
echo "all $(wc -l < logs/jobs.tsv) jobs done"
