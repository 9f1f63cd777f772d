"""Rank 0's record of a training run: a local journal always, MLflow while it answers.

Design:

* **The journal is the source of truth.** Every record (run start, params, tags, each
  metric value with its step and timestamp, each artifact, the end status) is appended to
  ``<run dir>/tracking.jsonl`` first, then sent to MLflow. Appending a line costs nothing
  next to a training step, and it means there is no separate "offline mode" to get right:
  whatever MLflow missed, the journal holds, and :func:`gppq_dist.tracking.sync.push`
  uploads the difference (``gppq mlflow sync RUN_DIR``).
* **A tracking server that fails never fails the run.** The first MLflow call that raises
  (server down at the start, gone mid-run, a locked sqlite file) prints one warning and
  the tracker stops talking to MLflow for the rest of the run; the journal goes on.
  MLflow's HTTP client retries 7 times with exponential backoff and waits 120 s per
  request by default (minutes against a dead server); the tracker's calls run under
  :func:`mlflow_calls`, which sets 1 retry, backoff factor 1 and a 10 s timeout unless the
  environment sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_BACKOFF_FACTOR`` /
  ``_TIMEOUT`` itself. A refused connection then costs well under a second, a server that
  accepts but never answers about 20 s, once.
* **A resumed run continues its MLflow run.** The run id is kept in
  ``<run dir>/mlflow_run_id`` (written atomically); on resume the tracker reopens that run
  (or creates it where the store never had it), first uploads whatever the journal holds
  and MLflow lacks, then sets it RUNNING again. Metric values at steps the journal already
  holds are not logged twice (a resume recomputes them bit for bit). A fresh start begins
  a new journal and a new MLflow run.

Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
working directory; an experiment the tracker creates in a sqlite store keeps its artifacts
in ``mlruns/`` beside the database file.

Metrics: per step (every ``tracking.log_every`` steps, step = global step) ``loss``,
``step_lr`` and ``images_per_s``; per epoch (step = epoch) ``top1_quantized``, ``top1_raw``,
``gamma``, ``train_loss``, ``val_loss_quantized`` and ``lr``; at the end (step = total
steps) ``size_mb``, ``ratio``, ``file_bytes``, ``baseline_top1`` and ``direct_pq_top1``. The
per-step learning rate is ``step_lr`` because one metric has one step axis.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from gppq_dist.config import RunConfig
    from gppq_dist.distributed import DistContext

log = logging.getLogger(__name__)

JOURNAL = "tracking.jsonl"
RUN_ID_FILE = "mlflow_run_id"
DEFAULT_URI = "sqlite:///mlflow.db"
DYNAMICS_PNG = "dynamics.png"
ARTIFACTS = ("config.yaml", "gppq.gppq", "summary.json", DYNAMICS_PNG)
EPOCH_METRICS = ("top1_quantized", "top1_raw", "gamma", "train_loss", "val_loss_quantized", "lr")
FINAL_METRICS = ("size_mb", "ratio", "file_bytes", "baseline_top1", "direct_pq_top1", "start_top1")
# MLflow's limits (mlflow.utils.validation): key length, param value length
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
QUIET_LOGGERS = {"urllib3": logging.ERROR, "mlflow": logging.WARNING, "alembic": logging.WARNING}
_VALID_NAME = re.compile(r"[/\w.\- :]+")  # what MLflow accepts as a param or metric name


def resolve_uri(uri: str | None = None) -> str:
    """The tracking store: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def mlflow_calls() -> Iterator[None]:
    """MLflow calls that give up quickly: few retries, short timeouts, no chatter.

    Values the environment already sets are kept. Inside this block urllib3 (which logs
    each retry as a warning) speaks only of errors, and MLflow and alembic (database
    set-up, at INFO) only of warnings: what goes wrong reaches the tracker as an exception.
    What MLflow prints (links to the run) goes to stderr, leaving stdout to the command.
    """
    importlib.import_module("mlflow")  # it sets its loggers up on import: before we lower them

    saved = {name: os.environ.get(name) for name in HTTP_LIMITS}
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    levels = {}
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(max(level, logger.level))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # "View run ... at: URL": stdout is the command's
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client_for(uri: str):
    """An ``MlflowClient`` for ``uri`` (MLflow is imported only when tracking is used)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def describe_failure(exc: BaseException) -> str:
    """A short reason for a failed MLflow call, fit for one line."""
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                           ("Max retries exceeded", "no answer"), ("database is locked", "database is locked")):
        if needle in text:
            return reason
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:120]}" if first else type(exc).__name__


def git_commit(workdir: str | Path | None = None) -> str:
    """The commit checked out in ``workdir`` (default: the working directory), or "unknown"."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workdir or os.getcwd(),
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else "unknown"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``{"train": {"lr": 0.01}}`` -> ``{"train.lr": "0.01"}``.

    A mapping whose keys MLflow would refuse as names (the regexes of
    ``quantization.names``) stays one param holding its JSON; an empty one is ``{}``.
    Values longer than MLflow's 6,000 characters are cut, ending in ``...``.
    """
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        nested = isinstance(value, dict) and value and all(
            _VALID_NAME.fullmatch(str(k)) and ".." not in str(k) for k in value)
        if nested:
            out.update(flat_params(value, name))
        elif len(name) <= MAX_KEY_LENGTH:
            out[name] = _param_value(value)
    return out


def run_tags(cfg: RunConfig, world_size: int, method: str, workdir: str | Path | None = None) -> dict[str, str]:
    commit = git_commit(workdir)
    tags = {
        "git_commit": commit,
        "host": socket.gethostname(),
        "world_size": str(world_size),
        "engine": cfg.train.engine,
        "method": method,
        "precision": cfg.train.precision,
        "run_dir": str(Path(cfg.run_dir).resolve()),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


class Journal:
    """``tracking.jsonl``: one JSON record per line, appended and flushed as it happens."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w" if fresh else "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """The journal's records; a line cut short by a crash (the last one) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "kind" in record:
            records.append(record)
    return records


