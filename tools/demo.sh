#!/usr/bin/env bash
# The main job on a fresh machine: set up, compress the bundled SmolLM2 with the defaults, export it to GGUF
# (base + LoRA adapter) and ONNX, and benchmark both against the uncompressed model. Everything goes under $OUT
# (default out/), the report in $REPORT (default $OUT/bench); REPORT=docs/bench regenerates the committed one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
LRD=.venv/bin/lrdeploy
OUT=${OUT:-out}
DATA=tools/data/wikitext2-valid.txt  # WikiText-2 validation split: calibrate on the first half, score the second
CALIB=(--calib "$DATA" --calib-range 0:0.5); PPL=(--ppl-text "$DATA" --ppl-range 0.5:1)
REPORT=${REPORT:-$OUT/bench}
if [ -f "$OUT/smollm2-caldera/lrdeploy.json" ]; then echo "reusing $OUT/smollm2-caldera (delete it to recompress)";
else $LRD compress smollm2 -o "$OUT/smollm2-caldera" "${CALIB[@]}" --force; fi
$LRD export "$OUT/smollm2-caldera" --format gguf -o "$OUT/smollm2-gguf" --force
# The default ONNX export is built for the EP this machine has: here the CPU EP, with int8 activations, which the
# artifact's fallback linears need to run fast (iq4_nl, as SmolLM2's 576-wide rows hold no q2_k super-block, is
# 8-bit MatMulNBits in ONNX)
$LRD export "$OUT/smollm2-caldera" --format onnx -o "$OUT/smollm2-onnx" --force
$LRD bench "$OUT/smollm2-gguf" "$OUT/smollm2-onnx" --baseline smollm2 --ctx 256,1024,4096 --gen-tokens 32 \
    --memory-budget 512MiB --runs 3 "${PPL[@]}" --report "$REPORT"
