"""Per-worker Prometheus metrics.

Each worker owns a registry (not prometheus_client's global one) and serves it on its own port,
bound to 127.0.0.1 unless the config says otherwise: metrics can reveal run names and paths, and
a training node has no business exposing them to its network by default.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

from hilum.monitoring.flops import mfu

log = logging.getLogger("hilum.metrics")

LABELS = ("run", "rank", "node")


def find_stragglers(step_seconds: list[float], factor: float) -> tuple[float, list[int]]:
    """(median step time, ranks whose step time exceeds ``factor`` × the median)."""
    median = statistics.median(step_seconds)
    return median, [rank for rank, t in enumerate(step_seconds) if median > 0 and t > factor * median]


class WorkerMetrics:
    def __init__(self, run: str, rank: int, node: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"run": run, "rank": str(rank), "node": node}
        self.url: str | None = None
        self._server = None
        self._targets: list[Path] = []
        r = self.registry
        self.samples_per_second = Gauge("hilum_samples_per_second", "Samples per second on this rank", LABELS, registry=r)
        self.step_seconds = Gauge("hilum_step_seconds", "Wall time of the last step", LABELS, registry=r)
        self.data_wait_seconds = Gauge("hilum_data_wait_seconds", "Time the last step waited for data", LABELS, registry=r)
        self.step = Gauge("hilum_step", "Optimizer steps completed", LABELS, registry=r)
        self.samples = Counter("hilum_samples", "Samples trained on by this rank", LABELS, registry=r)
        self.loss = Gauge("hilum_loss", "Loss of the last step by objective term (total = weighted sum)", (*LABELS, "term"), registry=r)
        self.logit_scale = Gauge("hilum_logit_scale", "exp(logit_scale): inverse temperature", LABELS, registry=r)
        self.bad_samples = Counter("hilum_bad_samples", "Samples skipped, by reason", (*LABELS, "reason"), registry=r)
        self.term_value = Gauge(
            "hilum_term_value", "What the loss terms report after each optimizer step (e.g. MLIP's s_image, s_text)",
            (*LABELS, "name"), registry=r
        )
        self.checkpoint_seconds = Gauge("hilum_checkpoint_seconds", "Wall time of the last checkpoint save", LABELS, registry=r)
        self.checkpoint_bytes = Gauge("hilum_checkpoint_bytes", "Size of the last checkpoint (all ranks' files)", LABELS, registry=r)
        self.tokens_per_second = Gauge("hilum_tokens_per_second", "Text tokens (non-padding) per second on this rank", LABELS, registry=r)
        self.phase_seconds = Gauge(
            "hilum_phase_seconds", "The last step's wall time by phase (data, forward, loss, replay, backward, optimizer, after_step)",
            (*LABELS, "phase"), registry=r,
        )
        self.flops_per_sample = Gauge("hilum_flops_per_sample", "Training FLOPs per sample (see monitoring/flops.py)", LABELS, registry=r)
        self.mfu = Gauge("hilum_mfu", "Model FLOPs utilisation of the last step (0-1)", LABELS, registry=r)
        self.memory_bytes = Gauge(
            "hilum_device_memory_bytes", "Device memory: allocated, reserved, peak (CUDA) or rss (CPU)", (*LABELS, "kind"), registry=r
        )
        self.gradcache_chunks = Gauge("hilum_gradcache_chunks", "GradCache chunks per step (0: GradCache off)", LABELS, registry=r)
        self.straggler = Gauge("hilum_straggler", "1 when this rank's step time exceeds the job median by the configured factor",
                               LABELS, registry=r)
        self.grad_norm = Gauge("hilum_grad_norm", "Gradient norm before clipping: part=global at every step; each tower "
                               "and part at log steps (monitoring.module_grad_norms)", (*LABELS, "part"), registry=r)
        self.update_ratio = Gauge("hilum_update_ratio", "Norm of the last logged optimizer update over the weights' norm",
                                  LABELS, registry=r)
        self.skipped_steps = Counter("hilum_skipped_steps", "Optimizer steps skipped (non-finite loss or gradients)",
                                     LABELS, registry=r)
        self.skipped_fraction = Gauge("hilum_skipped_step_fraction", "Skipped steps over steps since this process started",
                                      LABELS, registry=r)
        self.health_events = Counter("hilum_health_events", "Training health findings by kind (nonfinite, spike, "
                                     "collapse, rollback)", (*LABELS, "kind"), registry=r)
        self.embedding_variance = Gauge("hilum_embedding_variance", "Total variance of the batch's unit-norm embeddings "
                                        "(near 0: collapse)", (*LABELS, "output"), registry=r)
        self.step_time_ratio = Gauge("hilum_step_time_vs_median", "This rank's mean step time over the job's median rank", LABELS,
                                     registry=r)

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

    def write_target(self, directory: Path, name: str | None = None) -> Path | None:
        """Record where this rank's metrics are, in Prometheus file_sd format (written whole, then
        renamed: Prometheus re-reads the file as soon as it changes)."""
        if not self.url:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        host_port = self.url.split("//", 1)[1].split("/", 1)[0]
        target = [{"targets": [host_port], "labels": dict(self.labels)}]
        path = directory / (name or f"rank{self.labels['rank']}.json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(target))
        tmp.replace(path)
        self._targets.append(path)
        return path

    def discard_target(self, path: Path) -> None:
        """Stop Prometheus from scraping this endpoint (the run is over)."""
        path.unlink(missing_ok=True)

    def observe_step(
        self,
        step: int,
        batch_samples: int,
        step_seconds: float,
        data_seconds: float,
        losses: dict[str, float],
        logit_scale: float,
        skipped: dict[str, int],
        reported: dict[str, float] | None = None,
        phases: dict[str, float] | None = None,
        tokens: int = 0,
        flops_per_sample: float = 0.0,
        peak_tflops: float | None = None,
        memory: dict[str, float] | None = None,
    ) -> None:
        lab = self.labels
        self.step.labels(**lab).set(step)
        self.samples.labels(**lab).inc(batch_samples)
        self.step_seconds.labels(**lab).set(step_seconds)
        self.data_wait_seconds.labels(**lab).set(data_seconds)
        if step_seconds > 0:
            self.samples_per_second.labels(**lab).set(batch_samples / step_seconds)
            self.tokens_per_second.labels(**lab).set(tokens / step_seconds)
            utilisation = mfu(batch_samples / step_seconds, flops_per_sample, peak_tflops)
            if utilisation is not None:
                self.mfu.labels(**lab).set(utilisation)
        for phase, seconds in (phases or {}).items():
            self.phase_seconds.labels(**lab, phase=phase).set(seconds)
        for kind, value in (memory or {}).items():
            self.memory_bytes.labels(**lab, kind=kind).set(value)
        for term, value in losses.items():
            self.loss.labels(**lab, term=term).set(value)
        self.logit_scale.labels(**lab).set(logit_scale)
        for reason, n in skipped.items():
            self.bad_samples.labels(**lab, reason=reason).inc(n)
        for name, value in (reported or {}).items():
            self.term_value.labels(**lab, name=name).set(value)

    def observe_health(self, grad_norms: dict[str, float], skipped: bool, skipped_fraction: float,
                       update_ratio: float | None, embedding_variance: dict[str, float]) -> None:
        lab = self.labels
        for part, value in grad_norms.items():
            self.grad_norm.labels(**lab, part=part).set(value)
        if skipped:
            self.skipped_steps.labels(**lab).inc()
        self.skipped_fraction.labels(**lab).set(skipped_fraction)
        if update_ratio is not None:
            self.update_ratio.labels(**lab).set(update_ratio)
        for output, value in embedding_variance.items():
            self.embedding_variance.labels(**lab, output=output).set(value)

    def observe_event(self, kind: str) -> None:
        self.health_events.labels(**self.labels, kind=kind).inc()

    def observe_straggler(self, ratio: float, flagged: bool) -> None:
        self.step_time_ratio.labels(**self.labels).set(ratio)
        self.straggler.labels(**self.labels).set(1.0 if flagged else 0.0)

    def push(self, gateway: str) -> None:
        """Push this rank's metrics to a Prometheus pushgateway (short jobs end before a scrape)."""
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(gateway, job=f"hilum-{self.labels['run']}", registry=self.registry,
                            grouping_key={"rank": self.labels["rank"], "node": self.labels["node"]})
        except OSError as err:  # the gateway being down must not stop training
            log.warning("pushing metrics to %s failed: %s", gateway, err)

    def write_snapshot(self, directory: Path) -> Path:
        """This rank's metrics in Prometheus' text format (node_exporter's textfile collector reads it)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"rank{self.labels['rank']}.prom"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(generate_latest(self.registry))
        tmp.replace(path)
        return path

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
