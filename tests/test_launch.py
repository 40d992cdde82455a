"""`hilum launch / status / stop / resume`: a detached driver on this machine, and a Ray job on a
Ray cluster with its job server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hilum.launch.jobs import JobRecord, job_state
from hilum.trainer.checkpoint import latest_complete
from tests.conftest import HILUM, OUTSIDE, tiny_config, write_config

pytestmark = pytest.mark.slow


def hilum(*args: str, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([*HILUM, *args], capture_output=True, text=True, timeout=timeout, cwd=OUTSIDE)
    if ok:
        assert proc.returncode == 0, f"hilum {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def job_line(run_dir: Path) -> str:
    return next(line for line in hilum("status", str(run_dir)).stdout.splitlines() if line.startswith("job:"))


def job_now(run_dir: Path) -> str:
    """The state `hilum status` would print, read in this process: polling through the CLI would
    start a torch-importing process several times a second next to the run under test."""
    return job_state(run_dir, JobRecord.load(run_dir))


def wait_until(condition, what: str, timeout: float = 420, every: float = 0.3) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def latest_step(run_dir: Path) -> int:
    if not (run_dir / "config.yaml").is_file():
        return -1
    found = latest_complete(run_dir)
    return found.step if found else -1


def test_launch_survives_a_dead_driver_and_stops_and_resumes(phantom_dir, tmp_path):
    raw = tiny_config(phantom_dir, tmp_path / "runs", train={"max_steps": 400, "checkpoint_every": 2, "log_every": 1},
                      cluster={"launcher": "local"}, eval={"at_end": False}, monitoring={"enabled": False})
    cfg = write_config(tmp_path / "c.yaml", raw)
    run_dir = tmp_path / "runs" / "t"
    out = hilum("launch", str(cfg)).stdout
    assert "launched as driver process" in out and str(run_dir) in out
    record = JobRecord.load(run_dir)
    assert record.kind == "local"
    wait_until(lambda: latest_step(run_dir) >= 2, "a first checkpoint")
    assert job_line(run_dir).startswith("job: RUNNING")
    assert "still running" in hilum("resume", str(run_dir), ok=False).stderr  # one driver per run
    assert "already running" in hilum("launch", str(cfg), ok=False).stderr

    os.killpg(int(record.job_id), signal.SIGKILL)  # the driver dies with its workers: no word from it
    wait_until(lambda: job_now(run_dir) == "DIED", "the dead driver to show")
    assert job_line(run_dir).startswith("job: DIED")
    died_at = latest_step(run_dir)

    out = hilum("resume", str(run_dir)).stdout  # launched runs resume in the background
    assert "resumed as driver process" in out
    wait_until(lambda: latest_step(run_dir) >= died_at + 2, "a checkpoint after the resume")
    assert "stopped" in hilum("stop", str(run_dir)).stdout
    assert job_line(run_dir).startswith("job: STOPPED")
    stopped_at = latest_step(run_dir)
    assert stopped_at > died_at

    final = stopped_at + 2
    fg = hilum("resume", str(run_dir), "--foreground", "--set", f"train.max_steps={final}")
    assert f"continuing at step {stopped_at + 1}" in fg.stderr
    assert latest_step(run_dir) == final and job_line(run_dir).startswith("job: SUCCEEDED")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [final - 1, final]
    starts = (run_dir / "workers" / "rank0.jsonl").read_text().splitlines()
    assert len(starts) == 3  # launched, resumed after the driver died, resumed after the stop
    assert f"workers started 3 times; the last start continued after step {stopped_at}" in hilum("status", str(run_dir)).stdout


def test_a_ray_job_ships_the_submitters_packages_under_the_hilum_name(tmp_path):
    """Ray makes each ``py_modules`` folder importable by its own name: the staged ``hilum`` folder
    must then win over the cluster's installed copy (here: the editable install)."""
    from hilum.launch.jobs import PACKAGES, stage_packages

    staged = stage_packages(tmp_path)
    assert staged.name == "hilum" and sorted(p.name for p in staged.iterdir()) == sorted(PACKAGES)
    assert not list(staged.rglob("__pycache__"))
    code = "import hilum.launch.cli as m, hilum.trainer.data.entities as e; print(m.__file__); print(e.KNOWLEDGE_FILE.is_file())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=OUTSIDE,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    where, knowledge = out.stdout.split()
    assert Path(where).is_relative_to(staged) and knowledge == "True"


def test_launch_submits_a_ray_job_to_a_cluster(phantom_dir, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # A Ray job's entrypoint runs `python` from the head node's PATH: here, this environment's.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True})
    try:
        raw = tiny_config(phantom_dir, tmp_path / "runs", train={"max_steps": 4, "checkpoint_every": 2},
                          eval={"at_end": False}, monitoring={"enabled": False})
        cfg = write_config(tmp_path / "c.yaml", raw)
        run_dir = tmp_path / "runs" / "t"
        out = hilum("launch", str(cfg), "--address", cluster.address).stdout
        assert "launched as Ray job hilum-t-" in out
        record = JobRecord.load(run_dir)
        assert record.kind == "ray" and record.address == cluster.address
        wait_until(lambda: job_now(run_dir) in ("SUCCEEDED", "FAILED", "STOPPED"), "the job to end", every=1.0)
        from ray.job_submission import JobSubmissionClient

        logs = JobSubmissionClient(cluster.address).get_job_logs(record.job_id)
        assert "SUCCEEDED" in job_line(run_dir), logs[-4000:]
        assert latest_step(run_dir) == 4
        assert "ZeRO stage 2" in logs and "2 workers" in logs
    finally:
        cluster.shutdown()
