"""`gppq submit`, `gppq sweep` and launch/slurm_sbatch.sh against a real SLURM (see conftest).

Every SLURM run is checked bit for bit against the LocalExecutor reference run, so a job
that was preempted and requeued must end exactly where the uninterrupted run ended.
"""

import os
import re
import subprocess
import sys

import pytest
import submitit
import yaml

from tests.conftest import ROOT, gppq_here
from tests.launch.conftest import STEPS_PER_EPOCH, TIMEOUT_MIN, launch_config, summary_of
from tests.launch.slurm_cluster import poll
from tests.train.test_trainer import assert_same_model

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def final_state(slurm, job_id: str, deadline_s: float = 300) -> str:
    return poll(lambda: (state := slurm.job_field(job_id, "JobState")) in FINAL_STATES and state, deadline_s,
                f"job {job_id} ending", 0.5)


def first_checkpoint(run_dir, deadline_s: float = 300):
    return poll(lambda: sorted((run_dir / "checkpoints").glob("step_*.pt")), deadline_s,
                f"a checkpoint in {run_dir}")[0]


def submit(config, cwd, *extra):
    result = gppq_here("submit", "--config", config, "--cluster", "slurm", "--cpu-tasks-per-node", "2",
                       "--timeout-min", TIMEOUT_MIN, *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result, re.search(r"as slurm job (\d+): 1 node\(s\) x 2 CPU task\(s\)", result.stdout).group(1)


def test_submit_two_task_job(tmp_path, slurm_env, digits_dir, local_reference):
    config = launch_config(tmp_path, digits_dir, "two")
    result, job_id = submit(config, tmp_path, "--wait", "--account", "vision", "--constraint", "gppqtest",
                            "--set", "launch.sbatch={comment: gppq-two, exclusive: true}")
    assert final_state(slurm_env, job_id) == "COMPLETED"
    assert slurm_env.job_field(job_id, "NumTasks") == "2"
    # launch.account / constraint / sbatch reached sbatch through submitit
    assert slurm_env.job_field(job_id, "Account") == "vision"
    assert slurm_env.job_field(job_id, "Features") == "gppqtest"
    assert slurm_env.job_field(job_id, "Comment") == "gppq-two"
    assert slurm_env.job_field(job_id, "OverSubscribe") == "NO"  # --exclusive
    summary = summary_of(tmp_path, "two")
    assert summary["world_size"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH
    assert f"{tmp_path / 'runs' / 'two' / 'gppq.gppq'}: top-1" in result.stdout
    assert f"logs:   {tmp_path / 'submitit' / job_id}" in result.stdout
    # submitit's environment became torch.distributed's: 2 ranks met at one rendezvous
    log = (tmp_path / "submitit" / job_id / f"{job_id}_0_log.err").read_text()
    assert "joined process group: rank 0 of 2 (gloo)" in log
    assert_same_model(local_reference.artifact, tmp_path / "runs" / "two" / "gppq.gppq")


def test_preempted_job_requeues_and_resumes_where_it_stopped(tmp_path, slurm_env, digits_dir, local_reference):
    config = launch_config(tmp_path, digits_dir, "preempted")
    _, job_id = submit(config, tmp_path)
    run_dir = tmp_path / "runs" / "preempted"
    first = first_checkpoint(run_dir)
    job = submitit.SlurmJob(folder=tmp_path / "submitit" / "%j", job_id=job_id, tasks=[0, 1])
    job._interrupt()  # a preemption as SLURM delivers it: SIGTERM, then submitit's USR2
    poll(lambda: slurm_env.job_field(job_id, "Restarts") == "1", 120, f"job {job_id} requeued")
    assert final_state(slurm_env, job_id) == "COMPLETED"
    results = job.results()
    assert [r["job"]["restarts"] for r in results] == [1, 1]
    assert [r["job"]["rank"] for r in results] == [0, 1]
    log = job.task(0).stderr()
    assert "this job is preempted" in log and "Requeued job" in job.task(0).stdout()  # submitit's lines
    assert f"job {job_id} was requeued (restart 1)" in log
    summary = summary_of(tmp_path, "preempted")
    # it stopped mid-run and went on from a checkpoint at or after the first one
    resumed = re.search(r"step_(\d+)\.pt$", summary["resumed_from"])
    assert int(first.stem.split("_")[1]) <= int(resumed.group(1)) < 2 * STEPS_PER_EPOCH
    assert re.search(rf"resuming from\s+{re.escape(summary['resumed_from'])}", log)
    assert summary["world_size"] == 2 and summary["history"] == local_reference.summary["history"]
    assert_same_model(local_reference.artifact, run_dir / "gppq.gppq")


def test_sweep_is_one_array_under_one_parent_run(tmp_path, slurm_env, digits_dir):
    from mlflow.tracking import MlflowClient

    base = launch_config(tmp_path, digits_dir, "base", tracked=True, epochs=1, checkpoint_every=0)
    sweep = tmp_path / "k.yaml"
    sweep.write_text(yaml.safe_dump({"base": base.name, "name": "k2",
                                     "grid": {"quantization.types.conv3x3.k": [64, 256]}}))
    result = gppq_here("sweep", "--config", sweep, "--cluster", "slurm", "--wait", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = ["base_k64", "base_k256"]
    jobs = dict(re.findall(r"^  (\S+)\s+job (\d+_\d+)$", result.stdout, re.M))
    assert list(jobs) == names
    arrays = {job.split("_")[0] for job in jobs.values()}
    assert len(arrays) == 1 and sorted(job.split("_")[1] for job in jobs.values()) == ["0", "1"]
    array = arrays.pop()
    assert slurm_env.job_field(f"{array}_0", "ArrayTaskThrottle") == "2"
    for job_id in jobs.values():
        assert final_state(slurm_env, job_id) == "COMPLETED"
    sizes = []
    parent = re.search(r"MLflow: experiment 'launch-tests' at (\S+), parent run (\w+)", result.stdout)
    uri, parent_id = parent.groups()
    for name, k in zip(names, (64, 256)):
        summary = summary_of(tmp_path, name)
        assert summary["world_size"] == 1 and summary["steps"] == STEPS_PER_EPOCH
        saved = yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())
        assert saved["quantization"]["types"]["conv3x3"]["k"] == k
        assert saved["tracking"] == {**saved["tracking"], "parent_run_id": parent_id, "run_name": name, "uri": uri}
        assert f"{name}: {tmp_path / 'runs' / name / 'gppq.gppq'}: top-1" in result.stdout
        sizes.append(summary["size_mb"])
    assert sizes == sorted(sizes) and len(set(sizes)) == 2  # more codewords, more bytes

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(parent_id)
    assert run.info.run_name == "k2" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "launch-tests"
    assert run.data.tags["gppq.kind"] == "sweep" and run.data.tags["gppq.job_ids"] == array
    assert run.data.tags["gppq.points"] == "2" and run.data.tags["gppq.state"] == "2 of 2 runs done"
    assert run.data.params["quantization.types.conv3x3.k"] == "[64, 256]"
    # every point is a child run of the parent (the trainer's tracker honours tracking.parent_run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(child.info.run_name for child in children) == sorted(names)
    assert {child.info.status for child in children} == {"FINISHED"}


def test_sbatch_script_requeues_before_the_time_limit(tmp_path, slurm_env, digits_dir, local_reference):
    """launch/slurm_sbatch.sh: sbatch + srun + torchrun; its USR1 trap (sent by --signal=B:USR1@120
    before the time limit) requeues the job, which resumes from its newest checkpoint."""
    config = launch_config(tmp_path, digits_dir, "sbatch")
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--time={TIMEOUT_MIN}",
         f"--output={tmp_path}/%j.out", str(ROOT / "launch" / "slurm_sbatch.sh"), "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    run_dir = tmp_path / "runs" / "sbatch"
    first_checkpoint(run_dir)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=60)
    poll(lambda: slurm_env.job_field(job_id, "Restarts") == "1", 120, f"job {job_id} requeued")
    assert final_state(slurm_env, job_id) == "COMPLETED"
    log = (tmp_path / f"{job_id}.out").read_text()
    assert f"gppq: job {job_id} (restart 0): 1 node(s) x 2 rank(s)" in log
    assert f"gppq: job {job_id} is near its time limit: requeueing it" in log
    assert f"gppq: job {job_id} (restart 1)" in log and "resuming from" in log
    summary = summary_of(tmp_path, "sbatch")
    assert summary["world_size"] == 2 and summary["resumed_from"] is not None
    assert_same_model(local_reference.artifact, run_dir / "gppq.gppq")


def test_unknown_partition_is_refused_before_submitting(tmp_path, slurm_env, digits_dir):
    config = launch_config(tmp_path, digits_dir, "nowhere")
    result = gppq_here("submit", "--config", config, "--cluster", "slurm", "--partition", "gpu-a100", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: launch.partition: SLURM has no partition 'gpu-a100' (partitions: debug)"
    assert not (tmp_path / "submitit").exists()