class NullTracker:
    """What ranks other than 0 (and runs with ``tracking.enabled: false``) track: nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_step(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        pass

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False


class Tracker(NullTracker):
    """Journal + MLflow for one training run (see the module docstring).

    Used as a context manager, a run that raises ends as FAILED (KILLED on Ctrl-C).
    """

    def __init__(self, cfg: RunConfig, *, world_size: int = 1, resumed: bool = False,
                 run_dir: str | Path | None = None, method: str | None = None,
                 workdir: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.run_dir)
        self.journal_path = self.run_dir / JOURNAL
        self.uri = resolve_uri(cfg.tracking.uri)
        self.experiment = cfg.tracking.experiment
        self.client = None
        self.run_id = None
        self.ended = False
        self._warned = False
        earlier = read_journal(self.journal_path) if resumed else []
        if not resumed:  # a fresh start never uploads into an earlier run
            (self.run_dir / RUN_ID_FILE).unlink(missing_ok=True)
        self._last_step: dict[str, int] = {}
        earlier_params: dict[str, str] = {}
        for record in earlier:
            if record["kind"] == "metric":
                key = record["key"]
                self._last_step[key] = max(self._last_step.get(key, record["step"]), record["step"])
            elif record["kind"] == "params":
                earlier_params.update(record["params"])
        self.journal = Journal(self.journal_path, fresh=not resumed)
        # the config's method when it names one; G&P PQ otherwise
        method = method or cfg.method.name
        params = flat_params(cfg.model_dump(mode="json"))
        tags = run_tags(cfg, world_size, method, workdir)
        # params cannot change in MLflow: settings changed on resume (train.epochs, ...) become tags
        tags.update({f"resumed.{key}": value for key, value in params.items()
                     if key in earlier_params and earlier_params[key] != value})
        session = [
            {"kind": "start", "time": now_ms(), "uri": self.uri, "experiment": self.experiment,
             "run_name": cfg.tracking.run_name or cfg.name, "parent_run_id": cfg.tracking.parent_run_id,
             "resumed": resumed},
            {"kind": "params", "params": {k: v for k, v in params.items() if k not in earlier_params}},
            {"kind": "tags", "tags": tags},
        ]
        for record in session:
            self.journal.append(record)
        self._connect(earlier + session, reuse_run=resumed)

    # --- MLflow -----------------------------------------------------------------------

    def _connect(self, records: list[dict[str, Any]], reuse_run: bool) -> None:
        from gppq_dist.tracking.sync import push

        try:
            with mlflow_calls():
                client = client_for(self.uri)
                pushed = push(client, self.run_dir, records, reuse_run=reuse_run)
        except Exception as exc:  # noqa: BLE001 - any tracking failure leaves training alone
            self._offline(exc)
            return
        self.client, self.run_id = client, pushed.run_id
        log.info("tracking: %s MLflow run %s (experiment %r at %s)", "new" if pushed.created else "continuing",
                 pushed.run_id, self.experiment, self.uri)

    def _send(self, call) -> None:
        if self.client is None:
            return
        try:
            with mlflow_calls():
                call(self.client)
        except Exception as exc:  # noqa: BLE001
            self._offline(exc)

    def _offline(self, exc: BaseException) -> None:
        self.client = None
        if not self._warned:
            self._warned = True
            log.warning("MLflow tracking at %s failed (%s): training goes on, records are kept in %s "
                        "(upload them with: gppq mlflow sync %s)", self.uri, describe_failure(exc),
                        self.journal_path, self.run_dir)

    @property
    def online(self) -> bool:
        return self.client is not None

    # --- records ----------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Journal and send ``metrics`` at ``step``; steps a resumed run already logged are skipped."""
        from_mlflow = []
        timestamp = now_ms()
        for key, value in metrics.items():
            if step <= self._last_step.get(key, -1):
                continue
            value = float(value)
            self._last_step[key] = step
            self.journal.append({"kind": "metric", "key": key, "value": value, "step": step,
                                 "timestamp": timestamp})
            from_mlflow.append((key, value))
        if from_mlflow and self.client is not None:
            from mlflow.entities import Metric

            batch = [Metric(key, value, timestamp, step) for key, value in from_mlflow]
            self._send(lambda client: client.log_batch(self.run_id, metrics=batch))

    def log_step(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        self.log_metrics({"loss": loss, "step_lr": lr, "images_per_s": images_per_s}, step)

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.log_metrics({key: record[key] for key in EPOCH_METRICS}, step=record["epoch"])

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        try:
            name = str(path.resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            name = str(path.resolve())
        self.journal.append({"kind": "artifact", "path": name, "time": now_ms()})
        self._send(lambda client: client.log_artifact(self.run_id, str(path)))

    def finish(self, summary: dict[str, Any]) -> None:
        """The training-dynamics plot, the final metrics and the run's files; then FINISHED."""
        from gppq_dist.tracking.plots import dynamics_png

        try:
            start = summary.get("start_top1", summary["direct_pq_top1"])
            dynamics_png(summary["history"], summary["baseline_top1"], start, self.run_dir / DYNAMICS_PNG,
                         method=summary.get("method", "gppq"))
        except Exception as exc:  # noqa: BLE001 - a plot is not worth the run
            log.warning("could not draw %s: %s", self.run_dir / DYNAMICS_PNG, exc)
        self.log_metrics({key: summary[key] for key in FINAL_METRICS if summary.get(key) is not None},
                         step=int(summary.get("steps", 0)))
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.log_artifact(self.run_dir / name)
        self.end("FINISHED")

    def end(self, status: str = "FINISHED") -> None:
        if self.ended:
            return
        self.ended = True
        end_time = now_ms()
        self.journal.append({"kind": "end", "status": status, "time": end_time})
        self._send(lambda client: client.set_terminated(self.run_id, status, end_time))
        self.journal.close()


def open_tracker(cfg: RunConfig, context: DistContext, resumed: bool) -> NullTracker:
    """Rank 0's :class:`Tracker` (``tracking.enabled``), a :class:`NullTracker` elsewhere."""
    if not (context.is_main and cfg.tracking.enabled):
        return NullTracker()
    return Tracker(cfg, world_size=context.world_size, resumed=resumed)

