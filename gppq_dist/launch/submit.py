"""One training run as a submitit job: executors, the job callable, waiting for it.

``gppq submit`` builds an executor for ``slurm``, ``local`` (submitit's LocalExecutor:
processes on this machine, ``tasks_per_node`` works) or ``debug`` (in this process) from
``cfg.launch``, and submits a :class:`TrainJob`. One task per GPU (``gpus_per_node``), or
``cpu_tasks_per_node`` tasks for CPU jobs; every task is one rank.

The job always trains with ``resume=True``: a fresh run finds no checkpoint and starts, a
requeued one continues from its newest checkpoint (the trainer writes one every
``train.checkpoint_every`` steps and after every epoch). On preemption or timeout submitit
calls :meth:`TrainJob.checkpoint` on rank 0, which hands back the same job to run again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from gppq_dist.config import RunConfig, validate_config
from gppq_dist.errors import ConfigError, UserError

log = logging.getLogger(__name__)

CLUSTERS = ("slurm", "local", "debug")
# Requeues after a timeout that submitit allows before it gives a job up (preemptions do
# not count). Each requeue continues from a checkpoint, so a long run on short slots
# needs many: 30 epochs of ImageNet in 4-hour slots is a few dozen.
MAX_TIMEOUTS = 50
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
                 "SUSPENDED", "STAGE_OUT", "SIGNALING")


class JobFailed(UserError):
    """A submitted job ended with an error or without a result."""


@dataclass(frozen=True)
class Resources:
    """What one job asks for, resolved from ``cfg.launch`` (already overridden by flags)."""

    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int
    mem_gb: int | None
    partition: str | None
    timeout_min: int
    folder: str
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: tuple[tuple[str, Any], ...] = ()  # other sbatch options, in the config's order

    @classmethod
    def of(cls, cfg: RunConfig) -> "Resources":
        launch = cfg.launch
        tasks = launch.gpus_per_node if launch.gpus_per_node > 0 else launch.cpu_tasks_per_node
        return cls(nodes=launch.nodes, gpus_per_node=launch.gpus_per_node, tasks_per_node=tasks,
                   cpus_per_task=launch.cpus_per_task, mem_gb=launch.mem_gb, partition=launch.partition,
                   timeout_min=launch.timeout_min, folder=launch.folder, account=launch.account, qos=launch.qos,
                   constraint=launch.constraint, sbatch=tuple(launch.sbatch.items()))

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_node > 0 else "cpu"

    def describe(self) -> str:
        per_node = f"{self.gpus_per_node} GPU(s)" if self.gpus_per_node else f"{self.tasks_per_node} CPU task(s)"
        return f"{self.nodes} node(s) x {per_node}, {self.cpus_per_task} CPU(s) per task, {self.timeout_min} min"


def tracking_uri(cfg: RunConfig) -> str:
    """Where the run's MLflow records go: tracking.uri, $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    from gppq_dist.tracking import resolve_uri

    return resolve_uri(cfg.tracking.uri)


def with_tracking(cfg: RunConfig, **fields: Any) -> RunConfig:
    """``cfg`` with tracking fields set (a copy, validated)."""
    raw = cfg.model_dump(mode="json")
    raw["tracking"].update(fields)
    return validate_config(raw)


def pin_tracking_uri(cfg: RunConfig) -> RunConfig:
    """Write the resolved tracking URI into the config, so the job logs where we said it would."""
    return with_tracking(cfg, uri=tracking_uri(cfg)) if cfg.tracking.enabled else cfg


def check_resources(cfg: RunConfig, cluster: str, probe: bool = True) -> Resources:
    """Refuse, before anything is queued, what would only fail once the job starts.

    ``probe``: also ask the cluster (sbatch on PATH, the partition exists).
    """
    if cluster not in CLUSTERS:
        raise UserError(f"--cluster: expected one of {', '.join(CLUSTERS)}, got {cluster!r}")
    res = Resources.of(cfg)
    if cluster == "local" and res.nodes > 1:
        raise ConfigError(f"launch.nodes = {res.nodes}, but --cluster local runs on this machine only: "
                          "use 1 node (more tasks with launch.cpu_tasks_per_node or launch.gpus_per_node)")
    world_size = 1 if cluster == "debug" else res.world_size
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} must split evenly over the job's "
                          f"{world_size} tasks ({res.nodes} node(s) x {res.tasks_per_node})")
    if cluster == "slurm" and probe:
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise UserError("--cluster slurm: no sbatch/srun on PATH, so this machine cannot submit SLURM "
                            "jobs; run where it can, or use --cluster local to run here")
        if res.partition:
            found = subprocess.run(["sinfo", "-h", "-o", "%R", "-p", res.partition], capture_output=True,
                                   text=True, timeout=60)
            if found.returncode != 0 or not found.stdout.strip():
                listed = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
                known = ", ".join(sorted(set(listed.stdout.split()))) or "none found"
                raise ConfigError(f"launch.partition: SLURM has no partition {res.partition!r} "
                                  f"(partitions: {known})")
    return res


