"""Monitoring: metrics sinks, the three health signals, and the live display."""

from opd.monitor.display import RunDisplay
from opd.monitor.health import Signal, assess, health_metrics
from opd.monitor.metrics import MetricsLog, read_metrics

__all__ = ["MetricsLog", "RunDisplay", "Signal", "assess", "health_metrics", "read_metrics"]
