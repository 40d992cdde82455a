#!/usr/bin/env bash
# GPU measurements, in one device call (about 8 minutes on an H100/H200), by section (ONLY=...):
#   anchor     open_clip ResNet-50 + BERT-base training step at batch 512 (the plain step to compare with)
#   data5      issue 3 as measured in session 5: CPU decode at 4 loader workers and GPU decode at 1/2/4,
#              local disk and moto S3 (data_wait5: data wait in training, ResNet-50 + BERT-base, 512, S3)
#   gradcache  issue 5: GradCache 256 and 65536 (chunk 256) vs plain 512
#   divergence issue 6: divergence-encoder update, ResNet-50 + BERT-base (one rank)
#   layout     plain 512 and GradCache 65536 with images in channels-last memory and without
#   host       plain 512 with and without a pinned host batch, and GradCache 65536 pinned
#              (the 2026-11-26 run also tried torch's fused AdamW: no gain, removed)
#   plain      plain 512 at ZeRO-1 (gcbest's default stage) with the top kernels (full table in
#              $OUT/profile.txt); session 6 profiled ZeRO-2 (equal to ZeRO-1 there, and without
#              cuDNN's autotuner: no difference)
#   plainvariants  plain 512 at ZeRO-2, and at ZeRO-2 with padded reports (real batches are padded;
#              the in-memory batches and the anchor's are not)
#   gcstage    GradCache 8192 (32 chunks of 256) at ZeRO-2 and ZeRO-1, with phases: the per-chunk
#              cost of each stage's gradient accumulation
#   gcbest     GradCache 65536 at whichever stage gcstage found faster (without gcstage: ZeRO-1, the
#              faster one in session 6)
#   gcdata     GradCache (4096 in chunks of 256) fed by GPU decode from S3: decoded in groups of 512,
#              the batch waiting in page-locked host memory (session 8); data wait and samples/s
#   data       issue 3 as built in session 6 (batched augmentation, prefetch thread, one tensor of JPEG
#              bytes per batch): GPU decode at 4 workers, S3 then local (CPU decode was measured in
#              session 6), each with shard read-ahead (data.read_ahead_mb 32, session 9) and without;
#              since session 9's call also sample offsets and (session 10) the tar reader;
#              data_wait: the same training run as data_wait5
#   dataload   the loader alone at 4 workers (workers parse and ship the bytes, nothing decodes them), S3
#              and local, on 4 copies of the data set (epochs of ~3 300 samples, not ~800): does the S3
#              gap sit in the workers or in the main process? Then py-spy samples the GPU-decode S3 run,
#              main process and workers ($OUT/dataprof-s3.txt, raw flamegraph lines; summary:
#              python benchmarks/gpu/profile_summary.py). Also GPU decode from S3 in batches of 256,
#              with the workers tokenising on 1 thread and on 3 (data.tokenizer_threads, session 10).
#   datagap    why training from S3 ran at 53 % of the in-memory step in session 9: that run with its
#              phases timed (compare with plain's), the in-memory step with padded reports, and the
#              data_wait run from local disk (no moto server). Answered in session 11: its steps held
#              205 samples, not 512 (820 training samples in 4 loader slots; each slot is batched apart)
#   datafull   data_wait from S3 on 7 copies of the data set: slots of 1 435 samples, steps of 512, 512, 411
#   health     issue 31: what the training-health checks cost per step on one GPU (tiny CLIP, batch 256,
#              ZeRO 2): the step guard, the monitor's all-reduce, a log step's per-tower norms
# Session 6 ran ONLY=anchor,plain,gcstage,data,data_wait (gcbest ran out of time); session 9
# anchor,plain,gcbest,data,data_wait,gcdata (gcbest ran out of time again, with --phases; measured
# in a second call without). Session 11 ran anchor,data,dataload,data_wait,datagap (581 s), then
# datafull (155 s): issue 3's targets met (RESULTS.md). The default now re-checks those figures:
# anchor,data,datafull (about 6 minutes; a call cut short by its time limit loses only the last sections).
# Prepare here: bash benchmarks/gpu/wheels.sh and the anchors' wheels (../shared/anchors/README.md,
# into .anchors); then run on the device with carry [".gpu", ".anchors"]:
#   bash benchmarks/gpu/pending.sh > $OUT/log.txt 2>&1; tail -40 $OUT/log.txt
# (JSON lines land in $OUT; copy them to benchmarks/results/; the log survives a timeout)
# SMOKE=1 shrinks every size so that the script can be tried on a CPU machine first.
set -u
cd "$(dirname "$0")/../.."
SITE=${SITE:-/tmp/hilum-site}
# One copy of each wheel (the anchors' set repeats webdataset): pip refuses two of one package.
KIT=${KIT:-.gpu}
WHEELS=$(ls "$KIT"/wheels/*.whl .anchors/wheels/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $WHEELS || { echo "wheel install failed"; exit 1; }
# hilum itself, from this working tree under its one import name: a `hilum` folder of links to the
# top-level packages (what an editable install maps them to), so nothing is built on the device.
mkdir -p "$SITE/hilum" && for p in trainer cluster launch kernels monitoring; do ln -sfn "$PWD/$p" "$SITE/hilum/$p"; done
export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/hilum-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, triton, deepspeed, s3fs; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, 's3fs', s3fs.__version__)" 2>&1 | tail -1
T0=$(date +%s)
step() { echo "== $1: $(( $(date +%s) - T0 )) s"; }
quiet() { grep -v -i "warn" | cut -c1-300; }
ONLY=${ONLY:-anchor,data,datafull}  # a subset, e.g. ONLY=gradcache,data_wait
run() { [[ ",$ONLY," == *",$1,"* ]]; }
if [ "${SMOKE:-0}" = 1 ]; then
  DATA="--samples 128 --batches 2 --batch 16 --decode-device cpu"; ANCHOR=""; WAIT="--model tiny --batch 16 --steps 4 --window 2 --samples 128"
  GC="--model tiny --batches 32,64 --plain-batches 32 --chunk 16"; DIV="--model small --ranks 1 --steps 1"
  LAYOUT_PLAIN="--model tiny --plain-batches 32 --batches ''"; LAYOUT_GC="--model tiny --plain-batches '' --batches 64 --chunk 16"
  STAGE_GC="--model tiny --plain-batches '' --batches 64 --chunk 16"; BEST_GC="$LAYOUT_GC"
  DATA6="--samples 128 --batches 2 --batch 16 --decode-device cpu --workers 2 --gpu-workers 2 --sources s3,local --read-ahead-mb 32,0"
  GCWAIT="--model tiny --batch 32 --gradcache-chunk 8 --steps 4 --window 2 --samples 128"
  LOADER="--samples 128 --repeat 2 --batches 2 --batch 16 --gpu-workers 2"
  FULL="--model tiny --batch 16 --steps 4 --window 2 --samples 128 --repeat 2"
  BIG="--samples 128 --repeat 4 --batches 2 --batch 32 --gpu-workers 2 --decode-device cpu"; PROF="--samples 128 --batches 4 --batch 16 --decode-device cpu --gpu-workers 2"
else
  DATA="--samples 1024"; ANCHOR=512; WAIT="--model resnet50-bert --batch 512 --steps 30 --window 10"
  GC="--model resnet50-bert --batches 256,65536 --plain-batches 512 --chunk 256"; DIV="--model resnet50-bert --ranks 1 --steps 5"
  LAYOUT_PLAIN="--model resnet50-bert --plain-batches 512 --batches ''"
  LAYOUT_GC="--model resnet50-bert --plain-batches '' --batches 65536 --chunk 256"
  STAGE_GC="--model resnet50-bert --plain-batches '' --batches 8192 --chunk 256"; BEST_GC="$LAYOUT_GC"
  # S3 first (session 6 ran out of time before it), with shard read-ahead (the default) and without
  DATA6="--samples 1024 --workers '' --gpu-workers 4 --sources s3,local --read-ahead-mb 32,0"
  GCWAIT="--model resnet50-bert --batch 4096 --gradcache-chunk 256 --steps 8 --window 4"
  LOADER="--samples 1024 --repeat 4 --batches 64 --gpu-workers 4"
  FULL="$WAIT --repeat 7"
  BIG="--samples 1024 --repeat 8 --batches 24 --batch 256 --gpu-workers 4"; PROF="--samples 1024 --batches 600 --gpu-workers 4"
fi

if [ -n "$ANCHOR" ] && run anchor; then
  timeout 35 python3 -c "import sys; sys.path.insert(0, '.anchors'); import bench_anchors as b; b.openclip_throughput($ANCHOR)" \
    2>&1 | quiet | tee "$OUT/anchor.jsonl"
  step anchor
fi
if run data5; then
  timeout 140 python3 benchmarks/data_throughput.py $DATA --sources local,s3 --workers 4 --gpu-workers 1,2,4 \
    --cache /tmp/hilum-bench-data --out "$OUT/data.jsonl" 2>&1 | quiet
  step data
fi
if run gradcache; then
  timeout 210 python3 benchmarks/gradcache.py $GC --steps 1 --out "$OUT/gradcache.jsonl" 2>&1 | quiet
  step gradcache
fi
if run data_wait5; then
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
if run plain; then  # the plain step at ZeRO-1, the stage gcbest runs by default
  eval timeout 75 python3 benchmarks/gradcache.py $LAYOUT_PLAIN --steps 3 --profile --zero 1 --out "$OUT/plain.jsonl" 2>&1 \
    | quiet > "$OUT/profile.txt"
  grep -E "^\{|Self CUDA time|Self CPU time|Error" "$OUT/profile.txt"
  step "plain zero 1 (profiled)"
fi
if run plainvariants; then
  eval timeout 45 python3 benchmarks/gradcache.py $LAYOUT_PLAIN --steps 3 --phases --zero 2 --out "$OUT/plain.jsonl" 2>&1 | quiet
  step "plain zero 2"
  eval timeout 45 python3 benchmarks/gradcache.py $LAYOUT_PLAIN --steps 3 --phases --zero 2 --padded on \
    --out "$OUT/plain.jsonl" 2>&1 | quiet
  step "plain zero 2, padded text"
fi
if run gcstage; then
  for z in 2 1; do
    eval timeout 75 python3 benchmarks/gradcache.py $STAGE_GC --steps 1 --phases --zero $z --out "$OUT/gcstage.jsonl" 2>&1 | quiet
    step "gradcache stage $z"
  done
fi
if run gcbest; then
  BEST=$(python3 -c "
import json, sys
rows = [json.loads(l) for l in open('$OUT/gcstage.jsonl')] if __import__('os').path.exists('$OUT/gcstage.jsonl') else []
rows = [r for r in rows if 'samples_per_s' in r]
print(max(rows, key=lambda r: r['samples_per_s'])['zero_stage'] if rows else 1)")
  eval timeout 200 python3 benchmarks/gradcache.py $BEST_GC --steps 1 --phases --zero $BEST --out "$OUT/gcbest.jsonl" 2>&1 | quiet
  step "gradcache best (zero $BEST)"
fi
if run data; then  # the new decode path (batched augmentation, prefetch thread, packed bytes)
  eval timeout 180 python3 benchmarks/data_throughput.py $DATA6 --cache /tmp/hilum-bench-data \
    --out "$OUT/data6.jsonl" 2>&1 | quiet
  step data
fi
if run dataload; then  # the loader alone: workers and transport without the decode and the main process's share
  eval timeout 100 python3 benchmarks/data_throughput.py $LOADER --workers "''" --decode-device none --sources s3,local \
    --read-ahead-mb 32 --cache /tmp/hilum-bench-data --out "$OUT/dataload.jsonl" 2>&1 | quiet
  step "dataload (loader alone)"
  # GPU decode from S3 in batches of 256, a training batch (the data section's are 64, and the
  # decoder's per-batch costs are spread over fewer samples there); 8 copies: 1 600 samples a worker.
  # Each worker tokenising on 1 thread, then on 3 (data.tokenizer_threads; 16 CPUs, 4 workers).
  eval timeout 110 python3 benchmarks/data_throughput.py $BIG --workers "''" --sources s3 --read-ahead-mb 32 \
    --tokenizer-threads 1,3 --cache /tmp/hilum-bench-data --out "$OUT/dataload.jsonl" 2>&1 | quiet
  step "dataload (GPU decode, S3, batches of 256)"
  # Sampled, not instrumented: py-spy follows the workers (--subprocesses); a container that forbids
  # reading another process's memory ends this within seconds, and the section's figures above stand.
  eval timeout 75 py-spy record -r 50 --subprocesses -f raw -o "$OUT/dataprof-s3.txt" -- python3 benchmarks/data_throughput.py \
    $PROF --workers "''" --sources s3 --read-ahead-mb 32 --cache /tmp/hilum-bench-data --out "$OUT/dataprof.jsonl" 2>&1 \
    | grep -E "^\{|py-spy|Error|error" | quiet
  step "dataprof (py-spy, S3, GPU decode)"
fi
if run data_wait; then  # with data.prefetch = 2 (the default now)
  timeout 95 python3 benchmarks/data_wait.py $WAIT --source s3 --cache /tmp/hilum-bench-data --out "$OUT/data6.jsonl" 2>&1 \
    | grep -E "step [0-9]+/|data_wait|Error|error" | quiet
  step data_wait
fi
if run datagap; then  # why training from S3 ran at 1 056 samples/s against 1 986 in memory (session 9)
  timeout 95 python3 benchmarks/data_wait.py $WAIT --phases --source s3 --cache /tmp/hilum-bench-data --out "$OUT/datagap.jsonl" 2>&1 \
    | grep -E "step [0-9]+/|data_wait|Error|error" | quiet
  step "data_wait from S3, phases timed"
  eval timeout 45 python3 benchmarks/gradcache.py $LAYOUT_PLAIN --steps 3 --zero 1 --padded on --out "$OUT/datagap.jsonl" 2>&1 | quiet
  step "plain zero 1, padded text (in memory)"
  timeout 95 python3 benchmarks/data_wait.py $WAIT --source local --cache /tmp/hilum-bench-data --out "$OUT/datagap.jsonl" 2>&1 \
    | grep -E "step [0-9]+/|data_wait|Error|error" | quiet
  step "data_wait from local disk"
fi
if run datafull; then  # the data wait at full training batches (datagap's steps held 205 samples)
  timeout 190 python3 benchmarks/data_wait.py $FULL --source s3 --cache /tmp/hilum-bench-data --out "$OUT/datafull.jsonl" 2>&1 \
    | grep -E "step [0-9]+/|data_wait|Error|error|WARN" | cut -c1-300
  step "data_wait from S3, full batches"
fi
if run gcdata; then
  timeout 120 python3 benchmarks/data_wait.py $GCWAIT --source s3 --cache /tmp/hilum-bench-data --out "$OUT/gcdata.jsonl" 2>&1 \
    | grep -E "step [0-9]+/|data_wait|Error|error" | quiet
  step gcdata
fi
if run health; then
  timeout 120 python3 benchmarks/health_guard.py --ranks 1 --stage 2 --device cuda --batch 256 --out "$OUT/health.jsonl" 2>&1 \
    | grep -E "^\{|Error|error" | cut -c1-600
  step health
fi
