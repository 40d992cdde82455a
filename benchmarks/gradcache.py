#!/usr/bin/env python3
"""GradCache: peak memory and samples/s against the effective batch at a fixed chunk, next to
the plain step, through the real worker (DeepSpeed engine, objectives, loss kernel).

Each configuration runs in its own process (one rank, world size 1), so peak memory is its own:
CUDA's peak allocated memory on a GPU, the peak resident set above the process's state after
building the worker on CPU.

    python benchmarks/gradcache.py --batches 256,1024,4096 --chunk 64               # tiny model, CPU
    python benchmarks/gradcache.py --model resnet50-bert --batches 512,4096,65536 --chunk 256  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ResNet-50 + BERT-base as in the anchors' open_clip measurement (random init, ctx 128).
RESNET50_BERT = {
    "data": {"image_size": 224, "in_chans": 3, "context_length": 128},
    "model": {
        "embed_dim": 512,
        "image": {"model": "resnet50", "kwargs": {}},
        "text": {"config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                            "intermediate_size": 3072, "max_position_embeddings": 512}},
    },
}


def overlay(raw: dict, preset: dict) -> dict:
    """``raw`` (a parsed config) with a model preset's sections merged in, one level deep."""
    for section, values in preset.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(raw[section].get(key), dict):
                raw[section][key] = {**raw[section][key], **value}
            else:
                raw[section][key] = value
    return raw


