"""Runs launched in the background: ``hilum launch``, ``status``, ``stop``.

On a Ray cluster (``--address ray://HOST:10001``, ``auto``, or the dashboard's
``http://HOST:8265``) a run is a Ray job: Ray's job server keeps its driver alive on the head
node after the submitting terminal goes away, and reports its state. Without an address the
driver is a detached process on this machine that starts the embedded Ray (or the local
launcher) itself. Either way the run directory gets ``job.json`` naming the job, and the
driver keeps ``driver.json`` current (running, succeeded, failed), so ``hilum status`` can tell a
finished run from one whose driver died.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

JOB_FILE = "job.json"
DRIVER_FILE = "driver.json"
# hilum's own packages (folder = the name under ``hilum.``), shipped to the cluster with each Ray job
# so that it runs the submitter's code (its dependencies must be installed there: see the Dockerfile).
PACKAGES = ("launch", "trainer", "cluster", "kernels", "monitoring")


@dataclass
class JobRecord:
    kind: str  # "ray": a Ray job; "local": a detached driver process on this machine
    job_id: str  # the Ray submission id, or the driver's process id
    address: str | None
    submitted_at: float

    def save(self, run_dir: Path) -> None:
        (run_dir / JOB_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> "JobRecord | None":
        path = Path(run_dir) / JOB_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def mark_driver(run_dir: Path, state: str, **extra: Any) -> None:
    """Record the driver's state (called by the driver: at start, at the end, on failure)."""
    info = {"state": state, "pid": os.getpid(), "host": os.uname().nodename, "time": time.time(), **extra}
    tmp = run_dir / (DRIVER_FILE + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, run_dir / DRIVER_FILE)


def driver_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / DRIVER_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _entrypoint(run_dir: Path, resume: bool, ray_job: bool) -> list[str]:
    cmd = ["-m", "hilum.launch.cli", "train", "--config", str(run_dir / "config.yaml")]
    if ray_job:  # inside a Ray job, "auto" is the cluster the job runs on
        cmd += ["--launcher", "ray", "--address", "auto"]
    return cmd + (["--resume"] if resume else [])


def submit(run_dir: Path, address: str | None, resume: bool, name: str) -> JobRecord:
    """Start the run whose resolved config is ``run_dir/config.yaml`` in the background."""
    if address:
        record = _submit_ray_job(run_dir, address, resume, name)
    else:
        log = open(run_dir / "driver.log", "ab")
        proc = subprocess.Popen([sys.executable, *_entrypoint(run_dir, resume, ray_job=False)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=os.getcwd())
        record = JobRecord("local", str(proc.pid), None, time.time())
    record.save(run_dir)
    return record


def stage_packages(dest: Path) -> Path:
    """Copy hilum's packages into ``dest/hilum`` and return that folder, the one module a Ray job
    ships (``py_modules``). Ray makes a shipped folder importable by its own name, and the packages
    are imported as ``hilum.<package>``, so they travel inside a ``hilum`` folder: a namespace
    portion that comes before the cluster's installed copy on the job's path."""
    root = Path(__file__).resolve().parents[1]  # the folder that holds launch/, trainer/, ...
    staged = dest / "hilum"
    for package in PACKAGES:
        shutil.copytree(root / package, staged / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return staged


def _submit_ray_job(run_dir: Path, address: str, resume: bool, name: str) -> JobRecord:
    from ray.job_submission import JobSubmissionClient

    from hilum.cluster.ray_runner import worker_env

    client = JobSubmissionClient(address)
    job_id = f"hilum-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as workdir, tempfile.TemporaryDirectory() as modules:
        shutil.copy(run_dir / "config.yaml", Path(workdir) / "config.yaml")  # the working directory holds nothing else
        client.submit_job(
            entrypoint=" ".join(["python", *_entrypoint(run_dir, resume, ray_job=True)]),
            submission_id=job_id,
            runtime_env={"working_dir": workdir, "py_modules": [str(stage_packages(Path(modules)))],
                         "env_vars": worker_env()},
            metadata={"hilum_run": name, "run_dir": str(run_dir)},
        )
    return JobRecord("ray", job_id, address, time.time())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def job_state(run_dir: Path, record: JobRecord) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, or DIED (the driver vanished without a word)."""
    if record.kind == "ray":
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(record.address).get_job_status(record.job_id).value)
    recorded = driver_state(run_dir).get("state", "PENDING")
    if recorded in ("SUCCEEDED", "FAILED", "STOPPED"):
        return recorded
    return recorded if _alive(int(record.job_id)) else "DIED"


def stop(run_dir: Path, record: JobRecord, grace_s: float = 30.0) -> None:
    """Stop the run's driver and its workers (SIGTERM, then SIGKILL after ``grace_s``)."""
    if record.kind == "ray":
        from ray.job_submission import JobSubmissionClient

        JobSubmissionClient(record.address).stop_job(record.job_id)
        return
    pgid = int(record.job_id)  # the driver leads its own session: its process group holds its workers
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline and _alive(pgid):
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    if driver_state(run_dir).get("state") in (None, "PENDING", "RUNNING"):
        mark_driver(run_dir, "STOPPED")
