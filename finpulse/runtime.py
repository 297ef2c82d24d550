"""Wire components together from the config: the cluster to use, topics, model, history, metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from finpulse.config import AppConfig
from learner.model import Classifier
from monitor.metrics import MetricsServer, ScorerMetrics
from storage import History
from stream.admin import ensure_topics
from stream.broker import LocalBroker
from stream.scorer import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """The Kafka cluster in use and whether finpulse started it."""

    bootstrap_servers: str
    local: bool


def local_broker(config: AppConfig) -> LocalBroker:
    """Return the manager of the local broker in the configured data directory."""
    return LocalBroker(config.kafka.data_dir)


def connect(config: AppConfig, start_local: bool = True) -> Cluster:
    """Use the configured cluster, or start (or reuse) the local broker; make sure every topic exists."""
    if config.kafka.bootstrap_servers:
        cluster = Cluster(config.kafka.bootstrap_servers, local=False)
    else:
        broker = local_broker(config)
        status = broker.status()
        if status.running and status.bootstrap:
            bootstrap = status.bootstrap
        elif start_local:
            bootstrap = broker.start()
        else:
            from stream.errors import BrokerError

            raise BrokerError("no Kafka configured and the local broker is not running: run `finpulse kafka start`")
        cluster = Cluster(bootstrap, local=True)
    t = config.kafka.topics
    ensure_topics(cluster.bootstrap_servers, [t.raw, t.scored, t.labels, t.dlq, t.updates], config.kafka.partitions)
    return cluster


def build_scorer(
    config: AppConfig, cluster: Cluster, serve_metrics: bool = True
) -> tuple[Scorer, MetricsServer | None]:
    """Load the champion adapters and build a scorer (and its /metrics server)."""
    classifier = Classifier.from_store(config.model, config.scorer.device)
    metrics = ScorerMetrics()
    server = MetricsServer(metrics.registry, config.metrics) if serve_metrics else None
    scorer = Scorer(
        cluster.bootstrap_servers,
        config.kafka.topics,
        config.scorer,
        classifier,
        History(config.storage),
        metrics,
    )
    return scorer, server
