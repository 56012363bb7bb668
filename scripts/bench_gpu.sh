#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one go, on one CUDA GPU (meant for an H100/H200):
#
#     bash scripts/bench_gpu.sh [OUT]        # OUT defaults to results/gpu-<date>
#
# Writes OUT/device.txt (card, driver, torch, CUDA), OUT/pytest_gpu.txt (the gpu-marked tests:
# fused == reference on CUDA, flash SDPA, pinned loader), and for each benchmark its printed
# table (.txt) and JSON. Copy the tables into docs/benchmarks.md with the date and device.
# Needs GPT-2 tokens for representative gpt2-small/medium numbers: it prepares the stdlib corpus
# with the gpt2 tokenizer once (tiktoken's files come from TIKTOKEN_CACHE_DIR or one download).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-results/gpu-$(date +%F)}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench_gpu.sh: no CUDA device is visible to torch; run it on a GPU machine." >&2
    exit 2
fi
# Only now: a refusal must not leave an empty results folder that looks like a run.
mkdir -p "$out"

{
    date -u +"%F %T UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$out/device.txt"

# 1. Correctness on CUDA before any timing.
python -m pytest -q -m gpu 2>&1 | tee "$out/pytest_gpu.txt"

# 2. GPT-2 tokens for the training benchmarks (no-op when already prepared).
data=prepared/stdlib-gpt2
[ -f "$data/meta.json" ] || python -m data.prepare stdlib --tokenizer gpt2 --out "$data"

# 3. Optimizer step: ms and GB/s against the bytes floor (target: sophiag fused <= 0.9x fused AdamW).
python scripts/bench_optim.py --model gpt2-small,gpt2-medium --device cuda \
    --repeats 50 --steps 5 --warmup 3 --json "$out/bench_optim.json" | tee "$out/bench_optim.txt"

# 4. Training throughput, MFU, memory and step breakdown, bf16 + compile, 480 x 1024 tokens/step
#    (targets: sophia at k=10 >= 0.95x AdamW with 1/10 of the micro-batches feeding the Hessian,
#    >= 0.90x with all of them; AdamW's MFU >= the plain nanoGPT loop's).
python scripts/bench_train.py --model gpt2-small --device cuda --dtype bfloat16 --compile \
    --data "$data" --batch-tokens 491520 --micro-batch-size 16 --steps 20 --warmup 20 --repeats 3 \
    --optimizers adamw,lion,sophia,sophiah,muon --hessian-micro-batches all,1/10 \
    --nanogpt-baseline --json "$out/bench_train_gpt2-small.json" | tee "$out/bench_train_gpt2-small.txt"
python scripts/bench_train.py --model gpt2-medium --device cuda --dtype bfloat16 --compile \
    --data "$data" --batch-tokens 491520 --micro-batch-size 8 --steps 10 --warmup 20 --repeats 3 \
    --optimizers adamw,lion,sophia,sophiah,muon --hessian-micro-batches all,1/10 \
    --json "$out/bench_train_gpt2-medium.json" | tee "$out/bench_train_gpt2-medium.txt"

# 5. GNB loss cost and the Hessian micro-batch trade-off.
python scripts/bench_hessian.py --device cuda --dtype bfloat16 --batch 16 --seq 1024 \
    --model gpt2-small --mb-rows 16 --mb-seq 1024 --train-steps 200 \
    --json "$out/bench_hessian.json" | tee "$out/bench_hessian.txt"

echo "bench_gpu.sh: all results in $out"
