"""Build a realistic labelled stream from the shipped data sets and produce it to Kafka at a chosen rate."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from kafka import KafkaProducer

from learner.datasets import Example, stock_tweets, tfns_sentiment
from stream.connection import Target, client_kwargs
from stream.messages import NewsItem, news_value

_CASHTAG = re.compile(r"\$([A-Za-z]{1,6})\b")


@dataclass(frozen=True)
class LabelledItem:
    """A stream item and the sentiment an analyst gave it (None when unlabelled)."""

    item: NewsItem
    sentiment: str | None


def tickers_of(text: str) -> tuple[str, ...]:
    """Return the distinct $CASHTAGS of a text, upper-case, in order of appearance.

    >>> tickers_of("$aapl and $TSLA beat, $AAPL again")
    ('AAPL', 'TSLA')
    """
    return tuple(dict.fromkeys(t.upper() for t in _CASHTAG.findall(text)))


def labelled_stream(limit: int, data_dir: Path | None = None) -> list[LabelledItem]:
    """Return up to `limit` labelled items in time order.

    First the stock-market tweets of Apr–Jul 2020 with their real timestamps; past those, the
    twitter-financial-news valid split continues the clock one minute apart.
    """
    items: list[LabelledItem] = []
    tweets = stock_tweets(data_dir, labelled_only=True)
    for tweet in tweets[:limit]:
        news = NewsItem(tweet.id, tweet.text, tweet.published_at, "stock-market-tweets", tickers_of(tweet.text))
        items.append(LabelledItem(news, tweet.sentiment))
    clock = tweets[-1].published_at
    for n, example in enumerate(tfns_sentiment("valid", data_dir)):
        if len(items) >= limit:
            break
        clock += timedelta(minutes=1)
        news = NewsItem(f"tfns-valid-{n}", example.text, clock, "twitter-financial-news", tickers_of(example.text))
        items.append(LabelledItem(news, example.label))
    return items


def malformed_values(max_text_bytes: int) -> list[tuple[str, bytes | None]]:
    """Return one message per kind of bad input, with the reason the scorer must give."""
    ok_time = "2020-04-09T00:00:00+00:00"
    return [
        ("invalid_json", b"{not json"),
        ("not_utf8", b'{"id": "bad-\xff\xfe", "text": "x"}'),
        ("not_object", b"[1, 2, 3]"),
        ("missing_field", json.dumps({"id": "m-1", "published_at": ok_time}).encode()),
        ("wrong_type", json.dumps({"id": 7, "text": "x", "published_at": ok_time}).encode()),
        ("empty", json.dumps({"id": "m-2", "text": "   ", "published_at": ok_time}).encode()),
        (
            "oversized",
            json.dumps({"id": "m-3", "text": "x" * (max_text_bytes + 1), "published_at": ok_time}).encode(),
        ),
        (
            "bad_timestamp",
            json.dumps({"id": "m-4", "text": "fine text", "published_at": "yesterday"}).encode(),
        ),
        ("empty", None),
    ]


def paced(count: int, rate: float) -> Iterator[int]:
    """Yield 0..count-1, sleeping so that items come out at `rate` per second (0 = no pacing)."""
    started = time.perf_counter()
    for n in range(count):
        if rate > 0:
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        yield n


class ReplayProducer(threading.Thread):
    """Produce a list of (key, value) messages to a topic at a given rate, in a background thread."""

    def __init__(
        self,
        bootstrap_servers: Target,
        topic: str,
        messages: Sequence[tuple[bytes | None, bytes | None]],
        rate: float,
    ) -> None:
        super().__init__(name="replay-producer", daemon=True)
        self.topic = topic
        self.messages = messages
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()  # not `_stop`: threading.Thread has a method of that name
        self._producer = KafkaProducer(**client_kwargs(bootstrap_servers), acks="all", linger_ms=10)

    def stop(self, timeout_s: float = 10) -> None:
        """Stop sending (what was sent is flushed) and wait for the thread."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout_s)

    def run(self) -> None:
        """Send everything, then flush."""
        try:
            for n in paced(len(self.messages), self.rate):
                if self._halt.is_set():
                    break
                key, value = self.messages[n]
                self._producer.send(self.topic, key=key, value=value)
                self.sent += 1
            self._producer.flush()
        except BaseException as e:  # reported to the caller, who decides what to do
            self.error = e
        finally:
            self._producer.close(timeout=10)


def news_messages(items: Sequence[LabelledItem]) -> list[tuple[bytes | None, bytes | None]]:
    """Encode items as (key, value) pairs for `news.raw`."""
    return [(li.item.id.encode("utf-8"), news_value(li.item)) for li in items]


# Real bearish tweets about oil: replayed back to back they make the Energy / Oil topic turn negative.
_OIL = re.compile(r"\b(oil|crude|opec|brent|wti|barrels?|gasoline|drilling|refiner\w*)\b", re.IGNORECASE)


def oil_selloff(data_dir: Path | None = None) -> list[Example]:
    """Return the bearish oil tweets of twitter-financial-news-sentiment (train and valid), in file order."""
    tweets = tfns_sentiment("train", data_dir) + tfns_sentiment("valid", data_dir)
    return [e for e in tweets if e.label == "negative" and _OIL.search(e.text)]


def selloff(after: datetime) -> list[LabelledItem]:
    """Return the oil sell-off as stream items: the bearish oil tweets, ten seconds apart after `after`."""
    return [
        LabelledItem(
            NewsItem(f"selloff-{n}", e.text, after + timedelta(seconds=10 * (n + 1)), "twitter-financial-news", ()),
            e.label,
        )
        for n, e in enumerate(oil_selloff())
    ]