class TrainJob(submitit.helpers.Checkpointable):
    """The submitted callable: one rank of a training run.

    Holds the resolved config as plain data, so a job requeued with newer code still
    validates it. ``checkpoint()`` (submitit's, from Checkpointable) resubmits this same
    object: nothing in it changes while training, all progress is in the run's checkpoints.
    """

    def __init__(self, config: dict[str, Any], workdir: str, device: str = "cpu", threads: int = 1,
                 in_process: bool = False) -> None:
        self.config = config
        self.workdir = workdir
        self.device = device
        self.threads = threads
        self.in_process = in_process

    def __call__(self) -> dict[str, Any]:
        import torch

        from gppq_dist.distributed import init_distributed, shutdown
        from gppq_dist import progress
        from gppq_dist.progress import setup_logging
        from gppq_dist.methods import run as run_method

        os.chdir(self.workdir)  # the config's relative paths are relative to where it was submitted
        job: dict[str, Any] = {"cluster": "debug", "restarts": 0}
        if not self.in_process:
            env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                       overwrite=True)
            setup_logging()
            logging.getLogger("submitit").propagate = False  # it has its own handler: no doubled lines
            if not progress.console.is_terminal:  # the job's log is a file: whole lines, not 80 columns
                progress.console.width = max(progress.console.width, 160)
            torch.set_num_threads(self.threads)
            job_env = submitit.JobEnvironment()
            job = {"cluster": job_env.cluster, "id": job_env.job_id, "rank": env.rank,
                   "world_size": env.world_size, "master": f"{env.master_addr}:{env.master_port}",
                   "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
            if job["restarts"]:
                log.info("job %s was requeued (restart %d): continuing from the newest checkpoint",
                         job["id"], job["restarts"])
        cfg = validate_config(self.config, source="the submitted config")
        context = init_distributed("auto" if self.in_process else self.device)
        try:
            summary = run_method(cfg, context, resume=True)
        except UserError as exc:
            if not self.in_process:  # the job's log says why; in process, the CLI does
                log.error("error: %s", exc)
            raise
        finally:
            shutdown()
        return {**summary, "job": job}


def make_executor(cluster: str, res: Resources, name: str, array_parallelism: int | None = None):
    """A submitit executor for ``cluster`` with ``res``; logs in ``<launch.folder>/<job id>/``."""
    folder = Path(res.folder) / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as exc:  # no srun: not a SLURM submit host
        raise UserError(f"--cluster {cluster}: {exc}") from None
    params: dict[str, Any] = dict(name=name, timeout_min=res.timeout_min, nodes=res.nodes,
                                  tasks_per_node=res.tasks_per_node, cpus_per_task=res.cpus_per_task,
                                  mem_gb=res.mem_gb)
    if res.gpus_per_node:  # no --gpus-per-node=0: sites without GPU gres refuse it
        params["gpus_per_node"] = res.gpus_per_node
    if cluster == "slurm":
        params["slurm_partition"] = res.partition
        for key in ("account", "qos", "constraint"):
            if getattr(res, key) is not None:
                params[f"slurm_{key}"] = getattr(res, key)
        if res.sbatch:
            params["slurm_additional_parameters"] = dict(res.sbatch)
        if array_parallelism is not None:
            params["slurm_array_parallelism"] = array_parallelism
    executor.update_parameters(**params)
    return executor


def make_job(cfg: RunConfig, cluster: str, res: Resources) -> TrainJob:
    return TrainJob(cfg.model_dump(mode="json"), workdir=os.getcwd(), device=res.device,
                    threads=res.cpus_per_task, in_process=cluster == "debug")


def submit_run(cfg: RunConfig, cluster: str):
    """Submit one training run; returns the submitit job (debug: not yet run, see wait_for)."""
    res = check_resources(cfg, cluster)
    if cluster == "debug" and res.world_size > 1:
        log.warning("--cluster debug runs in this process: 1 task instead of %d", res.world_size)
    executor = make_executor(cluster, res, cfg.name)
    return submit_guarded(executor.submit, make_job(cfg, cluster, res))


def submit_guarded(submit, *args):
    """Call an executor's submit, turning sbatch's refusal into one error line."""
    try:
        return submit(*args)
    except FailedJobError as exc:  # sbatch exited non-zero; its stderr is the message
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise UserError(f"sbatch refused the job: {lines[-1] if lines else exc}") from None


def log_file(job) -> Path:
    """Task 0's stderr log (where the trainer logs)."""
    return Path(job.task(0).paths.stderr) if job.num_tasks > 1 else Path(job.paths.stderr)


def wait_for(job) -> list[dict[str, Any]]:
    """Wait for ``job`` and return every task's result (one per rank); JobFailed otherwise."""
    if isinstance(job, submitit.DebugJob):
        # DebugJob.results() drops into pdb on an exception; run the submission directly so
        # that a mistake in the run stays one error line.
        return [job.submission().result()]
    try:
        job.wait()
        if isinstance(job, submitit.SlurmJob):
            # After a requeue, ranks of the interrupted incarnation may have left error
            # results that the last one overwrites when it ends: read them once SLURM says
            # the whole job has ended.
            while job.get_info(mode="force").get("State", "UNKNOWN").split()[0] in ACTIVE_STATES:
                time.sleep(2)
        return job.results()
    except UncompletedJobError as exc:
        raise JobFailed(f"job {job.job_id} {_failure(exc)} (log: {log_file(job)})") from None


def _failure(exc: Exception) -> str:
    """The last line of the job's traceback, e.g. 'failed: DataError: data.root ...'."""
    text = str(exc)
    blocks = re.split(r"\n-{10,}\n", text)
    if isinstance(exc, FailedJobError) and len(blocks) >= 3:
        lines = [line.strip() for line in blocks[1].splitlines() if line.strip()]
        if lines:  # 'gppq_dist.errors.DataError: ...' -> 'DataError: ...'
            return "failed: " + re.sub(r"^(\w+\.)+(?=\w+:)", "", lines[-1])
    first = next((line for line in text.splitlines() if line.strip()), "no result")
    return f"ended without a result: {first}"
