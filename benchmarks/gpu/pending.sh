#!/usr/bin/env bash
# The GPU measurements still open, in one device call (about 9 minutes on an H100/H200):
#   anchor   open_clip ResNet-50 + BERT-base training step at batch 512 (the plain step to compare with)
#   issue 3  data path: CPU decode at 4 loader workers and GPU decode at 1/2/4, local disk and moto S3;
#            data wait in training (ResNet-50 + BERT-base, batch 512, from S3, GPU decode)
#   issue 5  GradCache: ResNet-50 + BERT-base, effective batch 256 and 65536 (chunk 256) vs plain 512
#   issue 6  divergence-encoder update, ResNet-50 + BERT-base (one rank)
#   layout   issue 5's plain-step gap: plain 512 with phase times and top kernels, and GradCache 65536,
#            each with images in channels-last memory and without (ONLY=anchor,layout)
#   host     plain 512 with and without a pinned host batch, and GradCache 65536 pinned
#            (ONLY=anchor,host; the 2026-11-26 run also tried torch's fused AdamW: no gain, removed)
# Prepare here: bash benchmarks/gpu/wheels.sh and the anchors' wheels (../shared/anchors/README.md,
# into .anchors); then run on the device with carry [".gpu", ".anchors"]:
#   bash benchmarks/gpu/pending.sh            (JSON lines land in $OUT; copy them to benchmarks/results/)
# SMOKE=1 shrinks every size so that the script can be tried on a CPU machine first.
set -u
cd "$(dirname "$0")/../.."
SITE=${SITE:-/tmp/hilum-site}
# One copy of each wheel (the anchors' set repeats webdataset): pip refuses two of one package.
WHEELS=$(ls .gpu/wheels/*.whl .gpu/s3wheels/*.whl .anchors/wheels/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $WHEELS || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/hilum-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, triton, deepspeed, s3fs; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, 's3fs', s3fs.__version__)" 2>&1 | tail -1
T0=$(date +%s)
step() { echo "== $1: $(( $(date +%s) - T0 )) s"; }
quiet() { grep -v -i "warn" | cut -c1-300; }
ONLY=${ONLY:-anchor,data,gradcache,data_wait,divergence}  # a subset, e.g. ONLY=gradcache,data_wait
run() { [[ ",$ONLY," == *",$1,"* ]]; }
if [ "${SMOKE:-0}" = 1 ]; then
  DATA="--samples 128 --batches 2 --batch 16 --decode-device cpu"; ANCHOR=""; WAIT="--model tiny --batch 16 --steps 4 --window 2 --samples 128"
  GC="--model tiny --batches 32,64 --plain-batches 32 --chunk 16"; DIV="--model small --ranks 1 --steps 1"
  LAYOUT_PLAIN="--model tiny --plain-batches 32 --batches ''"; LAYOUT_GC="--model tiny --plain-batches '' --batches 64 --chunk 16"
else
  DATA="--samples 1024"; ANCHOR=512; WAIT="--model resnet50-bert --batch 512 --steps 30 --window 10"
  GC="--model resnet50-bert --batches 256,65536 --plain-batches 512 --chunk 256"; DIV="--model resnet50-bert --ranks 1 --steps 5"
  LAYOUT_PLAIN="--model resnet50-bert --plain-batches 512 --batches ''"
  LAYOUT_GC="--model resnet50-bert --plain-batches '' --batches 65536 --chunk 256"
fi

if [ -n "$ANCHOR" ] && run anchor; then
  timeout 35 python3 -c "import sys; sys.path.insert(0, '.anchors'); import bench_anchors as b; b.openclip_throughput($ANCHOR)" \
    2>&1 | quiet | tee "$OUT/anchor.jsonl"
  step anchor
fi
if run data; then
  timeout 140 python3 benchmarks/data_throughput.py $DATA --sources local,s3 --workers 4 --gpu-workers 1,2,4 \
    --cache /tmp/hilum-bench-data --out "$OUT/data.jsonl" 2>&1 | quiet
  step data
fi
if run gradcache; then
  timeout 210 python3 benchmarks/gradcache.py $GC --steps 1 --out "$OUT/gradcache.jsonl" 2>&1 | quiet
  step gradcache
fi
if run data_wait; then
  timeout 95 python3 benchmarks/data_wait.py $WAIT --source s3 --cache /tmp/hilum-bench-data --out "$OUT/data.jsonl" 2>&1 \
    | grep -E "step [0-9]+/|data_wait|Error|error" | quiet
  step data_wait
fi
if run divergence; then
  timeout 50 python3 benchmarks/divergence.py $DIV --out "$OUT/divergence.jsonl" 2>&1 | quiet
  step divergence
fi
if run layout; then
  for cl in on off; do
    eval timeout 100 python3 benchmarks/gradcache.py $LAYOUT_PLAIN --steps 3 --profile --channels-last $cl \
      --out "$OUT/layout.jsonl" 2>&1 | quiet | grep -v "^-\|^ *$"
    step "layout plain channels_last=$cl"
  done
  for cl in on off; do
    eval timeout 200 python3 benchmarks/gradcache.py $LAYOUT_GC --steps 1 --channels-last $cl --out "$OUT/layout.jsonl" 2>&1 | quiet
    step "layout gradcache channels_last=$cl"
  done
fi
if run host; then
  for v in "--pin off" "--pin on"; do
    eval timeout 90 python3 benchmarks/gradcache.py $LAYOUT_PLAIN --steps 3 --profile $v --out "$OUT/host.jsonl" 2>&1 \
      | quiet | grep -E "^\{|Optimizer|Memcpy|Self CUDA time|Error"
    step "host plain $v"
  done
  eval timeout 200 python3 benchmarks/gradcache.py $LAYOUT_GC --steps 1 --pin on --out "$OUT/host.jsonl" 2>&1 | quiet
  step "host gradcache pinned"
fi
