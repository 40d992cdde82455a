#!/usr/bin/env python3
"""Data wait in training: the share of step time a rank spends waiting for (and decoding) its
next batch, through the real job (`hilum train --launcher local`: shard stream, loader workers,
GPU or CPU decode, DeepSpeed step), reading the ``data_wait_fraction`` the loop logs per window.

The data is ``benchmarks/data_throughput.py``'s (phantom 512×512 JPEG shards, built once into its
cache), read from local disk or from a moto S3 server on loopback. The first window (loader
start-up, cuDNN autotuning) is reported apart from the steady windows after it.

    python benchmarks/data_wait.py                                         # CPU, tiny model
    python benchmarks/data_wait.py --model resnet50-bert --batch 512 --source s3   # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_throughput import machine, prepare, repeated  # noqa: E402
from benchmarks.gradcache import RESNET50_BERT, overlay, record  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "resnet50-bert"], default="tiny")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--loader-workers", type=int, default=4)
    p.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--prefetch", type=int, default=2, help="data.prefetch (0: prepare each batch inline, as before)")
    p.add_argument("--read-ahead-mb", type=int, default=32, help="data.read_ahead_mb (0: workers read their shards themselves)")
    p.add_argument("--gradcache-chunk", type=int, default=0,
                   help="train with GradCache in chunks of this size (0: plain steps); GPU-decoded batches then wait on the host")
    p.add_argument("--phases", action="store_true",
                   help="time forward/loss/backward/optimizer (monitoring.phase_timing: synchronises at each phase end)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--window", type=int, default=10, help="steps per logged window")
    p.add_argument("--source", choices=["local", "s3"], default="local")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=1,
                   help="train on the training samples this many times over (copies with renamed keys). Each loader "
                        "worker batches its own slot of the epoch, and a slot shorter than --batch makes every step "
                        "short: at batch 512 with 4 workers the ~820 training samples give 205-sample steps")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--cache", default="/tmp/hilum-bench-data")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import datetime

    import fsspec
    import torch

    from hilum.launch.cli import _launch
    from hilum.launch.config import build_config, parse_yaml

    shards, tok, _ = prepare(Path(args.cache) / f"n{args.samples}-s{args.size}", args.samples, args.size)
    shards = repeated(shards, args.repeat)
    with contextlib.ExitStack() as stack:
        manifest, storage = str(shards / "train.json"), {}
        if args.source == "s3":
            from tests.s3server import moto_s3_server

            storage = stack.enter_context(moto_s3_server())
            fs = fsspec.filesystem("s3", **storage)
            fs.mkdir("hilum-wait")
            fs.put(str(shards) + "/", "hilum-wait/shards/", recursive=True)
            manifest = "s3://hilum-wait/shards/train.json"
            # Config credentials may only be environment references: hand them over that way.
            os.environ.update(HILUM_BENCH_KEY=storage.pop("key"), HILUM_BENCH_SECRET=storage.pop("secret"))
            storage |= {"key": "${HILUM_BENCH_KEY}", "secret": "${HILUM_BENCH_SECRET}"}
        raw = parse_yaml((ROOT / "configs" / "tiny-clip.yaml").read_text())
        if args.model == "resnet50-bert":
            overlay(raw, RESNET50_BERT)
        out_dir = tempfile.mkdtemp(prefix="hilum-wait-")
        raw["run"] |= {"name": "data-wait", "output_dir": out_dir}
        raw["data"] |= {"train_manifest": manifest, "eval_manifest": None, "storage_options": storage,
                        "batch_size": args.batch, "num_workers": args.loader_workers, "decode": args.decode,
                        "text": "report", "prefetch": args.prefetch,
                        "read_ahead_mb": args.read_ahead_mb}
        raw["model"]["text"]["tokenizer"] = str(tok)
        raw["train"] |= {"max_steps": args.steps, "log_every": args.window, "checkpoint_every": 0}
        raw["eval"] = {"at_end": False}
        raw["gradcache"] = {"enabled": args.gradcache_chunk > 0, "chunk_size": args.gradcache_chunk or 64}
        # Phase timing needs the metrics registry; port 0: any free port for its endpoint.
        raw["monitoring"] = {"enabled": args.phases, "metrics_port": 0, "phase_timing": args.phases}
        raw["cluster"] |= {"launcher": "local", "num_workers": 1}
        cfg = build_config(raw)
        _launch(cfg, None)
        windows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = windows[1:] or windows
    stamp = {"date": datetime.date.today().isoformat(), "machine": machine(), "torch": torch.__version__}
    record({"bench": "data_wait", **stamp, "model": args.model, "source": args.source, "decode": args.decode,
            "prefetch": args.prefetch, "read_ahead_mb": args.read_ahead_mb, "loader_workers": args.loader_workers, "batch": args.batch, "gradcache_chunk": args.gradcache_chunk, "steps": args.steps, "repeat": args.repeat,
            "first_window_wait": round(windows[0]["data_wait_fraction"], 4),
            "steady_wait": round(sum(w["data_wait_fraction"] for w in steady) / len(steady), 4),
            "steady_samples_per_s": round(sum(w["samples_per_second"] for w in steady) / len(steady), 1),
            "steady_samples_per_step": round(sum(w["samples_per_step"] for w in steady) / len(steady), 1),
            **({"steady_phase_seconds": {k: round(sum(w["phase_seconds"][k] for w in steady) / len(steady), 4)
                                         for k in steady[0]["phase_seconds"]}} if args.phases else {})}, args.out)


if __name__ == "__main__":
    main()
