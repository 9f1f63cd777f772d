"""A grid of runs on one base config, submitted as one job array under one MLflow parent run.

A sweep file names a base config and a grid of dotted keys, each with a list of values::

    base: ../resnet18_small_blocks.yaml     # relative to this file
    name: resnet18_k                         # optional: the parent run's name (default: file stem)
    grid:
      quantization.types.conv3x3.k: [256, 512, 1024, 2048]
      train.mu: [1.0e-3, 1.0e-2]
    set:                                     # optional: the same for every point
      train.epochs: 30
    parallelism: 8                           # optional: array jobs running at once

Every point of the product is one run, named ``<base name>_<point>`` (``resnet18_small_blocks
_k256_mu0.001``), validated like any config before anything is submitted, and nested in
MLflow under one parent run created here (``tracking.parent_run_id``).
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gppq_dist.config import RunConfig, load_config
from gppq_dist.errors import ConfigError, UserError
from gppq_dist.launch.submit import (
    Resources, check_resources, make_executor, make_job, submit_guarded, tracking_uri, with_tracking,
)

SWEEP_KEYS = ("base", "name", "grid", "set", "parallelism")
# what a grid may not vary: one array shares its resources; names and tracking are set per point
FIXED_SECTIONS = ("launch", "tracking")
FIXED_KEYS = ("name", "output_dir")
MAX_PARALLELISM = 64


@dataclass
class Point:
    """One run of the sweep: its grid values, its name and its resolved config."""

    values: dict[str, Any]
    name: str
    cfg: RunConfig


@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    grid: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    parallelism: int | None = None

    def points(self, sets: dict[str, Any] | None = None) -> list[Point]:
        """Every grid point as a validated config (``sets``: overrides for all of them)."""
        swept = [key for key in (sets or {}) if key in self.grid]
        if swept:
            raise ConfigError(f"--set {swept[0]}: {self.path} sweeps that key in its grid")
        overrides = {**self.fixed, **(sets or {})}
        try:
            base_name = load_config(self.base, overrides).name
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None
        keys = list(self.grid)
        labels = short_labels(keys)
        points = []
        for combination in itertools.product(*(self.grid[key] for key in keys)):
            values = dict(zip(keys, combination))
            label = "_".join(f"{labels[key]}{format_value(value)}" for key, value in values.items())
            name = safe_name(f"{base_name}_{label}")
            try:
                cfg = load_config(self.base, {**overrides, **values, "name": name})
            except ConfigError as exc:
                raise ConfigError(f"{self.path}, point {label}: {exc}") from None
            points.append(Point(values, name, cfg))
        seen: dict[str, Point] = {}
        for point in points:
            if point.name in seen:
                raise ConfigError(f"{self.path}: points {seen[point.name].values} and {point.values} get the "
                                  f"same run name {point.name!r}; list each value once")
            seen[point.name] = point
        return points


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (the base config and the points are checked by ``points``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist (expected a YAML file with base: and grid:)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with base: and grid:, got {type(raw).__name__}")
    for key in raw:
        if key not in SWEEP_KEYS:
            hint = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{path}: unknown key '{key}'{suggestion}; expected one of: {', '.join(SWEEP_KEYS)}")
    for key in ("base", "grid"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key '{key}'")
    if not isinstance(raw["base"], str) or not raw["base"]:
        raise ConfigError(f"{path}: base: expected the path of a run config, got {raw['base']!r}")
    base = Path(raw["base"])
    if not base.is_absolute():
        base = Path(os.path.normpath(path.parent / base))
    grid = raw["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid: expected dotted keys with lists of values, e.g. "
                          f"'train.mu: [1.0e-3, 1.0e-2]', got {grid!r}")
    for key, values in grid.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: grid: keys are dotted config keys (e.g. train.mu), got {key!r}")
        if key.split(".")[0] in FIXED_SECTIONS or key in FIXED_KEYS:
            raise ConfigError(f"{path}: grid: {key} cannot vary within a sweep (one job array shares launch "
                              "settings; names and tracking are set per point); put it under set:")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid: {key}: expected a non-empty list of values, e.g. [256, 512], "
                              f"got {values!r}")
    fixed = raw.get("set") or {}
    if not isinstance(fixed, dict) or not all(isinstance(key, str) for key in fixed):
        raise ConfigError(f"{path}: set: expected dotted keys with one value each, got {fixed!r}")
    overlap = sorted(set(fixed) & set(grid))
    if overlap:
        raise ConfigError(f"{path}: {overlap[0]} is both in set: and in grid:; keep it in one")
    parallelism = raw.get("parallelism")
    if parallelism is not None and (isinstance(parallelism, bool) or not isinstance(parallelism, int)
                                    or parallelism < 1):
        raise ConfigError(f"{path}: parallelism: expected a positive whole number, got {parallelism!r}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: name: expected a non-empty string, got {name!r}")
    return Sweep(path=path, name=name, base=base, grid=grid, fixed=fixed, parallelism=parallelism)


def short_labels(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix telling each key apart: conv3x3.k and conv1x1.k, else k."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for width in range(1, len(parts) + 1):
            suffix = ".".join(parts[-width:])
            if sum(other == suffix or other.endswith("." + suffix) for other in keys) == 1:
                break
        labels[key] = suffix
    return labels


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, dict):
        return "-".join(f"{key}{format_value(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(item) for item in value)
    return str(value)


def safe_name(text: str) -> str:
    """A run name that is one plain folder name."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-.") or "run"


