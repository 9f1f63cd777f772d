"""``gppq submit`` and ``gppq sweep``: training runs as submitit jobs.

Registered on the main app by :func:`register`; submitit and MLflow are imported only when
a command runs, so the rest of the command line starts as fast as before.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from gppq_dist.commands import ConfigOption, SetOption
from gppq_dist.methods import result_line

CLUSTERS = "slurm|local|debug"
CLUSTER_HELP = "slurm (sbatch), local (processes on this machine, in the background) or debug (in this process)"


def _say(text: str = "") -> None:
    # plain text, not rich: paths and names may hold [brackets] that rich would read as markup
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _main_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's summary (the one that wrote the artifact)."""
    return next((r for r in results if isinstance(r, dict) and "artifact" in r), results[0])


def _tracking_line(cfg, uri: str | None) -> str:
    if not cfg.tracking.enabled:
        return "MLflow: off (tracking.enabled: false)"
    return f"MLflow: experiment '{cfg.tracking.experiment}' at {uri}"


def submit(
    config: Path = ConfigOption,
    cluster: str = typer.Option("slurm", "--cluster", metavar=CLUSTERS, help=CLUSTER_HELP),
    nodes: Optional[int] = typer.Option(None, "--nodes", min=1, metavar="N", help="nodes (default: launch.nodes)"),
    gpus_per_node: Optional[int] = typer.Option(
        None, "--gpus-per-node", min=0, metavar="G",
        help="GPUs per node, one task each; 0: CPU job (default: launch.gpus_per_node)"),
    cpu_tasks_per_node: Optional[int] = typer.Option(
        None, "--cpu-tasks-per-node", min=1, metavar="T",
        help="tasks per node of a CPU job (default: launch.cpu_tasks_per_node)"),
    partition: Optional[str] = typer.Option(None, "--partition", metavar="P",
                                            help="SLURM partition (default: launch.partition)"),
    account: Optional[str] = typer.Option(None, "--account", metavar="A",
                                          help="SLURM account (default: launch.account)"),
    qos: Optional[str] = typer.Option(None, "--qos", metavar="Q",
                                      help="SLURM quality of service (default: launch.qos)"),
    constraint: Optional[str] = typer.Option(
        None, "--constraint", metavar="C", help="SLURM node features, e.g. 'a100&ib' (default: launch.constraint)"),
    timeout_min: Optional[int] = typer.Option(
        None, "--timeout-min", min=1, metavar="M",
        help="time limit of one slot; the job then requeues itself (default: launch.timeout_min)"),
    sets: Optional[list[str]] = SetOption,
    wait: bool = typer.Option(False, "--wait", help="wait for the job and print its result (debug always does)"),
) -> None:
    """Submit one training run (gppq train) as a submitit job; it resumes after preemption.

    One task per GPU (--gpus-per-node) or launch.cpu_tasks_per_node tasks for CPU jobs,
    on --nodes nodes; every task is one rank. The job trains with --resume auto, so a
    requeued job continues from its newest checkpoint. Other sbatch options: launch.sbatch
    (e.g. --set launch.sbatch.exclude=node01).
    """
    from gppq_dist.config import load_config, parse_overrides
    from gppq_dist.launch.submit import Resources, log_file, pin_tracking_uri, submit_run, tracking_uri, wait_for

    flags = {"launch.nodes": nodes, "launch.gpus_per_node": gpus_per_node,
             "launch.cpu_tasks_per_node": cpu_tasks_per_node, "launch.partition": partition,
             "launch.timeout_min": timeout_min, "launch.account": account, "launch.qos": qos,
             "launch.constraint": constraint}
    overrides = {**parse_overrides(sets or []), **{k: v for k, v in flags.items() if v is not None}}
    cfg = pin_tracking_uri(load_config(config, overrides))
    job = submit_run(cfg, cluster)
    res = Resources.of(cfg)
    if cluster == "debug":
        _say(f"running '{cfg.name}' in this process (--cluster debug)")
    else:
        _say(f"submitted '{cfg.name}' as {cluster} job {job.job_id}: {res.describe()}")
        _say(f"  logs:   {job.paths.folder} (rank 0: {log_file(job).name})")
    _say(f"  run:    {cfg.run_dir}")
    _say(f"  {_tracking_line(cfg, tracking_uri(cfg))}")
    if cluster == "local" and not wait:
        _say("  the job's processes run on in the background after this command returns")
    if not (wait or cluster == "debug"):
        return
    summary = _main_result(wait_for(job))
    _say(result_line(summary))


