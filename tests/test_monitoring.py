"""The per-worker Prometheus endpoint: loopback by default, real metric names and labels."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
import torch

from hilum.monitoring.metrics import WorkerMetrics
from tests.conftest import ROOT


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


# ----------------------------------------------------------------------------------------------
# MFU arithmetic, the dashboard's metric names


class _TowerStub(torch.nn.Module):
    """A model whose FLOPs are easy to count by hand: linear maps only."""

    def __init__(self, pixels, width, hidden, embed):
        super().__init__()
        self.image_tower = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(pixels, width))
        self.image_proj = torch.nn.Linear(width, embed, bias=False)
        self.embed = torch.nn.Embedding(50, hidden)
        self.text_lin = torch.nn.Linear(hidden, width)
        self.text_proj = torch.nn.Linear(width, embed, bias=False)

    def encode_image(self, image):
        return torch.nn.functional.normalize(self.image_proj(self.image_tower(image)), dim=-1)

    def text_tower(self, ids, mask):
        return self.text_lin(self.embed(ids).mean(1))


def test_training_flops_and_mfu_match_a_hand_count():
    from hilum.monitoring.flops import mfu, peak_tflops, training_flops_per_sample

    c, s, width, hidden, embed, batch = 1, 8, 16, 12, 4, 32
    model = _TowerStub(c * s * s, width, hidden, embed)
    image_fwd = 2 * (c * s * s) * width + 2 * width * embed  # two matrix products, 2 FLOPs per multiply-add
    text_fwd = 2 * hidden * width + 2 * width * embed  # the embedding lookup and the mean count nothing
    counts = training_flops_per_sample(model, s, c, 10, global_batch=batch)
    assert counts["image"] == 3 * image_fwd and counts["text"] == 3 * text_fwd
    assert counts["loss"] == 6 * batch * embed
    assert counts["total"] == 3 * image_fwd + 3 * text_fwd + 6 * batch * embed
    from hilum.trainer.objectives.mlip.encoders import DivergenceCopies

    copies = DivergenceCopies.__new__(DivergenceCopies)  # its FLOPs rule needs none of its modules
    frozen = training_flops_per_sample(model, s, c, 10, frozen_text=True, parts=[copies], gradcache=True, global_batch=batch)
    assert frozen["text"] == text_fwd and frozen["image"] == 4 * image_fwd and frozen["parts"] == image_fwd + text_fwd
    # 1000 samples/s at 1e9 FLOPs each on a 4-TFLOP/s device: 25 %
    assert mfu(1000.0, 1e9, 4.0) == pytest.approx(0.25)
    assert mfu(1000.0, 1e9, None) is None
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32) == 156.0
    assert peak_tflops("Some CPU", torch.float32) is None


def exported_names() -> set[str]:
    m = WorkerMetrics("r", 0, "n")
    names = set()
    for family in m.registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_dashboard_references_only_metrics_that_exist():
    dashboard = json.loads((ROOT / "monitoring" / "dashboards" / "hilum.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bhilum_[a-z_]+", e)}
    assert used and used <= exported_names(), used - exported_names()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("throughput", "mfu", "breakdown", "per-rank", "data wait", "memory", "loss", "bad samples",
                   "gradient norm", "update/weight", "training health"):
        assert needed in titles, needed


def test_a_rank_slower_than_the_median_by_the_factor_is_a_straggler():
    from hilum.monitoring.metrics import find_stragglers

    assert find_stragglers([1.0, 1.1, 3.0, 0.9], 1.5) == (1.05, [2])
    assert find_stragglers([1.0, 1.4], 1.5) == (1.2, [])
    assert find_stragglers([0.5], 1.5) == (0.5, [])
