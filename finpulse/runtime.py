"""Wire components together from the config: the cluster to use, topics, model, history, metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from finpulse.config import AppConfig
from learner.model import Classifier, set_compute_threads
from monitor.metrics import MetricsServer, ScorerMetrics
from storage import History
from stream.admin import ensure_topics, require_broker
from stream.broker import LocalBroker
from stream.connection import Connection
from stream.scorer import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """The Kafka cluster in use and whether finpulse started it."""

    connection: Connection
    local: bool

    @property
    def bootstrap_servers(self) -> str:
        """Return the bootstrap string, for messages."""
        return self.connection.bootstrap_servers

    def __str__(self) -> str:
        """Name the cluster by its bootstrap string."""
        return self.connection.bootstrap_servers


def local_broker(config: AppConfig) -> LocalBroker:
    """Return the manager of the local broker in the configured data directory."""
    return LocalBroker(config.kafka.data_dir)


def connect(config: AppConfig, start_local: bool = True) -> Cluster:
    """Use the configured cluster, or start (or reuse) the local broker; make sure every topic exists."""
    if config.kafka.bootstrap_servers:
        # Before any client: kafka-python would retry a bad address for 30 s per client, logging each try.
        connection = config.kafka.connection()
        require_broker(connection)
        cluster = Cluster(connection, local=False)
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
        cluster = Cluster(config.kafka.connection(bootstrap), local=True)
    t = config.kafka.topics
    ensure_topics(cluster.connection, [t.raw, t.scored, t.labels, t.dlq, t.updates], config.kafka.partitions)
    return cluster


def update_publisher(config: AppConfig, timeout_s: float = 10.0) -> Callable[[str, str, str, str | None], None] | None:
    """Return the function announcing champion changes on the updates topic, or None when no Kafka is in use.

    For one-shot commands (`finpulse models promote`): it never starts the local broker, and it probes the
    cluster first, so an unreachable one costs seconds and raises BrokerError instead of hanging in the producer.
    """
    from stream.admin import broker_answers
    from stream.errors import BrokerError
    from stream.updates import UpdatePublisher

    if config.kafka.bootstrap_servers:
        bootstrap = config.kafka.connection()
    else:
        status = local_broker(config).status()
        if not status.running or not status.bootstrap:
            return None
        bootstrap = config.kafka.connection(status.bootstrap)
    if not broker_answers(bootstrap, timeout_s=min(timeout_s, 3.0)):
        raise BrokerError(f"Kafka at {bootstrap} does not answer")
    # The topic may not exist yet on a cluster no scorer has used; a send to it would wait for metadata.
    ensure_topics(bootstrap, [config.kafka.topics.updates], config.kafka.partitions, timeout_s=timeout_s)
    return UpdatePublisher(config.kafka, timeout_s=timeout_s, connection=bootstrap).publish


def build_scorer(
    config: AppConfig, cluster: Cluster, serve_metrics: bool = True
) -> tuple[Scorer, MetricsServer | None]:
    """Load the champion adapters and build a scorer (and its /metrics server)."""
    set_compute_threads(config.scorer.threads, config.scorer.parallel)
    classifier = Classifier.from_store(config.model, config.scorer.device)
    metrics = ScorerMetrics(rules=config.alerts)
    server = MetricsServer(metrics.registry, config.metrics) if serve_metrics else None
    scorer = Scorer(
        cluster.connection,
        config.kafka.topics,
        config.scorer,
        classifier,
        History(config.storage),
        metrics,
        model_config=config.model,
    )
    return scorer, server
