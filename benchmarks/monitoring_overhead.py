#!/usr/bin/env python3
"""What monitoring costs: training samples/s with monitoring on (Prometheus endpoint, per-phase
timing, MFU, memory, straggler check at every log step) versus off, same run otherwise.

Runs ``hilum train`` (local launcher) in alternating on/off pairs so that drift of the machine
affects both; the rate of a run is the mean over its log windows after the first (warm-up).
Because run-to-run noise on a small machine exceeds 1 %, it also times in-process what
monitoring adds to each step (phase marks, metric updates, the memory read), a tighter bound.

    python benchmarks/monitoring_overhead.py --pairs 3 --steps 120
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gradcache import record  # noqa: E402


def run(enabled: bool, args: argparse.Namespace, out: Path, index: int) -> float:
    name = f"overhead-{'on' if enabled else 'off'}-{index}"
    cmd = [sys.executable, "-m", "hilum.launch.cli", "train", "--config", str(ROOT / "configs" / "tiny-clip.yaml"), "--launcher", "local",
           "--workers", str(args.workers), "--set", f"run.output_dir={out}", "--set", f"run.name={name}",
           "--set", f"train.max_steps={args.steps}", "--set", f"train.log_every={args.steps // 6}",
           "--set", "train.checkpoint_every=0", "--set", "eval.at_end=false",
           "--set", f"monitoring.enabled={'true' if enabled else 'false'}", "--set", "monitoring.metrics_port=0",
           "--set", f"data.train_manifest={args.data}/train.json", "--set", f"model.text.tokenizer={args.data}/tokenizer"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(x["samples_per_second"] for x in lines[1:])


def per_step_cost_us(repeats: int = 2000) -> float:
    """What monitoring adds to every step in-process: phase marks, the metric updates, the memory read."""
    import time

    import torch

    from hilum.monitoring.metrics import WorkerMetrics
    from hilum.trainer.loop import device_memory
    from hilum.trainer.timing import PhaseTimer

    m = WorkerMetrics("bench", 0, "n")
    phases = ("data", "forward", "loss", "backward", "optimizer")
    t0 = time.perf_counter()
    for step in range(repeats):
        timer = PhaseTimer(torch.device("cpu"))
        for phase in phases:
            timer.mark(phase)
        m.observe_step(step, 32, 0.2, 0.01, {"loss": 1.0, "clip": 1.0}, 14.0, {}, {}, phases=timer.phases, tokens=1000,
                       flops_per_sample=1e9, peak_tflops=100.0, memory=device_memory(torch.device("cpu")))
    return (time.perf_counter() - t0) / repeats * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default=str(ROOT / "data" / "phantom"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not (Path(args.data) / "train.json").exists():
        from hilum.trainer.data.phantom_dataset import build_phantom_dataset

        build_phantom_dataset(args.data, n_train=2048, n_test=384)
    on, off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for enabled in ((True, False) if i % 2 == 0 else (False, True)):
                (on if enabled else off).append(run(enabled, args, Path(tmp), i))
                print(f"pair {i}: monitoring {'on ' if enabled else 'off'} {(on if enabled else off)[-1]:.1f} samples/s", flush=True)
    result = {
        "what": "monitoring_overhead", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "workers": args.workers, "steps": args.steps,
        "on_samples_per_s": on, "off_samples_per_s": off,
        "overhead_percent": 100 * (1 - statistics.mean(on) / statistics.mean(off)),
        "per_step_cost_us": per_step_cost_us(),
    }
    record(result, args.out)


if __name__ == "__main__":
    main()
