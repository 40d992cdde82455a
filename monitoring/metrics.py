"""Per-worker Prometheus metrics.

Each worker owns a registry (not prometheus_client's global one) and serves it on its own port,
bound to 127.0.0.1 unless the config says otherwise: metrics can reveal run names and paths, and
a training node has no business exposing them to its network by default.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger("hilum.metrics")

LABELS = ("run", "rank", "node")


class WorkerMetrics:
    def __init__(self, run: str, rank: int, node: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"run": run, "rank": str(rank), "node": node}
        self.url: str | None = None
        self._server = None
        r = self.registry
        self.samples_per_second = Gauge("hilum_samples_per_second", "Samples per second on this rank", LABELS, registry=r)
        self.step_seconds = Gauge("hilum_step_seconds", "Wall time of the last step", LABELS, registry=r)
        self.data_wait_seconds = Gauge("hilum_data_wait_seconds", "Time the last step waited for data", LABELS, registry=r)
        self.step = Gauge("hilum_step", "Optimizer steps completed", LABELS, registry=r)
        self.samples = Counter("hilum_samples", "Samples trained on by this rank", LABELS, registry=r)
        self.loss = Gauge("hilum_loss", "Loss of the last step by objective term (total = weighted sum)", (*LABELS, "term"), registry=r)
        self.logit_scale = Gauge("hilum_logit_scale", "exp(logit_scale): inverse temperature", LABELS, registry=r)
        self.bad_samples = Counter("hilum_bad_samples", "Samples skipped, by reason", (*LABELS, "reason"), registry=r)
        self.divergence_similarity = Gauge(
            "hilum_divergence_similarity", "MLIP divergence encoders: s of the last update, per tower", (*LABELS, "tower"), registry=r
        )
        self.checkpoint_seconds = Gauge("hilum_checkpoint_seconds", "Wall time of the last checkpoint save", LABELS, registry=r)

    def serve(self, host: str, port: int, local_rank: int) -> str:
        """Start the HTTP endpoint; a busy port falls back to a free one rather than failing the run."""
        want = port + local_rank if port else 0
        try:
            self._server, _ = start_http_server(want, addr=host, registry=self.registry)
        except OSError as err:
            log.warning("metrics port %d on %s unavailable (%s); using a free port", want, host, err)
            self._server, _ = start_http_server(0, addr=host, registry=self.registry)
        bound = self._server.server_address[1]
        self.url = f"http://{host}:{bound}/metrics"
        return self.url

    def write_target(self, directory: Path) -> None:
        """Record where this rank's metrics are, in Prometheus file_sd format."""
        if not self.url:
            return
        directory.mkdir(parents=True, exist_ok=True)
        host_port = self.url.split("//", 1)[1].split("/", 1)[0]
        target = [{"targets": [host_port], "labels": dict(self.labels)}]
        (directory / f"rank{self.labels['rank']}.json").write_text(json.dumps(target))

    def observe_step(
        self,
        step: int,
        batch_samples: int,
        step_seconds: float,
        data_seconds: float,
        losses: dict[str, float],
        logit_scale: float,
        skipped: dict[str, int],
        similarity: dict[str, float] | None = None,
    ) -> None:
        lab = self.labels
        self.step.labels(**lab).set(step)
        self.samples.labels(**lab).inc(batch_samples)
        self.step_seconds.labels(**lab).set(step_seconds)
        self.data_wait_seconds.labels(**lab).set(data_seconds)
        if step_seconds > 0:
            self.samples_per_second.labels(**lab).set(batch_samples / step_seconds)
        for term, value in losses.items():
            self.loss.labels(**lab, term=term).set(value)
        self.logit_scale.labels(**lab).set(logit_scale)
        for reason, n in skipped.items():
            self.bad_samples.labels(**lab, reason=reason).inc(n)
        for tower, s in (similarity or {}).items():
            self.divergence_similarity.labels(**lab, tower=tower).set(s)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
