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
  accepts but never answers about 20 s, once, and after the start only the sender thread
  waits for it.
* **MLflow is never on the step path.** The journal line is written on the caller's
  thread; the MLflow send is handed to one sender thread (a daemon, one per tracker) through
  a bounded queue, and the call returns. The sender takes everything queued at once and joins
  consecutive metric records into ``log_batch`` requests (up to MLflow's 1,000 metrics per
  request), so a slow server receives fewer, larger requests instead of falling behind. When
  the queue already holds :data:`QUEUE_LIMIT` sends, a new one is dropped, never waited for:
  the journal has the record, and at the end the sender uploads what it dropped from the
  journal (:func:`gppq_dist.tracking.sync.push`, the same difference ``gppq mlflow sync``
  sends). :meth:`Tracker.end` (and :meth:`Tracker.finish`, which ends) waits for the sender
  to empty the queue and close the run for at most :data:`DRAIN_TIMEOUT_S`; a server slower
  than that gets one warning, the sender stops after the request it is in, and ``gppq mlflow
  sync`` uploads the rest. MLflow's own asynchronous logging (``log_batch(...,
  synchronous=False)``) was not used: its queue has no bound, it carries metrics, params and
  tags only (no artifacts, no run end), it sends each batch from a pool of up to 10 threads,
  it logs every failed batch as an error instead of letting the tracker go offline after
  the first, and waiting for it (``RunOperations.wait``, ``flush``) has no time limit. The
  one exchange left on the caller's thread is the start (create or reopen the run, params and
  tags), so that :attr:`Tracker.run_id` is known once the tracker exists.
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
import threading
import time
from collections import deque
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
# the sender thread cannot redirect stdout (that is the whole process's); MLflow's "View run"
# lines (and the extra get_run request that finds the link) are switched off for it instead
SENDER_ENV = {**HTTP_LIMITS, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
QUEUE_LIMIT = 1000  # MLflow sends waiting for the sender thread; one more is dropped (the journal keeps it)
DRAIN_TIMEOUT_S = 30.0  # how long end() waits for the sender to empty the queue and close the run
# After a send arrives, the sender waits this long for more before sending (the run's end
# cuts it short): the server gets one request per few seconds, not one per logged step. A
# tracking server on a node's own cores (or a busy shared one) otherwise spends CPU per
# request that the training then lacks (measured: benchmarks/tracking_overhead.py).
GATHER_S = 5.0
MAX_BATCH_METRICS = 1000  # MLflow's limit per log_batch request (mlflow.utils.validation)
QUIET_LOGGERS = {"urllib3": logging.ERROR, "mlflow": logging.WARNING, "alembic": logging.WARNING}
_VALID_NAME = re.compile(r"[/\w.\- :]+")  # what MLflow accepts as a param or metric name


def resolve_uri(uri: str | None = None) -> str:
    """The tracking store: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def mlflow_limits(env: dict[str, str] = HTTP_LIMITS) -> Iterator[None]:
    """Short HTTP limits and quiet loggers for the MLflow calls made inside the block.

    Each variable of ``env`` the environment does not set already is set for the block; inside
    it urllib3 (which logs each retry as a warning) speaks only of errors, and MLflow and
    alembic (database set-up, at INFO) only of warnings: what goes wrong reaches the caller
    as an exception. Both are the process's, so every thread's calls see them.
    """
    importlib.import_module("mlflow")  # it sets its loggers up on import: before we lower them

    saved = {name: os.environ.get(name) for name in env}
    for name, value in env.items():
        os.environ.setdefault(name, value)
    levels = {}
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(max(level, logger.level))
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def mlflow_calls() -> Iterator[None]:
    """MLflow calls that give up quickly: few retries, short timeouts, no chatter.

    :func:`mlflow_limits`, and what MLflow prints (links to the run) goes to stderr, leaving
    stdout to the command.
    """
    with mlflow_limits(), contextlib.redirect_stdout(sys.stderr):  # "View run ... at: URL"
        yield


class _SenderLimits:
    """:func:`mlflow_limits` (with :data:`SENDER_ENV`) from the first running sender thread's
    start to the last one's end. Counted, so trackers whose lives overlap restore the
    environment and the log levels once, as they found them."""

    _lock = threading.Lock()
    _holders = 0
    _held: contextlib.ExitStack | None = None

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._holders == 0:
                stack = contextlib.ExitStack()
                stack.enter_context(mlflow_limits(SENDER_ENV))
                cls._held = stack
            cls._holders += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0 and cls._held is not None:
                cls._held.close()
                cls._held = None


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


class Outbox:
    """The bounded queue between the caller's thread and the sender thread.

    :meth:`put` never waits: with ``limit`` sends already waiting it drops the new one and
    counts its records in :attr:`dropped`. :meth:`close` queues the last send (the run's
    end) whatever the count, and nothing is queued after it. :meth:`take` waits for at least
    one send and returns all that are queued, oldest first.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"queue limit must be at least 1, got {limit}")
        self.limit = limit
        self.dropped = 0  # records (metric values, files) the queue had no room for
        self._items: deque = deque()
        self._ready = threading.Condition()
        self._closed = False

    def put(self, item: tuple, records: int) -> bool:
        with self._ready:
            if self._closed or len(self._items) >= self.limit:
                self.dropped += records
                return False
            self._items.append(item)
            self._ready.notify()
            return True

    def close(self, item: tuple) -> None:
        with self._ready:
            self._items.append(item)
            self._closed = True
            self._ready.notify()

    def take(self, gather_s: float = 0.0) -> list[tuple]:
        """All queued sends, once there is one and then ``gather_s`` seconds more have passed
        (or the queue was closed: the run's end is sent at once)."""
        with self._ready:
            self._ready.wait_for(lambda: self._items)
            if gather_s > 0:
                self._ready.wait_for(lambda: self._closed, timeout=gather_s)
            items = list(self._items)
            self._items.clear()
            return items


