"""Tasks: data (train / eval), conditioning (prompt / givens) and metrics. A task never builds a model."""
from tasks.base import Task  # noqa: F401
