"""Experiment tracking: MLflow while it answers, and a local journal always.

Rank 0 of a training run records it (:class:`~gppq_dist.tracking.tracker.Tracker`); every
other rank gets a :class:`~gppq_dist.tracking.tracker.NullTracker`. Every record is also
appended to ``<run dir>/tracking.jsonl``, so a tracking server that is down at the start or
goes away mid-run costs one warning, never the run: ``gppq mlflow sync RUN_DIR`` uploads
later what MLflow missed. ``gppq compare`` tabulates an experiment's finished runs and
draws their size / top-1 Pareto front.
"""

from gppq_dist.tracking.tracker import NullTracker, Tracker, open_tracker, resolve_uri

__all__ = ["NullTracker", "Tracker", "open_tracker", "resolve_uri"]
