"""End to end with a real Prometheus server (Debian's `prometheus` package, installed by .ci/run):
a 2-worker run's endpoints are discovered through file_sd, scraped, and the job's samples/s and
step-time breakdown come back from Prometheus's HTTP API; the run's metric set and labels; and
`hilum status` on the finished run."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from hilum.cluster.local import free_port
from hilum.monitoring.status import parse_metrics
from tests.conftest import HILUM, OUTSIDE, tiny_config, write_config

pytestmark = pytest.mark.slow

REQUIRED = {
    "hilum_samples_per_second", "hilum_tokens_per_second", "hilum_step_seconds", "hilum_data_wait_seconds",
    "hilum_flops_per_sample", "hilum_gradcache_chunks", "hilum_step_time_vs_median", "hilum_straggler",
    "hilum_logit_scale", "hilum_samples_total", "hilum_checkpoint_seconds", "hilum_checkpoint_bytes",
}
PHASES = {"data", "forward", "loss", "backward", "optimizer"}
STEPS = 200  # tens of seconds on 2 CPU cores: many scrape intervals of 1 s


@pytest.fixture
def prometheus(tmp_path):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("the prometheus server is not installed: apt-get install prometheus (.ci/run does it)")
    runs = tmp_path / "runs"
    (runs / "metrics_targets").mkdir(parents=True)  # present at start, so file_sd watches it at once
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "hilum",
                            "file_sd_configs": [{"files": [f"{runs}/metrics_targets/*.json"], "refresh_interval": "1s"}]}],
    }))
    port = free_port()
    proc = subprocess.Popen([exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, "prometheus did not become ready"
        time.sleep(0.2)
    try:
        yield url, runs
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(url: str, promql: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}), timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def cfg_batch(path) -> int:
    from hilum.launch.config import load_config

    return load_config(path).data.batch_size


def test_prometheus_scrapes_a_two_worker_run(prometheus, phantom_dir):
    url, runs = prometheus
    raw = tiny_config(phantom_dir, runs, train={"max_steps": STEPS, "log_every": 20, "checkpoint_every": 100},
                      cluster={"launcher": "local"}, eval={"at_end": False})
    cfg = write_config(runs.parent / "c.yaml", raw)
    log = runs.parent / "train.log"  # a file, not a pipe: nobody reads a pipe while we poll
    with open(log, "w") as out:
        proc = subprocess.Popen([*HILUM, "train", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT, cwd=OUTSIDE)
    # Prometheus discovers both ranks through file_sd and scrapes them while the run lives.
    rate: list[dict] = []
    while proc.poll() is None and len(rate) < 2:
        time.sleep(1)
        rate = query(url, 'max_over_time(hilum_samples_per_second{run="t"}[10m])')
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    run_dir = runs / "t"
    assert not list((runs / "metrics_targets").glob("*.json"))  # the ended run withdrew its targets

    # What Prometheus scraped (the endpoints are gone now; the samples stay).
    rate = query(url, 'max_over_time(hilum_samples_per_second{run="t"}[10m])')
    assert sorted(r["metric"]["rank"] for r in rate) == ["0", "1"], rate
    assert all(float(r["value"][1]) > 0 for r in rate)
    job = query(url, 'sum(max_over_time(hilum_samples_per_second{run="t"}[10m]))')
    assert float(job[0]["value"][1]) > 0
    phases = query(url, 'count by (phase) (max_over_time(hilum_phase_seconds{run="t"}[10m]))')
    assert PHASES <= {r["metric"]["phase"] for r in phases}
    # metrics.jsonl has each window's mean phase times; together they make up most of the step
    # (a window's time also holds a checkpoint save or the log line's collectives: not phases).
    shares = []
    for window in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        assert PHASES <= set(window["phase_seconds"])
        per_step = cfg_batch(cfg) * 2 / window["samples_per_second"]  # 2 ranks
        shares.append(sum(window["phase_seconds"].values()) / per_step)
    assert all(0 < s <= 1.0 for s in shares) and sorted(shares)[len(shares) // 2] > 0.5, shares

    # The metric set and its labels, from each rank's final snapshot.
    for rank in (0, 1):
        text = (run_dir / "metrics" / f"rank{rank}.prom").read_text()
        node, values = parse_metrics(text, "t")
        assert REQUIRED <= set(values), REQUIRED - set(values)
        assert {f"hilum_phase_seconds[{p}]" for p in PHASES} <= set(values)
        assert "hilum_loss[clip]" in values and "hilum_device_memory_bytes[rss]" in values and node
        assert values["hilum_step"] == STEPS and values["hilum_flops_per_sample"] > 0
        assert f'rank="{rank}"' in text and 'run="t"' in text

    # The terminal view of the finished run.
    status = subprocess.run([*HILUM, "status", str(run_dir)], capture_output=True, text=True, timeout=120, cwd=OUTSIDE,
                            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert status.returncode == 0, status.stderr[-2000:]
    assert "finished or stopped" in status.stdout and f"step {STEPS}" in status.stdout and "0 (ended)" in status.stdout
