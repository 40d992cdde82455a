#!/usr/bin/env bash
# The GPU measurements still open, in one device call (about 8 minutes on an H100/H200):
#   issue 3  data path: GPU decode at 1/2/4 loader workers next to CPU decode at 4
#   issue 5  GradCache: ResNet-50 + BERT-base, effective batch 512 / 4096 / 65536 (chunk 256) vs plain 512
#   issue 6  divergence-encoder update, ResNet-50 + BERT-base (one rank)
# Prepare here: bash benchmarks/gpu/wheels.sh; then run on the device with carry [".gpu"]:
#   bash benchmarks/gpu/pending.sh            (JSON lines land in $OUT, copy them to benchmarks/results/)
set -u
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --target "$PWD/.gpu/site" .gpu/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD/.gpu/site:$PWD"
OUT=${OUT:-/tmp/hilum-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
T0=$(date +%s)
step() { echo "== $1: $(( $(date +%s) - T0 )) s"; }
quiet() { grep -v -i "warn" | cut -c1-300; }

timeout 200 python3 benchmarks/data_throughput.py --samples 1024 --sources local --workers 4 --gpu-workers 1,2,4 \
  --cache /tmp/hilum-bench-data --out "$OUT/data.jsonl" 2>&1 | quiet
step data
timeout 280 python3 benchmarks/gradcache.py --model resnet50-bert --batches 512,4096,65536 --plain-batches 512 \
  --chunk 256 --steps 1 --out "$OUT/gradcache.jsonl" 2>&1 | quiet
step gradcache
timeout 90 python3 benchmarks/divergence.py --model resnet50-bert --ranks 1 --steps 5 --out "$OUT/divergence.jsonl" 2>&1 | quiet
step divergence
