"""Metrics: definitions, the per-worker Prometheus exporter, FLOP counting, and `hilum status`."""

from monitoring.metrics import WorkerMetrics, find_stragglers

__all__ = ["WorkerMetrics", "find_stragglers"]