def coalesce(items: list[tuple], max_metrics: int = MAX_BATCH_METRICS) -> list[tuple]:
    """Join consecutive ``("metrics", [...])`` sends into sends of at most ``max_metrics``
    values; other sends (files, the end) keep their place."""
    out: list[tuple] = []
    for item in items:
        if item[0] != "metrics":
            out.append(item)
            continue
        values = list(item[1])
        while values:
            if not (out and out[-1][0] == "metrics" and len(out[-1][1]) < max_metrics):
                out.append(("metrics", []))
            room = max_metrics - len(out[-1][1])
            out[-1][1].extend(values[:room])
            values = values[room:]
    return out


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
    ``queue_limit`` and ``drain_timeout_s`` bound the sender's queue and :meth:`end`'s wait
    (defaults :data:`QUEUE_LIMIT`, :data:`DRAIN_TIMEOUT_S`); ``gather_s`` is how long the
    sender collects sends before each request (default :data:`GATHER_S`).
    """

    def __init__(self, cfg: RunConfig, *, world_size: int = 1, resumed: bool = False,
                 run_dir: str | Path | None = None, method: str | None = None,
                 workdir: str | Path | None = None, queue_limit: int = QUEUE_LIMIT,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, gather_s: float = GATHER_S) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.run_dir)
        self.journal_path = self.run_dir / JOURNAL
        self.uri = resolve_uri(cfg.tracking.uri)
        self.experiment = cfg.tracking.experiment
        self.client = None
        self.run_id = None
        self.ended = False
        self.drain_timeout_s = drain_timeout_s
        self.gather_s = gather_s
        self._warned = False
        self._warn_lock = threading.Lock()
        self._outbox = Outbox(queue_limit)
        self._sender: threading.Thread | None = None
        self._abandoned = threading.Event()  # end() stopped waiting: the sender sends nothing more
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
        """The start, on the caller's thread: create or reopen the run, then start the sender."""
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
        _SenderLimits.acquire()
        self._sender = threading.Thread(target=self._send_loop, name=f"gppq-tracking-{self.run_id}", daemon=True)
        self._sender.start()

    def _send_loop(self) -> None:
        """The sender thread: everything queued, joined into batches, in order, until the end."""
        try:
            while True:
                for item in coalesce(self._outbox.take(self.gather_s)):
                    if self._abandoned.is_set() or self.client is None:
                        return
                    if not self._send(item) or item[0] == "end":
                        return
        finally:
            _SenderLimits.release()

    def _send(self, item: tuple) -> bool:
        """One send to MLflow; False (and offline) when it fails."""
        client = self.client
        if client is None:
            return False
        kind = item[0]
        try:
            if kind == "metrics":
                from mlflow.entities import Metric

                client.log_batch(self.run_id, metrics=[Metric(*values) for values in item[1]])
            elif kind == "artifact":
                client.log_artifact(self.run_id, item[1])
            elif self._outbox.dropped:  # the end, with records the queue had no room for
                from gppq_dist.tracking.sync import push

                pushed = push(client, self.run_dir, read_journal(self.journal_path), reuse_run=True)
                log.info("tracking: %d records the queue had no room for were uploaded from %s (%s)",
                         self._outbox.dropped, self.journal_path, pushed.describe())
            else:  # the end
                _, status, end_time = item
                client.set_terminated(self.run_id, status, end_time)
        except Exception as exc:  # noqa: BLE001
            self._offline(exc)
            return False
        return True

    def _offline(self, exc: BaseException) -> None:
        self.client = None
        self._warn_once(f"MLflow tracking at {self.uri} failed ({describe_failure(exc)}): training goes on")

    def _warn_once(self, what: str) -> None:
        with self._warn_lock:
            if self._warned:
                return
            self._warned = True
        log.warning("%s, records are kept in %s (upload them with: gppq mlflow sync %s)", what,
                    self.journal_path, self.run_dir)

    @property
    def online(self) -> bool:
        return self.client is not None

    @property
    def dropped(self) -> int:
        """Records (metric values, files) not sent during the run because the queue was full."""
        return self._outbox.dropped

    def _queue(self, item: tuple, records: int) -> None:
        if self.client is not None:
            self._outbox.put(item, records)

    # --- records ----------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Journal ``metrics`` at ``step`` and queue them for MLflow; steps a resumed run
        already logged are skipped."""
        to_send = []
        timestamp = now_ms()
        for key, value in metrics.items():
            if step <= self._last_step.get(key, -1):
                continue
            value = float(value)
            self._last_step[key] = step
            self.journal.append({"kind": "metric", "key": key, "value": value, "step": step,
                                 "timestamp": timestamp})
            to_send.append((key, value, timestamp, step))
        if to_send:
            self._queue(("metrics", to_send), len(to_send))

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
        self._queue(("artifact", str(path)), 1)

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
        """Journal the end, then wait (at most ``drain_timeout_s``) for the sender to send what
        is queued and close the MLflow run."""
        if self.ended:
            return
        self.ended = True
        end_time = now_ms()
        self.journal.append({"kind": "end", "status": status, "time": end_time})
        try:
            if self._sender is not None:
                self._outbox.close(("end", status, end_time))
                self._sender.join(self.drain_timeout_s)
                if self._sender.is_alive():
                    self._abandon(f"did not take the run's last records within {self.drain_timeout_s:g} s")
        except KeyboardInterrupt:  # a second Ctrl-C while waiting: stop waiting
            self._abandon("was still sending when the run was interrupted")
            raise
        finally:
            self.journal.close()

    def _abandon(self, why: str) -> None:
        """Stop waiting for the sender: it finishes the request it is in and sends nothing more."""
        self._abandoned.set()
        self.client = None
        self._warn_once(f"MLflow tracking at {self.uri} {why}")


def open_tracker(cfg: RunConfig, context: DistContext, resumed: bool) -> NullTracker:
    """Rank 0's :class:`Tracker` (``tracking.enabled``), a :class:`NullTracker` elsewhere."""
    if not (context.is_main and cfg.tracking.enabled):
        return NullTracker()
    return Tracker(cfg, world_size=context.world_size, resumed=resumed)

