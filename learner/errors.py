"""Exceptions of the learner package."""


class LearnerError(Exception):
    """Root of every error raised by `learner`."""


class ModelLoadError(LearnerError):
    """The base encoder or an adapter could not be loaded."""


class DatasetError(LearnerError):
    """A data file is missing or not in the expected format."""
