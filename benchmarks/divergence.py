#!/usr/bin/env python3
"""MLIP's divergence-encoder update under ZeRO-3: hilum's shard-local moving average against the
usual ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)`` update, per step.

Each variant runs in its own group of processes (gloo on CPU, 2 ranks by default; NCCL on CUDA,
one rank per GPU), building the real model with divergence encoders under the DeepSpeed engine
(ZeRO-3), then timing ``--steps`` updates after a warm-up. Peak memory is what the update adds:
CUDA's peak allocated memory above the state before it, or on CPU the peak resident set above it
(sampled every millisecond during the timed updates).

    python benchmarks/divergence.py                                 # CPU, a small ViT + BERT
    python benchmarks/divergence.py --model resnet50-bert --ranks 1 # GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gradcache import RESNET50_BERT, overlay, record, rss_bytes  # noqa: E402

SMALL = {  # about 25 M parameters per encoder pair: big enough for the gather to show
    "model": {
        "embed_dim": 256,
        "image": {"model": "vit_small_patch16_224", "kwargs": {"img_size": 64, "patch_size": 8}},
        "text": {"config": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
                            "intermediate_size": 1536, "max_position_embeddings": 64}},
    },
}


class RssSampler(threading.Thread):
    """The resident set's peak while it runs (ru_maxrss would report the whole process's peak,
    model building included), sampled every millisecond."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = rss_bytes(), True
        self.start()

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.join()
        return self.peak


def _config(args: argparse.Namespace):  # noqa: ANN202 - HilumConfig
    from hilum.launch.config import build_config, parse_yaml

    raw = parse_yaml((ROOT / "configs" / "tiny-clip.yaml").read_text())
    overlay(raw, RESNET50_BERT if args.model == "resnet50-bert" else SMALL)
    raw["model"]["text"]["tokenizer"] = str(Path(args.data) / "tokenizer")
    raw["objectives"] = [{"name": "clip"}, {"name": "divergence", "weight": 0.5}]
    raw["train"]["zero_stage"] = 3
    raw["monitoring"] = {"enabled": False}
    raw["run"]["output_dir"] = "/tmp/hilum-bench"
    return build_config(raw)


def _rank(rank: int, args: argparse.Namespace, port: int, queue) -> None:  # noqa: ANN001
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.ranks),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(args.ranks))
    import deepspeed
    import torch

    from hilum.trainer.loop import build_worker
    from hilum.trainer.moving_average import eq7_update
    from hilum.trainer.objectives.mlip.divergence import PART

    w = build_worker(_config(args))
    pairs = [(s, t) for source, target in w.engine.module.parts[PART].pairs(w.engine.module).values()
             for s, t in zip(source.parameters(), target.parameters())]
    encoders = w.objectives["divergence"].encoders
    cuda = w.device.type == "cuda"

    def shard_local(weight: float) -> None:
        for tower in ("image", "text"):
            encoders.averages[tower].update(weight)

    @torch.no_grad()
    def gathered(weight: float) -> None:
        params = [p for pair in pairs for p in pair]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                for s, t in pairs:
                    t.data.copy_(eq7_update(s.data, t.data, weight))

    update = shard_local if args.variant == "shard_local" else gathered
    update(0.9)  # warm-up
    torch.distributed.barrier()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = None if cuda else RssSampler()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        update(0.9)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()
    n_params = sum(getattr(t, "ds_numel", t.numel()) for _, t in pairs)
    if rank == 0:
        times.sort()
        queue.put({"what": "divergence_update", "variant": args.variant, "model": args.model, "device": str(w.device),
                   "ranks": args.ranks, "target_params": n_params, "median_ms": 1000 * times[len(times) // 2],
                   "peak_extra_MiB": max(0.0, (peak - base) / 2**20), "torch": torch.__version__})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["small", "resnet50-bert"], default="small")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data", default=str(ROOT / "data" / "phantom-bench"),
                   help="a phantom data set, for its tokenizer (a small one is built here on first use: not the demo's "
                        "data/phantom, which `make demo` would then train on)")
    p.add_argument("--out", type=Path)
    p.add_argument("--variant", choices=["shard_local", "gathered"], help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch.multiprocessing as mp

    from hilum.cluster.local import free_port

    if not (Path(args.data) / "tokenizer").exists():
        from hilum.trainer.data.phantom_dataset import build_phantom_dataset

        build_phantom_dataset(args.data, n_train=256, n_test=64, size=64, seed=0, samples_per_shard=64)
    # Large CPU allocations go to mmap and back to the OS when freed, so the resident set shows live
    # memory (glibc's adaptive threshold would keep the warm-up's freed gather buffers resident).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    for variant in ("shard_local", "gathered"):
        args.variant = variant
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_rank, args=(args, free_port(), queue), nprocs=args.ranks, start_method="spawn")
        record(queue.get(), args.out)


if __name__ == "__main__":
    main()