def record(result: dict, out: Path | None) -> None:
    """Print one result as a JSON line and append it to ``out``."""
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        with Path(out).open("a") as f:
            f.write(line + "\n")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(args: argparse.Namespace) -> dict:
    """One configuration in this process: build the worker, run warm-up and timed steps."""
    import torch

    from hilum.launch.config import build_config, parse_yaml
    from hilum.trainer.loop import build_worker, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    raw = parse_yaml((ROOT / "configs" / "tiny-clip.yaml").read_text())
    if args.model == "resnet50-bert":
        overlay(raw, RESNET50_BERT)
    raw["model"]["text"]["tokenizer"] = str(Path(args.data) / "tokenizer")
    raw["data"]["batch_size"] = args.batch
    raw["gradcache"] = {"enabled": args.gradcache, "chunk_size": min(args.chunk, args.batch)}
    raw["model"]["image"]["channels_last"] = args.channels_last == "on"
    if args.zero is not None:
        raw["train"]["zero_stage"] = args.zero
    raw["train"]["cudnn_benchmark"] = args.cudnn_benchmark == "on"
    raw["monitoring"] = {"enabled": False}
    raw["run"]["output_dir"] = "/tmp/hilum-bench"
    cfg = build_config(raw)
    w = build_worker(cfg)
    d = cfg.data
    # The batch stays on the host, as the loader delivers it; GradCache moves one chunk at a time.
    # A random block repeated (features repeat; cost does not): 65536 fresh 224² images would take
    # a minute to draw. Stored in the training dtype: 20 GB for 65536 in bf16.
    block = torch.randn(min(args.batch, 1024), d.in_chans, d.image_size, d.image_size).to(w.dtype)
    batch = {
        "image": block.repeat(-(-args.batch // len(block)), 1, 1, 1)[: args.batch],
        "input_ids": torch.randint(5, len(w.tokenize.tokenizer), (args.batch, d.context_length)),
        "attention_mask": torch.ones(args.batch, d.context_length, dtype=torch.long),
    }
    if args.padded == "on":  # reports of 24 tokens to the full context, as real batches are padded
        lengths = torch.randint(24, d.context_length + 1, (args.batch, 1), generator=torch.Generator().manual_seed(0))
        batch["attention_mask"] = (torch.arange(d.context_length)[None] < lengths).long()
    cuda = w.device.type == "cuda"
    if cuda and args.pin == "on":  # as the training loader delivers batches to CUDA workers (pin_memory)
        batch = {k: v.pin_memory() for k, v in batch.items()}
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # Warm-up (kernel autotuning, optimizer state): GradCache runs chunk-shaped work only, so two
    # chunks warm it up as well as the whole effective batch would, in a fraction of the time.
    warm = min(args.batch, 2 * args.chunk) if args.gradcache else args.batch
    train_step(w, {k: v[:warm] for k, v in batch.items()})
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        values = train_step(w, batch).values
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    phases = {}
    if args.profile or args.phases:  # one more step: its phases (synchronised at each end)
        from hilum.trainer.timing import PhaseTimer

        timer = PhaseTimer(w.device, enabled=True)
        train_step(w, batch, timer)
        phases = {k: round(v, 4) for k, v in timer.phases.items()}
    if args.profile:  # and one more: the kernels that dominate it
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            train_step(w, batch)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        for line in prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70).splitlines():
            print("PROFILE " + line, flush=True)
    return {"what": "gradcache", "model": args.model, "device": str(w.device), "gradcache": args.gradcache,
            "batch": args.batch, "chunk": min(args.chunk, args.batch) if args.gradcache else None,
            "samples_per_s": args.batch / seconds, "step_s": seconds, "peak_extra_MiB": (peak - base) / 2**20,
            "loss": values["loss"], "threads": torch.get_num_threads(), "channels_last": args.channels_last,
            "pinned": args.pin, "padded": args.padded, "zero_stage": cfg.train.zero_stage,
            "cudnn_benchmark": args.cudnn_benchmark,
            **({"phases_s": phases} if phases else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "resnet50-bert"], default="tiny")
    p.add_argument("--batches", default="256,1024,4096")
    p.add_argument("--plain-batches", help="batches for the plain step (default: the same)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--data", default=str(ROOT / "data" / "phantom-bench"),
                   help="a phantom data set, for its tokenizer (a small one is built here on first use: not the demo's "
                        "data/phantom, which `make demo` would then train on)")
    p.add_argument("--out", type=Path)
    p.add_argument("--channels-last", choices=["on", "off"], default="on", help="model.image.channels_last")
    p.add_argument("--pin", choices=["on", "off"], default="on", help="CUDA: the host batch in pinned memory, as the loader gives it")
    p.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on", help="train.cudnn_benchmark")
    p.add_argument("--padded", choices=["on", "off"], default="off",
                   help="attention masks with padding (24 to context_length tokens) as real reports have; off: all "
                        "tokens real, as the open_clip anchor's batch")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="train.zero_stage (default: the config's, 2)")
    p.add_argument("--phases", action="store_true", help="also time one step's phases")
    p.add_argument("--profile", action="store_true", help="also time one step's phases and print its top kernels")
    p.add_argument("--fixed-mmap", action="store_true",
                   help="CPU: fixed glibc mmap threshold, so freed activations leave the resident set and the "
                        "peak shows live memory (glibc's adaptive threshold otherwise keeps them in a fragmented "
                        "heap); slower, so measure speed without it")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--gradcache", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=29777, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    if not (Path(args.data) / "tokenizer").exists():
        from hilum.trainer.data.phantom_dataset import build_phantom_dataset

        build_phantom_dataset(args.data, n_train=256, n_test=64, size=64, seed=0, samples_per_shard=64)
    def sizes(text: str) -> list[int]:
        return [int(b) for b in text.split(",") if b]

    runs = [(b, False) for b in sizes(args.batches if args.plain_batches is None else args.plain_batches)]
    runs += [(b, True) for b in sizes(args.batches)]
    for batch, gradcache in runs:
        cmd = [sys.executable, __file__, "--one", "--model", args.model, "--batch", str(batch), "--chunk", str(args.chunk),
               "--steps", str(args.steps), "--data", args.data, "--channels-last", args.channels_last,
               "--pin", args.pin, "--cudnn-benchmark", args.cudnn_benchmark, "--padded", args.padded] + (["--zero", str(args.zero)] if args.zero is not None else [])
        cmd += (["--gradcache"] if gradcache else []) + (["--profile"] if args.profile else []) + (["--phases"] if args.phases else [])
        env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if args.fixed_mmap else {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        for line in proc.stdout.splitlines():
            if line.startswith("PROFILE "):
                print(line[8:])
        lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            result = json.loads(lines[-1]) | {"fixed_mmap": args.fixed_mmap}
        else:
            lines = proc.stderr.strip().splitlines()
            tail = [line for line in lines if "Error" in line][-1:] or lines[-1:] or ["no output"]
            result = {"what": "gradcache", "batch": batch, "gradcache": gradcache, "error": tail[0][:300]}
        record(result, args.out)


if __name__ == "__main__":
    main()
