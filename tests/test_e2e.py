"""End-to-end runs through the real CLI: Ray Train + DeepSpeed, kill and resume, ZeRO-3.

Slow by nature (each starts DeepSpeed in two processes); kept to a handful of steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hilum.trainer.checkpoint import latest_complete, list_complete
from tests.conftest import HILUM, OUTSIDE, tiny_config, write_config

pytestmark = pytest.mark.slow


def hilum(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([*HILUM, *args], capture_output=True, text=True, timeout=timeout, cwd=OUTSIDE)
    assert proc.returncode == 0, f"hilum {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ray_train_two_workers_zero2(phantom_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(phantom_dir, tmp_path / "runs"))
    proc = hilum("train", "--config", str(cfg))
    run_dir = tmp_path / "runs" / "t"
    assert "ZeRO stage 2" in proc.stderr and "2 workers" in proc.stderr
    assert [c.step for c in list_complete(run_dir)] == [3, 6]
    assert logged_steps(run_dir) == [2, 4, 6]
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["samples"] == 64 and 0.0 <= ev["zero_shot"]["accuracy"] <= 1.0
    assert set(ev["retrieval"]) == {"image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5"}
    assert sorted(p.name for p in (run_dir / "metrics_targets").iterdir()) == ["rank0.json", "rank1.json"]
    assert "zero-shot accuracy" in proc.stdout
    # The console: hilum's lines, the libraries' only when they warn (Ray Train logs every report
    # with its whole metrics dict at INFO; DeepSpeed prints and warns at every start).
    console = proc.stdout + proc.stderr
    assert "INFO hilum: step 6/6 |" in console and "INFO hilum: eval step 6 |" in console
    for noise in ("Reporting training result", "TrainingReport(", "built successfully", "Requesting resources",
                  "Attempting to get learning rate", "all_gather_into_tensor", "PreemptionWatcher", "samples skipped: none"):
        assert noise not in console, noise
    # A second `train` into the same run directory must not clobber it.
    again = subprocess.run([*HILUM, "train", "--config", str(cfg)], capture_output=True, text=True, timeout=120, cwd=OUTSIDE)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_sigkill_after_checkpoint_then_resume_continues_at_next_step(phantom_dir, tmp_path):
    raw = tiny_config(phantom_dir, tmp_path / "runs", train={"max_steps": 14, "log_every": 1, "checkpoint_every": 4},
                      cluster={"launcher": "local"}, eval={"at_end": False})
    cfg = write_config(tmp_path / "c.yaml", raw)
    run_dir = tmp_path / "runs" / "t"
    proc = subprocess.Popen([*HILUM, "train", "--config", str(cfg)], cwd=OUTSIDE, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 420
        while not (run_dir / "config.yaml").is_file() or latest_complete(run_dir) is None:
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = latest_complete(run_dir).step
    assert killed_at < 14
    steps_before = logged_steps(run_dir)

    out = hilum("resume", str(run_dir))
    assert f"continuing at step {killed_at + 1}" in out.stderr
    after = logged_steps(run_dir)[len(steps_before):]
    assert after == list(range(killed_at + 1, 15))
    assert latest_complete(run_dir).step == 14


def test_gradcache_run_learns_like_a_plain_run(phantom_dir, tmp_path):
    """Same data, seed and batch (16 per rank, 2 ranks) with and without GradCache (chunks of 6):
    the loss falls alike and held-out zero-shot accuracy ends within noise."""
    results = {}
    for name, gradcache in (("plain", {"enabled": False}), ("cached", {"enabled": True, "chunk_size": 6})):
        raw = tiny_config(phantom_dir, tmp_path / name, train={"max_steps": 200, "log_every": 25, "checkpoint_every": 0},
                          data={"batch_size": 16}, cluster={"launcher": "local"}, gradcache=gradcache,
                          optim={"warmup_steps": 20})
        proc = hilum("train", "--config", str(write_config(tmp_path / f"{name}.yaml", raw)))
        assert ("GradCache: contrastive batch 32 (16 per rank), encoded 6 at a time" in proc.stderr) == gradcache["enabled"]
        run_dir = tmp_path / name / "t"
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = (losses, json.loads((run_dir / "eval.json").read_text())["zero_shot"]["accuracy"])
    print("losses and zero-shot accuracy:", results)  # shown with -rP
    (plain_losses, plain_acc), (cached_losses, cached_acc) = results["plain"], results["cached"]
    # Only dropout masks differ (drawn per chunk instead of per batch); single-batch losses are
    # noisy, so compare the mean of the last four logged steps.
    late_plain, late_cached = sum(plain_losses[-4:]) / 4, sum(cached_losses[-4:]) / 4
    assert late_cached < cached_losses[0] - 0.25, cached_losses
    assert late_cached == pytest.approx(late_plain, abs=0.15), (plain_losses, cached_losses)
    # Zero-shot accuracy here is over ~55 single-label held-out samples after 200 steps: two plain
    # runs have differed by 0.18, so this only catches a broken model (the loss curves above are
    # the sharp check; the 500-step demo-size comparison is in the issue note).
    assert abs(cached_acc - plain_acc) <= 0.3 and cached_acc > 0.1, (plain_acc, cached_acc)
