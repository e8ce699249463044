"""Helpers for tests: launch multi-process gloo jobs, tiny reference codecs."""
from gradwire.testing.launch import WorkerResult, run_workers

__all__ = ["WorkerResult", "run_workers"]
