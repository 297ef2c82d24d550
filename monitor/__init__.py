"""Metrics, alert rules, subscriptions and alert dispatch."""

from monitor.config import MetricsConfig
from monitor.errors import MonitorError
from monitor.metrics import MetricsServer, ScorerMetrics

__all__ = ["MetricsConfig", "MetricsServer", "MonitorError", "ScorerMetrics"]
