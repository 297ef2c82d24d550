"""The label sets of the shipped tasks, under the names their importers know; `learner.tasks` is the registry."""

from typing import Final

from learner.tasks import SENTIMENT, TOPIC, Task, labels_of

__all__ = ["SENTIMENTS", "TASKS", "TOPICS", "Task", "labels_of"]

# The shipped tasks only: code that must see every registered task calls learner.tasks.task_names().
TASKS: Final[tuple[Task, ...]] = (SENTIMENT.name, TOPIC.name)
SENTIMENTS: Final = SENTIMENT.labels
TOPICS: Final = TOPIC.labels
