"""The per-worker Prometheus endpoint: loopback by default, real metric names and labels."""

from __future__ import annotations

import json
import urllib.request

from monitoring import WorkerMetrics


def test_endpoint_serves_step_metrics_on_loopback(tmp_path):
    m = WorkerMetrics("run-a", rank=1, node="n0")
    url = m.serve("127.0.0.1", 0, local_rank=0)
    try:
        assert m._server.server_address[0] == "127.0.0.1"
        m.observe_step(7, 32, 0.5, 0.01, {"loss": 2.5, "clip": 2.5}, 14.3, {"bad_image": 2})
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        labels = 'node="n0",rank="1",run="run-a"'
        assert f"hilum_samples_per_second{{{labels}}} 64.0" in body
        assert f"hilum_step{{{labels}}} 7.0" in body
        assert f'hilum_loss{{{labels},term="clip"}} 2.5' in body
        assert 'hilum_bad_samples_total{node="n0",rank="1",reason="bad_image",run="run-a"} 2.0' in body
        assert f"hilum_samples_total{{{labels}}} 32.0" in body
        m.write_target(tmp_path)
        target = json.loads((tmp_path / "rank1.json").read_text())
        assert target[0]["targets"] == [url.split("//")[1].split("/")[0]] and target[0]["labels"]["run"] == "run-a"
    finally:
        m.close()


def test_busy_port_falls_back_to_a_free_one():
    a, b = WorkerMetrics("r", 0, "n"), WorkerMetrics("r", 1, "n")
    try:
        url_a = a.serve("127.0.0.1", 0, 0)
        port = int(url_a.rsplit(":", 1)[1].split("/")[0])
        url_b = b.serve("127.0.0.1", port, 0)
        assert url_b != url_a and urllib.request.urlopen(url_b, timeout=10).status == 200
    finally:
        a.close()
        b.close()
