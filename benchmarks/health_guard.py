"""What the training-health checks cost per step (hilum.trainer.health), on CPU ranks or a GPU.

    python benchmarks/health_guard.py --ranks 2 --stage 2            # 2 gloo ranks, the tiny CLIP
    python benchmarks/health_guard.py --ranks 1 --stage 0 --device cuda --batch 256

Three ways of running the same training step, interleaved in rounds so that drift hits all alike:

* ``bare``: the backward and ``engine.step()``, nothing else (what the loop did before the checks);
* ``guarded``: every step as the loop runs it: the optimizer step taken or skipped by the step
  guard (DeepSpeed's own overflow check; at stage 0 a gradient norm), the embeddings' variance,
  one all-reduce of the step's loss, terms and variances, and the spike and collapse monitor;
* ``detailed``: a log step, which adds each module's gradient norm (a collective per parameter
  under ZeRO) and the update/weight ratio (a copy of the optimizer's weights).

``poisoned()``, the factor every loss is multiplied by, runs in all three; its own cost is timed
apart, and so is the monitor's (``observe_health``: the all-reduce and the checks). Prints one JSON
line: the median seconds per step of each, and the overheads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    from hilum.launch.config import build_config, parse_yaml
    from hilum.trainer.engine import dist_backend
    from hilum.trainer.health import poisoned
    from hilum.trainer.loop import build_worker, observe_health, step_backward, train_step

    dist.init_process_group(dist_backend(args.device), rank=rank, world_size=world)
    raw = parse_yaml((ROOT / "configs" / "tiny-clip.yaml").read_text())
    raw["model"]["text"]["tokenizer"] = str(Path(args.data) / "tokenizer")
    raw["data"]["batch_size"] = args.batch
    raw["train"].update(zero_stage=args.stage, max_steps=10**6)
    raw["monitoring"] = {"enabled": False}
    raw["cluster"].update(device=args.device, cpus_per_worker=max(1, (os.cpu_count() or 1) // world))
    raw["run"]["output_dir"] = "/tmp/hilum-bench"
    w = build_worker(build_config(raw))
    d = w.cfg.data
    g = torch.Generator().manual_seed(rank)
    batch = {"image": torch.rand(args.batch, d.in_chans, d.image_size, d.image_size, generator=g),
             "input_ids": torch.randint(5, len(w.tokenize.tokenizer), (args.batch, d.context_length), generator=g),
             "attention_mask": torch.ones(args.batch, d.context_length, dtype=torch.long)}
    step = 0

    def sync() -> None:
        if w.device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        step_backward(w, batch)
        w.engine.step()

    def checked(detail: bool) -> None:
        nonlocal step
        step += 1
        observe_health(w, step, train_step(w, batch, step=step, detail=detail))

    modes = {"bare": bare, "guarded": lambda: checked(False), "detailed": lambda: checked(True)}
    for run in modes.values():  # warm-up: optimizer state, one-time collectives
        run()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    # the monitor's share alone: the all-reduce of the step's means and the spike/collapse checks
    report = train_step(w, batch, step=step + 1)
    sync()
    t0 = time.perf_counter()
    for i in range(200):
        observe_health(w, step + 2 + i, report)
    monitor_s = (time.perf_counter() - t0) / 200
    x = torch.tensor(1.5, device=w.device)
    sync()
    t0 = time.perf_counter()
    for _ in range(1000):
        poisoned(x)
    sync()
    poison_s = (time.perf_counter() - t0) / 1000
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        out.write_text(json.dumps({
            "ranks": world, "stage": args.stage, "device": args.device, "batch_per_rank": args.batch,
            "step_s": med, "guard_overhead": med["guarded"] / med["bare"] - 1,
            "log_step_overhead": med["detailed"] / med["bare"] - 1, "poisoned_s": poison_s, "monitor_s": monitor_s,
            "spread": {k: [min(v), max(v)] for k, v in times.items()}, "date": time.strftime("%Y-%m-%d"),
        }))
    dist.destroy_process_group()


def main() -> None:
    import tempfile

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and mode")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", default="/tmp/hilum-bench-data/health")
    parser.add_argument("--out", help="append the result (a JSON line) here")
    args = parser.parse_args()
    if not (Path(args.data) / "tokenizer").is_dir():
        from hilum.trainer.data.phantom_dataset import build_phantom_dataset

        build_phantom_dataset(args.data, n_train=64, n_test=16, size=64, seed=0, samples_per_shard=64)
    from hilum.cluster.local import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.start_processes(_rank, args=(args.ranks, free_port(), args, out), nprocs=args.ranks, start_method="spawn")
        result = out.read_text()
    print(result, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(result + "\n")


if __name__ == "__main__":
    main()
