"""Failures on a simulated multi-node Ray cluster, checkpoints in S3 (moto on loopback).

A real ``ray.cluster_utils.Cluster`` (a head and two worker nodes, each its own raylet) runs
``hilum train --address``; the test kills a worker process, removes the node that holds the
workers, or makes a worker die in the middle of a checkpoint save. In each case Ray Train's
FailureConfig restarts the worker group, the workers continue from the latest *complete*
checkpoint in S3, and the run ends with the parameters of an uninterrupted run (deterministic
mode), having trained every sample of the epoch exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import HILUM, OUTSIDE, tiny_config, write_config

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 3  # 16 samples per step: 12 of the epoch's 16 steps, checkpoints at 3, 6, 9, 12
BUCKET = "hilum-ft"


@pytest.fixture(scope="module")
def s3_env(s3_server):
    """Credentials in the environment, as on a real cluster's nodes: set before the Ray cluster
    starts, so its raylets (and the workers they start) have them too."""
    import fsspec

    fsspec.filesystem("s3", **s3_server).mkdir(BUCKET)
    creds = {"AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
             "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    yield dict(os.environ), s3_server["endpoint_url"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def ray_cluster(s3_env):
    """A head (no CPUs for workers) and two 2-CPU worker nodes: room to restart the two training
    workers on the surviving node when one node goes away."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, nodes
    cluster.shutdown()


def config(phantom_dir: Path, tmp_path: Path, name: str, endpoint: str, prefetch: int = 2, **cluster) -> Path:
    raw = tiny_config(phantom_dir, tmp_path / "runs", data={"prefetch": prefetch},
                      run={"name": name, "deterministic": True, "checkpoint_dir": f"s3://{BUCKET}/{tmp_path.name}/{name}",
                           "storage_options": {"endpoint_url": endpoint}},
                      train={"max_steps": STEPS, "checkpoint_every": EVERY, "log_every": 1, "sample_log": True,
                             "keep_checkpoints": 2},
                      eval={"at_end": False}, monitoring={"enabled": False}, cluster=cluster)
    return write_config(tmp_path / f"{name}.yaml", raw)


def start(cfg: Path, env: dict, *extra: str) -> subprocess.Popen:
    log = open(cfg.with_suffix(".log"), "w")
    return subprocess.Popen([*HILUM, "train", "--config", str(cfg), *extra], cwd=OUTSIDE, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, cfg: Path, timeout: int = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = cfg.with_suffix(".log").read_text()
    assert proc.returncode == 0, out[-6000:]
    return out


def wait_for_checkpoint(store, step: int, proc: subprocess.Popen, cfg: Path, timeout: float = 420) -> None:
    deadline = time.time() + timeout
    while (store.latest_complete() or type("none", (), {"step": -1})).step < step:
        assert proc.poll() is None, cfg.with_suffix(".log").read_text()[-4000:]
        assert time.time() < deadline, f"no checkpoint {step} in time"
        time.sleep(0.2)


def starts(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "workers" / f"rank{rank}.jsonl").read_text().splitlines()]


