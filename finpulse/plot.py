"""`finpulse plot sentiment`: the negative share over time against its baseline, alert firings marked, as a PNG.

Read from the history with the analysts' read-only queries: messages per time bucket and their negative share
(texts the model could not read left out, as the alert rules leave them out), a baseline that is the share of
the buckets before (as the rules' baseline is the hour before the window), and the times the dispatcher received
a firing alert. Times are processing time (`scored_at`, the clock the alerts run on) unless `--by published`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from finpulse.errors import FinpulseError
from storage import History, StorageError

TimeColumn = Literal["scored", "published"]
# Buckets the x axis is cut into, at most; the width is rounded to a readable unit.
TARGET_BUCKETS = 60
BASELINE_BUCKETS = 12
_UNITS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400, 604800)


class PlotError(FinpulseError):
    """Nothing to plot, or the picture cannot be written; the message says why."""


@dataclass(frozen=True)
class Series:
    """Per-bucket volume and negative share, the trailing baseline, and alert firing times."""

    starts: list[dt.datetime]
    volume: list[int]
    share: list[float]  # NaN where the bucket is empty
    baseline: list[float | None]
    alerts: list[tuple[dt.datetime, str]]
    bucket_s: int


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sentiment_series(
    history: History, topic: str | None = None, since: dt.datetime | None = None, by: TimeColumn = "scored"
) -> Series:
    """Read the series from the history."""
    column = "scored_at" if by == "scored" else "published_at"
    where = ["coalesce(outcome, 'scored') = 'scored'"]
    if topic is not None:
        where.append(f"topic = {_quote(topic)}")
    if since is not None:
        where.append(f"{column} >= TIMESTAMPTZ {_quote(since.isoformat())}")
    condition = " AND ".join(where)
    span = history.query(f"SELECT epoch(min({column})), epoch(max({column})) FROM news WHERE {condition}").rows
    if not span or span[0][0] is None:
        raise PlotError("no scored news matches: run the scorer or the demo first, or widen --topic/--since")
    first, last = float(str(span[0][0])), float(str(span[0][1]))
    bucket_s = next((u for u in _UNITS_S if (last - first) / u <= TARGET_BUCKETS), _UNITS_S[-1])
    rows = history.query(
        f"SELECT (floor(epoch({column}) / {bucket_s}) * {bucket_s})::BIGINT AS b, count(*) AS n, "
        f"sum(CASE WHEN sentiment = 'negative' THEN 1 ELSE 0 END) AS neg FROM news WHERE {condition} "
        "GROUP BY 1 ORDER BY 1"
    ).rows
    # Every bucket of the span, empty ones included: a line must break where no news came, not cross the gap.
    counts = {int(str(r[0])): (int(str(r[1])), int(str(r[2]))) for r in rows}
    first_bucket, last_bucket = min(counts), max(counts)
    buckets = range(first_bucket, last_bucket + bucket_s, bucket_s)
    starts = [dt.datetime.fromtimestamp(b, dt.UTC) for b in buckets]
    volume = [counts.get(b, (0, 0))[0] for b in buckets]
    negative = [counts.get(b, (0, 0))[1] for b in buckets]
    share = [neg / n if n else float("nan") for neg, n in zip(negative, volume, strict=True)]
    baseline: list[float | None] = []
    for i in range(len(starts)):
        lo = max(0, i - BASELINE_BUCKETS)
        n = sum(volume[lo:i])
        baseline.append(sum(negative[lo:i]) / n if n else None)
    alerts: list[tuple[dt.datetime, str]] = []
    alert_where = "status = 'firing'" + (f" AND topic = {_quote(topic)}" if topic is not None else "")
    try:
        found = history.query(
            f"SELECT DISTINCT epoch(starts_at), coalesce(topic, ticker, alertname) FROM alerts WHERE {alert_where}"
        ).rows
        alerts = [(dt.datetime.fromtimestamp(float(str(r[0])), dt.UTC), str(r[1])) for r in found if r[0] is not None]
    except StorageError:  # no alert tables yet (no dispatcher wrote to this history): no markers
        alerts = []
    if since is not None:
        alerts = [a for a in alerts if a[0] >= since]
    return Series(starts, volume, share, baseline, alerts, bucket_s)


def draw(series: Series, path: Path, title: str, by: TimeColumn = "scored") -> Path:
    """Draw the series into a PNG at `path`; return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, share_ax = plt.subplots(figsize=(10, 4.2))
    volume_ax = share_ax.twinx()
    # matplotlib's date axis counts days as floats.
    width = series.bucket_s / 86400
    starts = [float(mdates.date2num(s)) for s in series.starts]
    volume_ax.bar(starts, series.volume, width=width * 0.9, align="edge", color="#cfd8dc", label="messages")
    volume_ax.set_ylabel("messages per bucket", color="#607d8b")
    volume_ax.set_ylim(0, max(series.volume, default=1) * 2.5)  # the bars keep to the lower part, behind the lines
    share_ax.set_zorder(volume_ax.get_zorder() + 1)
    share_ax.patch.set_visible(False)
    mids = [s + width / 2 for s in starts]
    share_ax.plot(mids, series.share, color="#c62828", marker="o", markersize=3, label="negative share")
    baseline = [b if b is not None else float("nan") for b in series.baseline]
    share_ax.plot(mids, baseline, color="#37474f", linestyle="--", label=f"baseline (previous {BASELINE_BUCKETS})")
    for n, (when, about) in enumerate(series.alerts):
        at = float(mdates.date2num(when))
        share_ax.axvline(at, color="#ff6f00", linewidth=1.5, label="alert fired" if n == 0 else None)
        share_ax.annotate(about, (at, 1.0), rotation=90, fontsize=7, va="top", ha="right", color="#e65100")
    share_ax.set_ylim(0, 1.05)
    share_ax.set_ylabel("negative share")
    share_ax.set_xlabel(f"{'processing' if by == 'scored' else 'publication'} time (UTC), {series.bucket_s} s buckets")
    share_ax.xaxis.set_major_formatter(
        mdates.DateFormatter("%m-%d %H:%M:%S" if series.bucket_s < 60 else "%m-%d %H:%M")
    )
    fig.autofmt_xdate()
    handles, labels = share_ax.get_legend_handles_labels()
    more_handles, more_labels = volume_ax.get_legend_handles_labels()
    share_ax.legend(handles + more_handles, labels + more_labels, loc="best", fontsize=8, framealpha=0.9)
    share_ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise PlotError(f"cannot write {path}: {e}") from e
    finally:
        plt.close(fig)
    return path
