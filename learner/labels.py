"""The label sets of the two tasks; their order is the order of the classifier outputs."""

from typing import Final, Literal

Task = Literal["sentiment", "topic"]
TASKS: Final[tuple[Task, ...]] = ("sentiment", "topic")

SENTIMENTS: Final[tuple[str, ...]] = ("negative", "neutral", "positive")

# The 20 topics of twitter-financial-news-topic, in the order of its integer labels 0..19.
TOPICS: Final[tuple[str, ...]] = (
    "Analyst Update",
    "Fed / Central Banks",
    "Company / Product News",
    "Treasuries / Corporate Debt",
    "Dividend",
    "Earnings",
    "Energy / Oil",
    "Financials",
    "Currencies",
    "General News / Opinion",
    "Gold / Metals / Materials",
    "IPO",
    "Legal / Regulation",
    "M&A / Investments",
    "Macro",
    "Markets",
    "Politics",
    "Personnel Change",
    "Stock Commentary",
    "Stock Movement",
)

# twitter-financial-news-sentiment: 0 Bearish, 1 Bullish, 2 Neutral.
TFNS_SENTIMENT: Final[dict[int, str]] = {0: "negative", 1: "positive", 2: "neutral"}


def labels_of(task: Task) -> tuple[str, ...]:
    """Return the ordered label names of a task."""
    return SENTIMENTS if task == "sentiment" else TOPICS
