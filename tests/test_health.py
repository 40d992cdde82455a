"""Training health: non-finite steps skipped in lockstep, spikes rolled back, collapses flagged."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hilum.trainer.checkpoint import CheckpointInfo, list_complete, retired
from hilum.trainer.health import (
    HealthMonitor,
    LossDrill,
    Observation,
    SpikeDetector,
    diverged_message,
    embedding_variance,
    poisoned,
)
from tests.conftest import tiny_config, write_config
from tests.test_e2e import HILUM, OUTSIDE, hilum, logged_steps

# ---------------------------------------------------------------------------------------------
# Units, against straightforward references


def test_poisoned_is_exact_when_finite_and_reaches_every_gradient_when_not():
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    total = (w * 3).sum()
    same = poisoned(total)
    assert same.item() == total.item()  # times exactly 1
    same.backward(retain_graph=True)
    assert torch.equal(w.grad, torch.full_like(w, 3.0))
    # A NaN added at the very end back-propagates finite gradients unless poisoned.
    w.grad = None
    (total + float("nan")).backward(retain_graph=True)
    assert torch.isfinite(w.grad).all()
    w.grad = None
    poisoned(total + float("nan")).backward()
    assert torch.isnan(w.grad).all()


def _spike_reference(history: list[float], k: float) -> float:
    h = np.array(history, dtype=np.float64)
    median = np.median(h)
    mad = 1.4826 * np.median(np.abs(h - median))
    return float(median + k * max(mad, 1e-3 * abs(median), 1e-8))


def test_spike_detector_against_a_median_and_mad_reference():
    rng = np.random.default_rng(0)
    losses = list(2.0 + 0.05 * rng.standard_normal(40))
    detector = SpikeDetector(deviations=6.0, steps=3, window=30)
    for step, loss in enumerate(losses, 1):
        assert detector.observe(step, loss) is None
    assert detector.threshold() == pytest.approx(_spike_reference(losses[-30:], 6.0), rel=1e-12)
    limit = detector.threshold()
    # one blip over the limit is not a spike; three in a row are, reported once, at the third
    assert detector.observe(41, limit + 1) is None
    assert detector.observe(42, 2.0) is None and not detector.in_spike
    limit = detector.threshold()
    events = [detector.observe(s, limit * 3) for s in range(43, 48)]
    assert [e is not None for e in events] == [False, False, True, False, False]
    assert events[2].data["onset"] == 43 and detector.in_spike
    # the spike's values stayed out of the window: the threshold is unchanged
    assert detector.threshold() == pytest.approx(limit, rel=1e-12)
    assert detector.observe(48, float("nan")) is None  # non-finite losses are the step guard's


def _observe(monitor, step, **kw):
    base = dict(loss=2.0, logit_scale=10.0, terms={"clip": 2.0}, chance={"clip": math.log(16)},
                embedding_variance={"image": 0.5, "text": 0.5}, past_warmup=True)
    base.update(kw)
    return monitor.observe(Observation(step, **base))


def test_collapse_signs_are_reported_once_after_n_steps_and_rearm():
    from hilum.launch.config import HealthSection

    monitor = HealthMonitor(HealthSection(collapse_steps=4))
    found = [_observe(monitor, s, logit_scale=0.5) for s in range(1, 7)]
    assert [len(e) for e in found] == [0, 0, 0, 1, 0, 0] and found[3][0].data["cause"] == "logit_scale"
    assert not monitor.healthy
    _observe(monitor, 7)
    assert monitor.healthy
    chance = math.log(16)
    found = [_observe(monitor, s, terms={"clip": chance * 1.005}) for s in range(8, 12)]
    assert found[-1] and found[-1][0].data["cause"] == "chance"
    assert not any(_observe(monitor, s, terms={"clip": chance}, past_warmup=False) for s in range(12, 20))
    flat = {"image": 1e-5, "text": 0.4}
    assert not any(_observe(monitor, s, embedding_variance=flat, past_warmup=False) for s in range(20, 30))
    found = [_observe(monitor, s, embedding_variance=flat) for s in range(30, 34)]
    assert found[-1][0].data == {"cause": "embedding_variance", "image": 1e-5}


def test_embedding_variance_of_spread_and_collapsed_unit_vectors():
    x = torch.nn.functional.normalize(torch.randn(4096, 16, dtype=torch.float64), dim=1)
    assert embedding_variance(x) == pytest.approx(1.0 - float(x.mean(0).norm() ** 2), rel=1e-6)  # float32 sums
    assert embedding_variance(x[:1].expand(64, -1)) == pytest.approx(0.0, abs=1e-12)


def test_retention_never_removes_the_newest_healthy_checkpoint():
    def ck(step, healthy=True):
        return CheckpointInfo(f"x/step_{step:08d}", step, 1, 0.0, healthy)

    found = [ck(10), ck(20), ck(30, False), ck(40, False)]
    assert [c.step for c in retired(found, 2)] == [10]  # 20 stays: the newest healthy one
    assert [c.step for c in retired(found, 1)] == [10, 30]
    assert [c.step for c in retired([ck(10), ck(20), ck(30)], 1)] == [10, 20]


def test_diverged_message_is_found_in_a_launchers_error_text():
    text = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n  ...\n"
            "hilum.trainer.health.TrainingDiverged: training diverged: 3 consecutive steps\n")
    assert diverged_message(RuntimeError(text)) == "training diverged: 3 consecutive steps"
    assert diverged_message(RuntimeError("something else")) is None


def test_loss_drill_spec():
    os.environ["HILUM_LOSS_DRILL"] = "nan:3-5:1,spike:7:0"
    try:
        drill = LossDrill.from_env()
        os.environ["HILUM_LOSS_DRILL"] = "nan:3"
        with pytest.raises(ValueError, match="'nan:3' is not KIND:FIRST-LAST:RANK"):
            LossDrill.from_env()
    finally:
        del os.environ["HILUM_LOSS_DRILL"]
    assert [drill.factor(s, 1) is not None for s in range(1, 7)] == [False, False, True, True, True, False]
    assert drill.factor(3, 0) is None and math.isnan(drill.factor(3, 1)) and drill.factor(7, 0) == 20.0


# ---------------------------------------------------------------------------------------------
# Through the CLI, on 2 gloo ranks


def _train(cfg: Path, drill: str | None, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"HILUM_LOSS_DRILL": drill} if drill else {})}
    proc = subprocess.run([*HILUM, "train", "--config", str(cfg)], capture_output=True, text=True, timeout=600,
                          cwd=OUTSIDE, env=env)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _weights(ckpt: CheckpointInfo) -> dict[str, torch.Tensor]:
    from hilum.launch.export import consolidated_state_dict

    return consolidated_state_dict(Path(ckpt.url))


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "health_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _metric(run_dir: Path, rank: int, name: str) -> float:
    for line in (run_dir / "metrics" / f"rank{rank}.prom").read_text().splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in rank {rank}'s metrics")


def test_nonfinite_step_is_skipped_in_lockstep_and_a_spike_is_rolled_back(phantom_dir, tmp_path):
    """ZeRO 2, 2 ranks: rank 1's loss is NaN at step 3, rank 0's 20x too large at steps 14-16."""
    health = {"spike_window": 8, "spike_steps": 3}
    raw = tiny_config(phantom_dir, tmp_path / "runs", train={"max_steps": 24, "log_every": 1, "checkpoint_every": 1,
                                                            "keep_checkpoints": 40, "rollback": True, "health": health},
                      cluster={"launcher": "local"}, eval={"at_end": False}, optim={"warmup_steps": 2},
                      run={"deterministic": True})
    proc = _train(write_config(tmp_path / "c.yaml", raw), "nan:3:1,spike:14-16:0")
    run_dir = tmp_path / "runs" / "t"
    console = proc.stdout + proc.stderr
    assert "step 3 skipped: non-finite gradients" in console and "rank 1: clip, loss" in console
    events = _events(run_dir)
    assert [(e["kind"], e["step"]) for e in events] == [("nonfinite", 3), ("spike", 16), ("rollback", 16)], events
    # in lockstep: both ranks counted the same one skip
    assert [_metric(run_dir, r, "hilum_skipped_steps_total") for r in (0, 1)] == [1.0, 1.0]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped"] for x in lines[:5]] == [0, 0, 1, 0, 0] and math.isnan(lines[2]["loss"])
    assert all(math.isfinite(x["grad_norm"]) for i, x in enumerate(lines) if i != 2)
    assert {"grad_norm/image_tower", "grad_norm/text_tower", "update_ratio"} <= set(lines[0])
    # The spike began at 14: the checkpoints of 14-16 were written inside it (not healthy), so the
    # rollback went to 13, removed them, and training went on with the data after step 16.
    assert events[1]["onset"] == 14 and events[2]["to_step"] == 13
    assert "rolled back from step 16 to the checkpoint of step 13" in console
    assert logged_steps(run_dir) == [*range(1, 17), *range(14, 25)]
    assert lines[-1]["step"] == 24
    ckpts = list_complete(run_dir)
    assert [c.step for c in ckpts] == list(range(1, 25)) and all(c.healthy for c in ckpts)
    weights = {c.step: _weights(c) for c in ckpts if c.step in (2, 3, 4, 24)}
    assert all(torch.isfinite(t).all() for w in weights.values() for t in w.values())
    # the skipped step left every weight as it was; the next one moved them again
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])


def test_run_stops_after_max_bad_steps_and_resumes_from_the_last_good_checkpoint(phantom_dir, tmp_path):
    """ZeRO 3 and GradCache, 2 ranks, NaN from step 5 on: the run stops at step 7 with exit code 3,
    and `hilum train --resume` with a longer schedule continues from step 6's checkpoint."""
    raw = tiny_config(phantom_dir, tmp_path / "runs", train={"max_steps": 12, "checkpoint_every": 2, "zero_stage": 3,
                                                            "max_bad_steps": 3},
                      cluster={"launcher": "local"}, gradcache={"enabled": True, "chunk_size": 4})
    cfg = write_config(tmp_path / "c.yaml", raw)
    proc = _train(cfg, "nan:5-12:0", expect=3)
    run_dir = tmp_path / "runs" / "t"
    assert "hilum: training diverged: 3 consecutive steps with non-finite loss or gradients (steps 5-7)" in proc.stderr
    assert "the last healthy checkpoint is" in proc.stderr and "step_00000006" in proc.stderr
    assert [e["kind"] for e in _events(run_dir)] == ["nonfinite", "nonfinite", "diverged"]
    ckpts = list_complete(run_dir)
    assert [c.step for c in ckpts] == [2, 4, 6]
    assert all(torch.isfinite(t).all() for t in _weights(ckpts[-1]).values())
    # it resumes from there (the drill is gone), with a schedule extended on the command line
    out = hilum("train", "--config", str(cfg), "--resume", "--set", "train.max_steps=14")
    assert "continuing at step 7" in out.stderr
    assert logged_steps(run_dir)[-2:] == [12, 14]
    assert list_complete(run_dir)[-1].step == 14 and json.loads((run_dir / "eval.json").read_text())["step"] == 14


