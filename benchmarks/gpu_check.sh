#!/usr/bin/env bash
# The GPU evidence pack on a bare, offline GPU machine: at most 8 minutes, at most 8 files in OUT.
#
#     bash benchmarks/gpu_check.sh [OUT]            # OUT defaults to $OUT when set, else results/gpu-check
#     python -m benchmarks.gpu_check --dry-run      # the plan: every phase's command and time cap
#
# Once, on a CPU machine with the package index (the machine that ships the working tree over):
#
#     bash benchmarks/gpu_check.sh --fetch          # wheels + tiktoken's GPT-2 files -> gpu-wheels/
#     bash benchmarks/gpu_check.sh --setup-only     # the offline setup alone (no GPU needed): to try it
#
# gpu-wheels/ is git-ignored and travels with the working tree (about 5 MiB). On the GPU machine
# this script installs from them with --no-index what such a machine may lack (hydra-core with
# omegaconf, antlr4 and PyYAML for train.py, pytest for the gpu tests), the project itself with
# --no-deps, prepares GPT-2 tokens of the machine's own Python standard library, then hands over
# to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=gpu-wheels

if [ "${1:-}" = "--fetch" ]; then
    mkdir -p "$WHEELS/tiktoken_cache"
    # train.py's hydra and the tests' pytest, with what they depend on (pure Python)
    python -m pip wheel -q -w "$WHEELS" "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" \
        "antlr4-python3-runtime==4.9.3" "pytest>=7"
    # omegaconf needs PyYAML, which has no pure-Python wheel: one per CPython the GPU machine
    # may run (x86_64 Linux; machines with transformers already have it). pytest on 3.10 also
    # needs tomli and exceptiongroup (with typing_extensions).
    for py in 3.10 3.11 3.12 3.13; do
        extra=""; [ "$py" = 3.10 ] && extra="tomli exceptiongroup typing_extensions"
        python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
            --platform manylinux2014_x86_64 -d "$WHEELS" "PyYAML>=5.1" $extra
    done
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
    # Only what is missing, resolved from gpu-wheels/ alone: pip keeps every package the machine
    # already has and picks the wheels that fit this Python (PyYAML's are per version).
    if ! python -c "import hydra, pytest" 2>/dev/null; then
        python -m pip install -q --no-index --find-links "$WHEELS" "hydra-core>=1.3,<1.4" "pytest>=7" \
            || { echo "gpu_check.sh: hydra-core or pytest is missing and $WHEELS/ cannot supply it for this Python: run 'bash benchmarks/gpu_check.sh --fetch' on a CPU machine first" >&2; exit 2; }
    fi
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
python -m benchmarks.gpu_check "$out" --budget $(( 480 - ($(date +%s) - start) ))
