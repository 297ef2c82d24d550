"""`finpulse bench score`: end-to-end throughput (Kafka → model → Kafka + DuckDB) of finpulse vs a naive baseline.

Both consume the same messages from the same topic (each with its own consumer group and DuckDB file), produce
`news.scored` records and write the same rows the same way, batch by batch, and commit offsets. The only
difference is inference: the baseline calls a Hugging Face `pipeline` once per message for each task; finpulse
scores length-sorted, dynamically padded micro-batches with merged adapters.
"""

from __future__ import annotations

import json
import platform
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition
from rich.console import Console

from finpulse.config import AppConfig
from finpulse.replay import ReplayProducer, labelled_stream, news_messages
from finpulse.runtime import connect
from learner.adapters import AdapterStore
from learner.encoder import load_tokenizer
from learner.model import (
    Answer,
    Classifier,
    Prediction,
    compute_threads,
    cpu_description,
    module_dtype,
    set_compute_threads,
)
from learner.tasks import SENTIMENT, labels_of
from learner.torch_engine import load_merged
from monitor.metrics import ScorerMetrics
from storage import History, StorageConfig
from stream.admin import delete_topics, ensure_topics
from stream.connection import Target, client_kwargs
from stream.messages import NewsItem, parse_news
from stream.scorer import Scorer
from stream.sinks import Scored, news_row, scored_value

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class RunResult:
    """Throughput of one contender."""

    name: str
    messages: int
    seconds: float
    rows: int

    @property
    def per_s(self) -> float:
        """Return messages handled per second."""
        return self.messages / self.seconds if self.seconds > 0 else 0.0


class PipelineBaseline:
    """The naive consumer: one `pipeline` call per message and task, everything else as finpulse does it."""

    def __init__(
        self,
        models: dict[str, PreTrainedModel],
        classifier: Classifier,
        bootstrap: Target,
        topic: str,
        scored_topic: str,
        history: History,
        max_batch: int,
        base_model: str = "",
    ) -> None:
        from transformers import pipeline

        device = classifier.device
        # The naive user's tokenizer: transformers' own (the scorer reads the same tokenizer.json without it).
        tokenizer = load_tokenizer(base_model)
        self.pipes = {
            task: pipeline(
                "text-classification",
                model=model,
                tokenizer=tokenizer,
                device=device,
                truncation=True,
                max_length=classifier.max_length,
            )
            for task, model in models.items()
        }
        self.models = models
        self.versions = classifier.versions
        self.first_record_at: float | None = None
        self.last_batch_at: float | None = None
        self.history = history
        self.scored_topic = scored_topic
        self.consumer = KafkaConsumer(
            topic,
            **client_kwargs(bootstrap),
            group_id=f"bench-baseline-{uuid.uuid4().hex[:6]}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max_batch,
            # Set like the scorer's: a first batch of per-message calls on a loaded CPU outlasts the 300 s default.
            max_poll_interval_ms=600_000,
        )
        self.producer = KafkaProducer(**client_kwargs(bootstrap), acks="all", linger_ms=5)

    def _label(self, task: str, output: dict[str, Any]) -> tuple[str, float]:
        labels = labels_of(task)
        raw = str(output["label"])
        # Pipelines name classes LABEL_k unless the config carries names.
        index = int(raw.rsplit("_", 1)[-1]) if raw.startswith("LABEL_") else labels.index(raw)
        return labels[index], float(output["score"])

    def _answer(self, task: str, text: str) -> Answer:
        label, confidence = self._label(task, self.pipes[task](text)[0])
        # A pipeline returns the top label only: the others share what is left of the probability mass.
        others = (1 - confidence) / max(1, len(labels_of(task)) - 1)
        scores = {name: confidence if name == label else others for name in labels_of(task)}
        return Answer(label, confidence, self.versions[task], scores)

    def run(self, expected: int) -> int:
        """Consume until `expected` messages were handled; return the rows written."""
        handled = rows_written = 0
        while handled < expected:
            polled = self.consumer.poll(timeout_ms=1000)
            records = [r for batch in polled.values() for r in batch]
            if not records:
                continue
            if self.first_record_at is None:
                self.first_record_at = time.perf_counter()
            rows, futures = [], []
            now = datetime.now(UTC)
            for record in records:
                item = parse_news(record.value, 1 << 20)
                if not isinstance(item, NewsItem):
                    continue
                prediction = Prediction.of({task: self._answer(task, item.text) for task in self.pipes})
                scored = Scored(record, item, prediction, now)
                futures.append(self.producer.send(self.scored_topic, key=item.id.encode(), value=scored_value(scored)))
                rows.append(news_row(scored))
            self.producer.flush()
            for future in futures:
                future.get(timeout=30)
            rows_written += len(self.history.write_batch(rows).inserted)
            offsets = {TopicPartition(r.topic, r.partition): OffsetAndMetadata(r.offset + 1, "", -1) for r in records}
            self.consumer.commit(offsets)
            handled += len(records)
            self.last_batch_at = time.perf_counter()
        return rows_written

    def close(self) -> None:
        """Release Kafka clients."""
        self.producer.close(timeout=10)
        self.consumer.close()


