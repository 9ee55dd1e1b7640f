#!/usr/bin/env bash
# On a Tenstorrent host with two devices (an n300's two chips, or two cards): the seed-style table,
# timed, for Llama 3.2 1B -> 3B and 1B -> 8B at k = 4 and 8, draft on device 0, target on device 1.
# MODELS holds the Hugging Face directories. Results land in results/tt-<date>-<pair>/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-/models}
PY=${PY:-python}
for target in Llama-3.2-3B-Instruct Llama-3.1-8B-Instruct; do
  "$PY" -m specdec.bench --backend ttnn --draft-device-id 0 --target-device-id 1 \
    --draft "$MODELS/Llama-3.2-1B-Instruct" --target "$MODELS/$target" --draft-dtype bfloat16 \
    --ks 4,8 --overlap-k 4 --no-hf "$@" --out "results/tt-$(date +%F)-1b-to-${target%%-Instruct}"
done
