"""Upload what a run's journal holds and its MLflow run does not (``gppq mlflow sync``).

:func:`push` compares the journal with the run, record by record, and sends only the
difference: params MLflow lacks, tags it lacks or holds with another value, metric values
it has not got (matched on key, step, timestamp and value), files it has not got (or got
with another size), and the status the journal ends in. Pushing twice therefore uploads
nothing the second time. The run is the one named in ``<run dir>/mlflow_run_id``; where the
store does not hold it (the server was down from the start, or this is another store), the
run is created and its id written there.

A training run's tracker does the same when it starts on a resumed run, so a run that lost
its server and was resumed later catches up by itself.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gppq_dist.errors import UserError
from gppq_dist.io import write_text_atomic
from gppq_dist.tracking.tracker import JOURNAL, RUN_ID_FILE, client_for, describe_failure, mlflow_calls, read_journal

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # what MLflow's UI nests child runs by (mlflow.utils.mlflow_tags)
MISSING_RUN = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@dataclass
class Pushed:
    """What one :func:`push` sent."""

    run_id: str
    experiment: str
    created: bool
    params: int = 0
    tags: int = 0
    metrics: int = 0
    artifacts: list[str] = field(default_factory=list)
    status: str | None = None  # the status set, when it changed
    conflicts: list[str] = field(default_factory=list)  # params MLflow holds with another value
    missing_files: list[str] = field(default_factory=list)  # journaled artifacts no longer on disk

    @property
    def uploaded_anything(self) -> bool:
        return bool(self.created or self.params or self.tags or self.metrics or self.artifacts or self.status)

    def describe(self) -> str:
        if not self.uploaded_anything:
            return "nothing to upload: MLflow holds everything the journal does"
        parts = [f"{self.params} params", f"{self.tags} tags", f"{self.metrics} metric values",
                 f"{len(self.artifacts)} artifacts" + (f" ({', '.join(self.artifacts)})" if self.artifacts else "")]
        if self.status:
            parts.append(f"status {self.status}")
        return "uploaded " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "experiment": self.experiment, "created": self.created,
                "params": self.params, "tags": self.tags, "metrics": self.metrics,
                "artifacts": self.artifacts, "status": self.status, "conflicts": self.conflicts,
                "missing_files": self.missing_files}


def sqlite_artifact_location(uri: str) -> str | None:
    """``mlruns/`` beside a sqlite database, for experiments created in it (else MLflow's default,
    ``./mlruns`` in whatever the working directory happens to be)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri[len("sqlite:///"):].split("?")[0]
    if not database or database == ":memory:":
        return None
    return (Path(database).resolve().parent / "mlruns").as_uri()


def experiment_id(client, name: str, create: bool) -> str | None:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage != "active":
        raise UserError(f"experiment {name!r} was deleted in {client.tracking_uri}: restore it "
                        "(mlflow experiments restore) or choose another tracking.experiment")
    if experiment is not None:
        return experiment.experiment_id
    if not create:
        return None
    return client.create_experiment(name, artifact_location=sqlite_artifact_location(str(client.tracking_uri)))


def _existing_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in MISSING_RUN:
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def _run_for(client, run_dir: Path, first: dict[str, Any], latest: dict[str, Any], reuse_run: bool):
    id_file = run_dir / RUN_ID_FILE
    if reuse_run and id_file.is_file():
        run = _existing_run(client, id_file.read_text().strip())
        if run is not None:
            return run, False
    tags = {PARENT_TAG: latest["parent_run_id"]} if latest.get("parent_run_id") else None
    created = client.create_run(experiment_id(client, latest["experiment"], create=True),
                                start_time=first["time"], tags=tags, run_name=latest["run_name"])
    write_text_atomic(id_file, created.info.run_id + "\n")
    return client.get_run(created.info.run_id), True


def _value_key(value: float) -> str:
    return repr(float(value))  # NaN matches NaN


