"""Exceptions of the learner package."""


class LearnerError(Exception):
    """Root of every error raised by `learner`."""


class ModelLoadError(LearnerError):
    """The base encoder or an adapter could not be loaded."""


class DatasetError(LearnerError):
    """A data file is missing or not in the expected format."""


# Also a ValueError: task names arrive as arguments, and callers that guard them with `except ValueError` (the
# label store among them) keep working.
class TaskError(LearnerError, ValueError):
    """A task name no spec is registered under, or a task spec the registry refuses."""
