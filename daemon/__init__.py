"""Detached local servers (the Kafka broker, Prometheus, Alertmanager): pids, state files, ports, logs."""