def push(client, run_dir: str | Path, records: list[dict[str, Any]], reuse_run: bool = True) -> Pushed:
    """Send MLflow what ``records`` (a run's journal) hold and its run lacks."""
    from mlflow.entities import Metric, Param, RunTag

    run_dir = Path(run_dir)
    starts = [r for r in records if r["kind"] == "start"]
    if not starts:
        raise UserError(f"{run_dir / JOURNAL}: no run start recorded (not a journal written by gppq train)")
    run, created = _run_for(client, run_dir, starts[0], starts[-1], reuse_run)
    run_id = run.info.run_id
    pushed = Pushed(run_id=run_id, experiment=starts[-1]["experiment"], created=created)

    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    metrics: dict[str, list[dict[str, Any]]] = defaultdict(list)
    artifacts: list[str] = []
    status, end_time = "RUNNING", None
    for record in records:
        kind = record["kind"]
        if kind == "params":
            for key, value in record["params"].items():
                params.setdefault(key, value)
        elif kind == "tags":
            tags.update(record["tags"])
        elif kind == "metric":
            metrics[record["key"]].append(record)
        elif kind == "artifact" and record["path"] not in artifacts:
            artifacts.append(record["path"])
        elif kind == "start":
            status, end_time = "RUNNING", None
        elif kind == "end":
            status, end_time = record["status"], record["time"]

    held_params, held_tags = run.data.params, run.data.tags
    new_params = [Param(k, v) for k, v in params.items() if k not in held_params]
    pushed.conflicts = sorted(k for k, v in params.items() if k in held_params and held_params[k] != v)
    new_tags = [RunTag(k, v) for k, v in tags.items() if held_tags.get(k) != v]
    new_metrics = []
    for key, values in metrics.items():
        held = set()
        if key in run.data.metrics:
            held = {(m.step, m.timestamp, _value_key(m.value)) for m in client.get_metric_history(run_id, key)}
        for m in values:
            if (m["step"], m["timestamp"], _value_key(m["value"])) not in held:
                new_metrics.append(Metric(key, float(m["value"]), m["timestamp"], m["step"]))
                held.add((m["step"], m["timestamp"], _value_key(m["value"])))
    if new_params or new_tags or new_metrics:
        client.log_batch(run_id, metrics=new_metrics, params=new_params, tags=new_tags)
    pushed.params, pushed.tags, pushed.metrics = len(new_params), len(new_tags), len(new_metrics)

    if artifacts:
        held_files = {Path(f.path).name: f.file_size for f in client.list_artifacts(run_id) if not f.is_dir}
        for name in artifacts:
            local = Path(name) if Path(name).is_absolute() else run_dir / name
            if not local.is_file():
                pushed.missing_files.append(name)
                continue
            if held_files.get(local.name) != local.stat().st_size:
                client.log_artifact(run_id, str(local))
                pushed.artifacts.append(local.name)

    if run.info.status != status:
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status, end_time)
        pushed.status = status
    return pushed


def sync(run_dir: str | Path, uri: str | None = None) -> tuple[Pushed, str]:
    """``gppq mlflow sync``: push a run folder's journal to ``uri`` (default: the store the run
    used). Returns what was sent and the store's URI."""
    run_dir = Path(run_dir)
    journal = run_dir / JOURNAL
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR: '{run_dir}' is not a folder (expected a run folder, e.g. runs/<name>)")
    records = read_journal(journal)
    if not records:
        raise UserError(f"RUN_DIR: '{run_dir}' holds no tracking journal ({JOURNAL}, written by gppq train "
                        "with tracking.enabled)")
    starts = [r for r in records if r["kind"] == "start"]
    target = uri or (starts[-1]["uri"] if starts else None)
    if target is None:
        raise UserError(f"{journal}: no run start recorded (not a journal written by gppq train)")
    from mlflow.exceptions import MlflowException

    try:
        with mlflow_calls():
            return push(client_for(target), run_dir, records), target
    except MlflowException as exc:
        raise UserError(f"MLflow tracking at {target} failed ({describe_failure(exc)})") from None