def trajectory(run_dir: Path) -> dict[int, list[str]]:
    """Per step, the sample keys of both ranks as last trained: a step redone after a restart
    replaces what the failed attempt did (its effect was rolled back with the checkpoint)."""
    steps: dict[int, list[str]] = {}
    for rank in (0, 1):
        last: dict[int, list[str]] = {}
        for line in (run_dir / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            last[record["step"]] = record["keys"]
        for step, keys in last.items():
            steps.setdefault(step, []).extend(keys)
    return steps


def final_parameters(cfg_path: Path) -> dict[str, torch.Tensor]:
    from hilum.launch.config import load_config
    from hilum.launch.export import consolidated_state_dict
    from hilum.trainer.checkpoint import local_copy, store_for

    store = store_for(load_config(cfg_path))
    return consolidated_state_dict(local_copy(store, store.find(STEPS)))


@pytest.fixture(scope="module")
def reference(phantom_dir, tmp_path_factory, s3_env):
    """The uninterrupted run, on the single-node launcher: the same arithmetic without Ray, and
    each batch prepared inline (``data.prefetch: 0``), so the runs compared with it also show that
    the prefetch thread changes no batch and no order."""
    env, endpoint = s3_env
    tmp = tmp_path_factory.mktemp("reference")
    cfg = config(phantom_dir, tmp, "reference", endpoint, prefetch=0)
    finish(start(cfg, env, "--launcher", "local"), cfg)
    steps = trajectory(tmp / "runs" / "reference")
    keys = [k for s in range(1, STEPS + 1) for k in steps[s]]
    assert sorted(steps) == list(range(1, STEPS + 1)) and len(set(keys)) == len(keys) == STEPS * 16
    return steps, final_parameters(cfg)


def check_same_as_reference(cfg: Path, run_dir: Path, reference) -> None:
    ref_steps, ref_params = reference
    assert trajectory(run_dir) == ref_steps  # every sample of the epoch once, in the same steps
    params = final_parameters(cfg)
    assert params.keys() == ref_params.keys()
    different = [k for k in params if not torch.equal(params[k], ref_params[k])]
    assert not different, different[:5]


def recovery_seconds(run_dir: Path, failed_at: float) -> float:
    """From the failure to the first step logged after it (printed: a benchmark figure, not a test)."""
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return min(t for t in times if t > failed_at) - failed_at


def start_on_cluster(phantom_dir, tmp_path, s3_env, cluster, name: str, checkpoint_step: int):
    """Start a run with two restarts allowed on the cluster; return once ``checkpoint_step`` is complete."""
    from hilum.launch.config import load_config
    from hilum.trainer.checkpoint import store_for

    env, endpoint = s3_env
    cfg = config(phantom_dir, tmp_path, name, endpoint, max_failures=2)
    store = store_for(load_config(cfg))
    proc = start(cfg, env, "--address", cluster.address)
    wait_for_checkpoint(store, checkpoint_step, proc, cfg)
    return cfg, store, proc, tmp_path / "runs" / name


def test_killed_worker_is_replaced_and_the_run_ends_as_if_uninterrupted(phantom_dir, tmp_path, s3_env, ray_cluster, reference):
    cfg, store, proc, run_dir = start_on_cluster(phantom_dir, tmp_path, s3_env, ray_cluster[0], "killed", 2 * EVERY)
    victim = starts(run_dir, 1)[-1]["pid"]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    out = finish(proc, cfg)
    print(f"killed worker: training again after {recovery_seconds(run_dir, killed_at):.1f}s")
    restarted = starts(run_dir, 1)
    assert len(restarted) == 2 and restarted[1]["pid"] != victim and restarted[1]["from_step"] >= 2 * EVERY, out[-3000:]
    check_same_as_reference(cfg, run_dir, reference)
    assert [c.step for c in store.list_complete()] == [STEPS - EVERY, STEPS]  # keep_checkpoints: 2


def test_removed_node_is_survived_on_the_other_node(phantom_dir, tmp_path, s3_env, ray_cluster, reference):
    cluster, nodes = ray_cluster
    cfg, _, proc, run_dir = start_on_cluster(phantom_dir, tmp_path, s3_env, cluster, "node", EVERY)
    lost = starts(run_dir, 0)[-1]["ray_node"]
    node = next(n for n in nodes if n.node_id == lost)
    cluster.remove_node(node)
    removed_at = time.time()
    out = finish(proc, cfg)
    print(f"removed node: training again after {recovery_seconds(run_dir, removed_at):.1f}s")
    after = starts(run_dir, 0)[-1]
    assert after["ray_node"] != lost and after["from_step"] >= EVERY, out[-3000:]
    check_same_as_reference(cfg, run_dir, reference)
    cluster.add_node(num_cpus=2)  # give the module's cluster its second node back


def test_crash_mid_checkpoint_save_resumes_from_the_previous_complete_one(phantom_dir, tmp_path, s3_env, ray_cluster, reference):
    env, endpoint = s3_env
    cluster, _ = ray_cluster
    cfg = config(phantom_dir, tmp_path, "midsave", endpoint, max_failures=1)
    once = tmp_path / "drill-fired"
    # Rank 1 dies after uploading its part of checkpoint 6, before the barrier that precedes the marker.
    drill = {**env, "HILUM_FAULT_DRILL": f"checkpoint_save:{2 * EVERY}:1:{once}"}
    out = finish(start(cfg, drill, "--address", cluster.address), cfg)
    run_dir = tmp_path / "runs" / "midsave"
    assert once.is_file(), out[-3000:]
    second = starts(run_dir, 0)[-1]
    assert len(starts(run_dir, 0)) == 2 and second["from_step"] == EVERY, out[-3000:]  # step 6 was never complete
    check_same_as_reference(cfg, run_dir, reference)


def test_whole_run_killed_mid_checkpoint_save_is_resumed_by_hand(phantom_dir, tmp_path, s3_env, reference):
    """No restarts configured (single-node launcher): the crash mid-save ends the run; the
    half-written checkpoint stays invisible and `hilum resume` continues from the one before."""
    from hilum.launch.config import load_config
    from hilum.trainer.checkpoint import COMPLETE, store_for

    env, endpoint = s3_env
    cfg = config(phantom_dir, tmp_path, "runkill", endpoint, launcher="local")
    once = tmp_path / "drill-fired"
    proc = start(cfg, {**env, "HILUM_FAULT_DRILL": f"checkpoint_save:{2 * EVERY}:1:{once}"})
    proc.wait(timeout=600)
    assert proc.returncode != 0 and once.is_file(), cfg.with_suffix(".log").read_text()[-3000:]
    store = store_for(load_config(cfg))
    assert store.latest_complete().step == EVERY
    half = store.path_of(f"step_{2 * EVERY:08d}")
    assert store.fs.exists(half) and not store.fs.exists(f"{half}/{COMPLETE}")  # rank 1's part, no marker

    run_dir = tmp_path / "runs" / "runkill"
    out = subprocess.run([*HILUM, "resume", str(run_dir)], cwd=OUTSIDE, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"continuing at step {EVERY + 1}" in out.stderr
    check_same_as_reference(cfg, run_dir, reference)
