#!/usr/bin/env bash
# The main job on a fresh machine: set up, compress the bundled SmolLM2 with the defaults, evaluate it, export it
# to GGUF (base + LoRA adapter) and ONNX, and evaluate the exports in llama.cpp and onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
LRD=.venv/bin/lrdeploy
OUT=${OUT:-out}
DATA=../shared/data/wikitext2-valid.txt
if [ -f "$DATA" ]; then CALIB=(--calib "$DATA" --calib-range 0:0.5); TEXT=(--text "$DATA" --text-range 0.5:1);
else CALIB=(); TEXT=(); fi
EVAL=("${TEXT[@]}" --ctx 512 --windows 40)
$LRD compress smollm2 -o "$OUT/smollm2-caldera" "${CALIB[@]}" --force
$LRD eval smollm2 "${EVAL[@]}"
$LRD eval "$OUT/smollm2-caldera" "${EVAL[@]}"
$LRD export "$OUT/smollm2-caldera" --format gguf -o "$OUT/smollm2-gguf" --force
$LRD eval "$OUT/smollm2-gguf" --backend llamacpp "${EVAL[@]}"
$LRD export "$OUT/smollm2-caldera" --format onnx -o "$OUT/smollm2-onnx" --force
$LRD eval "$OUT/smollm2-onnx" --backend onnxruntime "${EVAL[@]}"