def test_huge_learning_rate_is_flagged_as_collapse_and_stage_0_skips_a_nan(phantom_dir, tmp_path):
    """One rank, ZeRO 0 (the guard's own gradient check): lr 10 collapses the tiny CLIP."""
    raw = tiny_config(phantom_dir, tmp_path / "runs", train={"max_steps": 30, "log_every": 1, "checkpoint_every": 0,
                                                            "zero_stage": 0, "health": {"collapse_steps": 8}},
                      optim={"lr": 10.0, "warmup_steps": 2}, cluster={"launcher": "local", "num_workers": 1},
                      eval={"at_end": False})
    proc = _train(write_config(tmp_path / "c.yaml", raw), "nan:3:0")
    run_dir = tmp_path / "runs" / "t"
    events = _events(run_dir)
    assert [(e["kind"], e["step"]) for e in events if e["kind"] == "nonfinite"] == [("nonfinite", 3)]
    assert {e["cause"] for e in events if e["kind"] == "collapse"} == {"logit_scale", "chance", "embedding_variance"}
    assert "collapse:" in proc.stderr
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[2]["skipped"] == 1 and not math.isfinite(lines[2]["grad_norm"])
    # the schedule stood still on the skipped step, as ZeRO's overflow path leaves it
    assert lines[2]["lr"] == lines[1]["lr"] and lines[3]["lr"] != lines[2]["lr"]
