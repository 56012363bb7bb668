#!/usr/bin/env bash
# The GPU evidence pack on a bare, offline GPU machine: at most 8 minutes, at most 8 files in OUT.
#
#     bash scripts/gpu_check.sh [OUT]            # OUT defaults to $OUT when set, else results/gpu-check
#     python scripts/gpu_check.py --dry-run      # the plan: every phase's command and time cap
#
# Once, on a CPU machine with the package index (the machine that ships the working tree over):
#
#     bash scripts/gpu_check.sh --fetch          # pure-Python wheels + tiktoken's GPT-2 files -> gpu-wheels/
#     bash scripts/gpu_check.sh --setup-only     # the offline setup alone (no GPU needed): to try it
#
# gpu-wheels/ is git-ignored and travels with the working tree (well under 1 MiB). On the GPU
# machine this script installs those wheels with --no-index (hydra-core, omegaconf and antlr4 are
# what train.py imports and such a machine lacks), the project itself with --no-deps, prepares
# GPT-2 tokens of the machine's own Python standard library, then hands over to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=gpu-wheels

if [ "${1:-}" = "--fetch" ]; then
    mkdir -p "$WHEELS/tiktoken_cache"
    python -m pip wheel --no-deps -w "$WHEELS" "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" \
        "antlr4-python3-runtime==4.9.3" packaging
    python - "$WHEELS/tiktoken_cache" <<'PY'
import os, shutil, sys, tiktoken
tiktoken.get_encoding("gpt2")  # fills TIKTOKEN_CACHE_DIR (or downloads once into it)
src = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(os.environ.get("TMPDIR", "/tmp"), "data-gym-cache")
for name in os.listdir(src):
    shutil.copy(os.path.join(src, name), sys.argv[1])
PY
    ls -l "$WHEELS" "$WHEELS/tiktoken_cache"
    exit 0
fi

setup_only=false
if [ "${1:-}" = "--setup-only" ]; then setup_only=true; shift; fi
out=${1:-${OUT:-results/gpu-check}}
if ! $setup_only && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device is visible to torch; run it on a GPU machine." >&2
    exit 2
fi
mkdir -p "$out"
start=$(date +%s)
{
    echo "== setup (cap 50 s)"
    # Only what is missing: a package the machine has keeps the machine's version.
    for pair in hydra:hydra_core omegaconf:omegaconf antlr4:antlr4_python3_runtime packaging:packaging; do
        python -c "import ${pair%%:*}" 2>/dev/null && continue
        wheel=$(ls "$WHEELS"/"${pair#*:}"-*.whl 2>/dev/null | head -1)
        [ -n "$wheel" ] || { echo "gpu_check.sh: ${pair%%:*} is missing and $WHEELS/ has no wheel for it: run 'bash scripts/gpu_check.sh --fetch' on a CPU machine first" >&2; exit 2; }
        python -m pip install -q --no-index --no-deps "$wheel"
    done
    python -m pip install -q --no-index --no-deps --no-build-isolation -e . \
        || echo "note: editable install failed; using PYTHONPATH"
    [ -d "$WHEELS/tiktoken_cache" ] && export TIKTOKEN_CACHE_DIR=$PWD/$WHEELS/tiktoken_cache
    [ -f prepared/stdlib-gpt2/meta.json ] || timeout 40 python -m data.prepare stdlib \
        --tokenizer gpt2 --out prepared/stdlib-gpt2 --max-docs 4000 --workers 12 --no-progress
    echo "setup took $(( $(date +%s) - start )) s"
} 2>&1 | tee -a "$out/log.txt"
$setup_only && exit 0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d "$WHEELS/tiktoken_cache" ] && export TIKTOKEN_CACHE_DIR=$PWD/$WHEELS/tiktoken_cache
python scripts/gpu_check.py "$out" --budget $(( 480 - ($(date +%s) - start) ))
