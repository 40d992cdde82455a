"""Metrics: definitions, the per-worker Prometheus exporter, and the console log line."""

from monitoring.metrics import WorkerMetrics

__all__ = ["WorkerMetrics"]
