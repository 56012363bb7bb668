#!/usr/bin/env bash
# Grid edges and seeds 2, 3 at each optimizer's best lr (experiment=shakespeare-char), 2026-11-30.
# Run from the repository root; the byte-level corpus needs no tokenizer download.
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1
C="experiment=shakespeare-char data.source=tests/fixtures/tinyshakespeare.txt train.log_interval=50"
M="optimizer.decay_rule=matrices"
(
python train.py -m $C optimizer=adamw-nanogpt optimizer.lr=1e-2 seed=1337 hydra.sweep.dir=results/shakespeare/edge-adamw
python train.py -m $C optimizer=adamw-nanogpt optimizer.lr=3e-3 seed=2,3 hydra.sweep.dir=results/shakespeare/seeds-adamw
python train.py -m $C optimizer=sophia optimizer.lr=3e-4 $M seed=2,3 hydra.sweep.dir=results/shakespeare/seeds-sophia
) > results/shakespeare/seeds_a.log 2>&1 &
(
python train.py -m $C optimizer=lion optimizer.lr=3e-3 $M seed=1337 hydra.sweep.dir=results/shakespeare/edge-lion
python train.py -m $C optimizer=lion optimizer.lr=1e-3 $M seed=2,3 hydra.sweep.dir=results/shakespeare/seeds-lion
python train.py -m $C optimizer=muon optimizer.lr=0.02 optimizer.adamw_lr=1e-3 'optimizer.adamw_betas=[0.9,0.99]' $M seed=2,3 hydra.sweep.dir=results/shakespeare/seeds-muon
) > results/shakespeare/seeds_b.log 2>&1 &
wait