def run_bench(config: AppConfig, messages: int, workdir: Path, console: Console) -> dict[str, Any]:
    """Run baseline and finpulse on the same messages in one process and return the comparison."""
    run_id = uuid.uuid4().hex[:8]
    cluster = connect(config)
    raw, scored = f"bench.{run_id}.news.raw", f"bench.{run_id}.news.scored"
    ensure_topics(cluster.connection, [raw, scored], config.kafka.partitions)
    items = labelled_stream(messages)
    producer = ReplayProducer(cluster.connection, raw, news_messages(items), rate=0)
    producer.start()
    producer.join()
    if producer.error is not None:
        raise producer.error

    console.print(f"bench: {len(items)} messages on {raw}; loading the model…")
    set_compute_threads(config.scorer.threads, config.scorer.parallel)
    classifier = Classifier.from_store(config.model, config.scorer.device)
    _warm_up(classifier, [li.item.text for li in items[:64]])
    results: list[RunResult] = []

    workdir.mkdir(parents=True, exist_ok=True)
    # The naive user runs the pipeline with the default float32 weights.
    store = AdapterStore(config.model.adapters_dir)
    fp32 = config.model.model_copy(update={"inference_dtype": "float32"})
    naive_models = {
        task: load_merged(store, task, model.version, fp32).to(classifier.device)
        for task, model in classifier.models.items()
    }
    base_history = History(StorageConfig(duckdb_path=workdir / f"bench-{run_id}-baseline.duckdb"))
    # Both histories are created before their timed runs, as the model is warmed: a scorer that runs for days
    # creates its lake once, and that first write (a quarter of the history's time in a 1,000-message run) is
    # not throughput.
    base_history.ensure_schema()
    baseline = PipelineBaseline(
        {str(t): m for t, m in naive_models.items()},
        classifier,
        cluster.connection,
        raw,
        scored,
        base_history,
        config.scorer.max_batch,
        config.model.base_model,
    )
    console.print("bench: naive per-message pipeline…")
    rows = baseline.run(len(items))
    results.append(RunResult("baseline", len(items), _span(baseline.first_record_at, baseline.last_batch_at), rows))
    baseline.close()

    fp_history = History(StorageConfig(duckdb_path=workdir / f"bench-{run_id}-finpulse.duckdb"))
    fp_history.ensure_schema()
    topics = config.kafka.topics.model_copy(update={"raw": raw, "scored": scored, "dlq": f"bench.{run_id}.news.dlq"})
    scorer_config = config.scorer.model_copy(update={"group_id": f"bench-finpulse-{run_id}"})
    scorer = Scorer(cluster.connection, topics, scorer_config, classifier, fp_history, ScorerMetrics())
    scorer_batch = scorer.inference_batch
    console.print("bench: finpulse scorer…")
    stats = scorer.run(threading.Event(), until=lambda s: s.consumed >= len(items))
    results.append(
        RunResult("finpulse", stats.consumed, _span(stats.first_record_at, stats.last_batch_at), stats.scored)
    )
    stages = _stage_seconds(scorer, results[-1].seconds)
    scorer.close()
    delete_topics(cluster.connection, [raw, scored, topics.dlq])
    console.print("bench: model ceiling (the same engine on pre-tokenised batches)…")
    ceiling = model_ceiling(classifier, [li.item.text for li in items], config.scorer.max_batch, scorer_batch)

    by_name = {r.name: r for r in results}
    base, fp = by_name["baseline"], by_name["finpulse"]
    device = classifier.device
    return {
        "benchmark": "score",
        "messages": len(items),
        "baseline_per_s": round(base.per_s, 1),
        "finpulse_per_s": round(fp.per_s, 1),
        "ratio": round(fp.per_s / base.per_s, 2) if base.per_s else None,
        "model_ceiling_per_s": round(ceiling["per_s"], 1),
        "ceiling_fraction": round(fp.per_s / ceiling["per_s"], 3) if ceiling["per_s"] else None,
        "stages": stages,
        "tokenise_share_of_model": ceiling["tokenise_share"],
        "shared_layers": classifier.shared_layers,
        "baseline_s": round(base.seconds, 2),
        "finpulse_s": round(fp.seconds, 2),
        "rows": {"baseline": base.rows, "finpulse": fp.rows},
        "device": device if device == "cpu" else torch.cuda.get_device_name(device),
        "engine": classifier.trunk.engine,
        "dtype": module_dtype(classifier.models[SENTIMENT.name]),
        "baseline_dtype": "float32",
        "threads": compute_threads(),
        # Sub-batches run side by side, one compute thread each (1: each operator split across the threads).
        "workers": classifier.workers,
        "inference_batch": scorer_batch,
        # With a backlog the scorer takes max_batch records at a time: the last batch's sinks overlap nothing, so a
        # run of few batches reads lower against the ceiling than a long stream would.
        "batches": stats.batches,
        "max_batch": config.scorer.max_batch,
        "host": platform.node(),
        # Engines and rates differ by CPU (AMX makes torch bf16 the faster engine): say which one this was.
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _stage_seconds(scorer: Scorer, span_s: float) -> dict[str, float]:
    """Return the share of the finpulse run's wall time each stage was busy.

    The model of one batch runs beside the sinks and commit of the one before, so the shares overlap and may
    sum past 1; `model` near 1 means the model never waited for the rest.
    """
    registry = scorer.metrics.registry
    names = ["dedupe", "model", *[sink.name for sink in scorer.sinks], "dlq", "commit"]
    seconds = {name: registry.get_sample_value("finpulse_batch_seconds_sum", {"stage": name}) or 0.0 for name in names}
    return {name: round(value / span_s, 4) if span_s > 0 else 0.0 for name, value in seconds.items()}


def model_ceiling(classifier: Classifier, texts: Sequence[str], max_batch: int, batch_size: int) -> dict[str, float]:
    """Time the scorer's engine alone on the same texts, tokenised beforehand and grouped as the scorer gets them."""
    started = time.perf_counter()
    encoded = classifier.encode(texts)
    tokenise_s = time.perf_counter() - started
    best = float("inf")
    for _ in range(2):  # the better of two: the first may still pay for allocations
        started = time.perf_counter()
        for begin in range(0, len(encoded), max_batch):
            classifier.probabilities(encoded[begin : begin + max_batch], batch_size)
        best = min(best, time.perf_counter() - started)
    return {
        "per_s": len(texts) / best if best > 0 else 0.0,
        "tokenise_share": round(tokenise_s / (tokenise_s + best), 4) if best > 0 else 0.0,
    }


def _span(first: float | None, last: float | None) -> float:
    # Timed from the first record's arrival to the last commit: consumer-group joins are not scoring.
    return (last - first) if first is not None and last is not None else 0.0


def _warm_up(classifier: Classifier, texts: Sequence[str]) -> None:
    # The first forward pass allocates and picks kernels; neither contender should pay it in the timing.
    classifier.predict(list(texts))


def write_result(result: dict[str, Any], path: Path) -> None:
    """Write the result as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
