"""Training loops. ``simple`` is the single-process trainer; distributed trainers build on it."""

from mcdist.train.simple import evaluate_mqar, learning_rate_at, resolve_device, train

__all__ = ["evaluate_mqar", "learning_rate_at", "resolve_device", "train"]
