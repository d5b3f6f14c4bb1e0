#!/usr/bin/env bash
# The fidelity evaluation in one go: train the model (<= ~5.5 min on an H100), then evaluate it
# (~3-3.5 min; rows not started within 200 s are reported as skipped): ~9 min in all. TRAIN_ARGS and
# EVAL_ARGS pass more options to train.py and evaluate.py (e.g. EVAL_ARGS="--context 4096"). Only small files land in the output directory ($OUT, or --out): train_log.json,
# fidelity.json, fidelity.md, fidelity.png, run.log. The checkpoint goes to --ckpt (default under /tmp).
#
#   bash bench/fidelity/run_all.sh                  # on the GPU machine, writes to $OUT
#   bash bench/fidelity/run_all.sh --tiny --out /tmp/fidelity_tiny   # a CPU check, ~3-4 min
# hetero is imported from this checkout (PYTHONPATH), installed or not.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
tiny=""
out="${OUT:-results/fidelity}"
ckpt=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tiny) tiny="--tiny"; shift ;;
        --out) out="$2"; shift 2 ;;
        --ckpt) ckpt="$2"; shift 2 ;;
        *) echo "usage: run_all.sh [--tiny] [--out DIR] [--ckpt DIR]" >&2; exit 2 ;;
    esac
done
ckpt="${ckpt:-${TMPDIR:-/tmp}/fidelity_ckpt${tiny:+_tiny}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$(cd "$here/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
{
    echo "fidelity run: $(date -u +%FT%TZ) python $("$python" -c 'import sys; print(sys.version.split()[0])') ckpt $ckpt"
    "$python" "$here/train.py" $tiny --ckpt "$ckpt" --log "$out/train_log.json" ${TRAIN_ARGS:-}
    "$python" "$here/evaluate.py" $tiny --ckpt "$ckpt" --out "$out" --train-log "$out/train_log.json" ${EVAL_ARGS:-}
} 2>&1 | tee "$out/run.log"