def sweep(
    config: Path = typer.Option(..., "--config", "-c", metavar="SWEEP",
                                help="sweep file (YAML): base config and grid"),
    cluster: str = typer.Option("slurm", "--cluster", metavar=CLUSTERS, help=CLUSTER_HELP),
    sets: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                             help="override a key of every point: KEY=VALUE"),
    parallelism: Optional[int] = typer.Option(
        None, "--parallelism", min=1, metavar="P",
        help="array jobs running at once (default: the file's parallelism, else all)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check and list the points, submit nothing"),
    wait: bool = typer.Option(False, "--wait", help="wait for every job and print the results (debug always does)"),
) -> None:
    """Submit a grid of runs (configs/sweeps/*.yaml) as one job array under one MLflow parent run.

    Each point is its own run, named <base name>_<point>, and a child of the parent run.
    The parent run ends when the array is submitted, or with --wait when every job has
    ended (FAILED if one failed).
    """
    from gppq_dist.config import parse_overrides
    from gppq_dist.errors import UserError
    from gppq_dist.launch.submit import JobFailed, wait_for
    from gppq_dist.launch.sweep import load_sweep, submit_sweep, update_parent_run

    swept = load_sweep(config)
    done = submit_sweep(swept, cluster, parse_overrides(sets or []), parallelism, dry_run)
    first = done.points[0].cfg
    grid = "; ".join(f"{key}: {', '.join(map(str, values))}" for key, values in swept.grid.items())
    _say(f"sweep {swept.name}: {len(done.points)} runs of {swept.base} ({grid})")
    width = max(len(point.name) for point in done.points)
    for index, point in enumerate(done.points):
        job = f"  job {done.jobs[index].job_id}" if done.jobs and cluster != "debug" else ""
        _say(f"  {point.name:<{width}}{job}".rstrip())
    if dry_run:
        _say(f"dry run: nothing submitted ({done.resources.describe()} per run)")
        return
    if cluster != "debug":
        array = ", ".join(sorted({str(job.job_id).split("_")[0] for job in done.jobs}))
        at_once = f"at most {done.parallelism} at a time" if cluster == "slurm" else "all at once"
        _say(f"submitted {cluster} job(s) {array}: {len(done.jobs)} runs, {at_once}, "
             f"{done.resources.describe()} each; logs in {Path(first.launch.folder)}/<job id>/")
    _say(_tracking_line(first, done.uri) + (f", parent run {done.parent_run_id}" if done.parent_run_id else ""))
    if not (wait or cluster == "debug"):
        if done.parent_run_id:
            update_parent_run(done.uri, done.parent_run_id, "FINISHED", **{"gppq.state": "submitted"})
        return
    failures = []
    for point, job in zip(done.points, done.jobs):
        try:
            _say(f"{point.name}: {result_line(_main_result(wait_for(job)))}")
        except UserError as exc:  # JobFailed, or the run's own error in --cluster debug
            failures.append(str(exc))
            _say(f"{point.name}: {exc}")
    if done.parent_run_id:
        update_parent_run(done.uri, done.parent_run_id, "FAILED" if failures else "FINISHED",
                          **{"gppq.state": f"{len(done.jobs) - len(failures)} of {len(done.jobs)} runs done"})
    if failures:
        raise JobFailed(f"{len(failures)} of {len(done.jobs)} runs failed; the first: {failures[0]}")


def register(app: typer.Typer) -> None:
    """Add ``submit`` and ``sweep`` to the ``gppq`` app."""
    app.command("submit")(submit)
    app.command("sweep")(sweep)