# -- MLflow parent run -------------------------------------------------------------------

def create_parent_run(sweep: Sweep, cfg: RunConfig, uri: str, points: list[Point]) -> str:
    """The parent run the points nest under (in the base config's experiment); returns its id."""
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    from gppq_dist.tracking.sync import experiment_id
    from gppq_dist.tracking.tracker import client_for, mlflow_calls

    try:
        with mlflow_calls():
            client = client_for(uri)
            run = client.create_run(experiment_id(client, cfg.tracking.experiment, create=True),
                                    run_name=sweep.name, tags={
                "gppq.kind": "sweep", "gppq.sweep_file": str(sweep.path), "gppq.base_config": str(sweep.base),
                "gppq.points": str(len(points)),
            })
            client.log_batch(run.info.run_id, params=[
                Param(key, json.dumps(values)) for key, values in sweep.grid.items()
            ], tags=[RunTag("gppq.runs", ", ".join(point.name for point in points)[:5000])])
    except MlflowException as exc:
        raise UserError(f"MLflow at {uri}: {exc.message}") from None
    return run.info.run_id


def update_parent_run(uri: str, run_id: str, status: str | None = None, **tags: str) -> None:
    """Tag the parent run; with ``status`` (FINISHED, FAILED), also end it."""
    from gppq_dist.tracking.tracker import client_for, mlflow_calls

    with mlflow_calls():
        client = client_for(uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        if status is not None:
            client.set_terminated(run_id, status)


# -- submission --------------------------------------------------------------------------

@dataclass
class SweepSubmission:
    sweep: Sweep
    points: list[Point]
    jobs: list[Any]
    resources: Resources
    parallelism: int
    uri: str | None
    experiment: str | None
    parent_run_id: str | None


def submit_sweep(sweep: Sweep, cluster: str, sets: dict[str, Any] | None = None,
                 parallelism: int | None = None, dry_run: bool = False) -> SweepSubmission:
    """Validate every point, create the MLflow parent run, submit the points as one array.

    ``dry_run``: validate and name the points only (no parent run, no jobs).
    """
    points = sweep.points(sets)
    first = points[0].cfg
    resources = check_resources(first, cluster, probe=not dry_run)
    parallelism = parallelism or sweep.parallelism or min(len(points), MAX_PARALLELISM)
    uri = experiment = parent = None
    if first.tracking.enabled:
        uri, experiment = tracking_uri(first), first.tracking.experiment
    if dry_run:
        return SweepSubmission(sweep, points, [], resources, parallelism, uri, experiment, None)
    if uri is not None:
        parent = create_parent_run(sweep, first, uri, points)
        points = [Point(p.values, p.name, with_tracking(p.cfg, uri=uri, parent_run_id=parent, run_name=p.name))
                  for p in points]
    executor = make_executor(cluster, resources, sweep.name, array_parallelism=parallelism)

    def submit_all() -> list[Any]:
        with executor.batch():
            jobs = [executor.submit(make_job(point.cfg, cluster, resources)) for point in points]
        return jobs

    try:
        jobs = submit_guarded(submit_all)
    except BaseException:
        if parent is not None:
            update_parent_run(uri, parent, "FAILED", **{"gppq.state": "not submitted"})
        raise
    if parent is not None:
        job_ids = ", ".join(sorted({str(job.job_id).split("_")[0] for job in jobs}))
        update_parent_run(uri, parent, **{"gppq.cluster": cluster, "gppq.job_ids": job_ids})
    return SweepSubmission(sweep, points, jobs, resources, parallelism, uri, experiment, parent)
